//! The modality generator: a distilled latent diffusion model (SD-Turbo layout) on ONNX Runtime.
//!
//! Conditioning → UNet denoising steps (see [`super::DiffusionSampler`]) → VAE decoder → RGB8 image.
//! Conditioning comes either from the text encoder on a prompt (CLIP tokenizer from a
//! `tokenizer.json`), or from the output projector on the LLM's hidden states at the signal tokens.
//! Every model fact (tensor names, widths, scaling, sizes, defaults) comes from the manifest's
//! `[generator]` section; sessions use the same execution providers and fallback as the encoder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::diffusion::{gaussian_noise, DiffusionSampler};
use crate::cache::{self, CacheError};
use crate::frame::RgbImage;
use crate::manifest::SamplerKind;
use crate::manifest::{GeneratorSpec, Manifest};
use crate::onnx::{Element, Input, OnnxError, OnnxRuntime, OnnxSession};
use crate::util::ms_since;

/// An error from the generator, naming what is wrong and what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeneratorError {
    /// The model manifest has no `[generator]` section.
    #[error("no generator is configured: the model manifest {0} has no [generator] section")]
    NotConfigured(String),
    /// Image generation is switched off in the config.
    #[error("image generation is disabled (`generator.enabled = false` in the config)")]
    Disabled,
    /// A model file is missing or differs from the manifest.
    #[error(transparent)]
    File(#[from] CacheError),
    /// ONNX Runtime or a model's signature.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The tokenizer file cannot be used.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A request that is out of range.
    #[error("{0}")]
    Request(String),
    /// A model produced a tensor of an unexpected shape.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// Which tensor.
        what: &'static str,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape it had.
        got: Vec<usize>,
    },
    /// The output projector is not in the manifest.
    #[error("the model manifest names no generator.output_projector, so images cannot be conditioned on the LLM's hidden states")]
    NoOutputProjector,
    /// Too little memory to load the generator now.
    #[error("not enough memory to load the generator: {available_mib} MiB available, generator.min_free_mib is {required_mib}")]
    Memory {
        /// MemAvailable.
        available_mib: u64,
        /// The configured floor.
        required_mib: u64,
    },
    /// A prompt that cannot be rendered.
    #[error(transparent)]
    Prompt(#[from] PromptError),
}

/// One render's settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RenderOptions {
    /// Seed of the initial noise (and of LCM's noise between steps).
    pub seed: u64,
    /// Denoising steps.
    pub steps: usize,
    /// `[height, width]` in pixels.
    pub size: [usize; 2],
    /// Classifier-free guidance scale; 1 or less: off.
    pub guidance: f32,
    /// The sampler.
    pub sampler: SamplerKind,
}

/// Limits on requests (from the config).
#[derive(Debug, Clone, Copy)]
pub struct RenderLimits {
    /// Most steps.
    pub max_steps: usize,
    /// Largest side in pixels.
    pub max_side: usize,
    /// Longest prompt in characters (`generator.max_prompt_chars`).
    pub max_prompt_chars: usize,
}

/// What a request (CLI or MQTT) may change of the manifest's defaults; `None` keeps the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderRequest {
    /// Noise seed.
    pub seed: Option<u64>,
    /// Denoising steps.
    pub steps: Option<usize>,
    /// Image width in pixels.
    pub width: Option<usize>,
    /// Image height in pixels.
    pub height: Option<usize>,
    /// Classifier-free guidance scale.
    pub guidance: Option<f32>,
    /// The sampler.
    pub sampler: Option<SamplerKind>,
}

impl RenderRequest {
    /// The manifest's defaults with this request's changes, checked against the model and `limits`.
    /// `seed` is used when the request gives none.
    pub fn options(
        &self,
        spec: &GeneratorSpec,
        limits: RenderLimits,
        seed: u64,
    ) -> Result<RenderOptions, GeneratorError> {
        let mut options = Generator::default_options(spec, self.seed.unwrap_or(seed));
        options.steps = self.steps.unwrap_or(options.steps);
        options.size = [self.height.unwrap_or(options.size[0]), self.width.unwrap_or(options.size[1])];
        options.guidance = self.guidance.unwrap_or(options.guidance);
        options.sampler = self.sampler.unwrap_or(options.sampler);
        Generator::check(spec, &options, limits)?;
        Ok(options)
    }
}

