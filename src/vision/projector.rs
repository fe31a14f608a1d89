//! The input projector: pools the encoder's patch grid and maps it (ONNX) into the LLM's
//! embedding space, giving the image tokens the backbone reads.

use std::path::Path;
use std::time::Instant;

use super::encoder::{PatchFeatures, VisionError};
use crate::cache;
use crate::manifest::{Manifest, ProjectorSpec};
use crate::onnx::{Element, Input, OnnxRuntime, OnnxSession};
use crate::util::ms_since;

/// Image tokens ready for the backbone: `[n_tokens, n_embd]` f32, row-major.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageTokens {
    /// Number of image tokens.
    pub n_tokens: usize,
    /// Embedding width (the LLM's `n_embd`).
    pub n_embd: usize,
    /// The embeddings.
    pub data: Vec<f32>,
    /// With a `[detector]`: its best score of each class (column) over all its anchors in the same
    /// frame, which the caption check can read (`grounding.classifier_threshold`); empty without.
    pub class_scores: Vec<f32>,
    /// With a `[detector]`: where in the frame each class scores best, as the horizontal centre of
    /// that anchor point (a fraction of the frame's width; NaN where unknown); empty without.
    pub class_x: Vec<f32>,
}

/// Average-pools a row-major `grid` of patch tokens (after `prefix` leading tokens) to `pool`
/// cells, writing `[pool_rows * pool_cols, width]` into `out`. `pool` must divide `grid`, which the
/// manifest guarantees.
pub fn pool_patches(features: &PatchFeatures, prefix: usize, grid: [usize; 2], pool: [usize; 2], out: &mut Vec<f32>) {
    let width = features.width;
    let [rows, cols] = grid;
    let [pool_rows, pool_cols] = pool;
    let (cell_rows, cell_cols) = (rows / pool_rows, cols / pool_cols);
    let scale = 1.0 / (cell_rows * cell_cols) as f32;
    out.clear();
    out.resize(pool_rows * pool_cols * width, 0.0);
    for row in 0..rows {
        for col in 0..cols {
            let cell = (row / cell_rows) * pool_cols + col / cell_cols;
            let dst = &mut out[cell * width..(cell + 1) * width];
            for (d, s) in dst.iter_mut().zip(features.token(prefix + row * cols + col)) {
                *d += s * scale;
            }
        }
    }
}

/// Appends the first `count` leading (non-patch) tokens of `features` (CLS) to `out`, as they are.
pub fn append_leading(features: &PatchFeatures, count: usize, out: &mut Vec<f32>) {
    for token in 0..count {
        out.extend_from_slice(features.token(token));
    }
}

/// The projector session and its pooling buffer.
pub struct Projector {
    session: OnnxSession,
    spec: ProjectorSpec,
    prefix: usize,
    grid: [usize; 2],
    /// Rows of the projector's input: the pooled cells, then the global (leading) tokens.
    rows: usize,
    /// Image tokens out (`Manifest::n_image_tokens`).
    n_tokens: usize,
    pooled: Vec<f32>,
}

impl Projector {
    /// Loads the projector the manifest names. `llm`, when known (the GGUF's path and `n_embd`),
    /// must have the projector's output width.
    pub fn load(
        runtime: &OnnxRuntime,
        manifest: &Manifest,
        cache_root: &Path,
        llm: Option<(&Path, usize)>,
    ) -> Result<Self, VisionError> {
        let spec = manifest.projector.clone().expect("Projector::load is called for manifests with a [projector]");
        let path = manifest.resolve(&spec.file, cache_root);
        if let Some((llm_path, llm_width)) = llm {
            if llm_width != spec.out_width {
                return Err(VisionError::WidthMismatch {
                    projector: path,
                    projector_width: spec.out_width,
                    llm: llm_path.to_owned(),
                    llm_width,
                });
            }
        }
        cache::verify(&path, "the projector ONNX model", spec.file.size, None)?;
        let session = runtime.session(&path, "the input projector")?;
        session.check_signature(
            &spec.input,
            &[-1, spec.in_width as i64],
            &spec.output,
            &[-1, spec.out_width as i64],
        )?;
        if let Some(name) = &spec.detections_input {
            // The detector's scores go in as they come out: a projector trained on another detector
            // (another count of anchors or classes) is refused here, not at its first frame.
            match &manifest.detector {
                Some(det) => session.check_input(name, &det.output_shape)?,
                None => session.check_io(&[(name, &[Element::F32], 3)], &[])?,
            }
        }
        if spec.untrained {
            tracing::warn!(projector = %path.display(), "the projector is the untrained placeholder: captions will not describe the image");
        }
        let rows = spec.pool[0] * spec.pool[1] + spec.global_tokens;
        Ok(Projector {
            session,
            spec,
            prefix: manifest.encoder.prefix_tokens,
            grid: manifest.encoder.patch_grid,
            rows,
            n_tokens: manifest.n_image_tokens(),
            pooled: Vec::new(),
        })
    }

