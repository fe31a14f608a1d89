//! MQTT: the only module that knows `rumqttc`. One task owns the connection and polls it
//! continuously; another publishes results, spooling them on disk while the broker is away.
//!
//! Requests arrive on `<prefix>/ask` (JSON) and `<prefix>/ask/text` (plain text, Home Assistant's
//! text entity), are validated here, and go to the inference worker through a bounded queue; a full
//! queue is answered `busy` at once. MQTT v5 requests are answered on their Response Topic with
//! their Correlation Data; v3.1.1 requests carry `id` and `reply_to` in the JSON.

pub mod broker;
pub mod spool;
pub mod wire;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{MqttConfig, MqttProtocol};
use crate::spool::{Spool, SpoolError, SpooledMessage};
use crate::wire::{self, Discovery, Limits, Reply, RequestError, StatusAttributes, Topics};

/// An error starting the MQTT side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// A TLS file could not be read.
    #[error("mqtt.tls: cannot read {path}: {source}")]
    TlsFile {
        /// The file.
        path: PathBuf,
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

/// What a request asks the worker to do.
#[derive(Debug, Clone)]
pub enum Task {
    /// Answer the question in `Question::text`.
    Answer {
        /// Stream partial answers.
        stream: bool,
    },
    /// Render an image.
    Generate(wire::GenerateRequest),
}

/// A validated request on its way to the worker.
#[derive(Debug, Clone)]
pub struct Question {
    /// The question (for `Task::Generate`, the prompt, possibly empty).
    pub text: String,
    /// What to do.
    pub task: Task,
    /// Where to reply.
    pub reply: ReplyAddress,
    /// When it arrived.
    pub received_at: Instant,
    /// When its MQTT v5 Message Expiry passes: not answered after that.
    pub expires_at: Option<Instant>,
}

impl Question {
    /// True when its message expiry has passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// What the rest of the daemon publishes.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A caption (retained on the caption topic).
    Caption(wire::Caption),
    /// A reply (answer, partial answer or error) to a request.
    Reply {
        /// Where it goes.
        to: ReplyAddress,
        /// The body.
        reply: Reply,
    },
    /// The worker dropped a request whose message expiry passed (counted, not published).
    Expired,
    /// The runtime settings in effect (retained on `config/state`).
    ConfigState(wire::RuntimeSettings),
    /// An image: to a request's reply topic (when `to` is given) and, retained, to the image topic.
    Image {
        /// The requester, if any.
        to: Option<ReplyAddress>,
        /// PNG or JPEG bytes.
        bytes: Vec<u8>,
        /// Their MIME type.
        content_type: &'static str,
        /// What was rendered (user properties on the reply).
        info: Option<wire::ImageInfo>,
    },
}

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
    fn default() -> Self {
        let config = crate::config::Config::default();
        RequestSettings::from_config(&config)
    }
}

