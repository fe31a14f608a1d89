//! The tensors scenecast feeds its encoders, for `make bench-peer` (benches/peer/run.py): for each
//! image, the encoder's and the detector's pre-processed input (decoded, resized, normalised, NCHW)
//! as raw little-endian f32, so the Python peer can run its own models on exactly what scenecast
//! reads and show where two captions part. A tool, not part of the daemon.
//!
//! ```sh
//! cargo run --release --example preprocess_dump -- OUT_DIR IMAGE...
//! ```
//! Writes `OUT_DIR/<file name>.encoder.f32` and, when the reference stack has a detector,
//! `OUT_DIR/<file name>.detector.f32`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use scenecast::frame::RgbImage;
use scenecast::manifest::Manifest;
use scenecast::vision::Preprocessor;

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let out = PathBuf::from(args.next().context("usage: preprocess_dump OUT_DIR IMAGE...")?);
    let manifest = Manifest::reference()?;
    let mut encoder = Preprocessor::new(&manifest.encoder.preprocess);
    let mut detector = manifest.detector.as_ref().map(|d| Preprocessor::new(&d.preprocess));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for image in args.map(PathBuf::from) {
        let name = image.file_name().context("an image path without a file name")?.to_string_lossy().into_owned();
        let rgb = RgbImage::open(&image).with_context(|| format!("reading {}", image.display()))?;
        write(&out.join(format!("{name}.encoder.f32")), encoder.run(&rgb)?)?;
        if let Some(detector) = detector.as_mut() {
            write(&out.join(format!("{name}.detector.f32")), detector.run(&rgb)?)?;
        }
    }
    Ok(())
}

fn write(path: &Path, tensor: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = tensor.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