/// Checks a generation prompt: never blank (leave it out instead), given unless the scene's
/// description is rendered (`from_scene`), and at most `limit` characters.
pub fn check_prompt(prompt: Option<&str>, from_scene: bool, limit: usize) -> Result<(), PromptError> {
    match prompt {
        Some(p) if p.trim().is_empty() => Err(PromptError::Empty),
        None if !from_scene => Err(PromptError::Empty),
        Some(p) if p.chars().count() > limit => Err(PromptError::TooLong { chars: p.chars().count(), limit }),
        _ => Ok(()),
    }
}

/// A generation prompt that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptError {
    /// No prompt and nothing else to render.
    #[error(
        "the prompt is empty: give a prompt, or have the scene described and rendered (`from_scene: true` in an MQTT \
         request, `--from-image IMAGE` on the command line)"
    )]
    Empty,
    /// Longer than `generator.max_prompt_chars`.
    #[error("the prompt has {chars} characters; the limit is {limit} (generator.max_prompt_chars)")]
    TooLong {
        /// Its length.
        chars: usize,
        /// The limit.
        limit: usize,
    },
}

/// What to condition on.
#[derive(Debug, Clone, Copy)]
pub enum Conditioning<'a> {
    /// A prompt through the tokenizer and text encoder.
    Prompt(&'a str),
    /// LLM hidden states at the signal tokens, `[n, n_embd]` row-major, through the output projector.
    Hidden {
        /// The states.
        states: &'a [f32],
        /// Their width (the LLM's n_embd).
        n_embd: usize,
    },
}

/// Milliseconds per stage of one render.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RenderTimings {
    /// Tokenizer + text encoder, or the output projector.
    pub condition_ms: f64,
    /// Each UNet step (including CFG's second half).
    pub step_ms: Vec<f64>,
    /// VAE decoder.
    pub vae_ms: f64,
    /// Everything.
    pub total_ms: f64,
}

/// A rendered image.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The prompt was cut at the tokenizer's limit of this many tokens (see [`Rendered::warning`]).
    pub context_tokens: usize,
    /// The image.
    pub image: RgbImage,
    /// Prompt tokens used (after truncation), including BOS and EOS; 0 for hidden-state conditioning.
    pub prompt_tokens: usize,
    /// How many prompt tokens were cut off at the tokenizer's limit.
    pub truncated_tokens: usize,
    /// Timings.
    pub timings: RenderTimings,
}

impl Rendered {
    /// The warning for the requester when the prompt was cut at the tokenizer's limit.
    pub fn warning(&self) -> Option<String> {
        (self.truncated_tokens > 0).then(|| {
            format!(
                "the prompt was cut to the tokenizer's limit of {} tokens ({} tokens dropped)",
                self.context_tokens, self.truncated_tokens
            )
        })
    }
}

/// The loaded generator.
pub struct Generator {
    spec: GeneratorSpec,
    tokenizer: tokenizers::Tokenizer,
    tokenizer_path: PathBuf,
    text_encoder: OnnxSession,
    unet: OnnxSession,
    vae: OnnxSession,
    output_projector: Option<OnnxSession>,
    ids_element: Element,
    timestep_element: Element,
    /// The unconditional embedding for guidance (the empty prompt), made on first use.
    uncond: Option<Vec<f32>>,
    load_ms: f64,
}

