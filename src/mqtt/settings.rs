//! The `[mqtt]` settings: broker, protocol, TLS, topics, limits, spool and discovery.

use std::path::PathBuf;

use serde::Deserialize;

use crate::worker::OffloadKind;

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
    /// Categories published as occupancy binary sensors, on while the latest caption names them
    /// (its `objects`). Each must be in the model stack's vocabulary; absent: those of
    /// [`DEFAULT_OBJECTS`] it has (`Config::with_objects` settles the list at start; the MQTT side
    /// publishes a sensor per name given, none when absent).
    pub objects: Option<Vec<String>>,
}

/// The object sensors a camera gets unless `mqtt.discovery.objects` says otherwise.
pub const DEFAULT_OBJECTS: [&str; 4] = ["person", "car", "dog", "cat"];

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig { enabled: true, prefix: "homeassistant".into(), objects: None }
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
    /// Fleet groups this device belongs to: it answers questions published on `<group>/ask`
    /// and keeps a retained member record on `<group>/members/<device>` (`scenecast fleet`).
    pub groups: Vec<String>,
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
            groups: vec!["scenecast/all".into()],
        }
    }
}

impl MqttConfig {
    /// The device name in effect.
    pub fn device_name(&self) -> String {
        self.device.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "camera".into())
        })
    }

    /// The device name reduced to what topics and ids allow.
    pub fn device_id(&self) -> String {
        self.device_name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect()
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

/// `[offload]`: handing jobs to workers over MQTT v5 shared subscriptions (the camera side) and
/// serving them (`scenecast worker`). The broker balances the jobs among the workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadConfig {
    /// Camera side: the kinds of job (`ask`, `generate`) published to workers instead of run
    /// here. Empty (the default): everything runs here.
    pub kinds: Vec<OffloadKind>,
    /// Jobs are published on `<jobs_prefix>/<kind>`.
    pub jobs_prefix: String,
    /// Camera side: seconds after which a job without a result gets an `unavailable` error reply
    /// (also the job message's expiry, so the broker drops it unserved).
    pub timeout_s: f64,
    /// Camera side: seconds after which a job without a result is published again, for a worker
    /// that died mid-job; the first result wins, later ones are dropped. 0: never.
    pub retry_s: f64,
    /// Worker side (`scenecast worker`): the shared-subscription group, `$share/<group>/...`.
    pub share_group: String,
    /// Worker side: the kinds of job it serves.
    pub serve: Vec<OffloadKind>,
    /// Worker side: the largest job accepted, in bytes (a job about the scene carries its frame).
    pub max_job_bytes: usize,
    /// Worker side: seconds the broker keeps a disconnected worker's session. A worker back
    /// within this time (a restart) gets its unacknowledged jobs again; while the session lives,
    /// the broker may still queue new jobs for it, which the cameras publish again after
    /// `retry_s`. 0: a clean session, nothing kept.
    pub worker_session_s: u32,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            kinds: Vec::new(),
            jobs_prefix: "scenecast/jobs".into(),
            timeout_s: 60.0,
            retry_s: 20.0,
            share_group: "scenecast".into(),
            serve: vec![OffloadKind::Ask, OffloadKind::Generate],
            max_job_bytes: 8 << 20,
            worker_session_s: 15,
        }
    }
}

/// Why a topic (or topic part) from the configuration is unusable, if it is.
pub fn topic_problem(topic: &str) -> Option<&'static str> {
    if topic.is_empty() {
        Some("is empty")
    } else if topic.contains(['+', '#', '\0']) {
        Some("contains a wildcard (`+`, `#`) or NUL")
    } else if topic.starts_with('/') || topic.ends_with('/') || topic.contains("//") {
        Some("has an empty level (a leading, trailing or doubled `/`)")
    } else if topic.starts_with('$') {
        Some("starts with `$`, which brokers reserve")
    } else {
        None
    }
}
