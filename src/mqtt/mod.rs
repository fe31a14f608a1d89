//! MQTT: the only module that knows `rumqttc`. One task owns the connection and polls it
//! continuously; another publishes results, spooling them on disk while the broker is away.
//!
//! Requests arrive on `<prefix>/ask` (JSON) and `<prefix>/ask/text` (plain text, Home Assistant's
//! text entity), are validated here, and go to the inference worker through a bounded queue; a full
//! queue is answered `busy` at once. MQTT v5 requests are answered on their Response Topic with
//! their Correlation Data; v3.1.1 requests carry `id` and `reply_to` in the JSON.

mod broker;
mod client;
mod outbound;
mod settings;
mod spool;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::worker::{Job, JobKind, Output, RuntimeSettings};
use client::{connect, Client, Event, EventLoop};
use spool::Spool;
use wire::{ConfigState, Discovery, Limits, RequestError, StatusAttributes, Topics};

pub use broker::{start as start_broker, BrokerError, EmbeddedBroker, Forwarded};
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

impl Default for RequestSettings {
    /// The defaults of `[llm]` and `[generator]`.
    fn default() -> Self {
        let (llm, generator) = (crate::llm::LlmConfig::default(), crate::generate::GeneratorConfig::default());
        RequestSettings {
            max_question_chars: llm.max_question_chars,
            max_prompt_chars: generator.max_prompt_chars,
            image_type: generator.format.content_type(),
        }
    }
}

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

struct ConnectionTask {
    config: MqttConfig,
    topics: Topics,
    client: Client,
    questions: std::sync::mpsc::SyncSender<Request>,
    replies: mpsc::Sender<Outgoing>,
    counters: Arc<Counters>,
    connected: watch::Sender<bool>,
    online: Arc<AtomicBool>,
    drain: Arc<Notify>,
    model: String,
    /// Cancelled by the publisher once it has sent `stopped` and the disconnect.
    closed: CancellationToken,
    limits: Limits,
    requests: RequestSettings,
    settings: Arc<RwLock<RuntimeSettings>>,
}

impl ConnectionTask {
    fn discovery(&self) -> (String, Vec<u8>) {
        let device_id = self.config.device_id();
        let device_name = self.config.device_name();
        let d = Discovery {
            prefix: &self.config.discovery.prefix,
            device_id: &device_id,
            device_name: &device_name,
            model: &self.model,
            topics: &self.topics,
            image_type: self.requests.image_type,
        };
        // Disabled discovery publishes an empty retained payload: Home Assistant removes the device.
        let payload = if self.config.discovery.enabled { d.payload().to_string().into_bytes() } else { Vec::new() };
        (d.topic(), payload)
    }

    /// Subscribes and announces the device; returns how many subscriptions await their SubAck.
    async fn on_connect(&self) -> usize {
        let mut pending = 0;
        for topic in [
            self.topics.ask(),
            self.topics.ask_text(),
            self.topics.generate(),
            self.topics.config_set(),
            format!("{}/status", self.config.discovery.prefix),
        ] {
            match self.client.subscribe(&topic).await {
                Ok(()) => pending += 1,
                Err(e) => tracing::warn!(topic, "subscribe failed: {e}"),
            }
        }
        let status = SpooledMessage::plain(self.topics.status(), b"online".to_vec(), true);
        let _ = self.client.publish(&status).await;
        self.publish_discovery().await;
        pending
    }

    async fn publish_discovery(&self) {
        let (topic, payload) = self.discovery();
        let m = SpooledMessage::plain(topic, payload, true);
        if let Err(e) = self.client.publish(&m).await {
            tracing::warn!("discovery publish failed: {e}");
        }
    }

