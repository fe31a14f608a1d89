//! The LLM backbone: a quantized GGUF run by llama.cpp.
//!
//! This part reads a GGUF's metadata with llama.cpp's own reader (through [`crate::ffi`]) and
//! checks it against the manifest: architecture, embedding width, and that the file is complete.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::ffi::{GgufFile, GgufValue};
use crate::manifest::Manifest;
use crate::ms_since;

/// An error about the backbone's model file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackboneError {
    /// The file is missing.
    #[error("{path}: file not found (expected a GGUF model; run `make models` for the reference one)")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// llama.cpp's reader rejects the header.
    #[error("{path}: not a readable GGUF file (llama.cpp's gguf reader rejected its header; expected a GGUF v2/v3 model)")]
    NotGguf {
        /// The file.
        path: PathBuf,
    },
    /// The file is shorter than its tensor table says.
    #[error("{path}: truncated: {actual} bytes, but its tensors end at byte {expected}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the tensor data ends.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// A required metadata key is missing or has the wrong type.
    #[error("{path}: metadata key `{key}` is missing or not {expected}")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The expected type.
        expected: &'static str,
    },
    /// The GGUF differs from what the manifest says.
    #[error("{path}: {what} is {actual}, but manifest {manifest} expects {expected}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The manifest.
        manifest: String,
        /// Which property.
        what: &'static str,
        /// The manifest's value.
        expected: String,
        /// The file's value.
        actual: String,
    },
}

/// What a GGUF says about itself.
#[derive(Debug, Clone, Serialize)]
pub struct GgufInfo {
    /// The file.
    pub path: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// `<arch>.embedding_length`.
    pub n_embd: usize,
    /// `<arch>.context_length`, when present.
    pub n_ctx_train: Option<usize>,
    /// `<arch>.block_count`, when present.
    pub n_layer: Option<usize>,
    /// The quantisation (`general.file_type`), when present.
    pub quantization: Option<String>,
    /// Whether the GGUF carries `tokenizer.chat_template`.
    pub has_chat_template: bool,
    /// Number of tensors.
    pub n_tensors: i64,
    /// File size in bytes.
    pub size: u64,
}

/// The name of a llama.cpp `general.file_type` (`llama_ftype`).
fn ftype_name(ftype: i64) -> String {
    let name = match ftype {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return format!("file_type {ftype}"),
    };
    name.to_owned()
}

impl GgufInfo {
    /// Reads the metadata of `path` and checks that the file is complete.
    pub fn read(path: &Path) -> Result<Self, BackboneError> {
        let size = std::fs::metadata(path).map_err(|_| BackboneError::Missing { path: path.to_owned() })?.len();
        let gguf = GgufFile::open(path).ok_or_else(|| BackboneError::NotGguf { path: path.to_owned() })?;
        let data_end = gguf.data_end();
        if data_end > size {
            return Err(BackboneError::Truncated { path: path.to_owned(), expected: data_end, actual: size });
        }
        let missing = |key: &str, expected| BackboneError::MissingKey { path: path.to_owned(), key: key.to_owned(), expected };
        let string = |key: &str| match gguf.get(key) {
            Some(GgufValue::Str(s)) => Some(s),
            _ => None,
        };
        let int = |key: &str| match gguf.get(key) {
            Some(GgufValue::Int(v)) if v >= 0 => Some(v),
            _ => None,
        };
        let architecture = string("general.architecture").ok_or_else(|| missing("general.architecture", "a string"))?;
        let width_key = format!("{architecture}.embedding_length");
        let n_embd = int(&width_key).ok_or_else(|| missing(&width_key, "a positive integer"))? as usize;
        Ok(GgufInfo {
            path: path.to_owned(),
            name: string("general.name"),
            n_embd,
            n_ctx_train: int(&format!("{architecture}.context_length")).map(|v| v as usize),
            n_layer: int(&format!("{architecture}.block_count")).map(|v| v as usize),
            quantization: int("general.file_type").map(ftype_name),
            has_chat_template: string("tokenizer.chat_template").is_some(),
            n_tensors: gguf.n_tensors(),
            architecture,
            size,
        })
    }

    /// Checks the GGUF against the manifest's `llm` section.
    pub fn check_against(&self, manifest: &Manifest) -> Result<(), BackboneError> {
        let mismatch = |what, expected: String, actual: String| BackboneError::Mismatch {
            path: self.path.clone(),
            manifest: manifest.origin.clone(),
            what,
            expected,
            actual,
        };
        if self.architecture != manifest.llm.architecture {
            return Err(mismatch("general.architecture", manifest.llm.architecture.clone(), self.architecture.clone()));
        }
        if self.n_embd != manifest.llm.n_embd {
            return Err(mismatch("the embedding width (n_embd)", manifest.llm.n_embd.to_string(), self.n_embd.to_string()));
        }
        Ok(())
    }
}

