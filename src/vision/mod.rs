//! The vision path as one unit: frame → encoder → pooled patch features → projector → image
//! tokens (with a `[detector]`, the projector also reads the detector's class scores of the same
//! frame), or, for an encoder with its connector inside (no `[projector]` in the manifest),
//! frame → encoder → image tokens. The last frame's features stay available for scene-change
//! gating.

mod detector;
mod encoder;
mod preprocess;
mod projector;

use std::path::Path;

use serde::Serialize;

use crate::frame::RgbImage;
use crate::manifest::Manifest;
use crate::onnx::OnnxRuntime;

pub use detector::Detector;
pub use encoder::{EncodeTimings, Encoder, PatchFeatures, VisionError};
pub use preprocess::Preprocessor;
pub use projector::{ImageTokens, Projector};

/// For an encoder with its connector inside: its output width must be the LLM's (`llm`: the GGUF's
/// path and `n_embd`, when known).
pub fn check_width(manifest: &Manifest, cache_root: &Path, llm: Option<(&Path, usize)>) -> Result<(), VisionError> {
    let width = manifest.encoder.output_shape[2] as usize;
    match llm {
        Some((llm_path, llm_width)) if llm_width != width => Err(VisionError::WidthMismatch {
            projector: manifest.resolve(&manifest.encoder.file, cache_root),
            projector_width: width,
            llm: llm_path.to_owned(),
            llm_width,
        }),
        _ => Ok(()),
    }
}

/// Writes the best score of each class over all anchors of `detections` (`[anchors, classes]`
/// row-major, with its shape) into `out`, and into `at_x` the horizontal centre of the anchor that
/// scores it best (the first of equals; `anchor_x`, [`crate::manifest::DetectorSpec::anchor_x`],
/// NaN for an anchor it does not place); clears both without detections.
pub fn best_per_class(
    detections: Option<(&[f32], [usize; 3])>,
    anchor_x: &[f32],
    out: &mut Vec<f32>,
    at_x: &mut Vec<f32>,
) {
    out.clear();
    at_x.clear();
    let Some((scores, [_, _, classes])) = detections else { return };
    out.resize(classes, f32::MIN);
    at_x.resize(classes, f32::NAN);
    for (i, anchor) in scores.chunks_exact(classes.max(1)).enumerate() {
        let x = anchor_x.get(i).copied().unwrap_or(f32::NAN);
        for ((best, at), s) in out.iter_mut().zip(at_x.iter_mut()).zip(anchor) {
            if *s > *best {
                *best = *s;
                *at = x;
            }
        }
    }
}

/// Milliseconds per vision stage for one frame.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct VisionTimings {
    /// Resize and normalise.
    pub preprocess_ms: f64,
    /// The ViT.
    pub encode_ms: f64,
    /// Pooling, the detector (when the manifest has one) and the projector.
    pub project_ms: f64,
}

