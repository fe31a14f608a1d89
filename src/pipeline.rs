//! The model stack as one unit: the one loader every command, the evaluation and the daemon use
//! (manifest → ONNX Runtime → LLM → vision, widths checked against each other), `models check`
//! as structured results, and rendering a description with the generator (text encoder or the
//! LLM's hidden states through the output projector).

use std::path::{Path, PathBuf};

use crate::cache::{self, CacheError};
use crate::frame::{ImageError, RgbImage};
use crate::generate::{ConditionPath, Conditioning, Generator, GeneratorError, RenderOptions, Rendered};
use crate::llm::{Backbone, Generation, LlmConfig, LlmError};
use crate::manifest::{FileRef, Manifest, ManifestError};
use crate::onnx::{OnnxConfig, OnnxError, OnnxRuntime, MIN_ORT_VERSION};
use crate::vision::{Detector, Encoder, ImageTokens, Projector, Vision, VisionError, VisionTimings};

/// An error loading or running the model stack.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StackError {
    /// The model manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A model file is missing or differs from the manifest.
    #[error(transparent)]
    File(#[from] CacheError),
    /// ONNX Runtime.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The encoder or the projector.
    #[error(transparent)]
    Vision(#[from] VisionError),
    /// The LLM.
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The generator.
    #[error(transparent)]
    Generate(#[from] GeneratorError),
    /// An image file.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// The captioning stack: the manifest, ONNX Runtime, the LLM and the vision path.
pub struct Pipeline {
    /// The model manifest.
    pub manifest: Manifest,
    /// Where the model files are.
    pub cache_root: PathBuf,
    /// ONNX Runtime (the generator, loaded later, shares it).
    pub runtime: OnnxRuntime,
    /// The LLM.
    pub backbone: Backbone,
    /// Encoder and projector.
    pub vision: Vision,
}

impl Pipeline {
    /// Loads the stack: ONNX Runtime, the LLM (metadata checks, adapter, chat layout), then the
    /// encoder and the projector, whose output width must equal the LLM's.
    pub fn load(manifest: Manifest, cache_root: &Path, onnx: &OnnxConfig, llm: &LlmConfig) -> Result<Self, StackError> {
        let runtime = OnnxRuntime::init(onnx, cache_root)?;
        let backbone = Backbone::load(&manifest, cache_root, llm)?;
        let vision = Vision::load(&runtime, &manifest, cache_root, Some(backbone.summary().gguf.llm_width()))?;
        Ok(Pipeline { manifest, cache_root: cache_root.to_owned(), runtime, backbone, vision })
    }

    /// Makes `image` the scene (`id`): vision, then the scene prefix into the LLM's cache. Returns
    /// the vision timings and the prefill time in ms.
    pub fn set_scene(
        &mut self,
        id: u64,
        image: &RgbImage,
        tokens: &mut ImageTokens,
    ) -> Result<(VisionTimings, f64), StackError> {
        let timings = self.vision.run(image, tokens)?;
        let prefill_ms = self.backbone.set_scene(id, Some(tokens))?;
        Ok((timings, prefill_ms))
    }

    /// Captions the current scene with the configured caption prompt.
    pub fn caption(&mut self) -> Result<Generation, StackError> {
        let (prompt, options) = (self.backbone.caption_prompt().to_owned(), self.backbone.default_options());
        Ok(self.backbone.describe(&prompt, &options, &mut |_| true)?)
    }
}

/// Renders `text` with the generator: through the text encoder, or (`ConditionPath::Hidden`)
/// through the LLM's hidden states at the manifest's signal tokens and the output projector.
/// `question` is the prompt the description answers (the caption prompt).
pub fn render_description(
    backbone: &mut Backbone,
    generator: &mut Generator,
    condition: ConditionPath,
    question: &str,
    text: &str,
    options: &RenderOptions,
) -> Result<Rendered, StackError> {
    match condition {
        ConditionPath::Text => Ok(generator.render(Conditioning::Prompt(text), options)?),
        ConditionPath::Hidden => {
            let signal =
                generator.spec().output_projector.as_ref().ok_or(GeneratorError::NoOutputProjector)?.signal.clone();
            let states = backbone.signal_states(question, text, &signal)?;
            let n_embd = backbone.summary().gguf.n_embd;
            Ok(generator.render(Conditioning::Hidden { states: &states, n_embd }, options)?)
        }
    }
}

/// One line of `models check`: a part of the stack and what was found.
#[derive(Debug)]
pub struct PartCheck {
    /// `onnxruntime`, `llm`, `encoder`, `projector` or `generator`.
    pub part: &'static str,
    /// What was checked, or why the part fails.
    pub outcome: Result<String, StackError>,
}

fn verify_file(manifest: &Manifest, file: &FileRef, root: &Path, what: &str) -> Result<PathBuf, StackError> {
    let path = manifest.resolve(file, root);
    cache::verify(&path, what, file.size, file.sha256.as_deref())?;
    Ok(path)
}

/// Checks every model part the manifest names: presence, checksums, ONNX signatures, GGUF
/// metadata, the adapter, and the widths between them. One result per part, in stack order.
pub fn check(manifest: &Manifest, root: &Path, onnx: &OnnxConfig, llm_config: &LlmConfig) -> Vec<PartCheck> {
    let mut checks = Vec::new();
    let (runtime, outcome) = match OnnxRuntime::init(onnx, root) {
        Ok(rt) => {
            let detail = format!("{} version {} (needs >= {MIN_ORT_VERSION})", rt.library().display(), rt.version());
            (Some(rt), Ok(detail))
        }
        Err(e) => (None, Err(e.into())),
    };
    checks.push(PartCheck { part: "onnxruntime", outcome });

    let llm = verify_file(manifest, &manifest.llm.file, root, "the LLM GGUF")
        .and_then(|_| {
            let splits =
                manifest.llm.splits.iter().map(|split| (split, "a further split of the LLM GGUF (llm.splits)"));
            let scene = llm_config
                .scene_model_of(manifest)
                .map(|file| (file, "the LLM with the scene adapter folded in (llm.scene_model)"));
            splits.chain(scene).try_for_each(|(file, what)| verify_file(manifest, file, root, what).map(|_| ()))
        })
        .and_then(|_| Ok(Backbone::load(manifest, root, llm_config)?));
    let llm_width = llm.as_ref().ok().map(|b| (b.summary().gguf.path.clone(), b.summary().gguf.n_embd));
    checks.push(PartCheck {
        part: "llm",
        outcome: llm.map(|backbone| {
            let s = backbone.summary();
            let info = &s.gguf;
            format!(
                "{}{}: {} {}, {:.0}M parameters, n_embd {}, {} layers, context {}, {}, {}{}{}",
                info.path.display(),
                s.splits.iter().map(|p| format!(" + {}", p.display())).collect::<String>(),
                info.architecture,
                info.name.as_deref().unwrap_or("(unnamed)"),
                s.n_params as f64 / 1e6,
                info.n_embd,
                info.n_layer.map_or("?".into(), |n| n.to_string()),
                info.n_ctx_train.map_or("?".into(), |n| n.to_string()),
                info.quantization.as_deref().unwrap_or("unknown quantisation"),
                if info.has_chat_template { "chat template in GGUF" } else { "no chat template in GGUF" },
                s.adapter.as_ref().map_or(String::new(), |p| format!(
                    ", LoRA adapter {}{}",
                    p.display(),
                    match s.adapter_scope {
                        crate::manifest::AdapterScope::All => "",
                        crate::manifest::AdapterScope::Scene => " (scene prefix only)",
                        crate::manifest::AdapterScope::Prompt => " (scene prefix and prompts only)",
                        crate::manifest::AdapterScope::Questions => " (scene prefix and questions only)",
                    }
                )),
                s.scene_model.as_ref().map_or(String::new(), |p| format!(
                    ", scene prefix decoded by {} (the scene adapter folded in)",
                    p.display()
                )),
            )
        }),
    });

    let encoder =
        verify_file(manifest, &manifest.encoder.file, root, "the encoder ONNX model").and_then(|path| match &runtime {
            None => Ok(format!("{}: checksum ok (signature not checked without ONNX Runtime)", path.display())),
            Some(runtime) => {
                let enc = &manifest.encoder;
                let loaded = Encoder::load(runtime, manifest, root)?;
                Ok(format!(
                    "{}: {} {:?} -> {} {:?}; ep {}",
                    path.display(),
                    enc.input,
                    enc.input_shape,
                    enc.output,
                    enc.output_shape,
                    loaded.session().ep()
                ))
            }
        });
    checks.push(PartCheck { part: "encoder", outcome: encoder });

    if let Some(det) = &manifest.detector {
        let detector =
            verify_file(manifest, &det.file, root, "the detector ONNX model").and_then(|path| match &runtime {
                None => Ok(format!("{}: checksum ok (signature not checked without ONNX Runtime)", path.display())),
                Some(runtime) => {
                    let loaded = Detector::load(runtime, manifest, root)?;
                    Ok(format!(
                        "{}: {} {:?} -> {} {:?}, {} classes; ep {}",
                        path.display(),
                        det.input,
                        det.input_shape,
                        det.output,
                        det.output_shape,
                        det.classes.len(),
                        loaded.session().ep()
                    ))
                }
            });
        checks.push(PartCheck { part: "detector", outcome: detector });
    }

    let projector = match &manifest.projector {
        None => {
            let llm = llm_width.as_ref().map(|(path, n_embd)| (path.as_path(), *n_embd));
            crate::vision::check_width(manifest, root, llm).map_err(StackError::from).map(|()| {
                format!(
                    "none: the encoder's connector makes the {} image tokens of width {} itself",
                    manifest.n_image_tokens(),
                    manifest.encoder.output_shape[2]
                )
            })
        }
        Some(proj) => {
            verify_file(manifest, &proj.file, root, "the projector ONNX model").and_then(|path| match &runtime {
                None => Ok(format!("{}: checksum ok (signature not checked without ONNX Runtime)", path.display())),
                Some(runtime) => {
                    let width = llm_width.as_ref().map(|(path, n_embd)| (path.as_path(), *n_embd));
                    let loaded = Projector::load(runtime, manifest, root, width)?;
                    Ok(format!(
                        "{}: {} [n, {}] -> {} [n, {}], {} image tokens{}; ep {}",
                        path.display(),
                        proj.input,
                        proj.in_width,
                        proj.output,
                        proj.out_width,
                        manifest.n_image_tokens(),
                        if proj.untrained { " (untrained placeholder)" } else { "" },
                        loaded.session().ep()
                    ))
                }
            })
        }
    };
    checks.push(PartCheck { part: "projector", outcome: projector });

    if let (Some(g), Some(runtime)) = (&manifest.generator, &runtime) {
        // Every file's checksum, then one load: tokenizer and every session's names checked.
        let files = manifest.files().into_iter().filter(|(key, _)| key.starts_with("generator."));
        let verified = files.map(|(key, file)| verify_file(manifest, file, root, key)).collect::<Result<Vec<_>, _>>();
        let outcome = verified.and_then(|_| Ok(Generator::load(runtime, manifest, root)?)).map(|loaded| {
            format!(
                "{}: {} {}x{} {} step(s){}, output projector {}; loaded in {:.0} ms",
                g.description,
                g.sampler,
                g.size[1],
                g.size[0],
                g.steps,
                if g.random { " (random test weights)" } else { "" },
                if loaded.has_output_projector() { "yes" } else { "no" },
                loaded.load_ms()
            )
        });
        checks.push(PartCheck { part: "generator", outcome });
    }
    checks
}