/// An error while loading or running the backbone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The GGUF failed the metadata checks.
    #[error(transparent)]
    File(#[from] BackboneError),
    /// llama.cpp refused the model.
    #[error("{path}: llama.cpp cannot load it: {reason} (expected a complete GGUF of an architecture llama.cpp supports)")]
    Load {
        /// The file.
        path: PathBuf,
        /// llama.cpp's last error.
        reason: String,
    },
    /// llama.cpp could not create the context.
    #[error("cannot create a llama.cpp context of {n_ctx} tokens: {reason}")]
    Context {
        /// The requested length.
        n_ctx: u32,
        /// llama.cpp's last error.
        reason: String,
    },
    /// The manifest's LoRA adapter is missing or has the wrong size.
    #[error(transparent)]
    AdapterFile(crate::cache::CacheError),
    /// llama.cpp refused the adapter.
    #[error("{path}: llama.cpp cannot apply it to the LLM: {reason} (expected a LoRA adapter GGUF trained for this GGUF, see models/README.md)")]
    Adapter {
        /// The file.
        path: PathBuf,
        /// llama.cpp's last error.
        reason: String,
    },
    /// The chat layout could not be built.
    #[error(transparent)]
    Prompt(#[from] crate::prompt::PromptError),
    /// The context cannot hold what is asked of it.
    #[error("the context of {n_ctx} tokens is too small: {what} needs {needed}; raise `llm.context`")]
    ContextTooSmall {
        /// The context length.
        n_ctx: usize,
        /// What does not fit.
        what: String,
        /// Tokens needed.
        needed: usize,
    },
    /// Image tokens of another width than the model's.
    #[error("image tokens are {got} wide, but the LLM's n_embd is {expected}")]
    EmbeddingWidth {
        /// The model's width.
        expected: usize,
        /// The tokens' width.
        got: usize,
    },
    /// An empty question.
    #[error("the question is empty")]
    EmptyQuestion,
    /// A question over the configured limit.
    #[error("the question has {chars} characters; the limit is {limit} (`llm.max_question_chars`)")]
    QuestionTooLong {
        /// Its length.
        chars: usize,
        /// The limit.
        limit: usize,
    },
    /// The cache cannot drop the previous request while keeping the scene prefix.
    #[error("this model's cache cannot drop a request while keeping the scene prefix (recurrent architectures are not supported); pick a transformer GGUF")]
    CacheCut,
    /// llama.cpp produced no logits after a decode.
    #[error("llama.cpp returned no logits for the last position (a decode that asked for them succeeded)")]
    NoLogits,
    /// The output projector's signal text is longer than one decode batch.
    #[error("the manifest's generator.output_projector.signal is {n} tokens; at most `llm.batch` ({batch}) fit in one decode")]
    SignalTooLong {
        /// Its tokens.
        n: usize,
        /// `llm.batch`.
        batch: usize,
    },
    /// llama_decode failed.
    #[error("llama.cpp failed to decode {what} (status {status}){}", decode_hint(*status))]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// llama_decode's status.
        status: i32,
    },
}

/// What a user can do about a `llama_decode` status (1: no room left in the KV cache).
fn decode_hint(status: i32) -> &'static str {
    if status == 1 { ": no room left in the context; raise `llm.context`" } else { "" }
}

/// A piece of a prompt: text, or embedding rows (image tokens).
#[derive(Debug, Clone, Copy)]
pub enum Part<'a> {
    /// Text, tokenized with special tokens parsed.
    Text(&'a str),
    /// Row-major embeddings, `n_embd` floats per position.
    Embeddings(&'a [f32]),
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-generation token or a stop string.
    End,
    /// `max_tokens` reached.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The deadline passed.
    Deadline,
    /// Cancelled by the caller.
    Cancelled,
}

/// Limits of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: crate::sampling::SamplingParams,
    /// Stop when this instant passes.
    pub deadline: Option<std::time::Instant>,
    /// Stop when this flag becomes true.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// A finished caption or answer.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The text, without stop strings.
    pub text: String,
    /// Tokens generated.
    pub n_tokens: usize,
    /// Time to decode the request's prompt tokens (after the cached scene prefix), ms.
    pub prefill_ms: f64,
    /// Time generating, ms.
    pub decode_ms: f64,
    /// From the start of the request to the first generated token, ms.
    pub ttft_ms: f64,
    /// Whether the scene prefix was already in the cache.
    pub prefix_cached: bool,
    /// Why it ended.
    pub stop: StopReason,
}

