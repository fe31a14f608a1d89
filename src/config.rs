//! The daemon's configuration: one TOML file, parsed in two stages (raw TOML into these types,
//! then `validate`), with every error naming the key that is wrong.
//!
//! Every field has a default that works on the demo setup, so an empty file is a valid config.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cache;
use crate::camera::CameraConfig;
use crate::generate::GeneratorConfig;
use crate::llm::LlmConfig;
use crate::manifest::{Manifest, ManifestError};
use crate::mqtt::{MqttConfig, MqttProtocol, OffloadConfig, DEFAULT_OBJECTS};
use crate::onnx::OnnxConfig;
use crate::worker::{GateConfig, PrivacyConfig, RuntimeSettings};

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
    pub scene: GateConfig,
    /// systemd watchdog checks.
    pub watchdog: WatchdogConfig,
    /// Where the spool lives (default: `$STATE_DIRECTORY`, `$XDG_STATE_HOME/scenecast`).
    pub state_dir: Option<PathBuf>,
    /// The modality generator.
    pub generator: GeneratorConfig,
    /// What may leave the device.
    pub privacy: PrivacyConfig,
    /// Jobs handed to workers over MQTT, and `scenecast worker`'s side of it.
    pub offload: OffloadConfig,
    /// Where the config came from; not in the TOML.
    #[serde(skip)]
    pub origin: String,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
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
                return Err(self
                    .invalid(format!("onnx.execution_providers[{i}].kind"), format!("`{}` is listed twice", ep.kind)));
            }
            if ep.device_id < 0 {
                return Err(self.invalid(
                    format!("onnx.execution_providers[{i}].device_id"),
                    format!("must be >= 0, got {}", ep.device_id),
                ));
            }
        }
        let llm = &self.llm;
        let checks: [(&str, bool, &str); 8] = [
            ("llm.context", llm.context >= 64, "must be at least 64 tokens"),
            ("llm.batch", llm.batch >= 1, "must be at least 1"),
            ("llm.max_tokens", llm.max_tokens >= 1, "must be at least 1"),
            ("llm.max_question_chars", llm.max_question_chars >= 1, "must be at least 1"),
            (
                "llm.request_timeout_s",
                llm.request_timeout_s > 0.0 && llm.request_timeout_s.is_finite(),
                "must be a positive number of seconds",
            ),
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
            ("offload.timeout_s", self.offload.timeout_s),
            ("offload.retry_s", self.offload.retry_s),
        ];
        if let Some((key, value)) = durations.iter().find(|(_, v)| !(v.is_finite() && (0.0..=MAX_SECONDS).contains(v)))
        {
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
                return Err(self.invalid(
                    "camera.v4l2",
                    format!("width, height and fps must be positive, got {}x{} at {}", v.width, v.height, v.fps),
                ));
            }
        }
        // The prompt and the gating follow the same rule here as on SIGHUP and `config/set`.
        self.runtime_settings().check().map_err(|e| self.invalid(e.key, e.message))?;
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
                return Err(self.invalid(
                    "mqtt.topic_prefix",
                    format!("{prefix:?} must be non-empty, without wildcards or a trailing '/'"),
                ));
            }
        }
        if let Some(tls) = &mqtt.tls {
            if tls.client_cert.is_some() != tls.client_key.is_some() {
                return Err(self.invalid("mqtt.tls", "give both client_cert and client_key, or neither"));
            }
        }
        for (i, group) in mqtt.groups.iter().enumerate() {
            if let Some(problem) = crate::mqtt::topic_problem(group) {
                return Err(self.invalid(format!("mqtt.groups[{i}]"), format!("{group:?} {problem}")));
            }
        }
        self.validate_offload()?;
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
            return Err(self.invalid(
                "privacy.rerender_captions",
                "only applies with privacy.no_camera_pixels = true (otherwise the snapshot is published)",
            ));
        }
        if let Some(lib) = &self.onnx.library {
            if lib.as_os_str().is_empty() {
                return Err(self.invalid("onnx.library", "is empty; remove the key to use the default"));
            }
        }
        Ok(())
    }

    fn validate_offload(&self) -> Result<(), ConfigError> {
        let o = &self.offload;
        if let Some(problem) = crate::mqtt::topic_problem(&o.jobs_prefix) {
            return Err(self.invalid("offload.jobs_prefix", format!("{:?} {problem}", o.jobs_prefix)));
        }
        if o.share_group.is_empty() || o.share_group.contains(['/', '+', '#', '\0']) {
            return Err(self.invalid(
                "offload.share_group",
                format!("{:?} must be one non-empty topic level (no `/`, `+`, `#`)", o.share_group),
            ));
        }
        if o.timeout_s <= 0.0 {
            return Err(self.invalid("offload.timeout_s", "must be a positive number of seconds"));
        }
        if o.timeout_s > f64::from(u32::MAX) {
            return Err(self.invalid("offload.timeout_s", "is longer than MQTT's message expiry allows (2^32 - 1 s)"));
        }
        if o.max_job_bytes < 1024 {
            return Err(self.invalid("offload.max_job_bytes", "must be at least 1024"));
        }
        if !o.kinds.is_empty() && self.mqtt.protocol != MqttProtocol::V5 {
            return Err(self.invalid(
                "offload.kinds",
                "offloading needs mqtt.protocol = \"v5\" (shared subscriptions, Response Topic, message expiry)",
            ));
        }
        Ok(())
    }

    /// The cache root in effect.
    pub fn cache_root(&self) -> PathBuf {
        self.models.cache_dir.clone().unwrap_or_else(cache::default_root)
    }

    /// The settings that SIGHUP and `config/set` can change.
    pub fn runtime_settings(&self) -> RuntimeSettings {
        RuntimeSettings { caption_prompt: self.llm.caption_prompt.clone(), gate: self.scene.clone() }
    }

    /// The config with `mqtt.discovery.objects` settled against the vocabulary of `manifest` (its
    /// `[grounding] categories`): when absent, the categories of [`DEFAULT_OBJECTS`] the vocabulary
    /// has; when given, each name must be in it, once.
    pub fn with_objects(mut self, manifest: &Manifest) -> Result<Self, ConfigError> {
        let vocabulary: &[String] = manifest.grounding.as_ref().map_or(&[], |g| &g.categories);
        let objects = match &self.mqtt.discovery.objects {
            None => {
                DEFAULT_OBJECTS.iter().filter(|o| vocabulary.iter().any(|v| v == *o)).map(|o| o.to_string()).collect()
            }
            Some(given) => {
                for (i, name) in given.iter().enumerate() {
                    let key = format!("mqtt.discovery.objects[{i}]");
                    if given[..i].contains(name) {
                        return Err(self.invalid(key, format!("{name:?} is listed twice")));
                    }
                    if vocabulary.is_empty() {
                        return Err(self.invalid(
                            key,
                            format!(
                                "the model stack `{}` has no vocabulary (no `[grounding] categories` in its manifest), so its captions name no objects to sense; remove the key",
                                manifest.name
                            ),
                        ));
                    }
                    if !vocabulary.contains(name) {
                        return Err(self.invalid(
                            key,
                            format!(
                                "{name:?} is not a category of the model stack `{}`; expected one of {}",
                                manifest.name,
                                vocabulary.join(", ")
                            ),
                        ));
                    }
                }
                given.clone()
            }
        };
        self.mqtt.discovery.objects = Some(objects);
        Ok(self)
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
    use crate::onnx::EpKind;

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
        assert_eq!(config.llm.context, 1024);
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
            (
                "[onnx]\nexecution_providers = [{ kind = \"cuda\" }, { kind = \"cuda\" }]\n",
                "`onnx.execution_providers[1].kind`: `cuda` is listed twice",
            ),
            (
                "[onnx]\nexecution_providers = [{ kind = \"cuda\", device_id = -1 }]\n",
                "`onnx.execution_providers[0].device_id`: must be >= 0",
            ),
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
            (
                "[privacy]\nrerender_captions = true\n",
                "`privacy.rerender_captions`: only applies with privacy.no_camera_pixels = true",
            ),
            ("[llm.sampling]\ntemprature = 0.7\n", "unknown field `temprature`"),
            ("[mqtt]\nprotocol = \"v4\"\n", "unknown variant `v4`, expected `v5` or `v3.1.1`"),
            (
                "[mqtt]\ntopic_prefix = \"cams/#\"\n",
                "`mqtt.topic_prefix`: \"cams/#\" must be non-empty, without wildcards",
            ),
            (
                "[mqtt.tls]\nca_file = \"/ca.pem\"\nclient_cert = \"/c.pem\"\n",
                "`mqtt.tls`: give both client_cert and client_key",
            ),
            ("[mqtt]\nrequest_queue = 0\n", "`mqtt.request_queue`: must be at least 1"),
            ("[scene]\nchange_threshold = 3.0\n", "`scene.change_threshold`: 3 is outside 0..2"),
            (
                "[scene]\nmax_interval_s = inf\n",
                "`scene.max_interval_s`: inf is not a number of seconds between 0 and 1e9",
            ),
            ("[watchdog]\nmax_frame_age_s = nan\n", "`watchdog.max_frame_age_s`: NaN is not a number of seconds"),
            ("[mqtt]\nreconnect_max_s = 1e300\n", "`mqtt.reconnect_max_s`: 1e300 is not a number of seconds"),
            (
                "[camera]\npath = \"/x\"\n[camera.v4l2]\ndevice = \"/dev/video0\"\n",
                "`camera`: give either `path` or `[camera.v4l2]`",
            ),
            ("[camera.v4l2]\nfps = 0\n", "`camera.v4l2`: width, height and fps must be positive"),
            ("[mqtt]\ngroups = [\"scenecast/+\"]\n", "`mqtt.groups[0]`: \"scenecast/+\" contains a wildcard"),
            ("[mqtt]\ngroups = [\"a\", \"b/\"]\n", "`mqtt.groups[1]`: \"b/\" has an empty level"),
            ("[offload]\nkinds = [\"caption\"]\n", "unknown variant `caption`, expected `ask` or `generate`"),
            (
                "[mqtt]\nprotocol = \"v3.1.1\"\n[offload]\nkinds = [\"generate\"]\n",
                "`offload.kinds`: offloading needs mqtt.protocol = \"v5\"",
            ),
            ("[offload]\nshare_group = \"a/b\"\n", "`offload.share_group`: \"a/b\" must be one non-empty topic level"),
            ("[offload]\njobs_prefix = \"$SYS/jobs\"\n", "`offload.jobs_prefix`: \"$SYS/jobs\" starts with `$`"),
            ("[offload]\ntimeout_s = 0\n", "`offload.timeout_s`: must be a positive number of seconds"),
            ("[offload]\nretry_s = nan\n", "`offload.retry_s`: NaN is not a number of seconds"),
        ];
        for (text, expect) in cases {
            let err = Config::parse(text, "t.toml").unwrap_err().to_string();
            assert!(err.starts_with("config t.toml: "), "{err}");
            assert!(err.contains(expect), "expected {expect:?} in: {err}");
        }
    }

    /// The object sensors are settled against the model stack's vocabulary: the defaults it has,
    /// or the names given, each checked, with the key of a bad one named.
    #[test]
    fn object_sensors_are_the_vocabularys_categories() {
        let reference = Manifest::reference().unwrap();
        let objects = |text: &str, manifest: &Manifest| {
            Config::parse(text, "t.toml").unwrap().with_objects(manifest).map(|c| c.mqtt.discovery.objects.unwrap())
        };
        assert_eq!(objects("", &reference).unwrap(), ["person", "car", "dog", "cat"]);
        let given = "[mqtt.discovery]\nobjects = [\"goat\", \"person\"]\n";
        assert_eq!(objects(given, &reference).unwrap(), ["goat", "person"]);
        assert_eq!(objects("[mqtt.discovery]\nobjects = []\n", &reference).unwrap(), Vec::<String>::new());
        // Only the default names a vocabulary has.
        let mut few = reference.clone();
        few.grounding.as_mut().unwrap().categories = vec!["cat".into(), "goat".into(), "person".into()];
        assert_eq!(objects("", &few).unwrap(), ["person", "cat"]);
        // A stack without a vocabulary (no [grounding]) senses nothing, and refuses names.
        let mut none = reference.clone();
        none.grounding = None;
        assert_eq!(objects("", &none).unwrap(), Vec::<String>::new());
        let cases = [
            (
                "[mqtt.discovery]\nobjects = [\"person\", \"unicorn\"]\n",
                &reference,
                "`mqtt.discovery.objects[1]`: \"unicorn\" is not a category of the model stack `dinov2s-nanodet-imagenet-smollm2-135m`; expected one of person, cat, dog,",
            ),
            (
                "[mqtt.discovery]\nobjects = [\"dog\", \"cat\", \"dog\"]\n",
                &reference,
                "`mqtt.discovery.objects[2]`: \"dog\" is listed twice",
            ),
            (
                "[mqtt.discovery]\nobjects = [\"person\"]\n",
                &none,
                "`mqtt.discovery.objects[0]`: the model stack `dinov2s-nanodet-imagenet-smollm2-135m` has no vocabulary",
            ),
        ];
        for (text, manifest, expect) in cases {
            let err = objects(text, manifest).unwrap_err().to_string();
            assert!(err.starts_with("config t.toml: "), "{err}");
            assert!(err.contains(expect), "expected {expect:?} in: {err}");
        }
    }
}
