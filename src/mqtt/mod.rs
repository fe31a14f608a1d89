//! MQTT, the transport: one task owns the connection and polls it ((`inbound.rs`)), another publishes
//! results ((`publisher.rs`)) through the one mapping ((`outbound.rs`)), spooling what may wait while the
//! broker is away. Only `client.rs` knows `rumqttc`, only `broker.rs` `rumqttd`.
//!
//! Requests arrive on `<prefix>/ask` (JSON) and `<prefix>/ask/text` (plain text, Home Assistant's
//! text entity), are validated here, and go to the inference worker through a bounded queue; a full
//! queue is answered `busy` at once. MQTT v5 requests are answered on their Response Topic with
//! their Correlation Data; v3.1.1 requests carry `id` and `reply_to` in the JSON.

mod broker;
mod client;
pub mod fleet;
mod inbound;
mod offload;
mod outbound;
mod publisher;
mod settings;
mod spool;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::worker::{Job, Output, RuntimeSettings};
use client::{connect, Session};
use inbound::{ConnectionTask, Role};
use offload::{Pending, Timing};
use publisher::{OffloadRoute, PublisherTask};
use spool::Spool;
use wire::{Limits, Topics};

pub use broker::{start as start_broker, EmbeddedBroker, Forwarded};
pub use client::AckToken;
pub use outbound::{messages, Delivery, Outgoing};
pub use settings::{
    topic_problem, DiscoveryConfig, MqttConfig, MqttProtocol, OffloadConfig, TlsConfig, DEFAULT_OBJECTS,
};
pub use spool::{SpoolError, SpooledMessage};

/// An error starting the MQTT side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// A TLS file could not be read.
    #[error("mqtt.tls: cannot read {path}: {source}")]
    TlsFile {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The spool directory is unusable.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The demo's embedded broker could not start.
    #[error("embedded MQTT broker on {addr}: {message}")]
    Broker {
        /// Where it was to listen.
        addr: std::net::SocketAddr,
        /// What went wrong.
        message: String,
    },
}

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyAddress {
    /// The topic.
    pub topic: String,
    /// MQTT v5 Correlation Data, echoed.
    pub correlation: Option<Vec<u8>>,
    /// The request's id, echoed in the JSON.
    pub id: Option<String>,
    /// Retain the reply (the answer topic of plain-text questions is retained).
    pub retain: bool,
    /// The device that replies, named in the reply (its id, as in its topics).
    pub device: Option<String>,
    /// A worker's job, acknowledged to the broker once its last reply is published.
    pub ack: Option<AckToken>,
}

/// A validated request on its way to the worker.
pub type Request = Job<ReplyAddress>;

/// Limits and formats of incoming requests that come from outside `[mqtt]`.
#[derive(Debug, Clone, Copy)]
pub struct RequestSettings {
    /// `llm.max_question_chars`.
    pub max_question_chars: usize,
    /// `generator.max_prompt_chars`.
    pub max_prompt_chars: usize,
    /// What the image topic carries (`generator.format`), for discovery.
    pub image_type: &'static str,
}

impl RequestSettings {
    /// The limits `[llm]` and `[generator]` set.
    pub fn new(llm: &crate::llm::LlmConfig, generator: &crate::generate::GeneratorConfig) -> Self {
        RequestSettings {
            max_question_chars: llm.max_question_chars,
            max_prompt_chars: generator.max_prompt_chars,
            image_type: generator.format.content_type(),
        }
    }
}

impl Default for RequestSettings {
    /// The defaults of `[llm]` and `[generator]`.
    fn default() -> Self {
        RequestSettings::new(&Default::default(), &Default::default())
    }
}

/// Refusals and drops, for the status attributes.
#[derive(Default)]
struct Counters {
    busy: AtomicU64,
    bad: AtomicU64,
    expired: AtomicU64,
}

/// Handle to the running MQTT side.
pub struct MqttHandle {
    /// The worker sends its results here.
    pub results: mpsc::Sender<Output<ReplyAddress>>,
    /// The topics in use.
    pub topics: Topics,
    connected: watch::Receiver<bool>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MqttHandle {
    /// Waits until the client is connected and subscribed (or `timeout` passes); returns whether it is.
    pub async fn wait_connected(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.connected.wait_for(|c| *c)).await.is_ok_and(|r| r.is_ok())
    }

    /// Clean shutdown: everything queued is published or spooled, `stopped` is published
    /// (retained), and the client disconnects. Waits at most `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        let MqttHandle { results, shutdown, tasks, .. } = self;
        drop(results);
        shutdown.cancel();
        let all = async {
            for task in tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!("MQTT shutdown did not finish within {deadline:?}");
        }
    }
}