/// Encoder and projector, loaded together and checked against each other and the LLM.
pub struct Vision {
    encoder: Encoder,
    /// None when the encoder's output already is the image tokens.
    projector: Option<Projector>,
    /// The second encoder the projector reads, when the manifest has one.
    detector: Option<Detector>,
    /// The horizontal centre of each of the detector's anchor points (empty without one).
    anchor_x: Vec<f32>,
    features: PatchFeatures,
    /// Tokens before the grid (for the layout without a projector, whose grid tokens are the
    /// image tokens).
    prefix: usize,
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
        let projector = match &manifest.projector {
            Some(_) => Some(Projector::load(runtime, manifest, cache_root, llm)?),
            None => {
                check_width(manifest, cache_root, llm)?;
                None
            }
        };
        let encoder = Encoder::load(runtime, manifest, cache_root)?;
        let detector = match &manifest.detector {
            Some(_) => Some(Detector::load(runtime, manifest, cache_root)?),
            None => None,
        };
        if manifest.random {
            tracing::warn!(stack = %manifest.name, "the model stack has random test weights: its text does not describe the image");
        }
        let prefix = manifest.encoder.prefix_tokens;
        let anchor_x = manifest.detector.as_ref().map(|d| d.anchor_x()).unwrap_or_default();
        Ok(Vision { encoder, projector, detector, anchor_x, features: PatchFeatures::default(), prefix })
    }

    /// Runs the whole path on one frame, writing the image tokens into `out`.
    pub fn run(&mut self, image: &RgbImage, out: &mut ImageTokens) -> Result<VisionTimings, VisionError> {
        let enc = self.encode(image)?;
        let project_ms = self.project(out)?;
        Ok(VisionTimings { preprocess_ms: enc.preprocess_ms, encode_ms: enc.encode_ms, project_ms })
    }

    /// Encodes one frame; its features stay for [`Vision::signature`] and [`Vision::project`].
    /// With a detector, the frame is also pre-processed for it (the detector itself runs in
    /// `project`, so frames the scene gate drops do not pay for it).
    pub fn encode(&mut self, image: &RgbImage) -> Result<EncodeTimings, VisionError> {
        let mut timings = self.encoder.encode(image, &mut self.features)?;
        if let Some(detector) = &mut self.detector {
            timings.preprocess_ms += detector.prepare(image)?;
        }
        Ok(timings)
    }

    /// The scene signature of the last encoded frame: its patch grid pooled as the projector pools
    /// it (written into `out`, reused).
    pub fn signature(&self, out: &mut Vec<f32>) {
        match &self.projector {
            Some(projector) => projector.pool(&self.features, out),
            None => {
                out.clear();
                out.extend_from_slice(self.grid_tokens());
            }
        }
    }

    /// Projects the last encoded frame into image tokens; returns the time in ms.
    pub fn project(&mut self, out: &mut ImageTokens) -> Result<f64, VisionError> {
        match &mut self.projector {
            Some(projector) => {
                let start = std::time::Instant::now();
                let detections = match &mut self.detector {
                    Some(detector) => Some(detector.run()?),
                    None => None,
                };
                best_per_class(detections, &self.anchor_x, &mut out.class_scores, &mut out.class_x);
                let detect_ms = crate::util::ms_since(start);
                Ok(detect_ms + projector.project(&self.features, detections, out)?)
            }
            None => {
                // The encoder's connector already mapped them: the grid tokens are the image tokens.
                let start = std::time::Instant::now();
                out.data.clear();
                out.data.extend_from_slice(self.grid_tokens());
                out.n_tokens = self.features.n_tokens - self.prefix;
                out.n_embd = self.features.width;
                out.class_scores.clear();
                out.class_x.clear();
                Ok(crate::util::ms_since(start))
            }
        }
    }

    /// The last frame's tokens after the prefix tokens, `[n, width]` row-major.
    fn grid_tokens(&self) -> &[f32] {
        &self.features.data[self.prefix * self.features.width..]
    }

    /// The encoder's and projector's preferred execution providers (the projector's is "-" when
    /// the encoder has its connector inside).
    pub fn providers(&self) -> (String, String) {
        let projector = self.projector.as_ref().map_or_else(|| "-".to_owned(), |p| p.session().ep().to_string());
        (self.encoder.session().ep().to_string(), projector)
    }
}

#[cfg(test)]
mod tests {
    use super::best_per_class;

    #[test]
    fn each_class_keeps_its_best_score_and_where_its_anchor_is() {
        // Three anchors, two classes.
        let scores = [0.1, 0.7, 0.9, 0.2, 0.9, 0.5];
        let (mut best, mut at) = (Vec::new(), Vec::new());
        best_per_class(Some((&scores, [1, 3, 2])), &[0.1, 0.5, 0.9], &mut best, &mut at);
        assert_eq!((best.as_slice(), at.as_slice()), (&[0.9, 0.7][..], &[0.5, 0.1][..]), "ties: the first anchor");
        // An anchor without a centre is placed nowhere; no detections clear both.
        best_per_class(Some((&scores, [1, 3, 2])), &[0.1], &mut best, &mut at);
        assert!(at[0].is_nan() && at[1] == 0.1, "{at:?}");
        best_per_class(None, &[], &mut best, &mut at);
        assert!(best.is_empty() && at.is_empty());
    }
}
