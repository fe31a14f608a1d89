//! The connection task: the one task that polls the connection. It subscribes and announces on
//! every ConnAck, validates requests and queues them for the worker (`busy` when the queue is full),
//! applies `config/set`, republishes discovery when Home Assistant comes online, and reconnects with
//! backoff and jitter.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::client::{AckToken, Client, Event, EventLoop, Incoming};
use super::offload::Pending;
use super::outbound::Outgoing;
use super::settings::MqttConfig;
use super::spool::SpooledMessage;
use super::wire::{self, Discovery, Limits, Member, RequestError, Topics};
use super::{Counters, ReplyAddress, Request, RequestSettings};
use crate::worker::{Job, JobKind, OffloadKind, RuntimeSettings};

pub(super) struct ConnectionTask {
    pub(super) config: MqttConfig,
    pub(super) topics: Topics,
    pub(super) client: Client,
    pub(super) questions: std::sync::mpsc::SyncSender<Request>,
    pub(super) replies: mpsc::Sender<Outgoing>,
    pub(super) counters: Arc<Counters>,
    pub(super) connected: watch::Sender<bool>,
    pub(super) online: Arc<AtomicBool>,
    pub(super) drain: Arc<Notify>,
    pub(super) model: String,
    /// Cancelled by the publisher once it has sent `stopped` and the disconnect.
    pub(super) closed: CancellationToken,
    pub(super) limits: Limits,
    pub(super) requests: RequestSettings,
    pub(super) settings: Arc<RwLock<RuntimeSettings>>,
    /// A camera daemon or a job worker.
    pub(super) role: Role,
    /// `mqtt.device` (or the hostname) as an id, read once at start: it names every reply.
    pub(super) device_id: String,
    /// The display name, read once at start.
    pub(super) device_name: String,
    /// The camera's offloaded jobs awaiting results.
    pub(super) pending: Arc<Pending>,
}

/// What the connection serves.
pub(super) enum Role {
    /// A camera: its own topics, its fleet groups, and the results of the jobs it offloaded.
    Camera {
        /// Whether any job kind is offloaded (then `<prefix>/jobs/result` is subscribed).
        offloads: bool,
    },
    /// `scenecast worker`: jobs from shared subscriptions, acknowledged after their result.
    Worker {
        /// The kinds served.
        serve: Vec<OffloadKind>,
        /// `$share/<share_group>/...`.
        share_group: String,
        /// `<jobs_prefix>/<kind>`.
        jobs_prefix: String,
        /// `offload.max_job_bytes`.
        max_job_bytes: usize,
    },
}

impl ConnectionTask {
    /// A reply address on `topic` that names this device; the rest as the caller sets it.
    fn reply_address(&self, topic: String) -> ReplyAddress {
        ReplyAddress {
            topic,
            correlation: None,
            id: None,
            retain: false,
            device: Some(self.device_id.clone()),
            ack: None,
        }
    }

    fn discovery(&self) -> (String, Vec<u8>) {
        let d = Discovery {
            prefix: &self.config.discovery.prefix,
            device_id: &self.device_id,
            device_name: &self.device_name,
            model: &self.model,
            topics: &self.topics,
            image_type: self.requests.image_type,
            objects: self.config.discovery.objects.as_deref().unwrap_or_default(),
        };
        // Disabled discovery publishes an empty retained payload: Home Assistant removes the device.
        let payload = if self.config.discovery.enabled { d.payload().to_string().into_bytes() } else { Vec::new() };
        (d.topic(), payload)
    }

    /// The filters this connection subscribes to.
    fn subscriptions(&self) -> Vec<String> {
        match &self.role {
            Role::Camera { offloads } => {
                let mut topics = vec![
                    self.topics.ask(),
                    self.topics.ask_text(),
                    self.topics.generate(),
                    self.topics.config_set(),
                    format!("{}/status", self.config.discovery.prefix),
                ];
                topics.extend(self.config.groups.iter().map(|g| wire::group_ask(g)));
                if *offloads {
                    topics.push(self.topics.job_results());
                }
                topics
            }
            Role::Worker { serve, share_group, jobs_prefix, .. } => {
                serve.iter().map(|k| wire::job_subscription(share_group, jobs_prefix, *k)).collect()
            }
        }
    }

    /// Subscribes and announces the device; returns how many subscriptions await their SubAck.
    async fn on_connect(&self) -> usize {
        let mut pending = 0;
        for topic in self.subscriptions() {
            match self.client.subscribe(&topic).await {
                Ok(()) => pending += 1,
                Err(e) => tracing::warn!(topic, "subscribe failed: {e}"),
            }
        }
        let status = SpooledMessage::plain(self.topics.status(), b"online".to_vec(), true);
        let _ = self.client.publish(&status).await;
        if matches!(self.role, Role::Camera { .. }) {
            self.publish_discovery().await;
            self.publish_membership().await;
        }
        pending
    }