/// Starts the MQTT side: connects (retrying with backoff in the background), and returns the
/// handle through which results are published. Valid questions go to `questions`, a bounded
/// channel (its capacity is `mqtt.request_queue`) that the inference worker drains on its own thread.
/// Must be called inside a tokio runtime.
pub fn start(
    config: &MqttConfig,
    offload: &OffloadConfig,
    state_dir: &std::path::Path,
    questions: std::sync::mpsc::SyncSender<Request>,
    settings: Arc<RwLock<RuntimeSettings>>,
    model: &str,
    requests: RequestSettings,
) -> Result<MqttHandle, MqttError> {
    let topics = Topics::new(&config.topic_prefix());
    let session = Session {
        client_id: config.client_id(),
        // A persistent session: the broker keeps our subscriptions and QoS 1 messages for an hour.
        expiry_s: 3600,
        will: Some(topics.status()),
        manual_acks: false,
        receive_maximum: None,
    };
    let route = (!offload.kinds.is_empty()).then(|| OffloadRoute {
        device_id: config.device_id(),
        jobs_prefix: offload.jobs_prefix.clone(),
        timing: Timing {
            timeout: Duration::from_secs_f64(offload.timeout_s),
            retry: (offload.retry_s > 0.0).then(|| Duration::from_secs_f64(offload.retry_s)),
        },
    });
    let role = Role::Camera { offloads: route.is_some() };
    start_with(config, topics, session, role, route, state_dir, questions, settings, model, requests)
}

/// Starts the MQTT side of `scenecast worker`: jobs from the shared subscriptions
/// `$share/<offload.share_group>/<offload.jobs_prefix>/<kind>` go to `jobs`, each acknowledged
/// to the broker only after its result is published. The worker's session outlives a disconnect
/// by `offload.worker_session_s` and at most
/// `mqtt.request_queue` jobs are in flight to it (MQTT v5 Receive Maximum): the broker holds the
/// rest instead of the worker refusing them. Status on `<prefix>/status` as for a camera.
pub fn start_worker(
    config: &MqttConfig,
    offload: &OffloadConfig,
    state_dir: &std::path::Path,
    jobs: std::sync::mpsc::SyncSender<Request>,
    model: &str,
    requests: RequestSettings,
) -> Result<MqttHandle, MqttError> {
    let topics = Topics::new(&config.topic_prefix());
    let session = Session {
        client_id: config.client_id.clone().unwrap_or_else(|| format!("scenecast-worker-{}", config.device_id())),
        // Kept briefly: a worker restarted at once (systemd) gets its unacknowledged job back, and
        // one that stays down stops receiving its share of new jobs when the session expires.
        expiry_s: offload.worker_session_s,
        will: Some(topics.status()),
        manual_acks: true,
        receive_maximum: Some(config.request_queue.clamp(1, usize::from(u16::MAX)) as u16),
    };
    let role = Role::Worker {
        serve: offload.serve.clone(),
        share_group: offload.share_group.clone(),
        jobs_prefix: offload.jobs_prefix.clone(),
        max_job_bytes: offload.max_job_bytes,
    };
    // A worker has no caption prompt of its own to change; `config/set` is not subscribed.
    let settings = Arc::new(RwLock::new(RuntimeSettings {
        caption_prompt: crate::llm::LlmConfig::default().caption_prompt,
        gate: Default::default(),
    }));
    start_with(config, topics, session, role, None, state_dir, jobs, settings, model, requests)
}

#[allow(clippy::too_many_arguments)]
fn start_with(
    config: &MqttConfig,
    topics: Topics,
    session: Session,
    role: Role,
    route: Option<OffloadRoute>,
    state_dir: &std::path::Path,
    questions: std::sync::mpsc::SyncSender<Request>,
    settings: Arc<RwLock<RuntimeSettings>>,
    model: &str,
    requests: RequestSettings,
) -> Result<MqttHandle, MqttError> {
    let spool_dir = config.spool_dir.clone().unwrap_or_else(|| state_dir.join("spool"));
    let spool = Spool::open(&spool_dir, config.spool_limit)?;
    let (client, eventloop) = connect(config, &session)?;
    let (out_tx, out_rx) = mpsc::channel(256);
    let (results_tx, results_rx) = mpsc::channel(256);
    let (connected_tx, connected_rx) = watch::channel(false);
    let shutdown = CancellationToken::new();
    let closed = CancellationToken::new();
    let counters = Arc::new(Counters::default());
    let online = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(Notify::new());
    let pending = Arc::new(Pending::new());
    let publishes_settings = matches!(role, Role::Camera { .. });

    let conn = ConnectionTask {
        config: config.clone(),
        topics: topics.clone(),
        client: client.clone(),
        questions,
        replies: out_tx.clone(),
        counters: counters.clone(),
        connected: connected_tx,
        online: online.clone(),
        drain: drain.clone(),
        model: model.to_owned(),
        closed: closed.clone(),
        limits: Limits { max_payload_bytes: config.max_payload_bytes, max_question_chars: requests.max_question_chars },
        requests,
        settings: settings.clone(),
        role,
        pending: pending.clone(),
        device_id: config.device_id(),
        device_name: config.device_name(),
    };
    let publisher = PublisherTask {
        client,
        topics: topics.clone(),
        spool,
        online,
        drain,
        counters,
        shutdown: shutdown.clone(),
        closed,
        settings,
        published_settings: None,
        pending,
        publishes_settings,
        offload: route,
    };
    let conn_task = tokio::spawn(conn.run(eventloop));
    let pub_task = tokio::spawn(publisher.run(out_rx, results_rx));
    Ok(MqttHandle { results: results_tx, topics, connected: connected_rx, shutdown, tasks: vec![pub_task, conn_task] })
}
