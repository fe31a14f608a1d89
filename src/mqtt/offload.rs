//! The camera's side of work offload: jobs published to workers and awaiting their results.
//!
//! A job leaves as a QoS 1 message on `<jobs_prefix>/<kind>` with the camera's
//! `<prefix>/jobs/result` as its Response Topic and a fresh Correlation Data; the broker hands it
//! to one member of the workers' shared subscription. The result comes back here and is forwarded
//! to whoever asked the camera, under their reply topic, correlation and id. A job without a
//! result after `offload.retry_s` is published again (a worker that died mid-job), and one without
//! a result after `offload.timeout_s` gets an `unavailable` error: never silence. The first result
//! wins; a later one for the same job (a retry that also ran) is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::client::Incoming;
use super::outbound::{error_message, image_messages, reply_message, Delivery, Outgoing};
use super::spool::SpooledMessage;
use super::wire::{self, JobMessage, Reply, RequestError, Topics};
use super::ReplyAddress;
use crate::worker::OffloadJob;

/// `[offload]`'s timing, as the camera applies it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    pub(super) timeout: Duration,
    pub(super) retry: Option<Duration>,
}

struct InFlight {
    to: ReplyAddress,
    message: SpooledMessage,
    deadline: Instant,
    next_retry: Option<Instant>,
    attempts: u32,
}

/// Offloaded jobs awaiting results, by correlation data.
pub(super) struct Pending {
    jobs: Mutex<HashMap<Vec<u8>, InFlight>>,
    next: AtomicU64,
    /// Distinguishes this process's correlation data from an earlier run's.
    epoch: u64,
}

impl Pending {
    pub(super) fn new() -> Self {
        let epoch =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        Pending { jobs: Mutex::new(HashMap::new()), next: AtomicU64::new(0), epoch }
    }

    /// Jobs in flight.
    pub(super) fn len(&self) -> usize {
        self.jobs.lock().map_or(0, |j| j.len())
    }

