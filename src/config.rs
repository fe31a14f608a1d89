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

/// Where frames come from: a V4L2 camera when `[camera.v4l2]` is given, else images.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CameraConfig {
    /// A V4L2 camera.
    pub v4l2: Option<crate::camera::V4l2Config>,
    /// An image file or a directory of images played as a slideshow (default: the fetched sample
    /// photos, the demo camera).
    pub path: Option<PathBuf>,
    /// Seconds each slideshow frame stays (a still image is delivered again at this rate).
    pub interval_s: f64,
}

impl Default for CameraConfig {
    fn default() -> Self {
        CameraConfig { v4l2: None, path: None, interval_s: 10.0 }
    }
}

/// What the systemd watchdog checks before each ping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// Frames older than this (seconds) mean a stuck camera: no ping.
    pub max_frame_age_s: f64,
    /// A worker without progress for this long (seconds) is hung: no ping.
    pub max_stall_s: f64,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig { max_frame_age_s: 60.0, max_stall_s: 120.0 }
    }
}

/// The MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 5 (request/response properties, message expiry).
    #[serde(rename = "v5")]
    V5,
    /// MQTT 3.1.1 (requests carry `id` and `reply_to` in their JSON).
    #[serde(rename = "v3.1.1")]
    V311,
}

/// TLS to the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate, for brokers that require one (with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key: Option<PathBuf>,
}

/// Home Assistant discovery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Publish discovery; when turned off, the device is removed from Home Assistant.
    pub enabled: bool,
    /// Home Assistant's discovery prefix.
    pub prefix: String,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig { enabled: true, prefix: "homeassistant".into() }
    }
}

/// MQTT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Connect to a broker at all.
    pub enabled: bool,
    /// Broker host.
    pub host: String,
    /// Broker port (1883; 8883 is usual with TLS).
    pub port: u16,
    /// Protocol version.
    pub protocol: MqttProtocol,
    /// The device name: in the default client id, topic prefix and discovery id (default: hostname).
    pub device: Option<String>,
    /// Client id (default `scenecast-<device>`).
    pub client_id: Option<String>,
    /// Topic prefix (default `scenecast/<device>`).
    pub topic_prefix: Option<String>,
    /// Keep-alive interval in seconds.
    pub keep_alive_s: u64,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// TLS; absent means plain TCP.
    pub tls: Option<TlsConfig>,
    /// Reconnect backoff: first delay, seconds (doubles up to `reconnect_max_s`, with jitter).
    pub reconnect_min_s: f64,
    /// Reconnect backoff: longest delay, seconds.
    pub reconnect_max_s: f64,
    /// Largest accepted request payload, bytes.
    pub max_payload_bytes: usize,
    /// Requests waiting for the model; beyond this a request gets a `busy` reply.
    pub request_queue: usize,
    /// MQTT filters a reply topic must match (`#` allows any).
    pub allowed_reply_topics: Vec<String>,
    /// Messages kept on disk while the broker is unreachable; beyond this the oldest are dropped.
    pub spool_limit: usize,
    /// Where the spool lives (default: `<state dir>/spool`).
    pub spool_dir: Option<PathBuf>,
    /// Home Assistant discovery.
    pub discovery: DiscoveryConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: true,
            host: "127.0.0.1".into(),
            port: 1883,
            protocol: MqttProtocol::V5,
            device: None,
            client_id: None,
            topic_prefix: None,
            keep_alive_s: 30,
            username: None,
            password: None,
            tls: None,
            reconnect_min_s: 0.5,
            reconnect_max_s: 30.0,
            max_payload_bytes: 16 * 1024,
            request_queue: 8,
            allowed_reply_topics: vec!["#".into()],
            spool_limit: 1000,
            spool_dir: None,
            discovery: DiscoveryConfig::default(),
        }
    }
}

impl MqttConfig {
    /// The device name in effect.
    pub fn device_name(&self) -> String {
        self.device.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "camera".into())
        })
    }

    /// The device name reduced to what topics and ids allow.
    pub fn device_id(&self) -> String {
        self.device_name().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
    }

    /// The client id in effect.
    pub fn client_id(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| format!("scenecast-{}", self.device_id()))
    }

    /// The topic prefix in effect.
    pub fn topic_prefix(&self) -> String {
        self.topic_prefix.clone().unwrap_or_else(|| format!("scenecast/{}", self.device_id()))
    }
}

/// Where the daemon keeps state (the spool): `$STATE_DIRECTORY` under systemd, else
/// `$XDG_STATE_HOME/scenecast`, else `~/.local/state/scenecast`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|v| !v.is_empty()) {
        // systemd may pass several, separated by ':'; the first is ours.
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_owned();
        return PathBuf::from(first);
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("scenecast");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib"));
    home.join(".local/state/scenecast")
}

/// How conditioning reaches the generator for scene re-renderings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConditionPath {
    /// The text encoder on the LLM's own description (works with off-the-shelf weights).
    #[default]
    Text,
    /// The output projector on the LLM's hidden states at the signal tokens.
    Hidden,
}

