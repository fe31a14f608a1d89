//! The daemon's configuration: one TOML file, parsed in two stages (raw TOML into these types,
//! then `validate`), with every error naming the key that is wrong.
//!
//! Every field has a default that works on the demo setup, so an empty file is a valid config.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cache;
use crate::manifest::{Manifest, ManifestError};

/// An error in the configuration file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("config {origin}: {message}")]
    Parse {
        /// The config file.
        origin: String,
        /// The TOML error, which names the key and line.
        message: String,
    },
    /// A value parses but is not usable.
    #[error("config {origin}: `{key}`: {message}")]
    Invalid {
        /// The config file.
        origin: String,
        /// The dotted key.
        key: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// The manifest the config names is not valid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// Where models come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// The cache root (default: `$SCENECAST_CACHE`, `$XDG_CACHE_HOME/scenecast`, `~/.cache/scenecast`).
    pub cache_dir: Option<PathBuf>,
    /// A model manifest file (default: the built-in reference stack).
    pub manifest: Option<PathBuf>,
}

/// An ONNX Runtime execution provider, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EpKind {
    /// NVIDIA TensorRT.
    Tensorrt,
    /// NVIDIA CUDA.
    Cuda,
    /// The CPU (always available; the implicit last resort).
    Cpu,
}

impl std::fmt::Display for EpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EpKind::Tensorrt => "tensorrt",
            EpKind::Cuda => "cuda",
            EpKind::Cpu => "cpu",
        })
    }
}

/// One entry of `onnx.execution_providers`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpConfig {
    /// Which provider.
    pub kind: EpKind,
    /// When true, failing to register this provider stops startup instead of falling back.
    #[serde(default)]
    pub required: bool,
    /// The GPU (TensorRT, CUDA).
    #[serde(default)]
    pub device_id: i32,
    /// TensorRT: build fp16 engines.
    #[serde(default)]
    pub fp16: bool,
    /// TensorRT: where built engines are cached (default: `<cache>/tensorrt`).
    pub engine_cache_dir: Option<PathBuf>,
}

/// ONNX Runtime settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxConfig {
    /// The `libonnxruntime.so` to load; else `ORT_DYLIB_PATH`; else the fetched cache's.
    pub library: Option<PathBuf>,
    /// Threads inside one operator (0: ONNX Runtime's default, one per core).
    pub intra_threads: usize,
    /// Providers in order of preference; the CPU is always the last resort.
    pub execution_providers: Vec<EpConfig>,
}

impl Default for OnnxConfig {
    fn default() -> Self {
        OnnxConfig {
            library: None,
            intra_threads: 0,
            execution_providers: vec![EpConfig { kind: EpKind::Cpu, required: false, device_id: 0, fp16: false, engine_cache_dir: None }],
        }
    }
}

/// The LLM backbone: llama.cpp settings, prompts and generation limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// CPU threads (0: the number of physical cores).
    pub threads: usize,
    /// Context length in tokens: the scene prefix, a question and its answer must fit.
    pub context: u32,
    /// Most tokens decoded in one llama.cpp call (prefill chunk).
    pub batch: u32,
    /// Layers offloaded to the GPU (needs the `cuda` build; 0: CPU only).
    pub gpu_layers: i32,
    /// Most tokens in one caption or answer.
    pub max_tokens: usize,
    /// Longest accepted question, in characters.
    pub max_question_chars: usize,
    /// Replaces the manifest's system prompt.
    pub system_prompt: Option<String>,
    /// The question that asks for a caption.
    pub caption_prompt: String,
    /// A caption or answer that takes longer is cut off (seconds).
    pub request_timeout_s: f64,
    /// Sampling; the default (temperature 0) is greedy and deterministic.
    pub sampling: crate::sampling::SamplingParams,
}

impl Default for LlmConfig {
    fn default() -> Self {
        LlmConfig {
            threads: 0,
            context: 2048,
            batch: 512,
            gpu_layers: 0,
            max_tokens: 96,
            max_question_chars: 500,
            system_prompt: None,
            caption_prompt: "Describe what you see in one sentence.".into(),
            request_timeout_s: 60.0,
            sampling: crate::sampling::SamplingParams::default(),
        }
    }
}

