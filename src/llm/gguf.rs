//! A GGUF's metadata, read with llama.cpp's own reader (through [`crate::ffi`]) and checked
//! against the manifest: architecture, embedding width, and that the file is complete.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::LlmError;
use crate::ffi::{GgufFile, GgufValue};
use crate::manifest::Manifest;

/// What a GGUF says about itself.
#[derive(Debug, Clone, Serialize)]
pub struct GgufInfo {
    /// The file.
    pub path: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// `<arch>.embedding_length`.
    pub n_embd: usize,
    /// `<arch>.context_length`, when present.
    pub n_ctx_train: Option<usize>,
    /// `<arch>.block_count`, when present.
    pub n_layer: Option<usize>,
    /// The quantisation (`general.file_type`), when present.
    pub quantization: Option<String>,
    /// Whether the GGUF carries `tokenizer.chat_template`.
    pub has_chat_template: bool,
    /// Number of tensors (in this file).
    pub n_tensors: i64,
    /// How many split files the model is in (`split.count`; 1 for a whole GGUF).
    pub n_splits: usize,
    /// File size in bytes.
    pub size: u64,
}

/// The name of a llama.cpp `general.file_type` (`llama_ftype`).
fn ftype_name(ftype: i64) -> String {
    let name = match ftype {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return format!("file_type {ftype}"),
    };
    name.to_owned()
}

impl GgufInfo {
    /// The file and its `n_embd`: what the vision path checks its projector's width against.
    pub fn llm_width(&self) -> (&Path, usize) {
        (self.path.as_path(), self.n_embd)
    }

    /// Reads the metadata of `path` and checks that the file is complete.
    pub fn read(path: &Path) -> Result<Self, LlmError> {
        let size = std::fs::metadata(path).map_err(|_| LlmError::Missing { path: path.to_owned() })?.len();
        let gguf = GgufFile::open(path).ok_or_else(|| LlmError::NotGguf { path: path.to_owned() })?;
        let data_end = gguf.data_end();
        if data_end > size {
            return Err(LlmError::Truncated { path: path.to_owned(), expected: data_end, actual: size });
        }
        let missing =
            |key: &str, expected| LlmError::MissingKey { path: path.to_owned(), key: key.to_owned(), expected };
        let string = |key: &str| match gguf.get(key) {
            Some(GgufValue::Str(s)) => Some(s),
            _ => None,
        };
        let int = |key: &str| match gguf.get(key) {
            Some(GgufValue::Int(v)) if v >= 0 => Some(v),
            _ => None,
        };
        let architecture = string("general.architecture").ok_or_else(|| missing("general.architecture", "a string"))?;
        let width_key = format!("{architecture}.embedding_length");
        let n_embd = int(&width_key).ok_or_else(|| missing(&width_key, "a positive integer"))? as usize;
        Ok(GgufInfo {
            path: path.to_owned(),
            name: string("general.name"),
            n_embd,
            n_ctx_train: int(&format!("{architecture}.context_length")).map(|v| v as usize),
            n_layer: int(&format!("{architecture}.block_count")).map(|v| v as usize),
            quantization: int("general.file_type").map(ftype_name),
            has_chat_template: string("tokenizer.chat_template").is_some(),
            n_tensors: gguf.n_tensors(),
            n_splits: int("split.count").map_or(1, |n| (n as usize).max(1)),
            architecture,
            size,
        })
    }

    /// Checks the GGUF against the manifest's `llm` section.
    pub fn check_against(&self, manifest: &Manifest) -> Result<(), LlmError> {
        let mismatch = |what, expected: String, actual: String| LlmError::Mismatch {
            path: self.path.clone(),
            manifest: manifest.origin.clone(),
            what,
            expected,
            actual,
        };
        if self.architecture != manifest.llm.architecture {
            return Err(mismatch("general.architecture", manifest.llm.architecture.clone(), self.architecture.clone()));
        }
        if self.n_embd != manifest.llm.n_embd {
            return Err(mismatch(
                "the embedding width (n_embd)",
                manifest.llm.n_embd.to_string(),
                self.n_embd.to_string(),
            ));
        }
        // Split 0 of a split model is given with its further splits (`llm.splits`), a whole GGUF
        // without: llama.cpp would otherwise look for splits by its own naming, or ignore them.
        let files = 1 + manifest.llm.splits.len();
        if self.n_splits != files {
            return Err(mismatch(
                "the number of split files (split.count)",
                format!("{files} (`llm.file` and {} in `llm.splits`)", manifest.llm.splits.len()),
                self.n_splits.to_string(),
            ));
        }
        Ok(())
    }
}

/// The rows of `tokens` in the GGUF's token-embedding matrix (`token_embd.weight`), dequantised:
/// what the model itself feeds its first layer for those tokens. `files` are the model's GGUF
/// files (one, or its splits in order): the first that holds the matrix is read.
pub fn token_embeddings(files: &[&Path], tokens: &[i32]) -> Result<Vec<f32>, LlmError> {
    let tensor = "token_embd.weight";
    // A row is the model's width, which split 0's metadata records (further splits have none).
    let Some(first) = files.first() else {
        return Err(LlmError::Tensor {
            path: PathBuf::new(),
            tensor,
            problem: "cannot be read: no GGUF file was given".into(),
        });
    };
    let width = GgufInfo::read(first)?.n_embd;
    for &path in files {
        let gguf = GgufFile::open(path).ok_or_else(|| LlmError::NotGguf { path: path.to_owned() })?;
        if !gguf.has_tensor(tensor) {
            continue;
        }
        let bad = |problem: String| LlmError::Tensor { path: path.to_owned(), tensor, problem };
        let rows = tokens
            .iter()
            .map(|&t| usize::try_from(t).map_err(|_| bad(format!("has no row for the negative token id {t}"))))
            .collect::<Result<Vec<usize>, _>>()?;
        return gguf.tensor_rows_f32(path, tensor, width, &rows).map_err(bad);
    }
    let names = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    Err(LlmError::Tensor { path: first.to_path_buf(), tensor, problem: format!("is missing (in {names})") })
}
