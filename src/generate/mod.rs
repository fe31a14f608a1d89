//! The modality generator: few-step diffusion samplers and the ONNX pipeline (text encoder or
//! output projector, UNet, VAE decoder) that renders images, loaded on demand.

mod diffusion;
mod generator;
mod on_demand;

use serde::{Deserialize, Serialize};

use crate::frame::ImageFormat;

pub use diffusion::{gaussian_noise, DiffusionSampler};
pub use generator::{
    check_prompt, Conditioning, Generator, GeneratorError, PromptError, RenderLimits, RenderOptions, RenderRequest,
    RenderTimings, Rendered,
};
pub use on_demand::{mem_available_mib, OnDemand};

/// How conditioning reaches the generator for scene re-renderings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConditionPath {
    /// The text encoder on the LLM's own description (works with off-the-shelf weights).
    #[default]
    Text,
    /// The output projector on the LLM's hidden states at the signal tokens.
    Hidden,
}

/// The modality generator: limits, memory budget, output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Serve `generate` requests (when the manifest has a generator).
    pub enabled: bool,
    /// Unload the generator after this many idle seconds, so a device with shared RAM does not hold it.
    pub idle_unload_s: f64,
    /// Most denoising steps a request may ask for.
    pub max_steps: usize,
    /// Largest image side a request may ask for, in pixels.
    pub max_side: usize,
    /// PNG or JPEG.
    pub format: ImageFormat,
    /// How `from_scene` renderings are conditioned: `text` (text encoder on the description) or
    /// `hidden` (output projector on the LLM's hidden states).
    pub condition: ConditionPath,
    /// Longest prompt in characters; longer prompts are refused (the tokenizer's own token limit
    /// truncates with a warning in the reply).
    pub max_prompt_chars: usize,
    /// Refuse to load when less memory than this is available (MiB, from /proc/meminfo; 0: no check).
    pub min_free_mib: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            enabled: true,
            idle_unload_s: 120.0,
            max_steps: 8,
            max_side: 1024,
            format: ImageFormat::Png,
            condition: ConditionPath::Text,
            max_prompt_chars: 2000,
            min_free_mib: 0,
        }
    }
}

impl GeneratorConfig {
    /// The limits a request is checked against.
    pub fn limits(&self) -> RenderLimits {
        RenderLimits { max_steps: self.max_steps, max_side: self.max_side, max_prompt_chars: self.max_prompt_chars }
    }
}
