//! scenecast gives an edge camera a multimodal LLM and speaks MQTT.
//!
//! Data flows one way, through one module per component:
//! frame ([`frame`], [`preprocess`]) → patch features ([`encoder`]) → image tokens
//! ([`projector`]) → text ([`backbone`]). Model facts come from a [`manifest`]; model files from
//! the [`cache`]. Each external system is known to exactly one module: ONNX Runtime to [`onnx`],
//! llama.cpp's C API to [`ffi`] (the only `unsafe` code).
//!
//! ```no_run
//! use scenecast::{config::Config, frame::RgbImage, onnx::OnnxRuntime, projector::ImageTokens, vision::Vision};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::builtin();
//! let manifest = config.manifest()?;
//! let runtime = OnnxRuntime::init(&config.onnx, &config.cache_root())?;
//! let mut vision = Vision::load(&runtime, &manifest, &config.cache_root(), None)?;
//! let mut tokens = ImageTokens::default();
//! vision.run(&RgbImage::open("cat.png".as_ref())?, &mut tokens)?;
//! assert_eq!(tokens.n_tokens, manifest.n_image_tokens());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

/// Milliseconds since `start`: the unit of every timing scenecast reports.
pub fn ms_since(start: std::time::Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

pub mod cache;
pub mod camera;
pub mod config;
pub mod daemon;
pub mod eval;
pub mod ffi;
pub mod frame;
pub mod generate;
pub mod llm;
pub mod manifest;
pub mod mqtt;
pub mod onnx;
pub mod vision;
pub mod worker;

// The flat paths of the earlier layout, while the code moves.
pub use camera::{source, v4l2 as camera_v4l2};
pub use daemon::systemd;
pub use generate::{diffusion as sampler, generator};
pub use llm::{backbone, prompt, sampling};
pub use mqtt::{broker, spool, wire};
pub use vision::{encoder, preprocess, projector};
pub use worker::gate as scene;
