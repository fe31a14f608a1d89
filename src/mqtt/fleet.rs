//! A hub's view of a fleet (`scenecast fleet`): the devices of a group, from their retained
//! member records and status topics, and one question asked of all of them at once.
//!
//! The question is published once on `<group>/ask`; every device of the group answers it to the
//! one reply topic (MQTT v5 Response Topic with Correlation Data; v3.1.1: `reply_to` and `id` in
//! the JSON), each answer naming its device. Collection stops when every device that is online
//! has answered, or at the timeout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::client::{connect, Client, Event, EventLoop, Session};
use super::settings::{MqttConfig, MqttProtocol};
use super::spool::SpooledMessage;
use super::wire::{self, AskRequest, Member, Reply};
use super::MqttError;

/// An error of a fleet command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The client could not be set up (TLS files).
    #[error(transparent)]
    Setup(#[from] MqttError),
    /// The broker refused or could not be reached.
    #[error("MQTT broker {host}:{port}: {message} (expected a broker there; check [mqtt] host and port)")]
    Connect {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// What went wrong.
        message: String,
    },
    /// The question is not one a device would accept.
    #[error("the question: {0}")]
    Question(String),
}

/// A device of a group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    /// Its member record.
    #[serde(flatten)]
    pub member: Member,
    /// Its retained status (`online`, `offline`, `stopped`), when one is known.
    pub status: Option<String>,
}

/// One device's reply to a fleet question.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetAnswer {
    /// The device that answered.
    pub device: String,
    /// The answer (absent for an error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The error code and message (absent for an answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<wire::ErrorBody>,
    /// How old the frame the answer is about was when the answer arrived, ms (by this
    /// machine's clock against the camera's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_age_ms: Option<i64>,
    /// From publishing the question to this reply, ms.
    pub latency_ms: f64,
}

/// What a fleet question returned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetReport {
    /// The group asked.
    pub group: String,
    /// The question.
    pub question: String,
    /// The replies, in arrival order.
    pub answers: Vec<FleetAnswer>,
    /// Devices of the group that did not reply, with their status.
    pub silent: Vec<Device>,
}

/// A client for one command: a clean session, no last will.
struct Connection {
    client: Client,
    eventloop: EventLoop,
    host: String,
    port: u16,
}

impl Connection {
    fn open(config: &MqttConfig) -> Result<Self, FleetError> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let session = Session {
            client_id: format!("scenecast-fleet-{}-{nanos:x}", std::process::id()),
            expiry_s: 0,
            will: None,
            manual_acks: false,
            receive_maximum: None,
        };
        let (client, eventloop) = connect(config, &session)?;
        Ok(Connection { client, eventloop, host: config.host.clone(), port: config.port })
    }

    /// The next event before `deadline` (None at the deadline); connection errors end the command.
    async fn next(&mut self, deadline: Instant) -> Result<Option<Event>, FleetError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.eventloop.poll()).await {
            Err(_) => Ok(None),
            Ok(Ok(event)) => Ok(Some(event)),
            Ok(Err(message)) => Err(FleetError::Connect { host: self.host.clone(), port: self.port, message }),
        }
    }

    /// Subscribes to `filters` and returns once all are acknowledged; retained messages that
    /// arrive meanwhile are returned.
    async fn subscribe(&mut self, filters: &[String], timeout: Duration) -> Result<Vec<(String, Vec<u8>)>, FleetError> {
        let deadline = Instant::now() + timeout;
        let mut received = Vec::new();
        let mut waiting = filters.len();
        for f in filters {
            self.client.subscribe(f).await.map_err(|message| self.error(message))?;
        }
        while waiting > 0 {
            match self.next(deadline).await? {
                None => return Err(self.error(format!("no subscription acknowledgement within {timeout:?}"))),
                Some(Event::SubAck) => waiting -= 1,
                Some(Event::Publish(m)) => received.push((m.topic, m.payload)),
                Some(_) => {}
            }
        }
        Ok(received)
    }

    /// Messages that arrive within `window` (retained ones come right after the SubAck).
    async fn collect(&mut self, window: Duration) -> Result<Vec<(String, Vec<u8>)>, FleetError> {
        let deadline = Instant::now() + window;
        let mut received = Vec::new();
        while let Some(event) = self.next(deadline).await? {
            if let Event::Publish(m) = event {
                received.push((m.topic, m.payload));
            }
        }
        Ok(received)
    }

    fn error(&self, message: String) -> FleetError {
        FleetError::Connect { host: self.host.clone(), port: self.port, message }
    }
}

/// How long retained member records and statuses may take to arrive after the SubAck.
const RETAINED_WINDOW: Duration = Duration::from_millis(400);

