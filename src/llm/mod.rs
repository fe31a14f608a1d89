//! The LLM backbone on llama.cpp: the model and its GGUF metadata, the chat layout around the
//! image tokens, and token sampling.

mod backbone;
mod error;
mod gguf;
mod grounding;
mod prompt;
mod sampling;

use serde::Deserialize;

pub use backbone::{Backbone, GenerateOptions, Generation, Guided, ModelSummary, Moved, Part, StopReason, MAX_OUTPUTS};
pub use error::{check_question, LlmError, QuestionError};
pub use gguf::{token_embeddings, GgufInfo};
pub use grounding::{
    classifier_support, mentions, name_directions, position, stated_sides, support, support_at, Checked, Grounding,
    Guide, GuideKind, Support,
};
pub use prompt::{ChatLayout, StopFilter};
pub use sampling::{SamplingParams, TokenSampler};

/// The LLM backbone: llama.cpp settings, prompts and generation limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// CPU threads (0: the number of physical cores).
    pub threads: usize,
    /// Context length in tokens: the scene prefix, a question and its answer must fit. The
    /// default, 1024, holds the reference stack's scene (67 tokens), the longest question
    /// (`max_question_chars` of plain text is about a quarter as many tokens) and `max_tokens`
    /// several times over; every token of context costs the KV cache memory (22.5 KiB each for
    /// SmolLM2-135M: 2048 tokens made the peak 20 MiB higher). A request that does not fit is
    /// refused with this key named.
    pub context: u32,
    /// Most tokens decoded in one llama.cpp call (prefill chunk).
    pub batch: u32,
    /// Layers offloaded to the GPU (needs the `cuda` build; 0: CPU only).
    pub gpu_layers: i32,
    /// Most tokens in one caption or answer.
    pub max_tokens: usize,
    /// Longest accepted question, in characters.
    pub max_question_chars: usize,
    /// Replaces the manifest's system prompt.
    pub system_prompt: Option<String>,
    /// The question that asks for a caption.
    pub caption_prompt: String,
    /// A caption or answer that takes longer is cut off (seconds).
    pub request_timeout_s: f64,
    /// Check captions against the image tokens when the manifest has a `[grounding]` section: a
    /// named category that no image token points at is removed (see `Grounding`).
    pub ground_captions: bool,
    /// Decode scene prefixes with the manifest's scene model (`llm.scene_model`, the scene adapter
    /// folded in) when it has one; `false` applies its `adapter` at run time instead: about 40 MB
    /// less memory, for a slower scene prefill. On the CPU only: with `gpu_layers` > 0 the
    /// adapter is applied, since llama.cpp would copy every tensor the two models share to the
    /// device twice (their files are mapped once in host memory, not in device memory).
    pub scene_model: bool,
    /// Sampling; the default (temperature 0) is greedy and deterministic.
    pub sampling: SamplingParams,
}

impl LlmConfig {
    /// The manifest's scene model when this configuration loads it (`scene_model`, on the CPU
    /// only): what `Backbone::load` loads and `models check` verifies.
    pub fn scene_model_of<'m>(&self, manifest: &'m crate::manifest::Manifest) -> Option<&'m crate::manifest::FileRef> {
        manifest.llm.scene_model.as_ref().filter(|_| self.scene_model && self.gpu_layers == 0)
    }
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            threads: 0,
            context: 1024,
            batch: 512,
            gpu_layers: 0,
            max_tokens: 96,
            max_question_chars: 500,
            system_prompt: None,
            caption_prompt: "Describe what you see in one sentence.".into(),
            request_timeout_s: 60.0,
            ground_captions: true,
            scene_model: true,
            sampling: SamplingParams::default(),
        }
    }
}
