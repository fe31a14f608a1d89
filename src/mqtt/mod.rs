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
mod inbound;
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
use client::connect;
use inbound::ConnectionTask;
use publisher::PublisherTask;
use spool::Spool;
use wire::{Limits, Topics};

pub use broker::{start as start_broker, EmbeddedBroker, Forwarded};
pub use outbound::{messages, Delivery, Outgoing};
pub use settings::{DiscoveryConfig, MqttConfig, MqttProtocol, TlsConfig};
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
    state_dir: &std::path::Path,
    questions: std::sync::mpsc::SyncSender<Request>,
    settings: Arc<RwLock<RuntimeSettings>>,
    model: &str,
    requests: RequestSettings,
) -> Result<MqttHandle, MqttError> {
    let topics = Topics::new(&config.topic_prefix());
    let spool_dir = config.spool_dir.clone().unwrap_or_else(|| state_dir.join("spool"));
    let spool = Spool::open(&spool_dir, config.spool_limit)?;
    let (client, eventloop) = connect(config, &topics)?;
    let (out_tx, out_rx) = mpsc::channel(256);
    let (results_tx, results_rx) = mpsc::channel(256);
    let (connected_tx, connected_rx) = watch::channel(false);
    let shutdown = CancellationToken::new();
    let closed = CancellationToken::new();
    let counters = Arc::new(Counters::default());
    let online = Arc::new(AtomicBool::new(false));
    let drain = Arc::new(Notify::new());

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
    };
    let conn_task = tokio::spawn(conn.run(eventloop));
    let pub_task = tokio::spawn(publisher.run(out_rx, results_rx));
    Ok(MqttHandle { results: results_tx, topics, connected: connected_rx, shutdown, tasks: vec![pub_task, conn_task] })
}
