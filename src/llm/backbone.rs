//! The LLM backbone: a quantized GGUF run by llama.cpp, with the manifest's LoRA adapter, the
//! chat layout around the image tokens, and the scene prefix kept in the KV cache.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::{check_question, LlmError, QuestionError};
use super::gguf::GgufInfo;
use super::grounding::{mentions, Checked, Grounding, Guide, Support};
use super::prompt::{ChatLayout, StopFilter};
use super::sampling::{SamplingParams, TokenSampler};
use super::LlmConfig;
use crate::manifest::{AdapterScope, Manifest};
use crate::util::ms_since;
use crate::vision::ImageTokens;

/// The most positions one decode returns outputs for: generation reads the last position's
/// logits, the output projector the hidden states of its few signal tokens. llama.cpp sizes its
/// compute buffer for the worst case, by default a whole batch of outputs: with SmolLM2's
/// 49,152-word vocabulary and a batch of 512 that is 96 MiB of logits no request reads (105 MiB
/// of compute buffer against 17 MiB with this limit; on a GPU that is device memory).
pub const MAX_OUTPUTS: usize = 32;

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
    pub sampling: SamplingParams,
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
    /// For a caption whose check against the image tokens removed names: the caption as the LLM
    /// wrote it (`text` is the checked one) and the names removed.
    pub checked: Option<Checked>,
    /// For a caption or an answer the detector's category columns guided
    /// (`grounding.guide_threshold`): the category it was begun with, and the LLM's first caption
    /// or answer. For a caption, `checked` then lists the names removed from both captions, its
    /// `unchecked` the first as written.
    pub guided: Option<Guided>,
    /// For a caption, the categories of the manifest's vocabulary (`[grounding] categories`) that
    /// its final text names, in the vocabulary's order (empty for "No known object."); None for an
    /// answer, or when the manifest has no vocabulary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objects: Option<Vec<String>>,
    /// For a caption that placed objects elsewhere than the answers to "Where is ...?" do: the
    /// categories moved, and the caption before ([`Grounding::place`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved: Option<Moved>,
}

/// A caption whose objects were placed again, each on the side the detector's own class of its
/// name or its image tokens place it ([`Grounding::place`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Moved {
    /// The categories whose side was rewritten, in the caption's order.
    pub categories: Vec<String>,
    /// The caption before (after the check and any guide).
    pub unmoved: String,
}

/// A caption (or a presence question's answer) written again, begun with the category (or the
/// yes) that the detector's category columns are sure of.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Guided {
    /// The category, its score, and the beginning given to the LLM.
    #[serde(flatten)]
    pub guide: Guide,
    /// The LLM's first caption, as it wrote it (before the check, which left it naming nothing), or
    /// its first answer (which did not say yes).
    pub written: String,
}

impl Generation {
    /// This generation, written again begun by `guide` after `first` (the LLM's own, which the
    /// guide replaces): the time and tokens of both; `ttft_ms` stays this one's.
    fn guided_after(mut self, first: Generation, guide: Guide) -> Generation {
        self.prefill_ms += first.prefill_ms;
        self.decode_ms += first.decode_ms;
        self.n_tokens += first.n_tokens;
        self.guided = Some(Guided { guide, written: first.as_written().to_owned() });
        self
    }

    /// The caption (or answer) as the LLM first wrote it, before the check, any guide and any
    /// object placed again.
    pub fn as_written(&self) -> &str {
        match (&self.guided, &self.checked, &self.moved) {
            (Some(g), _, _) => &g.written,
            (None, Some(c), _) => &c.unchecked,
            (None, None, Some(m)) => &m.unmoved,
            (None, None, None) => &self.text,
        }
    }
}

/// What the loaded model is.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    /// The manifest's name for the stack.
    pub stack: String,
    /// GGUF metadata.
    #[serde(flatten)]
    pub gguf: GgufInfo,
    /// The LoRA adapter, if the manifest names one.
    pub adapter: Option<PathBuf>,
    /// Where it computes: every token, the scene prefix only, or the scene prefix and prompts.
    pub adapter_scope: AdapterScope,
    /// The GGUF's further split files, after `gguf.path` (split 0).
    pub splits: Vec<PathBuf>,
    /// The scene model (`llm.scene_model`): the adapter folded in, decoding the scene prefix in
    /// place of the adapter applied at run time (`adapter` is then not loaded).
    pub scene_model: Option<PathBuf>,
    /// Parameters, as llama.cpp counts them.
    pub n_params: u64,
    /// CPU threads used.
    pub threads: usize,
    /// Context length.
    pub n_ctx: usize,
}