impl RequestSettings {
    /// From the whole config.
    pub fn from_config(config: &crate::config::Config) -> Self {
        RequestSettings {
            max_question_chars: config.llm.max_question_chars,
            max_prompt_chars: config.generator.max_prompt_chars,
            image_type: config.generator.format.content_type(),
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
    /// Send results here.
    pub outgoing: mpsc::Sender<Outgoing>,
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
        let MqttHandle { outgoing, shutdown, tasks, .. } = self;
        drop(outgoing);
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

/// A connection-level event, the same for both protocol versions.
enum Event {
    Connected,
    SubAck,
    Publish { topic: String, payload: Vec<u8>, response_topic: Option<String>, correlation: Option<Vec<u8>>, expiry_s: Option<u32> },
    Disconnected,
    Other,
}

#[derive(Clone)]
enum Client {
    V5(rumqttc::v5::AsyncClient),
    V3(rumqttc::AsyncClient),
}

enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V3(Box<rumqttc::EventLoop>),
}

impl Client {
    async fn publish(&self, m: &SpooledMessage) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    correlation_data: m.correlation.clone().map(Into::into),
                    user_properties: m.user_properties.clone(),
                    content_type: m.content_type.clone(),
                    ..Default::default()
                };
                c.publish_with_properties(m.topic.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce, m.retain, m.payload.clone(), props)
                    .await
                    .map_err(|e| e.to_string())
            }
            Client::V3(c) => c.publish(m.topic.clone(), rumqttc::QoS::AtLeastOnce, m.retain, m.payload.clone()).await.map_err(|e| e.to_string()),
        }
    }

    async fn subscribe(&self, topic: &str) -> Result<(), String> {
        match self {
            Client::V5(c) => c.subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.map_err(|e| e.to_string()),
            Client::V3(c) => c.subscribe(topic, rumqttc::QoS::AtLeastOnce).await.map_err(|e| e.to_string()),
        }
    }

    async fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V3(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

impl EventLoop {
    async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V5(l) => {
                use rumqttc::v5::mqttbytes::v5::Packet;
                use rumqttc::v5::Event as E;
                match l.poll().await.map_err(|e| e.to_string())? {
                    E::Incoming(Packet::ConnAck(_)) => Ok(Event::Connected),
                    E::Incoming(Packet::SubAck(_)) => Ok(Event::SubAck),
                    E::Incoming(Packet::Publish(p)) => {
                        let props = p.properties.unwrap_or_default();
                        Ok(Event::Publish {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            response_topic: props.response_topic,
                            correlation: props.correlation_data.map(|b| b.to_vec()),
                            expiry_s: props.message_expiry_interval,
                        })
                    }
                    E::Incoming(Packet::Disconnect(_)) | E::Outgoing(rumqttc::Outgoing::Disconnect) => Ok(Event::Disconnected),
                    _ => Ok(Event::Other),
                }
            }
            EventLoop::V3(l) => {
                use rumqttc::{Event as E, Packet};
                match l.poll().await.map_err(|e| e.to_string())? {
                    E::Incoming(Packet::ConnAck(_)) => Ok(Event::Connected),
                    E::Incoming(Packet::SubAck(_)) => Ok(Event::SubAck),
                    E::Incoming(Packet::Publish(p)) => Ok(Event::Publish { topic: p.topic.clone(), payload: p.payload.to_vec(), response_topic: None, correlation: None, expiry_s: None }),
                    E::Incoming(Packet::Disconnect) | E::Outgoing(rumqttc::Outgoing::Disconnect) => Ok(Event::Disconnected),
                    _ => Ok(Event::Other),
                }
            }
        }
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::TlsFile { path: path.clone(), source })
}

