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

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Model locations.
    pub models: ModelsConfig,
    /// ONNX Runtime.
    pub onnx: OnnxConfig,
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
    fn errors_name_the_key() {
        let cases = [
            ("[onnx]\nthreads = 2\n", "unknown field `threads`"),
            ("[onnx]\nexecution_providers = [{ kind = \"vulkan\" }]\n", "unknown variant `vulkan`"),
            ("[onnx]\nexecution_providers = [{ kind = \"cuda\" }, { kind = \"cuda\" }]\n", "`onnx.execution_providers[1].kind`: `cuda` is listed twice"),
            ("[onnx]\nexecution_providers = [{ kind = \"cuda\", device_id = -1 }]\n", "`onnx.execution_providers[0].device_id`: must be >= 0"),
            ("[onnx]\nlibrary = \"\"\n", "`onnx.library`: is empty"),
            ("[modles]\n", "unknown field `modles`"),
        ];
        for (text, expect) in cases {
            let err = Config::parse(text, "t.toml").unwrap_err().to_string();
            assert!(err.starts_with("config t.toml: "), "{err}");
            assert!(err.contains(expect), "expected {expect:?} in: {err}");
        }
    }
}