impl ModelSummary {
    /// The model's GGUF files in split order: split 0 (`gguf.path`) and its `splits`.
    pub fn files(&self) -> Vec<&Path> {
        std::iter::once(self.gguf.path.as_path()).chain(self.splits.iter().map(PathBuf::as_path)).collect()
    }
}

/// The model that decodes scene prefixes when the manifest folds the scene adapter into the
/// weights (`llm.scene_model`): a second llama.cpp model over the base's shared splits, with a
/// context just long enough for a scene prefix. Its cache of a prefix is handed to the base
/// model's context, which decodes everything after it.
struct SceneModel {
    ctx: crate::ffi::Context,
    path: PathBuf,
}

/// What a request asks for, which decides whether an adapter of scope "questions" reads its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// A description of the scene ([`Backbone::describe`]).
    Caption,
    /// Anything else ([`Backbone::ask`]).
    Question,
}

/// The scene whose prefix is in the KV cache.
#[derive(Debug, Clone, Copy)]
struct CachedScene {
    id: u64,
    /// Positions the prefix occupies.
    n_past: usize,
    /// Whether the prefix has an image (a scoped adapter computes on it and, with scope
    /// "prompt" or "questions", on the prompts it reads of requests about it).
    image: bool,
}

/// The LLM backbone: model, context, chat layout, and the cached scene prefix.
pub struct Backbone {
    ctx: crate::ffi::Context,
    layout: ChatLayout,
    summary: ModelSummary,
    config: LlmConfig,
    scene: Option<CachedScene>,
    history: Vec<i32>,
    /// The adapter's scope when it is switched on and off around parts of the conversation
    /// (`llm.adapter_scope` "scene" or "prompt"); None without an adapter or for one on every token.
    scoped: Option<AdapterScope>,
    /// The caption check (the manifest's `[grounding]`, unless `llm.ground_captions` is off).
    grounding: Option<Grounding>,
    /// The support of each of its categories in the cached scene, when it has an image.
    support: Option<Support>,
    /// The scene model, when the manifest has one (and then no adapter is applied at run time).
    scene_model: Option<SceneModel>,
    /// The manifest's vocabulary (`[grounding] categories`; empty without one), which captions'
    /// `objects` are read in, whether or not captions are checked.
    vocabulary: Vec<String>,
}

