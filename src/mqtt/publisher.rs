//! The publisher task: publishes results as the one mapping says, spooling what may wait while the
//! broker is away and draining the spool in order on reconnect; keeps `config/state` and the status
//! attributes current; at shutdown flushes through the same mapping, publishes `stopped` and
//! disconnects cleanly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::offload::{Pending, Timing};
use super::outbound::{messages, Delivery, Outgoing};
use super::spool::{Spool, SpooledMessage};
use super::wire::{ConfigState, RequestError, StatusAttributes, Topics};
use super::{Counters, ReplyAddress};
use crate::worker::{Output, RuntimeSettings};

pub(super) struct PublisherTask {
    pub(super) client: Client,
    pub(super) topics: Topics,
    pub(super) spool: Spool,
    pub(super) online: Arc<AtomicBool>,
    pub(super) drain: Arc<Notify>,
    pub(super) counters: Arc<Counters>,
    pub(super) shutdown: CancellationToken,
    pub(super) closed: CancellationToken,
    pub(super) settings: Arc<RwLock<RuntimeSettings>>,
    /// The settings last retained on `config/state` (a SIGHUP reload changes them behind our back).
    pub(super) published_settings: Option<RuntimeSettings>,
    /// The camera's offloaded jobs awaiting results.
    pub(super) pending: Arc<Pending>,
    /// Where offloaded jobs go, and their timing (none: nothing is offloaded).
    pub(super) offload: Option<OffloadRoute>,
    /// Retain the runtime settings on `config/state` (a camera; a worker has none to show).
    pub(super) publishes_settings: bool,
}

/// Where this camera's offloaded jobs go.
pub(super) struct OffloadRoute {
    pub(super) device_id: String,
    pub(super) jobs_prefix: String,
    pub(super) timing: Timing,
}

impl PublisherTask {
    async fn publish_config_state(&mut self, state: RuntimeSettings) {
        let payload = serde_json::to_vec(&ConfigState::from(&state)).unwrap_or_default();
        let m = SpooledMessage::json(self.topics.config_state(), payload, true, &Default::default());
        self.send(m).await;
        self.published_settings = Some(state);
    }

    async fn refresh_config_state(&mut self) {
        if !self.publishes_settings {
            return;
        }
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

    /// Delivers one message as the mapping says: kept (spooled while offline) or latest-only;
    /// then acknowledges the job it ends, when it came with manual acknowledgement (a worker's).
    async fn deliver(&mut self, message: Outgoing) {
        let ack = message.ack().cloned();
        self.deliver_message(message).await;
        if let Some(token) = ack {
            if let Err(e) = self.client.ack(&token).await {
                tracing::warn!("acknowledging a job failed: {e}");
            }
        }
    }

    async fn deliver_message(&mut self, message: Outgoing) {
        match message {
            Outgoing::Result(Output::Expired { .. }) => {
                self.counters.expired.fetch_add(1, Ordering::Relaxed);
            }
            Outgoing::Result(Output::Offload { to, job }) => {
                let Some(route) = &self.offload else {
                    let error = RequestError::Internal("offloading is not configured ([offload] kinds)".into());
                    for (m, _) in messages(&self.topics, Outgoing::Refused { to, error }) {
                        self.send(m).await;
                    }
                    return;
                };
                let m = self.pending.send(&route.device_id, &route.jobs_prefix, &self.topics, to, &job, route.timing);
                self.send(m).await;
            }
            Outgoing::ConfigState(state) => self.publish_config_state(state).await,
            other => {
                for (m, delivery) in messages(&self.topics, other) {
                    match delivery {
                        Delivery::Keep => self.send(m).await,
                        Delivery::LatestOnly => self.publish_if_online(m).await,
                    }
                }
            }
        }
    }

    /// Offloaded jobs past their timeout get their error; jobs due for a retry go out again.
    async fn offload_due(&mut self) {
        let Some(route) = &self.offload else { return };
        if self.pending.len() == 0 {
            return;
        }
        let (refusals, again) = self.pending.due(std::time::Instant::now(), route.timing);
        for refusal in refusals {
            self.deliver(refusal).await;
        }
        for m in again {
            self.send(m).await;
        }
    }

    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Outgoing>,
        mut results: mpsc::Receiver<Output<ReplyAddress>>,
    ) {
        let mut last = StatusAttributes { spool_limit: u64::MAX, ..Default::default() };
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut results_open = true;
        let mut offload_tick = tokio::time::interval(Duration::from_millis(250));
        offload_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = offload_tick.tick(), if self.offload.is_some() => self.offload_due().await,
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