    /// The retained member record in each fleet group.
    async fn publish_membership(&self) {
        let member = Member {
            device: self.device_id.clone(),
            name: self.device_name.clone(),
            prefix: self.topics.prefix().to_owned(),
            model: self.model.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let payload = serde_json::to_vec(&member).unwrap_or_default();
        for group in &self.config.groups {
            let m = SpooledMessage::json(
                wire::group_member(group, &member.device),
                payload.clone(),
                true,
                &Default::default(),
            );
            if let Err(e) = self.client.publish(&m).await {
                tracing::warn!(group, "member record publish failed: {e}");
            }
        }
    }

    async fn publish_discovery(&self) {
        let (topic, payload) = self.discovery();
        let m = SpooledMessage::plain(topic, payload, true);
        if let Err(e) = self.client.publish(&m).await {
            tracing::warn!("discovery publish failed: {e}");
        }
    }

    pub(super) async fn run(self, mut eventloop: EventLoop) {
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
                Ok(Event::Publish(incoming)) => match &self.role {
                    Role::Camera { .. } => self.on_publish(*incoming).await,
                    Role::Worker { .. } => self.on_job(*incoming).await,
                },
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
            correlation,
            id,
            ..self.reply_address(t)
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

    /// A message for a camera: a request (its own topics or a fleet group's), `config/set`, Home
    /// Assistant's status, or the result of a job it offloaded.
    async fn on_publish(&self, incoming: Incoming) {
        let Incoming { topic, payload, response_topic, correlation, expiry_s, .. } = &incoming;
        let (topic, payload, response_topic, correlation, expiry_s) =
            (topic.as_str(), payload.as_slice(), response_topic.clone(), correlation.clone(), *expiry_s);
        let limits = self.limits;
        if topic == self.topics.job_results() {
            let forwarded = self.pending.on_result(&incoming, &self.topics);
            if !forwarded.is_empty() {
                let _ = self.replies.send(Outgoing::Forwarded(forwarded)).await;
            }
            return;
        }
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
        let group_ask = self.config.groups.iter().any(|g| wire::group_ask(g) == topic);
        let (text, task, reply) = if topic == self.topics.ask_text() {
            let to = ReplyAddress { retain: true, ..self.reply_address(self.topics.answer()) };
            match wire::parse_text_question(payload, &limits) {
                Ok(q) => (q, JobKind::Answer { stream: false }, to),
                Err(e) => {
                    self.counters.bad.fetch_add(1, Ordering::Relaxed);
                    return self.reply_error(Some(to), e, topic).await;
                }
            }
        } else if topic == self.topics.ask() || group_ask || topic == self.topics.generate() {
            let parsed = if topic != self.topics.generate() {
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
                correlation: correlation.clone(),
                id: id.clone(),
                ..self.reply_address(t)
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
        self.queue(Job { text, kind: task, reply, received_at, expires_at, frame: None }, topic).await;
    }

    /// Hands a validated job to the worker, or refuses it as busy.
    async fn queue(&self, job: Request, topic: &str) {
        let reply = job.reply.clone();
        match self.questions.try_send(job) {
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

    /// A job for `scenecast worker`, from a shared subscription: parsed, queued for the model
    /// and acknowledged only once its result (or refusal) is published, so that a worker killed
    /// mid-job leaves it unacknowledged for the broker to deliver again.
    async fn on_job(&self, incoming: Incoming) {
        let Role::Worker { serve, jobs_prefix, max_job_bytes, .. } = &self.role else { return };
        let Incoming { topic, payload, response_topic, correlation, expiry_s, ack, .. } = incoming;
        let Some(kind) = serve.iter().copied().find(|k| wire::job_topic(jobs_prefix, *k) == topic) else {
            tracing::warn!(topic, "a message on no job topic; acknowledged and dropped");
            return self.ack(ack).await;
        };
        let Some(reply_topic) = response_topic.filter(|t| self.allowed(t)) else {
            tracing::warn!(topic, "a job without an allowed Response Topic; acknowledged and dropped");
            return self.ack(ack).await;
        };
        let to = ReplyAddress { correlation, ack, ..self.reply_address(reply_topic) };
        let limits = Limits { max_payload_bytes: *max_job_bytes, ..self.limits };
        let job = match wire::parse_job(kind, &payload, &limits, self.requests.max_prompt_chars) {
            Ok(job) => job,
            Err(e) => {
                self.counters.bad.fetch_add(1, Ordering::Relaxed);
                // The refusal's address carries the acknowledgement: it is sent after the refusal.
                return self.reply_error(Some(to), e, &topic).await;
            }
        };
        tracing::info!(kind = kind.as_str(), origin = %job.origin, "job received");
        let received_at = Instant::now();
        let expires_at = expiry_s.map(|s| received_at + Duration::from_secs(u64::from(s)));
        let job = Job { text: job.text, kind: job.kind, reply: to, received_at, expires_at, frame: job.frame };
        self.queue(job, &topic).await;
    }

    async fn ack(&self, token: Option<AckToken>) {
        if let Some(token) = token {
            if let Err(e) = self.client.ack(&token).await {
                tracing::warn!("acknowledging a message failed: {e}");
            }
        }
    }
}