fn connect(config: &MqttConfig, topics: &Topics) -> Result<(Client, EventLoop), MqttError> {
    let tls = match &config.tls {
        Some(tls) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client_auth = match (&tls.client_cert, &tls.client_key) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                _ => None,
            };
            Some(rumqttc::TlsConfiguration::Simple { ca: read(&tls.ca_file)?, alpn: None, client_auth })
        }
        None => None,
    };
    let keep_alive = Duration::from_secs(config.keep_alive_s);
    let client_id = config.client_id();
    Ok(match config.protocol {
        MqttProtocol::V5 => {
            use rumqttc::v5::mqttbytes::v5::LastWill;
            let mut options = rumqttc::v5::MqttOptions::new(client_id, &config.host, config.port);
            options.set_keep_alive(keep_alive);
            // A persistent session: the broker keeps our subscriptions and QoS 1 messages for an hour.
            options.set_clean_start(false);
            options.set_session_expiry_interval(Some(3600));
            options.set_last_will(LastWill::new(topics.status(), "offline", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, true, None));
            options.set_max_packet_size(Some(1 << 24));
            if let (Some(u), Some(p)) = (&config.username, &config.password) {
                options.set_credentials(u, p);
            }
            if let Some(tls) = tls {
                options.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
        MqttProtocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(client_id, &config.host, config.port);
            options.set_keep_alive(keep_alive);
            options.set_clean_session(false);
            options.set_last_will(rumqttc::LastWill::new(topics.status(), "offline", rumqttc::QoS::AtLeastOnce, true));
            options.set_max_packet_size(1 << 24, 1 << 24);
            if let (Some(u), Some(p)) = (&config.username, &config.password) {
                options.set_credentials(u, p);
            }
            if let Some(tls) = tls {
                options.set_transport(rumqttc::Transport::tls_with_config(tls));
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(options, 64);
            (Client::V3(client), EventLoop::V3(Box::new(eventloop)))
        }
    })
}

/// A caption as a message ready to publish (retained, timings as user properties).
pub fn caption_message(topics: &Topics, caption: &wire::Caption) -> SpooledMessage {
    SpooledMessage::json(topics.caption(), serde_json::to_vec(caption).unwrap_or_default(), true, &caption.timings_ms)
}

/// A reply as a message ready to publish.
pub fn reply_message(to: &ReplyAddress, reply: &Reply) -> SpooledMessage {
    let payload = serde_json::to_vec(reply).unwrap_or_default();
    let mut message = match reply {
        Reply::Answer(a) => SpooledMessage::json(to.topic.clone(), payload, to.retain, &a.timings_ms),
        Reply::Error(e) => {
            let mut m = SpooledMessage::json(to.topic.clone(), payload, to.retain, &Default::default());
            m.user_properties.push(("error".into(), e.error.code.clone()));
            m
        }
    };
    message.correlation = to.correlation.clone();
    message
}

/// Image messages: the retained copy on the image topic, and the reply when there is a requester.
pub fn image_messages(topics: &Topics, to: Option<&ReplyAddress>, bytes: &[u8], content_type: &str, info: Option<&wire::ImageInfo>) -> (SpooledMessage, Option<SpooledMessage>) {
    let properties = info.map(wire::ImageInfo::user_properties).unwrap_or_default();
    let message = |topic: String, retain: bool| SpooledMessage {
        topic,
        payload: bytes.to_vec(),
        retain,
        correlation: None,
        user_properties: properties.clone(),
        content_type: Some(content_type.to_owned()),
    };
    let reply = to.map(|to| SpooledMessage { correlation: to.correlation.clone(), ..message(to.topic.clone(), false) });
    (message(topics.image(), true), reply)
}

/// Starts the MQTT side: connects (retrying with backoff in the background), and returns the
/// handle through which results are published. Valid questions go to `questions`, a bounded
/// channel (its capacity is `mqtt.request_queue`) that the inference worker drains on its own thread.
/// Must be called inside a tokio runtime.
pub fn start(
    config: &MqttConfig,
    state_dir: &std::path::Path,
    questions: std::sync::mpsc::SyncSender<Question>,
    settings: Arc<std::sync::RwLock<wire::RuntimeSettings>>,
    model: &str,
    requests: RequestSettings,
) -> Result<MqttHandle, MqttError> {
    let topics = Topics::new(&config.topic_prefix());
    let spool_dir = config.spool_dir.clone().unwrap_or_else(|| state_dir.join("spool"));
    let spool = Spool::open(&spool_dir, config.spool_limit)?;
    let (client, eventloop) = connect(config, &topics)?;
    let (out_tx, out_rx) = mpsc::channel(256);
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
    let publisher = PublisherTask { client, topics: topics.clone(), spool, online, drain, counters, shutdown: shutdown.clone(), closed, settings, published_settings: None };
    let conn_task = tokio::spawn(conn.run(eventloop));
    let pub_task = tokio::spawn(publisher.run(out_rx));
    Ok(MqttHandle { outgoing: out_tx, topics, connected: connected_rx, shutdown, tasks: vec![pub_task, conn_task] })
}

struct ConnectionTask {
    config: MqttConfig,
    topics: Topics,
    client: Client,
    questions: std::sync::mpsc::SyncSender<Question>,
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
    settings: Arc<std::sync::RwLock<wire::RuntimeSettings>>,
}

impl ConnectionTask {
    fn discovery(&self) -> (String, Vec<u8>) {
        let device_id = self.config.device_id();
        let device_name = self.config.device_name();
        let d = Discovery { prefix: &self.config.discovery.prefix, device_id: &device_id, device_name: &device_name, model: &self.model, topics: &self.topics, image_type: self.requests.image_type };
        // Disabled discovery publishes an empty retained payload: Home Assistant removes the device.
        let payload = if self.config.discovery.enabled { d.payload().to_string().into_bytes() } else { Vec::new() };
        (d.topic(), payload)
    }

    /// Subscribes and announces the device; returns how many subscriptions await their SubAck.
    async fn on_connect(&self) -> usize {
        let mut pending = 0;
        for topic in [self.topics.ask(), self.topics.ask_text(), self.topics.generate(), self.topics.config_set(), format!("{}/status", self.config.discovery.prefix)] {
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
                    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
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
                let reply = Reply::Error(wire::ErrorReply::new(to.id.clone(), &err));
                let _ = self.replies.send(Outgoing::Reply { to, reply }).await;
            }
            None => tracing::warn!(topic, "the refused request gave no reply address"),
        }
    }

    fn allowed(&self, reply_topic: &str) -> bool {
        !reply_topic.is_empty() && !reply_topic.contains(['+', '#']) && self.config.allowed_reply_topics.iter().any(|f| wire::topic_matches(f, reply_topic))
    }

    /// Validates a `config/set` request, applies it to the worker's settings and acknowledges the
    /// new state on `config/state` (retained); a refusal goes to the request's reply address.
    async fn on_config_set(&self, topic: &str, payload: &[u8], response_topic: Option<String>, correlation: Option<Vec<u8>>) {
        let parsed = wire::parse_config_patch(payload, &self.limits);
        let (id, reply_to) = match &parsed {
            Ok(p) => (p.id.clone(), p.reply_to.clone()),
            Err(_) => wire::salvage_reply_address(payload),
        };
        let to = response_topic.or(reply_to).filter(|t| self.allowed(t)).map(|t| ReplyAddress { topic: t, correlation, id, retain: false });
        let current = self.settings.read().map(|s| s.clone()).unwrap_or_else(|e| e.into_inner().clone());
        match parsed.and_then(|patch| patch.apply(&current)) {
            Ok(next) => {
                tracing::info!(prompt = %next.caption_prompt, threshold = next.gate.change_threshold, "config/set applied");
                if let Ok(mut s) = self.settings.write() {
                    *s = next.clone();
                }
                let _ = self.replies.send(Outgoing::ConfigState(next)).await;
            }
            Err(e) => {
                self.counters.bad.fetch_add(1, Ordering::Relaxed);
                self.reply_error(to, e, topic).await;
            }
        }
    }

    async fn on_publish(&self, topic: &str, payload: &[u8], response_topic: Option<String>, correlation: Option<Vec<u8>>, expiry_s: Option<u32>) {
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
                Ok(q) => (q, Task::Answer { stream: false }, to),
                Err(e) => {
                    self.counters.bad.fetch_add(1, Ordering::Relaxed);
                    return self.reply_error(Some(to), e, topic).await;
                }
            }
        } else if topic == self.topics.ask() || topic == self.topics.generate() {
            let parsed = if topic == self.topics.ask() {
                wire::parse_ask(payload, &limits).map(|r| (r.question, Task::Answer { stream: r.stream }, r.id, r.reply_to))
            } else {
                wire::parse_generate(payload, &limits, self.requests.max_prompt_chars).map(|r| {
                    let (id, reply_to) = (r.id.clone(), r.reply_to.clone());
                    (r.prompt.clone().unwrap_or_default(), Task::Generate(r), id, reply_to)
                })
            };
            let (id, reply_to) = match &parsed {
                Ok((_, _, id, reply_to)) => (id.clone(), reply_to.clone()),
                Err(_) => wire::salvage_reply_address(payload),
            };
            let reply_topic = response_topic.or(reply_to);
            let to = reply_topic.clone().map(|t| ReplyAddress { topic: t, correlation: correlation.clone(), id: id.clone(), retain: false });
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
                    tracing::warn!(topic, "request without a reply address (MQTT v5 Response Topic, or `reply_to`): ignored");
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
        let question = Question { text, task, reply: reply.clone(), received_at, expires_at };
        match self.questions.try_send(question) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                self.counters.busy.fetch_add(1, Ordering::Relaxed);
                self.reply_error(Some(reply), RequestError::Busy(self.config.request_queue), topic).await;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                self.reply_error(Some(reply), RequestError::Internal("the inference worker has stopped".into()), topic).await;
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
    settings: Arc<std::sync::RwLock<wire::RuntimeSettings>>,
    /// The settings last retained on `config/state` (a SIGHUP reload changes them behind our back).
    published_settings: Option<wire::RuntimeSettings>,
}

