//! The LLM backbone on llama.cpp: the model, its chat layout and token sampling.

pub mod backbone;
pub mod prompt;
pub mod sampling;