    /// The message that hands `job` to a worker; the job is in flight from now on.
    pub(super) fn send(
        &self,
        device_id: &str,
        jobs_prefix: &str,
        topics: &Topics,
        to: ReplyAddress,
        job: &OffloadJob,
        timing: Timing,
    ) -> SpooledMessage {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let correlation = format!("{device_id}/{}/{n}", self.epoch).into_bytes();
        let payload = serde_json::to_vec(&JobMessage::new(device_id, job)).unwrap_or_default();
        let mut message = SpooledMessage::json(
            wire::job_topic(jobs_prefix, job.kind.offload_kind()),
            payload,
            false,
            &Default::default(),
        );
        message.correlation = Some(correlation.clone());
        message.response_topic = Some(topics.job_results());
        message.expiry_s = Some(timing.timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32);
        let now = Instant::now();
        let flight = InFlight {
            to,
            message: message.clone(),
            deadline: now + timing.timeout,
            next_retry: timing.retry.map(|r| now + r),
            attempts: 1,
        };
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.insert(correlation, flight);
        }
        message
    }

    /// A result from a worker: the messages that forward it to the requester (and, for an
    /// image, the camera's image topic), or nothing for a result of no job in flight (late, or a
    /// duplicate of a retried job). The requester's address names this camera; the worker is
    /// named in the `worker` user property (an image keeps the worker's own properties).
    pub(super) fn on_result(&self, incoming: &Incoming, topics: &Topics) -> Vec<(SpooledMessage, Delivery)> {
        let Some(correlation) = &incoming.correlation else {
            tracing::warn!("a job result without Correlation Data: dropped");
            return Vec::new();
        };
        let Ok(mut jobs) = self.jobs.lock() else { return Vec::new() };
        let Some(flight) = jobs.get(correlation) else {
            tracing::debug!("a result of no job in flight (late, or a retried job's second result): dropped");
            return Vec::new();
        };
        let to = &flight.to;
        let (messages, last) = match incoming.content_type.as_deref() {
            Some("application/json") => match serde_json::from_slice::<Reply>(&incoming.payload) {
                Ok(reply) => {
                    let worker = match &reply {
                        Reply::Answer(a) => a.device.clone(),
                        Reply::Error(e) => e.device.clone(),
                    };
                    let last = reply.is_final();
                    let mut m = reply_message(to, reply);
                    // The worker's own properties (its timings), and who it is.
                    m.user_properties = incoming.user_properties.clone();
                    m.user_properties.extend(worker.map(|w| ("worker".to_owned(), w)));
                    (vec![(m, Delivery::Keep)], last)
                }
                Err(e) => {
                    tracing::warn!("a job result that is no reply ({e}): the requester gets an error");
                    let error = RequestError::Internal(format!("the worker's result is not a valid reply: {e}"));
                    (vec![(error_message(to, &error), Delivery::Keep)], true)
                }
            },
            content_type => {
                // An image: the worker's properties, with the requester's id.
                let mut properties: Vec<(String, String)> =
                    incoming.user_properties.iter().filter(|(k, _)| k != "id").cloned().collect();
                properties.extend(to.id.clone().map(|id| ("id".to_owned(), id)));
                let content_type = content_type.unwrap_or("application/octet-stream").to_owned();
                (image_messages(topics, to, incoming.payload.clone(), content_type, properties), true)
            }
        };
        if last {
            jobs.remove(correlation);
        }
        messages
    }

    /// What is due at `now`: refusals of jobs past their timeout, and jobs to publish again.
    pub(super) fn due(&self, now: Instant, timing: Timing) -> (Vec<Outgoing>, Vec<SpooledMessage>) {
        let Ok(mut jobs) = self.jobs.lock() else { return Default::default() };
        let expired: Vec<Vec<u8>> = jobs.iter().filter(|(_, f)| now >= f.deadline).map(|(c, _)| c.clone()).collect();
        let refusals = expired
            .into_iter()
            .filter_map(|c| jobs.remove(&c))
            .map(|f| {
                let error = RequestError::Unavailable(format!(
                    "no offload worker returned a result within {:.0} s ({} attempt{}): is a `scenecast worker` subscribed to {}?",
                    timing.timeout.as_secs_f64(),
                    f.attempts,
                    if f.attempts == 1 { "" } else { "s" },
                    f.message.topic
                ));
                tracing::warn!(topic = %f.message.topic, "offloaded job timed out");
                Outgoing::Refused { to: f.to, error }
            })
            .collect();
        let mut again = Vec::new();
        for flight in jobs.values_mut() {
            if let (Some(at), Some(retry)) = (flight.next_retry, timing.retry) {
                if now >= at {
                    flight.next_retry = Some(now + retry);
                    flight.attempts += 1;
                    let mut m = flight.message.clone();
                    // What is left of the job's time, so the broker drops it when the requester has its error.
                    m.expiry_s = Some(flight.deadline.saturating_duration_since(now).as_secs().max(1) as u32);
                    tracing::info!(topic = %m.topic, attempt = flight.attempts, "no result yet: job published again");
                    again.push(m);
                }
            }
        }
        (refusals, again)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{JobKind, OffloadJob};

    fn requester() -> ReplyAddress {
        ReplyAddress {
            topic: "hub/replies".into(),
            correlation: Some(b"hub-7".to_vec()),
            id: Some("q7".into()),
            retain: false,
            device: Some("cam".into()),
            ack: None,
        }
    }

    fn result(correlation: &[u8], payload: &[u8], content_type: &str, properties: &[(&str, &str)]) -> Incoming {
        Incoming {
            topic: "cam/jobs/result".into(),
            payload: payload.to_vec(),
            response_topic: None,
            correlation: Some(correlation.to_vec()),
            expiry_s: None,
            user_properties: properties.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            content_type: Some(content_type.into()),
            ack: None,
        }
    }

    fn job() -> OffloadJob {
        OffloadJob { text: "What is there?".into(), kind: JobKind::Answer { stream: true }, frame: None }
    }

    const TIMING: Timing = Timing { timeout: Duration::from_secs(10), retry: Some(Duration::from_secs(3)) };

    #[test]
    fn a_result_is_forwarded_once_to_the_requester_with_its_id_and_correlation() {
        let topics = Topics::new("cam");
        let pending = Pending::new();
        let sent = pending.send("cam", "jobs", &topics, requester(), &job(), TIMING);
        assert_eq!(sent.topic, "jobs/ask");
        assert_eq!(sent.response_topic.as_deref(), Some("cam/jobs/result"));
        assert_eq!(sent.expiry_s, Some(10));
        let correlation = sent.correlation.clone().unwrap();
        // A partial answer is forwarded and the job stays in flight; the final one ends it.
        let partial = br#"{"text":"A c","done":false,"device":"gpu-box"}"#;
        let forwarded = pending.on_result(&result(&correlation, partial, "application/json", &[]), &topics);
        assert_eq!(forwarded.len(), 1);
        assert_eq!(pending.len(), 1);
        let last = br#"{"text":"A cup.","done":true,"device":"gpu-box","frame_seq":3}"#;
        let forwarded =
            pending.on_result(&result(&correlation, last, "application/json", &[("total_ms", "9.0")]), &topics);
        let (m, delivery) = &forwarded[0];
        assert_eq!((m.topic.as_str(), *delivery), ("hub/replies", Delivery::Keep));
        assert_eq!(m.correlation.as_deref(), Some(&b"hub-7"[..]));
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(
            (body["id"].as_str(), body["device"].as_str(), body["text"].as_str()),
            (Some("q7"), Some("cam"), Some("A cup."))
        );
        assert!(m.user_properties.contains(&("worker".into(), "gpu-box".into())), "{:?}", m.user_properties);
        assert!(m.user_properties.contains(&("total_ms".into(), "9.0".into())));
        assert_eq!(pending.len(), 0);
        // The same job's second result (a retry that also ran) is dropped: answered once.
        assert!(pending.on_result(&result(&correlation, last, "application/json", &[]), &topics).is_empty());
    }

    #[test]
    fn an_image_result_goes_to_the_requester_and_the_image_topic() {
        let topics = Topics::new("cam");
        let pending = Pending::new();
        let sent = pending.send("cam", "jobs", &topics, requester(), &job(), TIMING);
        let image =
            result(&sent.correlation.unwrap(), b"\x89PNG", "image/png", &[("id", "worker-side"), ("seed", "3")]);
        let forwarded = pending.on_result(&image, &topics);
        let shown: Vec<_> = forwarded.iter().map(|(m, d)| (m.topic.as_str(), m.retain, *d)).collect();
        assert_eq!(shown, [("cam/image", true, Delivery::LatestOnly), ("hub/replies", false, Delivery::Keep)]);
        let reply = &forwarded[1].0;
        assert_eq!(reply.payload, b"\x89PNG");
        assert_eq!(reply.content_type.as_deref(), Some("image/png"));
        assert!(reply.user_properties.contains(&("id".into(), "q7".into())));
        assert!(!reply.user_properties.contains(&("id".into(), "worker-side".into())));
    }

    #[test]
    fn jobs_are_retried_then_refused_as_unavailable_never_left_silent() {
        let topics = Topics::new("cam");
        let pending = Pending::new();
        let start = Instant::now();
        pending.send("cam", "jobs", &topics, requester(), &job(), TIMING);
        let (refusals, again) = pending.due(start + Duration::from_secs(1), TIMING);
        assert!(refusals.is_empty() && again.is_empty(), "nothing is due after 1 s");
        let (refusals, again) = pending.due(start + Duration::from_millis(3100), TIMING);
        assert_eq!((refusals.len(), again.len()), (0, 1), "retried after retry_s");
        assert_eq!(again[0].topic, "jobs/ask");
        assert!(again[0].expiry_s.unwrap() <= 7, "the retry expires with the job");
        let (refusals, _) = pending.due(start + Duration::from_secs(11), TIMING);
        let [Outgoing::Refused { to, error }] = refusals.as_slice() else { panic!("one refusal: {refusals:?}") };
        assert_eq!((to.topic.as_str(), error.code()), ("hub/replies", "unavailable"));
        assert!(error.to_string().contains("within 10 s (2 attempts)"), "{error}");
        assert_eq!(pending.len(), 0);
    }

    #[test]
    fn an_unreadable_result_becomes_an_error_reply() {
        let topics = Topics::new("cam");
        let pending = Pending::new();
        let sent = pending.send("cam", "jobs", &topics, requester(), &job(), TIMING);
        let forwarded = pending.on_result(&result(&sent.correlation.unwrap(), b"{", "application/json", &[]), &topics);
        let body: serde_json::Value = serde_json::from_slice(&forwarded[0].0.payload).unwrap();
        assert_eq!(body["error"]["code"], "internal");
        assert_eq!(pending.len(), 0);
    }
}