/// The devices of `group`: their retained member records, with each one's retained status.
async fn devices(conn: &mut Connection, group: &str) -> Result<Vec<Device>, FleetError> {
    let filter = wire::group_members(group);
    let mut records = conn.subscribe(std::slice::from_ref(&filter), Duration::from_secs(10)).await?;
    records.extend(conn.collect(RETAINED_WINDOW).await?);
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    for (topic, payload) in records {
        if !wire::topic_matches(&filter, &topic) || payload.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Member>(&payload) {
            Ok(m) => {
                members.insert(m.device.clone(), m);
            }
            Err(e) => tracing::warn!(topic, "not a member record ({e}); skipped"),
        }
    }
    let status_topics: Vec<String> = members.values().map(|m| format!("{}/status", m.prefix)).collect();
    let mut statuses = BTreeMap::new();
    if !status_topics.is_empty() {
        let mut seen = conn.subscribe(&status_topics, Duration::from_secs(10)).await?;
        seen.extend(conn.collect(RETAINED_WINDOW).await?);
        for (topic, payload) in seen {
            statuses.insert(topic, String::from_utf8_lossy(&payload).into_owned());
        }
    }
    Ok(members
        .into_values()
        .map(|member| {
            let status = statuses.get(&format!("{}/status", member.prefix)).cloned();
            Device { member, status }
        })
        .collect())
}

/// The devices of `group` and their status.
pub async fn list(config: &MqttConfig, group: &str) -> Result<Vec<Device>, FleetError> {
    let mut conn = Connection::open(config)?;
    let found = devices(&mut conn, group).await;
    conn.client.disconnect().await;
    found
}

/// Asks every device of `group` `question` and collects the replies until all devices that
/// are online have replied or `timeout` has passed.
pub async fn ask(
    config: &MqttConfig,
    group: &str,
    question: &str,
    max_question_chars: usize,
    timeout: Duration,
) -> Result<FleetReport, FleetError> {
    crate::llm::check_question(question, max_question_chars).map_err(|e| FleetError::Question(e.to_string()))?;
    let mut conn = Connection::open(config)?;
    let devices = devices(&mut conn, group).await?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    // The reply topic and the request id are this command's own: its process id and the time.
    let id = format!("fleet-{}-{nanos:x}", std::process::id());
    let reply_topic = format!("{group}/replies/{id}");
    conn.subscribe(std::slice::from_ref(&reply_topic), Duration::from_secs(10)).await?;
    let v5 = config.protocol == MqttProtocol::V5;
    let request = AskRequest {
        question: question.to_owned(),
        stream: false,
        id: Some(id.clone()),
        reply_to: (!v5).then(|| reply_topic.clone()),
    };
    let mut message = SpooledMessage::json(
        wire::group_ask(group),
        serde_json::to_vec(&request).unwrap_or_default(),
        false,
        &Default::default(),
    );
    if v5 {
        message.response_topic = Some(reply_topic.clone());
        message.correlation = Some(id.clone().into_bytes());
        // Devices that come online later do not answer a stale question.
        message.expiry_s = Some(timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32);
    }
    let asked = Instant::now();
    conn.client.publish(&message).await.map_err(|m| conn.error(m))?;
    let online: Vec<&str> =
        devices.iter().filter(|d| d.status.as_deref() == Some("online")).map(|d| d.member.device.as_str()).collect();
    let deadline = asked + timeout;
    let mut answers: Vec<FleetAnswer> = Vec::new();
    loop {
        // Done when every device that is online has replied (without member records: at the timeout).
        if !online.is_empty() && online.iter().all(|d| answers.iter().any(|a| a.device == *d)) {
            break;
        }
        let Some(event) = conn.next(deadline).await? else { break };
        let Event::Publish(m) = event else { continue };
        if m.topic != reply_topic {
            continue;
        }
        let Ok(reply) = serde_json::from_slice::<Reply>(&m.payload) else {
            tracing::warn!("a reply that is not JSON: skipped");
            continue;
        };
        let latency_ms = asked.elapsed().as_secs_f64() * 1e3;
        let answer = match reply {
            Reply::Answer(a) if a.id.as_deref() == Some(&id) && a.done => FleetAnswer {
                device: a.device.unwrap_or_else(|| "?".into()),
                text: Some(a.text),
                error: None,
                frame_age_ms: a.frame_ts_ms.map(|ts| now_ms().saturating_sub(i64::try_from(ts).unwrap_or(i64::MAX))),
                latency_ms,
            },
            Reply::Error(e) if e.id.as_deref() == Some(&id) => FleetAnswer {
                device: e.device.unwrap_or_else(|| "?".into()),
                text: None,
                error: Some(e.error),
                frame_age_ms: None,
                latency_ms,
            },
            _ => continue,
        };
        answers.push(answer);
    }
    conn.client.disconnect().await;
    let silent = devices.into_iter().filter(|d| !answers.iter().any(|a| a.device == d.member.device)).collect();
    Ok(FleetReport { group: group.to_owned(), question: question.to_owned(), answers, silent })
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
