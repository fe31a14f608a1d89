//! The second modality encoder: an object detector (ONNX) whose class scores per anchor point
//! the projector reads next to the patch features. It runs only when a frame is projected, not
//! for every frame the scene gate looks at: `prepare` resizes the frame when it is encoded, `run`
//! spends the inference when its tokens are needed.

use std::path::Path;
use std::time::Instant;

use super::encoder::VisionError;
use super::preprocess::Preprocessor;
use crate::cache;
use crate::frame::RgbImage;
use crate::manifest::{DetectorSpec, Manifest};
use crate::onnx::{Input, OnnxRuntime, OnnxSession};
use crate::util::ms_since;

/// The detector: its pre-processor, session and output buffer.
pub struct Detector {
    session: OnnxSession,
    preprocessor: Preprocessor,
    spec: DetectorSpec,
    shape: [usize; 4],
    /// A frame is pre-processed (in the pre-processor's buffer) and not yet run.
    pending: bool,
    scores: Vec<f32>,
}

impl Detector {
    /// Loads the detector the manifest names; checks its file, signature and (one run on a
    /// blank frame) the shape of its scores.
    pub fn load(runtime: &OnnxRuntime, manifest: &Manifest, cache_root: &Path) -> Result<Self, VisionError> {
        let spec = manifest.detector.clone().expect("Detector::load is called for manifests with a [detector]");
        let path = manifest.resolve(&spec.file, cache_root);
        cache::verify(&path, "the detector ONNX model", spec.file.size, None)?;
        let session = runtime.session(&path, "the object detector")?;
        session.check_signature(&spec.input, &spec.input_shape, &spec.output, &spec.output_shape)?;
        let [h, w] = spec.preprocess.size;
        let mut detector = Detector {
            preprocessor: Preprocessor::new(&spec.preprocess),
            shape: [1, 3, h as usize, w as usize],
            session,
            spec,
            pending: false,
            scores: Vec::new(),
        };
        let blank = RgbImage::from_pixels(w, h, vec![0; (w * h * 3) as usize]).expect("size validated by the manifest");
        detector.prepare(&blank)?;
        detector.run()?;
        Ok(detector)
    }

    /// The ONNX session (for its provider and file).
    pub fn session(&self) -> &OnnxSession {
        &self.session
    }

    /// Pre-processes `image` for the next `run`; returns the time in ms.
    pub fn prepare(&mut self, image: &RgbImage) -> Result<f64, VisionError> {
        let start = Instant::now();
        self.preprocessor.run(image)?;
        self.pending = true;
        Ok(ms_since(start))
    }

    /// Runs the detector on the prepared frame (once: later calls reuse its scores) and returns
    /// its class scores, `[anchors, classes]` row-major, with their shape `[1, anchors, classes]`.
    pub fn run(&mut self) -> Result<(&[f32], [usize; 3]), VisionError> {
        let expected = [1, self.spec.output_shape[1] as usize, self.spec.output_shape[2] as usize];
        if self.pending {
            let pixels = (self.spec.input.as_str(), self.shape.as_slice(), Input::F32(self.preprocessor.tensor()));
            let shape = self.session.run(&[pixels], &self.spec.output, &mut self.scores)?;
            self.pending = false;
            if shape != expected {
                self.scores.clear();
                return Err(VisionError::OutputShape {
                    file: self.session.file().to_owned(),
                    manifest: "detector.output_shape".into(),
                    expected: expected.to_vec(),
                    actual: shape,
                });
            }
        }
        Ok((&self.scores, expected))
    }
}
