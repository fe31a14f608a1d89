//! The modality encoder: an RGB8 frame through pre-processing and a ViT (ONNX) to patch features.

use std::path::PathBuf;
use std::time::Instant;

use super::preprocess::Preprocessor;
use crate::cache::{self, CacheError};
use crate::frame::RgbImage;
use crate::manifest::{EncoderSpec, Manifest};
use crate::onnx::{Element, Input, OnnxError, OnnxRuntime, OnnxSession};
use crate::util::ms_since;

/// An error from the vision path (encoder or projector).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VisionError {
    /// A model file is missing or differs from the manifest.
    #[error(transparent)]
    File(#[from] CacheError),
    /// ONNX Runtime or the model's signature.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The resizer failed on a frame.
    #[error("resize {from_w}x{from_h} -> {to_w}x{to_h}: {message}")]
    Resize {
        /// Source width.
        from_w: u32,
        /// Source height.
        from_h: u32,
        /// Target width.
        to_w: u32,
        /// Target height.
        to_h: u32,
        /// The resizer's message.
        message: String,
    },
    /// A model produced a tensor of another shape than the manifest says.
    #[error("{file}: output shape {actual:?}, expected {expected:?} (from manifest {manifest})")]
    OutputShape {
        /// The model.
        file: PathBuf,
        /// The manifest.
        manifest: String,
        /// What the manifest says.
        expected: Vec<usize>,
        /// What the model gave.
        actual: Vec<usize>,
    },
    /// The image tokens' width does not match the LLM's embedding width.
    #[error("{projector} outputs image tokens of width {projector_width}, but the LLM {llm} has n_embd {llm_width}; they must be equal (train or pick the projector or vision model made for this LLM)")]
    WidthMismatch {
        /// The model that makes the image tokens: the projector, or an encoder with its connector.
        projector: PathBuf,
        /// Its output width.
        projector_width: usize,
        /// The GGUF file.
        llm: PathBuf,
        /// The GGUF's embedding width.
        llm_width: usize,
    },
}

/// Encoder output for one frame: `[n_tokens, width]` row-major, prefix tokens (CLS) first, then
/// the patch grid row by row. The buffer is reused from frame to frame.
#[derive(Debug, Clone, Default)]
pub struct PatchFeatures {
    /// Tokens, including prefix tokens.
    pub n_tokens: usize,
    /// Feature width.
    pub width: usize,
    /// The values.
    pub data: Vec<f32>,
}

impl PatchFeatures {
    /// The feature vector of token `i`.
    pub fn token(&self, i: usize) -> &[f32] {
        &self.data[i * self.width..(i + 1) * self.width]
    }
}

/// Milliseconds spent in each encoder stage.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct EncodeTimings {
    /// Resize and normalise.
    pub preprocess_ms: f64,
    /// The ViT.
    pub encode_ms: f64,
}

/// The encoder: pre-processor and ONNX session.
pub struct Encoder {
    session: OnnxSession,
    preprocessor: Preprocessor,
    spec: EncoderSpec,
    manifest_origin: String,
    /// The input's shape with batch (and images) 1.
    shape: Vec<usize>,
    /// The pixel mask (all true) and its shape, for exports that take one.
    mask: Option<(PixelMask, Vec<usize>)>,
}

/// An all-true pixel mask in the element type the export declares (bool, as SmolVLM's; some
/// exports take int64).
enum PixelMask {
    Bool(Vec<bool>),
    I64(Vec<i64>),
}

impl Encoder {
    /// Loads the encoder the manifest names, checks its file, its signature, and the shape it
    /// really produces (one warm-up run on a blank frame).
    pub fn load(runtime: &OnnxRuntime, manifest: &Manifest, cache_root: &std::path::Path) -> Result<Self, VisionError> {
        let spec = manifest.encoder.clone();
        let path = manifest.resolve(&spec.file, cache_root);
        cache::verify(&path, "the encoder ONNX model", spec.file.size, None)?;
        let session = runtime.session(&path, "the image encoder")?;
        session.check_signature(&spec.input, &spec.input_shape, &spec.output, &spec.output_shape)?;
        // Batch (and images) 1: the manifest's free dimensions become 1.
        let shape: Vec<usize> = spec.input_shape.iter().map(|d| (*d).max(1) as usize).collect();
        let mask = match &spec.mask_input {
            Some(name) => {
                // [batch, (images,) height, width]: the input's shape without its channels.
                let mut dims = shape.clone();
                dims.remove(dims.len() - 3);
                session.check_io(&[(name, &[Element::Bool, Element::I64], dims.len())], &[])?;
                let n = dims.iter().product();
                let mask = match session.io_type(name) {
                    Some((Element::I64, _)) => PixelMask::I64(vec![1; n]),
                    _ => PixelMask::Bool(vec![true; n]),
                };
                Some((mask, dims))
            }
            None => None,
        };
        let mut encoder = Encoder {
            preprocessor: Preprocessor::new(&spec.preprocess),
            session,
            spec,
            manifest_origin: manifest.origin.clone(),
            shape,
            mask,
        };
        let [h, w] = encoder.spec.preprocess.size;
        let blank = RgbImage::from_pixels(w, h, vec![0; (w * h * 3) as usize]).expect("size validated by the manifest");
        let mut features = PatchFeatures::default();
        encoder.encode(&blank, &mut features)?;
        Ok(encoder)
    }

    /// The ONNX session (for its provider and file).
    pub fn session(&self) -> &OnnxSession {
        &self.session
    }

    /// Encodes one frame into `out`.
    pub fn encode(&mut self, image: &RgbImage, out: &mut PatchFeatures) -> Result<EncodeTimings, VisionError> {
        let start = Instant::now();
        let tensor = self.preprocessor.run(image)?;
        let preprocess_ms = ms_since(start);
        let start = Instant::now();
        let pixels = (self.spec.input.as_str(), self.shape.as_slice(), Input::F32(tensor));
        let out_shape = match (&self.spec.mask_input, &self.mask) {
            (Some(name), Some((mask, dims))) => {
                let mask = match mask {
                    PixelMask::Bool(m) => Input::Bool(m),
                    PixelMask::I64(m) => Input::I64(m),
                };
                self.session.run(&[pixels, (name.as_str(), dims.as_slice(), mask)], &self.spec.output, &mut out.data)?
            }
            _ => self.session.run(&[pixels], &self.spec.output, &mut out.data)?,
        };
        let encode_ms = ms_since(start);
        // The manifest fixes tokens and width (validated); the batch is 1.
        let expected = vec![1, self.spec.output_shape[1] as usize, self.spec.output_shape[2] as usize];
        if out_shape != expected {
            return Err(VisionError::OutputShape {
                file: self.session.file().to_owned(),
                manifest: self.manifest_origin.clone(),
                expected,
                actual: out_shape,
            });
        }
        out.n_tokens = out_shape[1];
        out.width = out_shape[2];
        Ok(EncodeTimings { preprocess_ms, encode_ms })
    }
}
