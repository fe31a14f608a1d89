//! The vision path as one unit: frame → encoder → pooled patch features → projector → image
//! tokens. The last frame's features stay available for scene-change gating.

mod encoder;
mod preprocess;
mod projector;

use std::path::Path;

use serde::Serialize;

use crate::frame::RgbImage;
use crate::manifest::Manifest;
use crate::onnx::OnnxRuntime;

pub use encoder::{EncodeTimings, Encoder, PatchFeatures, VisionError};
pub use preprocess::Preprocessor;
pub use projector::{ImageTokens, Projector};

/// Milliseconds per vision stage for one frame.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct VisionTimings {
    /// Resize and normalise.
    pub preprocess_ms: f64,
    /// The ViT.
    pub encode_ms: f64,
    /// Pooling and the projector.
    pub project_ms: f64,
}

/// Encoder and projector, loaded together and checked against each other and the LLM.
pub struct Vision {
    encoder: Encoder,
    projector: Projector,
    features: PatchFeatures,
}

impl Vision {
    /// Loads both models. With `llm` (the LLM's file and its `n_embd`), the projector's output
    /// width is checked against the LLM's at load time.
    pub fn load(
        runtime: &OnnxRuntime,
        manifest: &Manifest,
        cache_root: &Path,
        llm: Option<(&Path, usize)>,
    ) -> Result<Self, VisionError> {
        let projector = Projector::load(runtime, manifest, cache_root, llm)?;
        let encoder = Encoder::load(runtime, manifest, cache_root)?;
        Ok(Vision { encoder, projector, features: PatchFeatures::default() })
    }

    /// Runs the whole path on one frame, writing the image tokens into `out`.
    pub fn run(&mut self, image: &RgbImage, out: &mut ImageTokens) -> Result<VisionTimings, VisionError> {
        let enc = self.encode(image)?;
        let project_ms = self.project(out)?;
        Ok(VisionTimings { preprocess_ms: enc.preprocess_ms, encode_ms: enc.encode_ms, project_ms })
    }

    /// Encodes one frame; its features stay for [`Vision::signature`] and [`Vision::project`].
    pub fn encode(&mut self, image: &RgbImage) -> Result<EncodeTimings, VisionError> {
        self.encoder.encode(image, &mut self.features)
    }

    /// The scene signature of the last encoded frame: its patch grid pooled as the projector pools
    /// it (written into `out`, reused).
    pub fn signature(&self, out: &mut Vec<f32>) {
        self.projector.pool(&self.features, out);
    }

    /// Projects the last encoded frame into image tokens; returns the time in ms.
    pub fn project(&mut self, out: &mut ImageTokens) -> Result<f64, VisionError> {
        self.projector.project(&self.features, out)
    }

    /// The encoder's and projector's preferred execution providers.
    pub fn providers(&self) -> (String, String) {
        (self.encoder.session().ep().to_string(), self.projector.session().ep().to_string())
    }
}