/// The number of physical CPU cores (logical CPUs where the topology is not known).
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, usize::from);
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else { return logical };
    let mut cores = std::collections::HashSet::new();
    let mut physical = "0".to_owned();
    for line in cpuinfo.lines() {
        if let Some((key, value)) = line.split_once(':') {
            match key.trim() {
                "physical id" => physical = value.trim().to_owned(),
                "core id" => {
                    cores.insert((physical.clone(), value.trim().to_owned()));
                }
                _ => {}
            }
        }
    }
    if cores.is_empty() { logical } else { cores.len().min(logical) }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Model locations.
    pub models: ModelsConfig,
    /// ONNX Runtime.
    pub onnx: OnnxConfig,
    /// The LLM backbone.
    pub llm: LlmConfig,
    /// Where the config came from; not in the TOML.
    #[serde(skip)]
    pub origin: String,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { origin: origin.to_owned(), message: e.to_string().trim_end().to_owned() })?;
        config.origin = origin.to_owned();
        config.validate()?;
        Ok(config)
    }

    /// The defaults, as if from an empty file.
    pub fn builtin() -> Self {
        Config { origin: "<defaults>".into(), ..Config::default() }
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { origin: self.origin.clone(), key: key.into(), message: message.into() }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let eps = &self.onnx.execution_providers;
        for (i, ep) in eps.iter().enumerate() {
            if eps[..i].iter().any(|e| e.kind == ep.kind) {
                return Err(self.invalid(format!("onnx.execution_providers[{i}].kind"), format!("`{}` is listed twice", ep.kind)));
            }
            if ep.device_id < 0 {
                return Err(self.invalid(format!("onnx.execution_providers[{i}].device_id"), format!("must be >= 0, got {}", ep.device_id)));
            }
        }
        let llm = &self.llm;
        let checks: [(&str, bool, &str); 8] = [
            ("llm.context", llm.context >= 64, "must be at least 64 tokens"),
            ("llm.batch", llm.batch >= 1, "must be at least 1"),
            ("llm.max_tokens", llm.max_tokens >= 1, "must be at least 1"),
            ("llm.max_question_chars", llm.max_question_chars >= 1, "must be at least 1"),
            ("llm.request_timeout_s", llm.request_timeout_s > 0.0 && llm.request_timeout_s.is_finite(), "must be a positive number of seconds"),
            ("llm.sampling.temperature", llm.sampling.temperature >= 0.0, "must be >= 0 (0 is greedy)"),
            ("llm.sampling.top_p", llm.sampling.top_p > 0.0 && llm.sampling.top_p <= 1.0, "must be in (0, 1]"),
            ("llm.sampling.repeat_penalty", llm.sampling.repeat_penalty > 0.0, "must be > 0 (1 is off)"),
        ];
        if let Some((key, _, message)) = checks.iter().find(|(_, ok, _)| !ok) {
            return Err(self.invalid(*key, *message));
        }
        if llm.caption_prompt.trim().is_empty() {
            return Err(self.invalid("llm.caption_prompt", "is empty"));
        }
        if let Some(lib) = &self.onnx.library {
            if lib.as_os_str().is_empty() {
                return Err(self.invalid("onnx.library", "is empty; remove the key to use the default"));
            }
        }
        Ok(())
    }

    /// The cache root in effect.
    pub fn cache_root(&self) -> PathBuf {
        self.models.cache_dir.clone().unwrap_or_else(cache::default_root)
    }

    /// The manifest in effect.
    pub fn manifest(&self) -> Result<Manifest, ManifestError> {
        match &self.models.manifest {
            Some(path) => Manifest::load(path),
            None => Manifest::reference(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_cpu_default() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.onnx.execution_providers.len(), 1);
        assert_eq!(c.onnx.execution_providers[0].kind, EpKind::Cpu);
    }

    #[test]
    fn the_readme_example_is_a_valid_config() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n[models]").expect("README has the config example") + "```toml\n".len();
        let end = start + readme[start..].find("```").unwrap();
        let config = Config::parse(&readme[start..end], "README.md").unwrap();
        assert_eq!(config.onnx.execution_providers.len(), 3);
        assert_eq!(config.llm.context, 2048);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[onnx]\nthreads = 2\n", "unknown field `threads`"),
            ("[onnx]\nexecution_providers = [{ kind = \"vulkan\" }]\n", "unknown variant `vulkan`"),
            ("[onnx]\nexecution_providers = [{ kind = \"cuda\" }, { kind = \"cuda\" }]\n", "`onnx.execution_providers[1].kind`: `cuda` is listed twice"),
            ("[onnx]\nexecution_providers = [{ kind = \"cuda\", device_id = -1 }]\n", "`onnx.execution_providers[0].device_id`: must be >= 0"),
            ("[onnx]\nlibrary = \"\"\n", "`onnx.library`: is empty"),
            ("[modles]\n", "unknown field `modles`"),
            ("[llm]\ncontext = 16\n", "`llm.context`: must be at least 64 tokens"),
            ("[llm.sampling]\ntop_p = 1.5\n", "`llm.sampling.top_p`: must be in (0, 1]"),
            ("[llm]\ncaption_prompt = \" \"\n", "`llm.caption_prompt`: is empty"),
            ("[llm.sampling]\ntemprature = 0.7\n", "unknown field `temprature`"),
        ];
        for (text, expect) in cases {
            let err = Config::parse(text, "t.toml").unwrap_err().to_string();
            assert!(err.starts_with("config t.toml: "), "{err}");
            assert!(err.contains(expect), "expected {expect:?} in: {err}");
        }
    }
}