    async fn run(self, mut eventloop: EventLoop) {
        let mut backoff = self.config.reconnect_min_s;
        let mut pending_subacks = 0usize;
        // Once the publisher has queued `stopped` and the disconnect, keep polling a little longer
        // so they go out, then stop.
        let mut stopping = false;
        let grace = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(grace);
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = self.closed.cancelled(), if !stopping => {
                    stopping = true;
                    grace.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(2));
                    continue;
                }
                _ = &mut grace => return,
            };
            match event {
                Ok(Event::Connected) => {
                    tracing::info!(host = %self.config.host, port = self.config.port, "MQTT connected");
                    backoff = self.config.reconnect_min_s;
                    pending_subacks = self.on_connect().await;
                    self.online.store(true, Ordering::SeqCst);
                    self.drain.notify_one();
                    if pending_subacks == 0 {
                        let _ = self.connected.send(true);
                    }
                }
                Ok(Event::SubAck) => {
                    pending_subacks = pending_subacks.saturating_sub(1);
                    if pending_subacks == 0 {
                        // Ready: requests published from now on reach us.
                        let _ = self.connected.send(true);
                    }
                }
                Ok(Event::Publish { topic, payload, response_topic, correlation, expiry_s }) => {
                    self.on_publish(&topic, &payload, response_topic, correlation, expiry_s).await;
                }
                Ok(Event::Disconnected) if stopping => return,
                Ok(Event::Disconnected) | Ok(Event::Other) => {}
                Err(e) => {
                    if stopping {
                        return;
                    }
                    self.online.store(false, Ordering::SeqCst);
                    let _ = self.connected.send(false);
                    // Backoff with jitter: a fleet of cameras does not reconnect in lockstep.
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos());
                    let jitter = 0.5 + f64::from((nanos ^ std::process::id()) % 1000) / 1000.0;
                    let delay = Duration::from_secs_f64(backoff * jitter);
                    tracing::warn!(host = %self.config.host, port = self.config.port, "MQTT connection lost or refused: {e}; retrying in {delay:.1?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.closed.cancelled() => return,
                    }
                    backoff = (backoff * 2.0).min(self.config.reconnect_max_s);
                }
            }
        }
    }

    async fn reply_error(&self, to: Option<ReplyAddress>, err: RequestError, topic: &str) {
        tracing::warn!(topic, code = err.code(), "request refused: {err}");
        match to {
            Some(to) => {
                let _ = self.replies.send(Outgoing::Refused { to, error: err }).await;
            }
            None => tracing::warn!(topic, "the refused request gave no reply address"),
        }
    }

    fn allowed(&self, reply_topic: &str) -> bool {
        !reply_topic.is_empty()
            && !reply_topic.contains(['+', '#'])
            && self.config.allowed_reply_topics.iter().any(|f| wire::topic_matches(f, reply_topic))
    }

    /// Validates a `config/set` request, applies it to the worker's settings and acknowledges the
    /// new state on `config/state` (retained); a refusal goes to the request's reply address.
    async fn on_config_set(
        &self,
        topic: &str,
        payload: &[u8],
        response_topic: Option<String>,
        correlation: Option<Vec<u8>>,
    ) {
        let parsed = wire::parse_config_patch(payload, &self.limits);
        let (id, reply_to) = match &parsed {
            Ok(p) => (p.id.clone(), p.reply_to.clone()),
            Err(_) => wire::salvage_reply_address(payload),
        };
        let to = response_topic.or(reply_to).filter(|t| self.allowed(t)).map(|t| ReplyAddress {
            topic: t,
            correlation,
            id,
            retain: false,
        });
        let current = crate::util::read(&self.settings).clone();
        match parsed.and_then(|patch| patch.apply(&current)) {
            Ok(next) => {
                tracing::info!(prompt = %next.caption_prompt, threshold = next.gate.change_threshold, "config/set applied");
                *crate::util::write(&self.settings) = next.clone();
                let _ = self.replies.send(Outgoing::ConfigState(next)).await;
            }
            Err(e) => {
                self.counters.bad.fetch_add(1, Ordering::Relaxed);
                self.reply_error(to, e, topic).await;
            }
        }
    }

    async fn on_publish(
        &self,
        topic: &str,
        payload: &[u8],
        response_topic: Option<String>,
        correlation: Option<Vec<u8>>,
        expiry_s: Option<u32>,
    ) {
        let limits = self.limits;
        if topic == format!("{}/status", self.config.discovery.prefix) {
            if payload == b"online" {
                tracing::info!("Home Assistant came online; republishing discovery");
                self.publish_discovery().await;
            }
            return;
        }
        if topic == self.topics.config_set() {
            return self.on_config_set(topic, payload, response_topic, correlation).await;
        }
        let received_at = Instant::now();
        let expires_at = expiry_s.map(|s| received_at + Duration::from_secs(u64::from(s)));
        let (text, task, reply) = if topic == self.topics.ask_text() {
            let to = ReplyAddress { topic: self.topics.answer(), correlation: None, id: None, retain: true };
            match wire::parse_text_question(payload, &limits) {
                Ok(q) => (q, JobKind::Answer { stream: false }, to),
                Err(e) => {
                    self.counters.bad.fetch_add(1, Ordering::Relaxed);
                    return self.reply_error(Some(to), e, topic).await;
                }
            }
        } else if topic == self.topics.ask() || topic == self.topics.generate() {
            let parsed = if topic == self.topics.ask() {
                wire::parse_ask(payload, &limits)
                    .map(|r| (r.question, JobKind::Answer { stream: r.stream }, r.id, r.reply_to))
            } else {
                wire::parse_generate(payload, &limits, self.requests.max_prompt_chars).map(|r| {
                    let (id, reply_to) = (r.id.clone(), r.reply_to.clone());
                    (r.prompt.clone().unwrap_or_default(), JobKind::Generate(r.job()), id, reply_to)
                })
            };
            let (id, reply_to) = match &parsed {
                Ok((_, _, id, reply_to)) => (id.clone(), reply_to.clone()),
                Err(_) => wire::salvage_reply_address(payload),
            };
            let reply_topic = response_topic.or(reply_to);
            let to = reply_topic.clone().map(|t| ReplyAddress {
                topic: t,
                correlation: correlation.clone(),
                id: id.clone(),
                retain: false,
            });
            if let Some(t) = &reply_topic {
                if !self.allowed(t) {
                    self.counters.bad.fetch_add(1, Ordering::Relaxed);
                    // Never publish to a forbidden topic: the refusal is logged only.
                    return self.reply_error(None, RequestError::ForbiddenReplyTopic(t.clone()), topic).await;
                }
            }
            match (parsed, to) {
                (Ok((text, task, _, _)), Some(to)) => (text, task, to),
                (Ok(_), None) => {
                    self.counters.bad.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        topic,
                        "request without a reply address (MQTT v5 Response Topic, or `reply_to`): ignored"
                    );
                    return;
                }
                (Err(e), to) => {
                    self.counters.bad.fetch_add(1, Ordering::Relaxed);
                    return self.reply_error(to, e, topic).await;
                }
            }
        } else {
            return;
        };
        let question = Job { text, kind: task, reply: reply.clone(), received_at, expires_at };
        match self.questions.try_send(question) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                self.counters.busy.fetch_add(1, Ordering::Relaxed);
                self.reply_error(Some(reply), RequestError::Busy(self.config.request_queue), topic).await;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                self.reply_error(Some(reply), RequestError::Internal("the inference worker has stopped".into()), topic)
                    .await;
            }
        }
    }
}

