//! The modality generator: few-step diffusion samplers and the ONNX pipeline that renders images.

pub mod diffusion;
pub mod generator;