/// The modality generator: limits, memory budget, output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Serve `generate` requests (when the manifest has a generator).
    pub enabled: bool,
    /// Unload the generator after this many idle seconds, so a device with shared RAM does not hold it.
    pub idle_unload_s: f64,
    /// Most denoising steps a request may ask for.
    pub max_steps: usize,
    /// Largest image side a request may ask for, in pixels.
    pub max_side: usize,
    /// PNG or JPEG.
    pub format: crate::generator::ImageFormat,
    /// How `from_scene` renderings are conditioned: `text` (text encoder on the description) or
    /// `hidden` (output projector on the LLM's hidden states).
    pub condition: ConditionPath,
    /// Longest prompt in characters; longer prompts are refused (the tokenizer's own token limit
    /// truncates with a warning in the reply).
    pub max_prompt_chars: usize,
    /// Refuse to load when less memory than this is available (MiB, from /proc/meminfo; 0: no check).
    pub min_free_mib: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            enabled: true,
            idle_unload_s: 120.0,
            max_steps: 8,
            max_side: 1024,
            format: crate::generator::ImageFormat::Png,
            condition: ConditionPath::Text,
            max_prompt_chars: 2000,
            min_free_mib: 0,
        }
    }
}

/// What the daemon may publish about what the camera sees.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Never publish camera pixels: the Home Assistant image entity shows only generated
    /// re-renderings of the described scene, and requests for a snapshot are refused. Off by
    /// default: then each caption's frame is published there as a JPEG snapshot.
    pub no_camera_pixels: bool,
    /// With `no_camera_pixels`, publish a re-rendering of each caption to the image entity
    /// (costs one generator run per caption).
    pub rerender_captions: bool,
}