impl Backbone {
    /// Loads the manifest's GGUF: metadata checks, llama.cpp model and context, chat layout.
    pub fn load(manifest: &Manifest, cache_root: &Path, config: &LlmConfig) -> Result<Self, LlmError> {
        let path = manifest.resolve(&manifest.llm.file, cache_root);
        let info = GgufInfo::read(&path)?;
        info.check_against(manifest)?;
        let splits = manifest
            .llm
            .splits
            .iter()
            .map(|split| {
                let path = manifest.resolve(split, cache_root);
                crate::cache::verify(&path, "a further split of the LLM GGUF (llm.splits)", split.size, None)
                    .map_err(LlmError::File)
                    .map(|()| path)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let options = crate::ffi::ModelOptions { n_gpu_layers: config.gpu_layers };
        let load = |first: &Path| {
            let files: Vec<&Path> = std::iter::once(first).chain(splits.iter().map(PathBuf::as_path)).collect();
            crate::ffi::Model::load_splits(&files, options)
                .map(std::sync::Arc::new)
                .map_err(|reason| LlmError::Load { path: first.to_owned(), reason })
        };
        let model = load(&path)?;
        let threads = if config.threads == 0 { crate::util::physical_cores() } else { config.threads };
        let ctx_options = crate::ffi::ContextOptions {
            n_ctx: config.context,
            n_batch: config.batch,
            n_outputs: MAX_OUTPUTS as u32,
            n_threads: threads as i32,
        };
        let mut ctx = crate::ffi::Context::new(model.clone(), ctx_options)
            .map_err(|reason| LlmError::Context { n_ctx: config.context, reason })?;
        let mut adapter = None;
        let mut scene_model = None;
        if manifest.llm.scene_model.is_some() && config.scene_model && config.gpu_layers > 0 {
            tracing::info!("llm.gpu_layers > 0: the scene adapter is applied at run time, not by the scene model (which would hold a second copy of the shared tensors on the device)");
        }
        if let Some(file) = config.scene_model_of(manifest) {
            // The adapter is folded into this model's weights: it decodes the scene prefix (see
            // `set_scene`) and the adapter file is not applied.
            let path = manifest.resolve(file, cache_root);
            crate::cache::verify(&path, "the LLM with the scene adapter folded in (llm.scene_model)", file.size, None)
                .map_err(LlmError::File)?;
            GgufInfo::read(&path)?.check_against(manifest)?;
            scene_model = Some((load(&path)?, path));
        } else if let Some(file) = &manifest.llm.adapter {
            let path = manifest.resolve(file, cache_root);
            crate::cache::verify(&path, "the LLM's LoRA adapter GGUF", file.size, None)
                .map_err(LlmError::AdapterFile)?;
            crate::ffi::Adapter::load(model.clone(), &path)
                .and_then(|adapter| ctx.set_adapter(std::sync::Arc::new(adapter), 1.0))
                .map_err(|reason| LlmError::Adapter { path: path.clone(), reason })?;
            if manifest.llm.adapter_scope.is_scoped() {
                // Off, except while `set_scene` decodes a scene with an image and `decode_prompt`
                // a prompt the scope reads: each switches it on and off again.
                ctx.enable_adapter(false).map_err(|reason| LlmError::Adapter { path: path.clone(), reason })?;
            }
            tracing::info!(adapter = %path.display(), scope = ?manifest.llm.adapter_scope, "LoRA adapter loaded");
            adapter = Some(path);
        }
        let system = config.system_prompt.as_deref().unwrap_or(&manifest.llm.chat.system);
        let template = model.chat_template();
        let layout = ChatLayout::new(&manifest.llm.chat, system, |messages| {
            crate::ffi::Model::apply_chat_template(template.as_deref()?, messages)
        })?;
        let scene_model = match scene_model {
            None => None,
            Some((scene, path)) => {
                // Long enough for the prefix and the image tokens: a context of the base's
                // length would hold a KV cache that only ever sees a scene prefix.
                let n_prefix = model.tokenize(layout.prefix(), model.adds_bos()).len() + manifest.n_image_tokens() + 1;
                let n_ctx = (n_prefix as u32).min(config.context);
                let options = crate::ffi::ContextOptions {
                    n_ctx,
                    n_batch: n_ctx.min(config.batch),
                    n_outputs: 1,
                    n_threads: threads as i32,
                };
                let ctx =
                    crate::ffi::Context::new(scene, options).map_err(|reason| LlmError::Context { n_ctx, reason })?;
                tracing::info!(scene_model = %path.display(), n_ctx = ctx.n_ctx(), "scene adapter folded into a scene model");
                Some(SceneModel { ctx, path })
            }
        };
        let summary = ModelSummary {
            stack: manifest.name.clone(),
            adapter,
            adapter_scope: manifest.llm.adapter_scope,
            splits: splits.clone(),
            scene_model: scene_model.as_ref().map(|s| s.path.clone()),
            n_params: model.n_params(),
            threads,
            n_ctx: ctx.n_ctx(),
            gguf: info,
        };
        tracing::info!(model = %path.display(), params = summary.n_params, threads, n_ctx = summary.n_ctx, "LLM backbone loaded");
        let scoped =
            (summary.adapter.is_some() && manifest.llm.adapter_scope.is_scoped()).then_some(manifest.llm.adapter_scope);
        let mut backbone = Backbone {
            ctx,
            layout,
            summary,
            config: config.clone(),
            scene: None,
            history: Vec::new(),
            scoped,
            grounding: None,
            support: None,
            scene_model,
            vocabulary: manifest.grounding.as_ref().map(|g| g.categories.clone()).unwrap_or_default(),
        };
        backbone.check_layout()?;
        if let Some(spec) = manifest.grounding.as_ref().filter(|_| config.ground_captions) {
            let columns = manifest.category_columns(&spec.categories);
            let classes = manifest.detector_class_columns(&spec.categories);
            backbone.grounding = Some(Grounding::new(spec, &backbone, columns, classes, manifest.cell_grid())?);
            tracing::info!(
                categories = spec.categories.len(),
                threshold = spec.threshold,
                classifier_threshold = spec.classifier_threshold,
                "captions checked against the image tokens"
            );
        }
        Ok(backbone)
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
            deadline: Some(
                std::time::Instant::now() + std::time::Duration::from_secs_f64(self.config.request_timeout_s),
            ),
            cancel: None,
        }
    }

    /// The configured caption prompt.
    pub fn caption_prompt(&self) -> &str {
        &self.config.caption_prompt
    }

    /// Decodes `parts` at `pos`; returns the position after them.
    fn decode_parts(&mut self, parts: &[Part<'_>], pos: usize, what: &'static str) -> Result<usize, LlmError> {
        decode_parts(&mut self.ctx, parts, pos, what)
    }

    /// Makes `parts` the cached prefix of scene `id`: the cache is cleared and the prefix decoded
    /// once. Returns the prefill time in ms.
    pub fn set_prefix(&mut self, id: u64, parts: &[Part<'_>]) -> Result<f64, LlmError> {
        self.set_prefix_by(id, parts, false)
    }

    /// As [`Backbone::set_prefix`]; with `by_scene_model` and a scene model, the prefix is decoded
    /// by the scene model (the adapter folded in) and handed to the base model's context as its
    /// keys and values. The prefill time includes the hand-over.
    fn set_prefix_by(&mut self, id: u64, parts: &[Part<'_>], by_scene_model: bool) -> Result<f64, LlmError> {
        let start = std::time::Instant::now();
        self.ctx.clear();
        self.scene = None;
        self.support = None;
        let n_past = match self.scene_model.as_mut().filter(|_| by_scene_model) {
            Some(scene) => {
                // Dropping its cells is enough: the hand-over copies only the cells the prefix fills.
                scene.ctx.truncate(0);
                let n_past = decode_parts(&mut scene.ctx, parts, 0, "the scene prefix")?;
                let refused = |reason| LlmError::SceneState { path: scene.path.clone(), reason };
                let state = scene.ctx.state().map_err(refused)?;
                self.ctx.set_state(&state).map_err(refused)?;
                n_past
            }
            None => decode_parts(&mut self.ctx, parts, 0, "the scene prefix")?,
        };
        let image = parts.iter().any(|p| matches!(p, Part::Embeddings(_)));
        self.scene = Some(CachedScene { id, n_past, image });
        Ok(ms_since(start))
    }

    /// Makes a camera scene current: the chat prefix followed by the image tokens (or no image).
    pub fn set_scene(&mut self, id: u64, image: Option<&ImageTokens>) -> Result<f64, LlmError> {
        let n_embd = self.ctx.model().n_embd();
        if let Some(image) = image {
            if image.n_embd != n_embd {
                return Err(LlmError::EmbeddingWidth { expected: n_embd, got: image.n_embd });
            }
        }
        let prefix = self.layout.prefix().to_owned();
        let support = self.grounding.as_ref().zip(image).map(|(g, image)| g.support(image));
        let prefill = match image {
            Some(image) if self.scene_model.is_some() => {
                self.set_prefix_by(id, &[Part::Text(&prefix), Part::Embeddings(&image.data)], true)
            }
            Some(image) if self.scoped.is_some() => {
                // A scoped adapter computes the scene prefix and is off again after it; a request
                // whose prompt it reads switches it on for that prompt (`decode_prompt`). The
                // prefill time includes the switches (llama.cpp re-plans its graph on each).
                let start = std::time::Instant::now();
                self.switch_adapter(true)?;
                let prefill = self.set_prefix(id, &[Part::Text(&prefix), Part::Embeddings(&image.data)]);
                self.switch_adapter(false)?;
                prefill.map(|_| ms_since(start))
            }
            Some(image) => self.set_prefix(id, &[Part::Text(&prefix), Part::Embeddings(&image.data)]),
            None => self.set_prefix(id, &[Part::Text(&prefix)]),
        }?;
        self.support = support;
        Ok(prefill)
    }

    /// Switches a scoped adapter on or off (llama.cpp does nothing when it already is).
    fn switch_adapter(&mut self, on: bool) -> Result<(), LlmError> {
        self.ctx
            .enable_adapter(on)
            .map_err(|reason| LlmError::Adapter { path: self.summary.adapter.clone().unwrap_or_default(), reason })
    }

    /// Decodes a request's prompt after the scene prefix: with an adapter of scope "prompt" (any
    /// request) or "questions" (a question, not a caption), the adapter computes it when the scene
    /// has an image, and is off again for what is generated after (as everywhere but here and in
    /// `set_scene`).
    fn decode_prompt(
        &mut self,
        parts: &[Part<'_>],
        scene: CachedScene,
        request: Request,
        what: &'static str,
    ) -> Result<usize, LlmError> {
        let reads = scene.image
            && match self.scoped {
                Some(AdapterScope::Prompt) => true,
                Some(AdapterScope::Questions) => request == Request::Question,
                _ => false,
            };
        if !reads {
            return self.decode_parts(parts, scene.n_past, what);
        }
        self.switch_adapter(true)?;
        let pos = self.decode_parts(parts, scene.n_past, what);
        self.switch_adapter(false)?;
        pos
    }

    /// Checks a question against `llm.max_question_chars` (see [`check_question`]).
    pub fn check_question(&self, question: &str) -> Result<(), QuestionError> {
        check_question(question, self.config.max_question_chars)
    }

    /// Answers `question` about the current scene (a text-only prefix when none is set).
    /// `on_text` receives the answer as it is generated and returns false to stop early.
    /// With the manifest's `[grounding]`, a presence question about one category ("Is there a
    /// goat?", [`presence`](super::grounding::presence)) that the detector's category columns
    /// score at least `guide_threshold` in the frame, or that the scene's caption names (once
    /// [`Backbone::describe`] wrote one), is answered again, begun with `guide_yes`, when the
    /// LLM's answer does not begin with it (`Generation::guided`, whose `written` is the LLM's
    /// answer); a position question likewise with its side (`Grounding::answer_guide`). `on_text`
    /// then sees only the answer that stands, once it is known.
    pub fn ask(
        &mut self,
        question: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, LlmError> {
        let guide = self.grounding.as_ref().zip(self.support.as_ref()).and_then(|(g, s)| g.answer_guide(question, s));
        let Some(guide) = guide else { return self.request(Request::Question, question, options, "", on_text) };
        let g = self.request(Request::Question, question, options, "", &mut |_| true)?;
        let stands = matches!(g.stop, StopReason::Cancelled | StopReason::Deadline)
            || self.grounding.as_ref().is_some_and(|grounding| grounding.agrees(&g.text, &guide));
        if stands {
            if !g.text.is_empty() {
                on_text(&g.text);
            }
            return Ok(g);
        }
        // The classifier is sure of the category asked about and the LLM did not say yes, or the
        // image tokens place it elsewhere than the LLM did: it answers again, begun by the guide.
        let mut again = self.request(Request::Question, question, options, &guide.start, on_text)?;
        // What streams first arrives after the LLM's own answer and the second prefill.
        again.ttft_ms += g.prefill_ms + g.decode_ms;
        Ok(again.guided_after(g, guide))
    }

    /// Describes the current scene (a text-only prefix when none is set) as `prompt` asks: a
    /// caption. It differs from [`Backbone::ask`] in two ways: an adapter of scope "questions"
    /// reads questions but not the caption prompt (as it was trained), and with the manifest's
    /// `[grounding]` the finished caption of a scene with an image is checked against its image
    /// tokens (`Generation::checked`; `on_text` sees the caption as written). With its
    /// `guide_threshold`, a checked caption that names nothing is written again, begun with the
    /// category the detector's category columns are sure of (`Generation::guided`; `on_text` does
    /// not see the second caption; a cancelled or late first caption is not guided). With its
    /// `positions`, an object the caption places on another side than the answer to "Where is
    /// ...?" would is placed on that side (`Generation::moved`). With a vocabulary, the final
    /// caption's `objects` are the categories it names.
    pub fn describe(
        &mut self,
        prompt: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, LlmError> {
        let mut g = self.checked_caption(prompt, options, on_text)?;
        // Its objects on the sides the answers to "Where is ...?" give them.
        if let Some((grounding, support)) = self.grounding.as_ref().zip(self.support.as_ref()) {
            let unmoved = g.text.clone();
            let categories = grounding.place(&mut g.text, support);
            g.moved = (!categories.is_empty()).then_some(Moved { categories, unmoved });
        }
        g.objects = (!self.vocabulary.is_empty())
            .then(|| mentions(&g.text, &self.vocabulary).into_iter().map(str::to_owned).collect());
        // Presence answers about this scene follow its caption (`Grounding::answer_guide`).
        if let Some(support) = self.support.as_mut() {
            support.named = g.objects.clone().unwrap_or_default();
        }
        Ok(g)
    }

    /// [`Backbone::describe`] up to the checked (and guided) caption, before its objects are placed
    /// again and read.
    fn checked_caption(
        &mut self,
        prompt: &str,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, LlmError> {
        let mut g = self.request(Request::Caption, prompt, options, "", on_text)?;
        let Some((grounding, support)) = self.grounding.as_ref().zip(self.support.as_ref()) else { return Ok(g) };
        g.checked = grounding.check(&mut g.text, support);
        if matches!(g.stop, StopReason::Cancelled | StopReason::Deadline) {
            return Ok(g);
        }
        let Some(guide) = grounding.guide(&g.text, support) else { return Ok(g) };
        // The check left no known name and the classifier is sure of one: the LLM writes the
        // caption again, its answer begun with that name, and the rest of it is checked as before.
        let mut again = self.request(Request::Caption, prompt, options, &guide.start, &mut |_| true)?;
        let mut dropped = g.checked.as_ref().map(|c| c.dropped.clone()).unwrap_or_default();
        if let Some((grounding, support)) = self.grounding.as_ref().zip(self.support.as_ref()) {
            dropped.extend(
                grounding
                    .check_but(&mut again.text, support, Some(&guide.category))
                    .map(|c| c.dropped)
                    .into_iter()
                    .flatten(),
            );
        }
        // `on_text` saw the first caption: its first token is the caption's.
        again.ttft_ms = g.ttft_ms;
        let again = again.guided_after(g, guide);
        let written = again.as_written().to_owned();
        Ok(Generation { checked: (!dropped.is_empty()).then_some(Checked { unchecked: written, dropped }), ..again })
    }

    /// The caption check, when captions are checked.
    pub fn grounding(&self) -> Option<&Grounding> {
        self.grounding.as_ref()
    }

    /// The support of each of the check's categories in the current scene (None without a check or
    /// without an image in the scene).
    pub fn scene_support(&self) -> Option<&Support> {
        self.support.as_ref()
    }

    /// A request with `text` as its prompt; the answer begins with `start` (empty: as the LLM writes it).
    fn request(
        &mut self,
        kind: Request,
        text: &str,
        options: &GenerateOptions,
        start: &str,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, LlmError> {
        self.check_question(text)?;
        if self.scene.is_none() {
            self.set_scene(u64::MAX, None)?;
        }
        let request = self.layout.request(text);
        self.generate_as(kind, &[Part::Text(&request)], options, start, on_text)
    }

    /// The LLM's final hidden states at the tokens of `signal`, read after the conversation
    /// "scene, `question`, answer `answer`": the input of the output projector. `[n, n_embd]`
    /// row-major, with `n` the number of signal tokens. The cache is cut back to the scene prefix
    /// first and after, like every request.
    pub fn signal_states(&mut self, question: &str, answer: &str, signal: &str) -> Result<Vec<f32>, LlmError> {
        self.check_question(question)?;
        if self.scene.is_none() {
            self.set_scene(u64::MAX, None)?;
        }
        let scene = self.scene.expect("set above");
        if !self.ctx.truncate(scene.n_past) {
            return Err(LlmError::CacheCut);
        }
        let request = self.layout.request(question);
        // The prompt read as a caption's is (by the adapter only when its scope is "prompt"); the
        // answer as the base model wrote it.
        let pos = self.decode_prompt(&[Part::Text(&request)], scene, Request::Caption, "the description")?;
        let pos = self.decode_parts(&[Part::Text(answer)], pos, "the description")?;
        let tokens = self.tokenize(signal, false);
        if tokens.len() > self.ctx.n_outputs() {
            return Err(LlmError::SignalTooLong { n: tokens.len(), max: self.ctx.n_outputs() });
        }
        if tokens.is_empty() || pos + tokens.len() >= self.ctx.n_ctx() {
            return Err(LlmError::ContextTooSmall {
                n_ctx: self.ctx.n_ctx(),
                what: "the signal tokens".into(),
                needed: pos + tokens.len() + 1,
            });
        }
        let states = self
            .ctx
            .hidden_states(&tokens, pos)
            .map_err(|status| LlmError::Decode { what: "the signal tokens", status })?;
        self.ctx.truncate(scene.n_past);
        Ok(states)
    }

    /// Continues the cached prefix with `tail` and generates. The cache is first cut back to the
    /// prefix, so every request sees the same scene prefix and nothing of earlier requests.
    /// A scoped adapter reads `tail` as a question's prompt.
    pub fn generate(
        &mut self,
        tail: &[Part<'_>],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, LlmError> {
        self.generate_as(Request::Question, tail, options, "", on_text)
    }

    /// Generates after `tail`; the answer begins with `start` (decoded as if generated, and part of
    /// the text and of the repeat penalty's history), empty for an answer as the LLM writes it.
    fn generate_as(
        &mut self,
        kind: Request,
        tail: &[Part<'_>],
        options: &GenerateOptions,
        start: &str,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, LlmError> {
        let begin = std::time::Instant::now();
        let scene = match self.scene {
            Some(scene) => scene,
            None => {
                self.set_prefix(u64::MAX, &[])?;
                self.scene.expect("set above")
            }
        };
        let prefix_cached = scene.n_past > 0;
        if !self.ctx.truncate(scene.n_past) {
            return Err(LlmError::CacheCut);
        }
        let mut pos = self.decode_prompt(tail, scene, kind, "the request")?;
        let mut filter = StopFilter::new(self.layout.stop());
        self.history.clear();
        if !start.is_empty() {
            let begun = self.tokenize(start, false);
            pos = self.decode_parts(&[Part::Text(start)], pos, "the guided beginning")?;
            for &token in &begun {
                let (text, _) = filter.push(&self.ctx.model().token_bytes(token));
                if !text.is_empty() {
                    on_text(&text);
                }
            }
            self.history.extend(begun);
        }
        let prefill_ms = ms_since(begin);
        let mut sampler = TokenSampler::new(options.sampling.clone());
        let decode_start = std::time::Instant::now();
        let mut ttft_ms = 0.0;
        let mut stop = StopReason::MaxTokens;
        let begun = self.history.len();
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
                return Err(LlmError::NoLogits);
            };
            if self.history.len() == begun {
                ttft_ms = ms_since(begin);
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
            self.ctx
                .decode(crate::ffi::BatchInput::Tokens(&[token]), pos)
                .map_err(|status| LlmError::Decode { what: "a generated token", status })?;
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
            checked: None,
            guided: None,
            objects: None,
            moved: None,
        })
    }

    /// Checks (at load) that every marker in the chat layout (a `<...>` without spaces, as `<|im_start|>` or
    /// `<global-img>`) is a single token of the GGUF: a layout written for another model's
    /// vocabulary would otherwise feed the marker as plain text, silently.
    pub fn check_layout(&self) -> Result<(), LlmError> {
        let request = self.layout.request("");
        let texts =
            [self.layout.prefix(), request.as_str()].into_iter().chain(self.layout.stop().iter().map(String::as_str));
        for marker in texts.flat_map(markers) {
            let pieces = self.tokenize(marker, false).len();
            if pieces != 1 {
                return Err(LlmError::NotAToken {
                    marker: marker.to_owned(),
                    pieces,
                    gguf: self.summary.gguf.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// The token ids the last [`Backbone::generate`] produced (stop strings included, the
    /// end-of-generation token not).
    pub fn generated(&self) -> &[i32] {
        &self.history
    }

    /// The chat layout's text before the image tokens.
    pub fn prefix_text(&self) -> &str {
        self.layout.prefix()
    }

    /// The chat layout's text after the image tokens for `question`.
    pub fn request_text(&self, question: &str) -> String {
        self.layout.request(question)
    }

    /// Tokenizes text as a prompt part does: special tokens parsed, and BOS in front when
    /// `at_start` and the model wants one.
    pub fn tokenize(&self, text: &str, at_start: bool) -> Vec<i32> {
        self.ctx.model().tokenize(text, at_start && self.ctx.model().adds_bos())
    }
}

/// The tokens of each text part of `parts` (special tokens parsed; BOS in front of the first when
/// `at_start` and the model wants one); none for embedding parts.
fn tokens_of(model: &crate::ffi::Model, parts: &[Part<'_>], at_start: bool) -> Vec<Vec<i32>> {
    let mut first = at_start && model.adds_bos();
    parts
        .iter()
        .map(|part| match part {
            Part::Text(text) => {
                let tokens = model.tokenize(text, first);
                first = false;
                tokens
            }
            Part::Embeddings(_) => Vec::new(),
        })
        .collect()
}

/// Decodes `parts` into `ctx` at `pos`; returns the position after them.
fn decode_parts(
    ctx: &mut crate::ffi::Context,
    parts: &[Part<'_>],
    pos: usize,
    what: &'static str,
) -> Result<usize, LlmError> {
    let n_embd = ctx.model().n_embd();
    let tokens = tokens_of(ctx.model(), parts, pos == 0);
    let needed = pos
        + parts
            .iter()
            .zip(&tokens)
            .map(|(part, toks)| match part {
                Part::Text(_) => toks.len(),
                Part::Embeddings(embd) => embd.len() / n_embd.max(1),
            })
            .sum::<usize>();
    if needed >= ctx.n_ctx() {
        return Err(LlmError::ContextTooSmall { n_ctx: ctx.n_ctx(), what: what.to_owned(), needed: needed + 1 });
    }
    let mut pos = pos;
    for (part, toks) in parts.iter().zip(&tokens) {
        let (input, n) = match part {
            Part::Text(_) => (crate::ffi::BatchInput::Tokens(toks), toks.len()),
            Part::Embeddings(embd) => {
                if embd.len() % n_embd != 0 {
                    return Err(LlmError::EmbeddingWidth { expected: n_embd, got: embd.len() });
                }
                (crate::ffi::BatchInput::Embeddings(embd), embd.len() / n_embd)
            }
        };
        if n == 0 {
            continue;
        }
        ctx.decode(input, pos).map_err(|status| LlmError::Decode { what, status })?;
        pos += n;
    }
    Ok(pos)
}

/// The `<...>` markers in `text`: a `<`, at least one character that is neither whitespace nor an
/// angle bracket, and a `>`.
fn markers(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || loop {
        let start = rest.find('<')?;
        let after = &rest[start + 1..];
        let end = after.find(|c: char| c == '>' || c == '<' || c.is_whitespace());
        match end {
            Some(end) if end > 0 && after[end..].starts_with('>') => {
                let marker = &rest[start..start + end + 2];
                rest = &after[end + 1..];
                return Some(marker);
            }
            Some(end) => rest = &after[end..],
            None => return None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::markers;

    #[test]
    fn markers_are_angle_bracketed_words() {
        let found: Vec<&str> =
            markers("<|im_start|>User:<fake_token_around_image><global-img> a < b <x y> <> <<c>\n").collect();
        assert_eq!(found, ["<|im_start|>", "<fake_token_around_image>", "<global-img>", "<c>"]);
        assert_eq!(markers("no markers, 3 < 4 > 2").count(), 0);
    }
}