struct PublisherTask {
    client: Client,
    topics: Topics,
    spool: Spool,
    online: Arc<AtomicBool>,
    drain: Arc<Notify>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
    closed: CancellationToken,
    settings: Arc<RwLock<RuntimeSettings>>,
    /// The settings last retained on `config/state` (a SIGHUP reload changes them behind our back).
    published_settings: Option<RuntimeSettings>,
}

impl PublisherTask {
    async fn publish_config_state(&mut self, state: RuntimeSettings) {
        let payload = serde_json::to_vec(&ConfigState::from(&state)).unwrap_or_default();
        let m = SpooledMessage::json(self.topics.config_state(), payload, true, &Default::default());
        self.send(m).await;
        self.published_settings = Some(state);
    }

    async fn refresh_config_state(&mut self) {
        let current = crate::util::read(&self.settings).clone();
        if self.published_settings.as_ref() != Some(&current) && self.online.load(Ordering::SeqCst) {
            self.publish_config_state(current).await;
        }
    }

    fn attributes(&self) -> StatusAttributes {
        StatusAttributes {
            spooled: self.spool.len() as u64,
            spool_dropped: self.spool.dropped(),
            spool_limit: self.spool.limit() as u64,
            busy_replies: self.counters.busy.load(Ordering::Relaxed),
            bad_requests: self.counters.bad.load(Ordering::Relaxed),
            expired_requests: self.counters.expired.load(Ordering::Relaxed),
        }
    }