    /// The ONNX session (for its provider and file).
    pub fn session(&self) -> &OnnxSession {
        &self.session
    }

    /// Pools `features` as the projector's input is pooled, into `out`.
    pub fn pool(&self, features: &PatchFeatures, out: &mut Vec<f32>) {
        pool_patches(features, self.prefix, self.grid, self.spec.pool, out);
    }

    /// Pools and projects one frame's features (and, when the manifest has a detector, its class
    /// scores `[1, anchors, classes]` with their shape) into `out`; returns the time in ms.
    pub fn project(
        &mut self,
        features: &PatchFeatures,
        detections: Option<(&[f32], [usize; 3])>,
        out: &mut ImageTokens,
    ) -> Result<f64, VisionError> {
        let start = Instant::now();
        pool_patches(features, self.prefix, self.grid, self.spec.pool, &mut self.pooled);
        append_leading(features, self.spec.global_tokens, &mut self.pooled);
        let feature_shape = [self.rows, self.spec.in_width];
        let features = (self.spec.input.as_str(), feature_shape.as_slice(), Input::F32(&self.pooled));
        let shape = match (&self.spec.detections_input, detections) {
            (Some(name), Some((scores, shape))) => self.session.run(
                &[features, (name.as_str(), shape.as_slice(), Input::F32(scores))],
                &self.spec.output,
                &mut out.data,
            )?,
            _ => self.session.run(&[features], &self.spec.output, &mut out.data)?,
        };
        let n_tokens = self.n_tokens;
        if shape != [n_tokens, self.spec.out_width] {
            return Err(VisionError::OutputShape {
                file: self.session.file().to_owned(),
                manifest: "projector.pool / projector.detection_tokens / projector.global_tokens / projector.out_width"
                    .into(),
                expected: vec![n_tokens, self.spec.out_width],
                actual: shape,
            });
        }
        out.n_tokens = n_tokens;
        out.n_embd = self.spec.out_width;
        Ok(ms_since(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The cells are written as the sums of the patch indices they average.
    #[allow(clippy::identity_op)]
    #[test]
    fn pooling_averages_each_cell_and_skips_the_prefix() {
        // 1 prefix token (value 1000) + a 4x4 grid where token value = its index, width 2
        // (second channel negated). Pooled to 2x2: each cell averages a 2x2 block.
        let mut data = vec![1000.0, 1000.0];
        for i in 0..16 {
            data.extend_from_slice(&[i as f32, -(i as f32)]);
        }
        let features = PatchFeatures { n_tokens: 17, width: 2, data };
        let mut out = Vec::new();
        pool_patches(&features, 1, [4, 4], [2, 2], &mut out);
        let cells = [
            (0 + 1 + 4 + 5) as f32 / 4.0,
            (2 + 3 + 6 + 7) as f32 / 4.0,
            (8 + 9 + 12 + 13) as f32 / 4.0,
            (10 + 11 + 14 + 15) as f32 / 4.0,
        ];
        let expected: Vec<f32> = cells.iter().flat_map(|v| [*v, -v]).collect();
        assert_eq!(out, expected);
        // The buffer is reused, not appended to.
        pool_patches(&features, 1, [4, 4], [4, 4], &mut out);
        assert_eq!(out.len(), 16 * 2);
        assert_eq!(&out[..2], &[0.0, -0.0]);
    }

    #[test]
    fn global_tokens_follow_the_cells_unpooled() {
        // 1 prefix token (CLS: 1000, 2000) + a 2x2 grid pooled to one cell.
        let data = vec![1000.0, 2000.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let features = PatchFeatures { n_tokens: 5, width: 2, data };
        let mut out = Vec::new();
        pool_patches(&features, 1, [2, 2], [1, 1], &mut out);
        append_leading(&features, 1, &mut out);
        assert_eq!(out, [4.0, 5.0, 1000.0, 2000.0], "the cell's mean, then CLS as it is");
        append_leading(&features, 0, &mut out);
        assert_eq!(out.len(), 4, "no global tokens: nothing appended");
    }
}
