//! The LLM's errors: loading and running the backbone, and the one check of a question.

use std::path::PathBuf;

use crate::cache::CacheError;

/// An error of the LLM: its GGUF file (missing, incomplete, not what the manifest says), loading it
/// and its adapter, and running it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// A marker of the chat layout (`<global-img>`, `<|im_start|>`) is not one token of the GGUF:
    /// the layout belongs to another model.
    #[error("llm.chat: `{marker}` is not a token of {gguf} (it splits into {pieces} tokens); the chat layout in the manifest belongs to another model: write llm.chat's prefix, suffix and stop with this GGUF's own markers, or use `template = \"gguf\"`")]
    NotAToken {
        /// The marker as written in the manifest.
        marker: String,
        /// How many tokens the GGUF's tokenizer makes of it.
        pieces: usize,
        /// The GGUF file.
        gguf: PathBuf,
    },
    /// The GGUF file is missing.
    #[error("{path}: file not found (expected a GGUF model; run `make models` for the reference one)")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// llama.cpp's reader rejects the header.
    #[error(
        "{path}: not a readable GGUF file (llama.cpp's gguf reader rejected its header; expected a GGUF v2/v3 model)"
    )]
    NotGguf {
        /// The file.
        path: PathBuf,
    },
    /// The file is shorter than its tensor table says.
    #[error("{path}: truncated: {actual} bytes, but its tensors end at byte {expected}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the tensor data ends.
        expected: u64,
        /// The file's size.
        actual: u64,
    },
    /// A required metadata key is missing or has the wrong type.
    #[error("{path}: metadata key `{key}` is missing or not {expected}")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The expected type.
        expected: &'static str,
    },
    /// A tensor of the GGUF cannot be read as asked.
    #[error("{path}: tensor `{tensor}` {problem} (expected the LLM GGUF the manifest names, readable)")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The GGUF differs from what the manifest says.
    #[error("{path}: {what} is {actual}, but manifest {manifest} expects {expected}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The manifest.
        manifest: String,
        /// Which property.
        what: &'static str,
        /// The manifest's value.
        expected: String,
        /// The file's value.
        actual: String,
    },
    /// llama.cpp refused the model.
    #[error(
        "{path}: llama.cpp cannot load it: {reason} (expected a complete GGUF of an architecture llama.cpp supports)"
    )]
    Load {
        /// The file.
        path: PathBuf,
        /// llama.cpp's last error.
        reason: String,
    },
    /// llama.cpp could not create the context.
    #[error("cannot create a llama.cpp context of {n_ctx} tokens: {reason}")]
    Context {
        /// The requested length.
        n_ctx: u32,
        /// llama.cpp's last error.
        reason: String,
    },
    /// The manifest's LoRA adapter is missing or has the wrong size.
    #[error(transparent)]
    AdapterFile(CacheError),
    /// llama.cpp refused the adapter.
    #[error("{path}: llama.cpp cannot apply it to the LLM: {reason} (expected a LoRA adapter GGUF trained for this GGUF, see models/README.md)")]
    Adapter {
        /// The file.
        path: PathBuf,
        /// llama.cpp's last error.
        reason: String,
    },
    /// A further split of the GGUF (`llm.splits`) or the scene model (`llm.scene_model`) is
    /// missing or has the wrong size.
    #[error(transparent)]
    File(CacheError),
    /// The scene model's cache of a scene prefix does not fit the base model's context.
    #[error("{path}: its keys and values of the scene prefix do not fit the LLM's context: {reason} (expected `llm.scene_model` to be the LLM GGUF with an adapter folded in: the same layers and widths)")]
    SceneState {
        /// The scene model's split 0.
        path: PathBuf,
        /// llama.cpp's reason.
        reason: String,
    },
    /// The GGUF has no chat template, or one llama.cpp cannot render.
    #[error("llm.chat.template = \"gguf\": {0}; write `prefix` and `suffix` in the manifest instead")]
    ChatTemplate(String),
    /// The context cannot hold what is asked of it.
    #[error("the context of {n_ctx} tokens is too small: {what} needs {needed}; raise `llm.context`")]
    ContextTooSmall {
        /// The context length.
        n_ctx: usize,
        /// What does not fit.
        what: String,
        /// Tokens needed.
        needed: usize,
    },
    /// Image tokens of another width than the model's.
    #[error("image tokens are {got} wide, but the LLM's n_embd is {expected}")]
    EmbeddingWidth {
        /// The model's width.
        expected: usize,
        /// The tokens' width.
        got: usize,
    },
    /// A question that cannot be asked.
    #[error(transparent)]
    Question(#[from] QuestionError),
    /// The cache cannot drop the previous request while keeping the scene prefix.
    #[error("this model's cache cannot drop a request while keeping the scene prefix (recurrent architectures are not supported); pick a transformer GGUF")]
    CacheCut,
    /// llama.cpp produced no logits after a decode.
    #[error("llama.cpp returned no logits for the last position (a decode that asked for them succeeded)")]
    NoLogits,
    /// The output projector's signal text is longer than one decode can return states for.
    #[error("the manifest's generator.output_projector.signal is {n} tokens; the LLM returns hidden states for at most {max} in one decode (the smaller of `llm.batch` and 32): shorten the signal")]
    SignalTooLong {
        /// Its tokens.
        n: usize,
        /// The context's outputs per decode (`llm.batch` or `MAX_OUTPUTS`, whichever is smaller).
        max: usize,
    },
    /// llama_decode failed.
    #[error("llama.cpp failed to decode {what} (status {status}){}", decode_hint(*status))]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// llama_decode's status.
        status: i32,
    },
}

/// What a user can do about a `llama_decode` status (1: no room left in the KV cache).
fn decode_hint(status: i32) -> &'static str {
    if status == 1 {
        ": no room left in the context; raise `llm.context`"
    } else {
        ""
    }
}

/// A question that cannot be asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuestionError {
    /// Empty or blank.
    #[error("the question is empty")]
    Empty,
    /// Longer than `llm.max_question_chars`.
    #[error("the question has {chars} characters; the limit is {limit} (`llm.max_question_chars`)")]
    TooLong {
        /// Its length.
        chars: usize,
        /// The limit.
        limit: usize,
    },
}

/// The one check of a question, for every way one arrives (CLI, MQTT, the daemon's caption
/// prompt): not blank, and at most `limit` characters.
pub fn check_question(question: &str, limit: usize) -> Result<(), QuestionError> {
    if question.trim().is_empty() {
        return Err(QuestionError::Empty);
    }
    let chars = question.chars().count();
    if chars > limit {
        return Err(QuestionError::TooLong { chars, limit });
    }
    Ok(())
}