    /// Publishes spooled messages in order while connected.
    async fn drain_spool(&mut self) {
        while self.online.load(Ordering::SeqCst) {
            let message = match self.spool.front() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("{e}");
                    break;
                }
            };
            if let Err(e) = self.client.publish(&message).await {
                tracing::warn!("publishing a spooled message failed, keeping it: {e}");
                break;
            }
            if let Err(e) = self.spool.pop() {
                tracing::error!("{e}");
                break;
            }
        }
    }

    async fn send(&mut self, message: SpooledMessage) {
        if self.online.load(Ordering::SeqCst) && self.spool.is_empty() && self.client.publish(&message).await.is_ok() {
            return;
        }
        // Offline, or older messages still wait: keep the order by queueing behind them.
        if let Err(e) = self.spool.push(&message) {
            tracing::error!("cannot spool a message for {}: {e}", message.topic);
        }
    }

    /// Publishes now when connected with nothing spooled before it; otherwise drops the message.
    async fn publish_if_online(&mut self, message: SpooledMessage) {
        if !(self.online.load(Ordering::SeqCst) && self.spool.is_empty() && self.client.publish(&message).await.is_ok())
        {
            tracing::debug!(topic = %message.topic, "offline: the picture is not kept");
        }
    }

    async fn publish_attributes(&mut self, last: &mut StatusAttributes) {
        let now = self.attributes();
        if now != *last && self.online.load(Ordering::SeqCst) {
            let m = SpooledMessage::json(
                self.topics.status_attributes(),
                serde_json::to_vec(&now).unwrap_or_default(),
                true,
                &Default::default(),
            );
            if self.client.publish(&m).await.is_ok() {
                *last = now;
            }
        }
    }

    /// Delivers one message as the mapping says: kept (spooled while offline) or latest-only.
    async fn deliver(&mut self, message: Outgoing) {
        match message {
            Outgoing::Result(Output::Expired) => {
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
            }
            Outgoing::ConfigState(state) => self.publish_config_state(state).await,
            other => {
                for (m, delivery) in messages(&self.topics, &other) {
                    match delivery {
                        Delivery::Keep => self.send(m).await,
                        Delivery::LatestOnly => self.publish_if_online(m).await,
                    }
                }
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Outgoing>, mut results: mpsc::Receiver<Output<ReplyAddress>>) {
        let mut last = StatusAttributes { spool_limit: u64::MAX, ..Default::default() };
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut results_open = true;
        loop {
            tokio::select! {
                biased;
                _ = self.drain.notified() => {
                    self.drain_spool().await;
                    // Retain the settings in effect on every connect.
                    self.published_settings = None;
                    self.refresh_config_state().await;
                }
                message = rx.recv() => match message {
                    Some(message) => self.deliver(message).await,
                    None => break,
                },
                result = results.recv(), if results_open => match result {
                    Some(result) => self.deliver(Outgoing::Result(result)).await,
                    // The worker is gone; requests still get their refusals until shutdown.
                    None => results_open = false,
                },
                _ = tick.tick() => {
                    self.publish_attributes(&mut last).await;
                    self.refresh_config_state().await;
                }
                _ = self.shutdown.cancelled() => break,
            }
        }
        // Shutdown: whatever is still queued goes through the same mapping (pictures are not
        // spooled here either), then `stopped`, then a clean disconnect (which suppresses the
        // last will).
        while let Ok(result) = results.try_recv() {
            self.deliver(Outgoing::Result(result)).await;
        }
        while let Ok(message) = rx.try_recv() {
            if !matches!(message, Outgoing::ConfigState(_)) {
                self.deliver(message).await;
            }
        }
        self.drain_spool().await;
        if self.online.load(Ordering::SeqCst) {
            self.publish_attributes(&mut last).await;
            let stopped = SpooledMessage::plain(self.topics.status(), b"stopped".to_vec(), true);
            let _ = self.client.publish(&stopped).await;
            self.client.disconnect().await;
        }
        self.closed.cancel();
    }
}