impl PublisherTask {
    async fn publish_config_state(&mut self, state: wire::RuntimeSettings) {
        let m = SpooledMessage::json(self.topics.config_state(), serde_json::to_vec(&state).unwrap_or_default(), true, &Default::default());
        self.send(m).await;
        self.published_settings = Some(state);
    }

    async fn refresh_config_state(&mut self) {
        let current = self.settings.read().map(|s| s.clone()).unwrap_or_else(|e| e.into_inner().clone());
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
        if !(self.online.load(Ordering::SeqCst) && self.spool.is_empty() && self.client.publish(&message).await.is_ok()) {
            tracing::debug!(topic = %message.topic, "offline: the picture is not kept");
        }
    }

    async fn publish_attributes(&mut self, last: &mut StatusAttributes) {
        let now = self.attributes();
        if now != *last && self.online.load(Ordering::SeqCst) {
            let m = SpooledMessage::json(self.topics.status_attributes(), serde_json::to_vec(&now).unwrap_or_default(), true, &Default::default());
            if self.client.publish(&m).await.is_ok() {
                *last = now;
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Outgoing>) {
        let mut last = StatusAttributes { spool_limit: u64::MAX, ..Default::default() };
        let mut tick = tokio::time::interval(Duration::from_secs(5));
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
                    Some(Outgoing::Caption(caption)) => self.send(caption_message(&self.topics, &caption)).await,
                    Some(Outgoing::Reply { to, reply }) => self.send(reply_message(&to, &reply)).await,
                    Some(Outgoing::Expired) => {
                        self.counters.expired.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Outgoing::ConfigState(state)) => self.publish_config_state(state).await,
                    Some(Outgoing::Image { to, bytes, content_type, info }) => {
                        let (latest, reply) = image_messages(&self.topics, to.as_ref(), &bytes, content_type, info.as_ref());
                        // The image topic's copy is only the latest picture: published when online,
                        // never spooled (a backlog of stale pictures would fill the disk).
                        self.publish_if_online(latest).await;
                        if let Some(reply) = reply {
                            self.send(reply).await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    self.publish_attributes(&mut last).await;
                    self.refresh_config_state().await;
                }
                _ = self.shutdown.cancelled() => break,
            }
        }
        // Shutdown: whatever is still queued, then `stopped`, then a clean disconnect (which
        // suppresses the last will).
        while let Ok(message) = rx.try_recv() {
            let messages = match message {
                Outgoing::Caption(c) => vec![caption_message(&self.topics, &c)],
                Outgoing::Reply { to, reply } => vec![reply_message(&to, &reply)],
                Outgoing::Image { to, bytes, content_type, info } => {
                    let (latest, reply) = image_messages(&self.topics, to.as_ref(), &bytes, content_type, info.as_ref());
                    std::iter::once(latest).chain(reply).collect()
                }
                Outgoing::Expired | Outgoing::ConfigState(_) => continue,
            };
            for m in messages {
                self.send(m).await;
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