/// What the loaded model is.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// The manifest's name for the stack.
    pub stack: String,
    /// GGUF metadata.
    #[serde(flatten)]
    pub gguf: GgufInfo,
    /// Parameters, as llama.cpp counts them.
    pub n_params: u64,
    /// CPU threads used.
    pub threads: usize,
    /// Context length.
    pub n_ctx: usize,
}

/// The scene whose prefix is in the KV cache.
#[derive(Debug, Clone, Copy)]
struct CachedScene {
    id: u64,
    /// Positions the prefix occupies.
    n_past: usize,
}

/// The LLM backbone: model, context, chat layout, and the cached scene prefix.
pub struct Backbone {
    ctx: crate::ffi::Context,
    layout: crate::prompt::ChatLayout,
    summary: ModelSummary,
    config: crate::config::LlmConfig,
    scene: Option<CachedScene>,
    history: Vec<i32>,
}

impl Backbone {
    /// Loads the manifest's GGUF: metadata checks, llama.cpp model and context, chat layout.
    pub fn load(manifest: &Manifest, cache_root: &Path, config: &crate::config::LlmConfig) -> Result<Self, EngineError> {
        let path = manifest.resolve(&manifest.llm.file, cache_root);
        let info = GgufInfo::read(&path)?;
        info.check_against(manifest)?;
        let options = crate::ffi::ModelOptions { n_gpu_layers: config.gpu_layers };
        let model = crate::ffi::Model::load(&path, options).map_err(|reason| EngineError::Load { path: path.clone(), reason })?;
        let model = std::sync::Arc::new(model);
        let threads = if config.threads == 0 { crate::config::physical_cores() } else { config.threads };
        let ctx_options = crate::ffi::ContextOptions { n_ctx: config.context, n_batch: config.batch, n_threads: threads as i32 };
        let mut ctx = crate::ffi::Context::new(model.clone(), ctx_options).map_err(|reason| EngineError::Context { n_ctx: config.context, reason })?;
        if let Some(file) = &manifest.llm.adapter {
            let path = manifest.resolve(file, cache_root);
            crate::cache::verify(&path, "the LLM's LoRA adapter GGUF", file.size, None).map_err(EngineError::AdapterFile)?;
            crate::ffi::Adapter::load(model.clone(), &path)
                .and_then(|adapter| ctx.set_adapter(std::sync::Arc::new(adapter), 1.0))
                .map_err(|reason| EngineError::Adapter { path: path.clone(), reason })?;
            tracing::info!(adapter = %path.display(), "LoRA adapter applied");
        }
        let system = config.system_prompt.as_deref().unwrap_or(&manifest.llm.chat.system);
        let template = model.chat_template();
        let layout = crate::prompt::ChatLayout::new(&manifest.llm.chat, system, |messages| {
            crate::ffi::Model::apply_chat_template(template.as_deref()?, messages)
        })?;
        let summary = ModelSummary { stack: manifest.name.clone(), n_params: model.n_params(), threads, n_ctx: ctx.n_ctx(), gguf: info };
        tracing::info!(model = %path.display(), params = summary.n_params, threads, n_ctx = summary.n_ctx, "LLM backbone loaded");
        Ok(Backbone { ctx, layout, summary, config: config.clone(), scene: None, history: Vec::new() })
    }

    /// What is loaded.
    pub fn summary(&self) -> &ModelSummary {
        &self.summary
    }

    /// The id of the scene whose prefix is cached.
    pub fn scene_id(&self) -> Option<u64> {
        self.scene.map(|s| s.id)
    }

