//! scenecast gives an edge camera a multimodal LLM and speaks MQTT.
//!
//! Data flows one way, through one folder per part of the MM-LLM framework:
//! frame ([`camera`]) → patch features and image tokens ([`vision`]) → text ([`llm`]) → image
//! ([`generate`]) → MQTT ([`mqtt`]). [`pipeline`] loads the stack as one unit; the [`worker`]
//! runs it on its own thread; the [`daemon`] wires the worker to the camera, MQTT and systemd.
//! Model facts come from a [`manifest`]; model files from the [`cache`]. Each external system is
//! known to exactly one module: ONNX Runtime to [`onnx`], llama.cpp's C API to a private `ffi`
//! module (the only `unsafe` code), `rumqttc` to `mqtt`, `v4l` to `camera`.
//!
//! A module imports only from modules before it in that order (the foundation first:
//! `cache`, `frame`, `manifest`, `onnx`, `ffi`, `util`); `tests/layers.rs` checks it.
//!
//! ```no_run
//! use scenecast::{Config, ImageTokens, Pipeline, RgbImage};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::builtin();
//! let mut pipeline = Pipeline::load(config.manifest()?, &config.cache_root(), &config.onnx, &config.llm)?;
//! let mut tokens = ImageTokens::default();
//! pipeline.set_scene(0, &RgbImage::open("cat.png".as_ref())?, &mut tokens)?;
//! println!("{}", pipeline.caption()?.text);
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

// The foundation: plain values, and one module per external system, usable by every layer.
pub mod cache;
mod ffi;
pub mod frame;
pub mod manifest;
pub mod onnx;
mod util;

// The framework's parts, in the order data flows through them.
pub mod camera;
pub mod generate;
pub mod llm;
pub mod mqtt;
pub mod pipeline;
pub mod vision;
pub mod worker;

// Around them: the configuration file, the evaluation, the daemon.
pub mod config;
pub mod daemon;
pub mod eval;

pub use config::Config;
pub use ffi::release_free_memory;
pub use frame::{Frame, RgbImage};
pub use generate::Generator;
pub use llm::Backbone;
pub use manifest::Manifest;
pub use onnx::OnnxRuntime;
pub use pipeline::Pipeline;
pub use util::{ms_since, physical_cores};
pub use vision::{ImageTokens, Vision};
pub use worker::Worker;