impl Generator {
    /// Loads the tokenizer and the ONNX models the manifest's `[generator]` names, checking each
    /// model's inputs and outputs.
    pub fn load(runtime: &OnnxRuntime, manifest: &Manifest, cache_root: &Path) -> Result<Self, GeneratorError> {
        let start = Instant::now();
        let spec = manifest.generator.clone().ok_or_else(|| GeneratorError::NotConfigured(manifest.origin.clone()))?;
        let file = |f: &crate::manifest::FileRef, what: &str| -> Result<PathBuf, GeneratorError> {
            let path = manifest.resolve(f, cache_root);
            cache::verify(&path, what, f.size, None)?;
            Ok(path)
        };
        let tokenizer_path = file(&spec.tokenizer, "the generator's tokenizer.json")?;
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| GeneratorError::Tokenizer { path: tokenizer_path.clone(), reason: e.to_string() })?;
        let ints = &[Element::I32, Element::I64][..];
        let float = &[Element::F32][..];
        let te = &spec.text_encoder;
        let text_encoder = runtime.session(&file(&te.file, "the text encoder ONNX model")?, "the text encoder")?;
        text_encoder.check_io(&[(&te.input, ints, 2)], &[(&te.output, float, 3)])?;
        let u = &spec.unet;
        let unet = runtime.session(&file(&u.file, "the UNet ONNX model")?, "the UNet")?;
        unet.check_io(
            &[(&u.sample, float, 4), (&u.timestep, &[Element::I64, Element::F32], 1), (&u.context, float, 3)],
            &[(&u.output, float, 4)],
        )?;
        let v = &spec.vae_decoder;
        let vae = runtime.session(&file(&v.file, "the VAE decoder ONNX model")?, "the VAE decoder")?;
        vae.check_io(&[(&v.input, float, 4)], &[(&v.output, float, 4)])?;
        let output_projector = match &spec.output_projector {
            Some(o) => {
                let session =
                    runtime.session(&file(&o.file, "the output projector ONNX model")?, "the output projector")?;
                session.check_io(&[(&o.input, float, 2)], &[(&o.output, float, 3)])?;
                Some(session)
            }
            None => None,
        };
        let ids_element = text_encoder.io_type(&te.input).map_or(Element::I64, |t| t.0);
        let timestep_element = unet.io_type(&u.timestep).map_or(Element::I64, |t| t.0);
        if spec.random {
            tracing::warn!(
                "the generator's weights are randomly initialised test weights: its images are noise by design"
            );
        }
        let mut generator = Generator {
            spec,
            tokenizer,
            tokenizer_path,
            text_encoder,
            unet,
            vae,
            output_projector,
            ids_element,
            timestep_element,
            uncond: None,
            load_ms: 0.0,
        };
        generator.load_ms = ms_since(start);
        tracing::info!(ms = generator.load_ms, "generator loaded");
        Ok(generator)
    }

    /// How long loading took.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// The manifest's generator section.
    pub fn spec(&self) -> &GeneratorSpec {
        &self.spec
    }

    /// Whether hidden-state conditioning is available.
    pub fn has_output_projector(&self) -> bool {
        self.output_projector.is_some()
    }

    /// The manifest's defaults, with `seed`.
    pub fn default_options(spec: &GeneratorSpec, seed: u64) -> RenderOptions {
        RenderOptions { seed, steps: spec.steps, size: spec.size, guidance: spec.guidance, sampler: spec.sampler }
    }

    /// Checks `options` against the model and `limits`; the error says what is allowed.
    pub fn check(spec: &GeneratorSpec, options: &RenderOptions, limits: RenderLimits) -> Result<(), GeneratorError> {
        if options.steps == 0 || options.steps > limits.max_steps {
            return Err(GeneratorError::Request(format!(
                "steps {} is out of range: expected 1 to {}",
                options.steps, limits.max_steps
            )));
        }
        let m = spec.size_multiple;
        for side in options.size {
            if side == 0 || side % m != 0 || side > limits.max_side {
                return Err(GeneratorError::Request(format!(
                    "size {}x{} is out of range: each side must be a multiple of {m} between {m} and {}",
                    options.size[1], options.size[0], limits.max_side
                )));
            }
        }
        if !options.guidance.is_finite() || options.guidance < 0.0 || options.guidance > 30.0 {
            return Err(GeneratorError::Request(format!(
                "guidance {} is out of range: expected 0 to 30",
                options.guidance
            )));
        }
        Ok(())
    }

    /// Token ids for `prompt`, padded to `context_tokens`: (ids, tokens used, tokens cut off).
    pub fn tokenize(&self, prompt: &str) -> Result<(Vec<i64>, usize, usize), GeneratorError> {
        let bad = |reason: String| GeneratorError::Tokenizer { path: self.tokenizer_path.clone(), reason };
        let encoding = self.tokenizer.encode(prompt, true).map_err(|e| bad(e.to_string()))?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        let n = self.spec.context_tokens;
        let mut truncated = 0;
        if ids.len() > n {
            // Keep BOS and the first n - 2 tokens of the text, and end with EOS as the model was trained.
            truncated = ids.len() - n;
            let eos = *ids.last().expect("longer than n");
            ids.truncate(n - 1);
            ids.push(eos);
        }
        let used = ids.len();
        ids.resize(n, i64::from(self.spec.pad_token));
        Ok((ids, used, truncated))
    }

    /// Text-encoder conditioning `[context_tokens * text_width]` for `prompt`.
    fn encode_prompt(&mut self, prompt: &str) -> Result<(Vec<f32>, usize, usize), GeneratorError> {
        let (ids, used, truncated) = self.tokenize(prompt)?;
        let shape = [1, self.spec.context_tokens];
        let ids32: Vec<i32>;
        let input = match self.ids_element {
            Element::I32 => {
                ids32 = ids.iter().map(|&i| i as i32).collect();
                Input::I32(&ids32)
            }
            _ => Input::I64(&ids),
        };
        let mut out = Vec::new();
        let got = self.text_encoder.run(
            &[(&self.spec.text_encoder.input, &shape, input)],
            &self.spec.text_encoder.output,
            &mut out,
        )?;
        let expected = vec![1, self.spec.context_tokens, self.spec.text_width];
        if got != expected {
            return Err(GeneratorError::Shape { what: "text encoder output", expected, got });
        }
        Ok((out, used, truncated))
    }

    /// Output-projector conditioning from LLM hidden states.
    fn project_states(&mut self, states: &[f32], n_embd: usize) -> Result<Vec<f32>, GeneratorError> {
        let spec = self.spec.output_projector.clone().ok_or(GeneratorError::NoOutputProjector)?;
        let session = self.output_projector.as_mut().ok_or(GeneratorError::NoOutputProjector)?;
        if n_embd == 0 || states.is_empty() || !states.len().is_multiple_of(n_embd) {
            return Err(GeneratorError::Request(format!(
                "hidden states of {} values are not rows of the LLM's width {n_embd}",
                states.len()
            )));
        }
        let mut out = Vec::new();
        let got = session.run(
            &[(&spec.input, &[states.len() / n_embd, n_embd], Input::F32(states))],
            &spec.output,
            &mut out,
        )?;
        let expected = vec![1, self.spec.context_tokens, self.spec.text_width];
        if got != expected {
            return Err(GeneratorError::Shape { what: "output projector output", expected, got });
        }
        Ok(out)
    }

    /// Renders one image.
    pub fn render(
        &mut self,
        conditioning: Conditioning<'_>,
        options: &RenderOptions,
    ) -> Result<Rendered, GeneratorError> {
        let start = Instant::now();
        let (cond, prompt_tokens, truncated_tokens) = match conditioning {
            Conditioning::Prompt(prompt) => self.encode_prompt(prompt)?,
            Conditioning::Hidden { states, n_embd } => (self.project_states(states, n_embd)?, 0, 0),
        };
        let guided = options.guidance > 1.0;
        let context = if guided {
            if self.uncond.is_none() {
                self.uncond = Some(self.encode_prompt("")?.0);
            }
            let mut both = self.uncond.clone().expect("set above");
            both.extend_from_slice(&cond);
            both
        } else {
            cond
        };
        let condition_ms = ms_since(start);

        let spec = &self.spec;
        let [height, width] = options.size;
        let (lh, lw, ch) = (height / spec.vae_scale, width / spec.vae_scale, spec.latent_channels);
        let n = ch * lh * lw;
        let sampler = DiffusionSampler::new(options.sampler, &spec.schedule, options.steps);
        let sigma0 = sampler.init_noise_sigma() as f32;
        let mut latents: Vec<f32> = gaussian_noise(options.seed, n).into_iter().map(|x| x * sigma0).collect();
        let batch = if guided { 2 } else { 1 };
        let sample_shape = [batch, ch, lh, lw];
        let context_shape = [batch, spec.context_tokens, spec.text_width];
        let (mut scaled, mut input, mut eps) = (Vec::new(), Vec::with_capacity(n * batch), Vec::new());
        let mut step_ms = Vec::with_capacity(options.steps);
        for (i, &t) in sampler.timesteps().iter().enumerate() {
            let step_start = Instant::now();
            sampler.scale_input(&latents, i, &mut scaled);
            input.clear();
            for _ in 0..batch {
                input.extend_from_slice(&scaled);
            }
            let (t64, t32) = (vec![t as i64; batch], vec![t as f32; batch]);
            let timestep = if self.timestep_element == Element::F32 { Input::F32(&t32) } else { Input::I64(&t64) };
            let u = &spec.unet;
            let got = self.unet.run(
                &[
                    (&u.sample, &sample_shape, Input::F32(&input)),
                    (&u.timestep, &[batch], timestep),
                    (&u.context, &context_shape, Input::F32(&context)),
                ],
                &u.output,
                &mut eps,
            )?;
            if got != sample_shape {
                return Err(GeneratorError::Shape { what: "UNet output", expected: sample_shape.to_vec(), got });
            }
            if guided {
                let (uncond, cond) = eps.split_at(n);
                let g = options.guidance;
                let guided: Vec<f32> = uncond.iter().zip(cond).map(|(u, c)| u + g * (c - u)).collect();
                eps = guided;
            }
            // LCM draws fresh noise between steps: from the seed and the step, so renders repeat.
            let noise = if options.sampler == SamplerKind::Lcm {
                gaussian_noise(options.seed.wrapping_add(1 + i as u64), n)
            } else {
                Vec::new()
            };
            latents = sampler.step(&eps, i, &latents, &noise).prev;
            step_ms.push(ms_since(step_start));
        }

        let vae_start = Instant::now();
        let scale = 1.0 / spec.latent_scaling;
        latents.iter_mut().for_each(|x| *x *= scale);
        let mut pixels = Vec::new();
        let v = &spec.vae_decoder;
        let got = self.vae.run(&[(&v.input, &[1, ch, lh, lw], Input::F32(&latents))], &v.output, &mut pixels)?;
        let expected = vec![1, 3, height, width];
        if got != expected {
            return Err(GeneratorError::Shape { what: "VAE decoder output", expected, got });
        }
        let image = to_rgb8(&pixels, width, height);
        let vae_ms = ms_since(vae_start);
        Ok(Rendered {
            context_tokens: self.spec.context_tokens,
            image,
            prompt_tokens,
            truncated_tokens,
            timings: RenderTimings { condition_ms, step_ms, vae_ms, total_ms: ms_since(start) },
        })
    }
}

/// Planar `[3, h, w]` values in [-1, 1] to interleaved RGB8.
fn to_rgb8(planar: &[f32], width: usize, height: usize) -> RgbImage {
    let plane = width * height;
    let mut rgb = vec![0u8; plane * 3];
    for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
        for (c, v) in px.iter_mut().enumerate() {
            let x = planar[c * plane + i];
            *v = ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    RgbImage::from_pixels(width as u32, height as u32, rgb).expect("buffer sized for width x height")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb8_maps_minus_one_to_black_and_one_to_white() {
        // 2x1 image: pixel 0 black-ish, pixel 1 white with clamping.
        let planar = [-1.0, 1.5, -1.0, 1.0, -2.0, 0.99];
        let img = to_rgb8(&planar, 2, 1);
        assert_eq!(img.pixels(), &[0, 0, 0, 255, 255, 254]);
    }
}