    /// Options for a caption or answer from the config, with the configured deadline.
    pub fn default_options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.config.max_tokens,
            sampling: self.config.sampling.clone(),
            deadline: Some(std::time::Instant::now() + std::time::Duration::from_secs_f64(self.config.request_timeout_s)),
            cancel: None,
        }
    }

    /// The configured caption prompt.
    pub fn caption_prompt(&self) -> &str {
        &self.config.caption_prompt
    }

    fn tokens_of(&self, parts: &[Part<'_>], at_start: bool) -> Vec<Vec<i32>> {
        let mut first = at_start && self.ctx.model().adds_bos();
        parts
            .iter()
            .map(|part| match part {
                Part::Text(text) => {
                    let tokens = self.ctx.model().tokenize(text, first);
                    first = false;
                    tokens
                }
                Part::Embeddings(_) => Vec::new(),
            })
            .collect()
    }

    /// Decodes `parts` at `pos`; returns the position after them.
    fn decode_parts(&mut self, parts: &[Part<'_>], pos: usize, what: &'static str) -> Result<usize, EngineError> {
        let n_embd = self.ctx.model().n_embd();
        let tokens = self.tokens_of(parts, pos == 0);
        let needed = pos
            + parts
                .iter()
                .zip(&tokens)
                .map(|(part, toks)| match part {
                    Part::Text(_) => toks.len(),
                    Part::Embeddings(embd) => embd.len() / n_embd.max(1),
                })
                .sum::<usize>();
        if needed >= self.ctx.n_ctx() {
            return Err(EngineError::ContextTooSmall { n_ctx: self.ctx.n_ctx(), what: what.to_owned(), needed: needed + 1 });
        }
        let mut pos = pos;
        for (part, toks) in parts.iter().zip(&tokens) {
            let (input, n) = match part {
                Part::Text(_) => (crate::ffi::BatchInput::Tokens(toks), toks.len()),
                Part::Embeddings(embd) => {
                    if embd.len() % n_embd != 0 {
                        return Err(EngineError::EmbeddingWidth { expected: n_embd, got: embd.len() });
                    }
                    (crate::ffi::BatchInput::Embeddings(embd), embd.len() / n_embd)
                }
            };
            if n == 0 {
                continue;
            }
            self.ctx.decode(input, pos).map_err(|status| EngineError::Decode { what, status })?;
            pos += n;
        }
        Ok(pos)
    }

    /// Makes `parts` the cached prefix of scene `id`: the cache is cleared and the prefix decoded
    /// once. Returns the prefill time in ms.
    pub fn set_prefix(&mut self, id: u64, parts: &[Part<'_>]) -> Result<f64, EngineError> {
        let start = std::time::Instant::now();
        self.ctx.clear();
        self.scene = None;
        let n_past = self.decode_parts(parts, 0, "the scene prefix")?;
        self.scene = Some(CachedScene { id, n_past });
        Ok(ms_since(start))
    }

    /// Makes a camera scene current: the chat prefix followed by the image tokens (or no image).
    pub fn set_scene(&mut self, id: u64, image: Option<&crate::projector::ImageTokens>) -> Result<f64, EngineError> {
        let n_embd = self.ctx.model().n_embd();
        if let Some(image) = image {
            if image.n_embd != n_embd {
                return Err(EngineError::EmbeddingWidth { expected: n_embd, got: image.n_embd });
            }
        }
        let prefix = self.layout.prefix().to_owned();
        match image {
            Some(image) => self.set_prefix(id, &[Part::Text(&prefix), Part::Embeddings(&image.data)]),
            None => self.set_prefix(id, &[Part::Text(&prefix)]),
        }
    }

    /// Checks a question against the limits.
    pub fn check_question(&self, question: &str) -> Result<(), EngineError> {
        if question.trim().is_empty() {
            return Err(EngineError::EmptyQuestion);
        }
        let chars = question.chars().count();
        if chars > self.config.max_question_chars {
            return Err(EngineError::QuestionTooLong { chars, limit: self.config.max_question_chars });
        }
        Ok(())
    }

    /// Answers `question` about the current scene (a text-only prefix when none is set).
    /// `on_text` receives the answer as it is generated and returns false to stop early.
    pub fn ask(&mut self, question: &str, options: &GenerateOptions, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Generation, EngineError> {
        self.check_question(question)?;
        if self.scene.is_none() {
            self.set_scene(u64::MAX, None)?;
        }
        let request = self.layout.request(question);
        self.generate(&[Part::Text(&request)], options, on_text)
    }

    /// The LLM's final hidden states at the tokens of `signal`, read after the conversation
    /// "scene, `question`, answer `answer`": the input of the output projector. `[n, n_embd]`
    /// row-major, with `n` the number of signal tokens. The cache is cut back to the scene prefix
    /// first and after, like every request.
    pub fn signal_states(&mut self, question: &str, answer: &str, signal: &str) -> Result<Vec<f32>, EngineError> {
        self.check_question(question)?;
        if self.scene.is_none() {
            self.set_scene(u64::MAX, None)?;
        }
        let scene = self.scene.expect("set above");
        if !self.ctx.truncate(scene.n_past) {
            return Err(EngineError::CacheCut);
        }
        let request = self.layout.request(question);
        let pos = self.decode_parts(&[Part::Text(&request), Part::Text(answer)], scene.n_past, "the description")?;
        let tokens = self.tokenize(signal, false);
        if tokens.len() > self.config.batch as usize {
            return Err(EngineError::SignalTooLong { n: tokens.len(), batch: self.config.batch as usize });
        }
        if tokens.is_empty() || pos + tokens.len() >= self.ctx.n_ctx() {
            return Err(EngineError::ContextTooSmall { n_ctx: self.ctx.n_ctx(), what: "the signal tokens".into(), needed: pos + tokens.len() + 1 });
        }
        let states = self.ctx.hidden_states(&tokens, pos).map_err(|status| EngineError::Decode { what: "the signal tokens", status })?;
        self.ctx.truncate(scene.n_past);
        Ok(states)
    }

    /// Continues the cached prefix with `tail` and generates. The cache is first cut back to the
    /// prefix, so every request sees the same scene prefix and nothing of earlier requests.
    pub fn generate(&mut self, tail: &[Part<'_>], options: &GenerateOptions, on_text: &mut dyn FnMut(&str) -> bool) -> Result<Generation, EngineError> {
        let start = std::time::Instant::now();
        let scene = match self.scene {
            Some(scene) => scene,
            None => {
                self.set_prefix(u64::MAX, &[])?;
                self.scene.expect("set above")
            }
        };
        let prefix_cached = scene.n_past > 0;
        if !self.ctx.truncate(scene.n_past) {
            return Err(EngineError::CacheCut);
        }
        let mut pos = self.decode_parts(tail, scene.n_past, "the request")?;
        let prefill_ms = ms_since(start);
        let mut sampler = crate::sampling::Sampler::new(options.sampling.clone());
        let mut filter = crate::prompt::StopFilter::new(self.layout.stop());
        self.history.clear();
        let decode_start = std::time::Instant::now();
        let mut ttft_ms = 0.0;
        let mut stop = StopReason::MaxTokens;
        while self.history.len() < options.max_tokens {
            if options.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
                stop = StopReason::Cancelled;
                break;
            }
            if options.deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                stop = StopReason::Deadline;
                break;
            }
            let Some(token) = sampler.sample(self.ctx.last_logits(), &self.history) else {
                return Err(EngineError::NoLogits);
            };
            if self.history.is_empty() {
                ttft_ms = ms_since(start);
            }
            if self.ctx.model().is_eog(token) {
                stop = StopReason::End;
                break;
            }
            self.history.push(token);
            let (text, stopped) = filter.push(&self.ctx.model().token_bytes(token));
            if (!text.is_empty() && !on_text(&text)) || stopped {
                stop = if stopped { StopReason::End } else { StopReason::Cancelled };
                break;
            }
            if pos + 1 >= self.ctx.n_ctx() {
                stop = StopReason::ContextFull;
                break;
            }
            self.ctx.decode(crate::ffi::BatchInput::Tokens(&[token]), pos).map_err(|status| EngineError::Decode { what: "a generated token", status })?;
            pos += 1;
        }
        let rest = filter.finish();
        if !rest.is_empty() {
            on_text(&rest);
        }
        Ok(Generation {
            text: filter.text().trim().to_owned(),
            n_tokens: self.history.len(),
            prefill_ms,
            decode_ms: ms_since(decode_start),
            ttft_ms,
            prefix_cached,
            stop,
        })
    }

    /// Tokenizes text as a prompt part does: special tokens parsed, and BOS in front when
    /// `at_start` and the model wants one.
    pub fn tokenize(&self, text: &str, at_start: bool) -> Vec<i32> {
        self.ctx.model().tokenize(text, at_start && self.ctx.model().adds_bos())
    }
}

/// The rows of `tokens` in the GGUF's token-embedding matrix (`token_embd.weight`), dequantised:
/// what the model itself feeds its first layer for those tokens.
pub fn token_embeddings(path: &Path, tokens: &[i32]) -> Result<Vec<f32>, BackboneError> {
    let gguf = GgufFile::open(path).ok_or_else(|| BackboneError::NotGguf { path: path.to_owned() })?;
    let (matrix, width) = gguf
        .tensor_f32(path, "token_embd.weight")
        .ok_or_else(|| BackboneError::MissingKey { path: path.to_owned(), key: "token_embd.weight".into(), expected: "a dequantisable tensor" })?;
    let n_rows = matrix.len() / width;
    let mut out = Vec::with_capacity(tokens.len() * width);
    for &t in tokens {
        let row = usize::try_from(t).ok().filter(|r| *r < n_rows).ok_or_else(|| BackboneError::MissingKey {
            path: path.to_owned(),
            key: format!("token_embd.weight row {t}"),
            expected: "a token id inside the vocabulary",
        })?;
        out.extend_from_slice(&matrix[row * width..(row + 1) * width]);
    }
    Ok(out)
}