/// The longest duration a config key may give, in seconds (1e9, about 31 years; the error
/// messages name it).
const MAX_SECONDS: f64 = 1e9;

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
    /// MQTT.
    pub mqtt: MqttConfig,
    /// Frame source.
    pub camera: CameraConfig,
    /// Scene-change gating.
    pub scene: crate::scene::GateConfig,
    /// systemd watchdog checks.
    pub watchdog: WatchdogConfig,
    /// Where the spool lives (default: `$STATE_DIRECTORY`, `$XDG_STATE_HOME/scenecast`).
    pub state_dir: Option<PathBuf>,
    /// The modality generator.
    pub generator: GeneratorConfig,
    /// What may leave the device.
    pub privacy: PrivacyConfig,
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
        // Every duration becomes a `Duration`, which cannot hold NaN, infinity or absurdly large
        // values (TOML can write `inf` and `nan`): check them all in one place.
        let durations = [
            ("camera.interval_s", self.camera.interval_s),
            ("scene.min_interval_s", self.scene.min_interval_s),
            ("scene.max_interval_s", self.scene.max_interval_s),
            ("watchdog.max_frame_age_s", self.watchdog.max_frame_age_s),
            ("watchdog.max_stall_s", self.watchdog.max_stall_s),
            ("mqtt.reconnect_min_s", self.mqtt.reconnect_min_s),
            ("mqtt.reconnect_max_s", self.mqtt.reconnect_max_s),
            ("llm.request_timeout_s", self.llm.request_timeout_s),
            ("generator.idle_unload_s", self.generator.idle_unload_s),
        ];
        if let Some((key, value)) = durations.iter().find(|(_, v)| !(v.is_finite() && (0.0..=MAX_SECONDS).contains(v))) {
            return Err(self.invalid(*key, format!("{value:?} is not a number of seconds between 0 and 1e9")));
        }
        if !(self.camera.interval_s > 0.0 && self.camera.interval_s.is_finite()) {
            return Err(self.invalid("camera.interval_s", "must be a positive number of seconds"));
        }
        if self.camera.v4l2.is_some() && self.camera.path.is_some() {
            return Err(self.invalid("camera", "give either `path` or `[camera.v4l2]`, not both"));
        }
        if let Some(v) = &self.camera.v4l2 {
            if v.width == 0 || v.height == 0 || v.fps == 0 {
                return Err(self.invalid("camera.v4l2", format!("width, height and fps must be positive, got {}x{} at {}", v.width, v.height, v.fps)));
            }
        }
        let scene = &self.scene;
        if !(0.0..=2.0).contains(&scene.change_threshold) {
            return Err(self.invalid("scene.change_threshold", format!("{} is outside 0..2 (a cosine distance)", scene.change_threshold)));
        }
        if !(scene.min_interval_s >= 0.0 && scene.max_interval_s >= scene.min_interval_s) {
            return Err(self.invalid("scene.max_interval_s", "must be >= scene.min_interval_s >= 0"));
        }
        if !(self.watchdog.max_frame_age_s > 0.0 && self.watchdog.max_stall_s > 0.0) {
            return Err(self.invalid("watchdog", "max_frame_age_s and max_stall_s must be positive"));
        }
        let mqtt = &self.mqtt;
        if mqtt.host.trim().is_empty() {
            return Err(self.invalid("mqtt.host", "is empty"));
        }
        if mqtt.request_queue == 0 {
            return Err(self.invalid("mqtt.request_queue", "must be at least 1"));
        }
        if mqtt.spool_limit == 0 {
            return Err(self.invalid("mqtt.spool_limit", "must be at least 1"));
        }
        if !(mqtt.reconnect_min_s > 0.0 && mqtt.reconnect_max_s >= mqtt.reconnect_min_s) {
            return Err(self.invalid("mqtt.reconnect_max_s", "must be >= mqtt.reconnect_min_s > 0"));
        }
        if mqtt.keep_alive_s < 5 {
            return Err(self.invalid("mqtt.keep_alive_s", "must be at least 5 seconds"));
        }
        if let Some(prefix) = &mqtt.topic_prefix {
            if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.ends_with('/') {
                return Err(self.invalid("mqtt.topic_prefix", format!("{prefix:?} must be non-empty, without wildcards or a trailing '/'")));
            }
        }
        if let Some(tls) = &mqtt.tls {
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                return Err(self.invalid("mqtt.tls", "give both client_cert and client_key, or neither"));
            }
        }
        if llm.caption_prompt.trim().is_empty() {
            return Err(self.invalid("llm.caption_prompt", "is empty"));
        }
        let g = &self.generator;
        if !(1..=64).contains(&g.max_steps) {
            return Err(self.invalid("generator.max_steps", format!("{} is outside 1..=64", g.max_steps)));
        }
        if !(8..=4096).contains(&g.max_side) {
            return Err(self.invalid("generator.max_side", format!("{} is outside 8..=4096 pixels", g.max_side)));
        }
        if g.max_prompt_chars == 0 {
            return Err(self.invalid("generator.max_prompt_chars", "must be at least 1"));
        }
        if self.privacy.rerender_captions && !self.privacy.no_camera_pixels {
            return Err(self.invalid("privacy.rerender_captions", "only applies with privacy.no_camera_pixels = true (otherwise the snapshot is published)"));
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
    fn the_annotated_example_config_is_valid() {
        let config = Config::parse(include_str!("../systemd/scenecast.toml"), "systemd/scenecast.toml").unwrap();
        assert_eq!(config.camera.v4l2.as_ref().map(|v| v.fps), Some(15));
        assert!(config.mqtt.discovery.enabled);
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
            ("[generator]\nmax_steps = 0\n", "`generator.max_steps`: 0 is outside 1..=64"),
            ("[generator]\nmax_side = 4\n", "`generator.max_side`: 4 is outside 8..=4096"),
            ("[generator]\nformat = \"gif\"\n", "unknown variant `gif`"),
            ("[generator]\ncondition = \"pixels\"\n", "unknown variant `pixels`"),
            ("[generator]\nidle_unload_s = inf\n", "`generator.idle_unload_s`: inf is not a number of seconds"),
            ("[privacy]\nrerender_captions = true\n", "`privacy.rerender_captions`: only applies with privacy.no_camera_pixels = true"),
            ("[llm.sampling]\ntemprature = 0.7\n", "unknown field `temprature`"),
            ("[mqtt]\nprotocol = \"v4\"\n", "unknown variant `v4`, expected `v5` or `v3.1.1`"),
            ("[mqtt]\ntopic_prefix = \"cams/#\"\n", "`mqtt.topic_prefix`: \"cams/#\" must be non-empty, without wildcards"),
            ("[mqtt.tls]\nca_file = \"/ca.pem\"\nclient_cert = \"/c.pem\"\n", "`mqtt.tls`: give both client_cert and client_key"),
            ("[mqtt]\nrequest_queue = 0\n", "`mqtt.request_queue`: must be at least 1"),
            ("[scene]\nchange_threshold = 3.0\n", "`scene.change_threshold`: 3 is outside 0..2"),
            ("[scene]\nmax_interval_s = inf\n", "`scene.max_interval_s`: inf is not a number of seconds between 0 and 1e9"),
            ("[watchdog]\nmax_frame_age_s = nan\n", "`watchdog.max_frame_age_s`: NaN is not a number of seconds"),
            ("[mqtt]\nreconnect_max_s = 1e300\n", "`mqtt.reconnect_max_s`: 1e300 is not a number of seconds"),
            ("[camera]\npath = \"/x\"\n[camera.v4l2]\ndevice = \"/dev/video0\"\n", "`camera`: give either `path` or `[camera.v4l2]`"),
            ("[camera.v4l2]\nfps = 0\n", "`camera.v4l2`: width, height and fps must be positive"),
        ];
        for (text, expect) in cases {
            let err = Config::parse(text, "t.toml").unwrap_err().to_string();
            assert!(err.starts_with("config t.toml: "), "{err}");
            assert!(err.contains(expect), "expected {expect:?} in: {err}");
        }
    }
}
