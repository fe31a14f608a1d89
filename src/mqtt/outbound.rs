//! What leaves over MQTT, and the one mapping from it to messages: topic, payload, retain flag,
//! properties, and whether a message may wait in the spool while the broker is away.

use super::client::AckToken;
use super::spool::SpooledMessage;
use super::wire::{self, ErrorReply, Reply, RequestError, Topics};
use super::ReplyAddress;
use crate::worker::{Output, RuntimeSettings};

/// What the publisher sends: the worker's results, refusals of requests, and the settings state.
#[derive(Debug)]
pub enum Outgoing {
    /// A result of the worker.
    Result(Output<ReplyAddress>),
    /// A request refused before it reached the worker.
    Refused {
        /// Where the refusal goes.
        to: ReplyAddress,
        /// Why.
        error: RequestError,
    },
    /// The runtime settings in effect (retained on `config/state`).
    ConfigState(RuntimeSettings),
    /// A worker's result of an offloaded job, readdressed to the requester.
    Forwarded(Vec<(SpooledMessage, Delivery)>),
}

impl Outgoing {
    /// The acknowledgement to send once this item is published: a worker's job is acknowledged
    /// after its last message (a final answer, an image, an error, or its expiry).
    pub(super) fn ack(&self) -> Option<&AckToken> {
        let to = match self {
            Outgoing::Refused { to, .. } => to,
            Outgoing::Result(Output::Answer { to, answer }) if answer.done => to,
            Outgoing::Result(
                Output::Rendered { to, .. }
                | Output::Failed { to, .. }
                | Output::Expired { to }
                | Output::Offload { to, .. },
            ) => to,
            _ => return None,
        };
        to.ack.as_ref()
    }
}

/// How a message is delivered when the broker is away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Kept: spooled on disk while offline and published in order on reconnect.
    Keep,
    /// Only the latest matters: published when online, dropped otherwise, never spooled (a
    /// backlog of stale pictures would fill the disk).
    LatestOnly,
}

/// A reply (answer or error) to `to`: readdressed with its id and device, its correlation,
/// timings or the error code as user properties.
pub(super) fn reply_message(to: &ReplyAddress, reply: Reply) -> SpooledMessage {
    let reply = reply.readdressed(to.id.clone(), to.device.clone());
    let payload = serde_json::to_vec(&reply).unwrap_or_default();
    let mut message = match &reply {
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

/// The error reply for `error` to `to`.
pub(super) fn error_message(to: &ReplyAddress, error: &RequestError) -> SpooledMessage {
    reply_message(to, Reply::Error(ErrorReply::new(to.id.clone(), error)))
}

fn picture_message(
    topic: String,
    retain: bool,
    bytes: Vec<u8>,
    content_type: String,
    properties: Vec<(String, String)>,
) -> SpooledMessage {
    SpooledMessage {
        topic,
        payload: bytes,
        retain,
        correlation: None,
        user_properties: properties,
        content_type: Some(content_type),
        response_topic: None,
        expiry_s: None,
    }
}

/// A rendered image: the reply to its requester (kept) and the retained image topic's copy
/// (latest only), with the same user properties.
pub(super) fn image_messages(
    topics: &Topics,
    to: &ReplyAddress,
    bytes: Vec<u8>,
    content_type: String,
    properties: Vec<(String, String)>,
) -> Vec<(SpooledMessage, Delivery)> {
    let reply = SpooledMessage {
        correlation: to.correlation.clone(),
        ..picture_message(to.topic.clone(), false, bytes.clone(), content_type.clone(), properties.clone())
    };
    let latest = picture_message(topics.image(), true, bytes, content_type, properties);
    vec![(latest, Delivery::LatestOnly), (reply, Delivery::Keep)]
}

/// The messages for one outgoing item, each with how it is delivered. The only place that turns
/// results into MQTT messages; the settings state and expired requests are handled by the
/// publisher itself and map to nothing here. Takes the item, so a picture's bytes are moved, not
/// copied (a render's reply and the image topic's copy share one copy).
pub fn messages(topics: &Topics, outgoing: Outgoing) -> Vec<(SpooledMessage, Delivery)> {
    let result = match outgoing {
        Outgoing::Refused { to, error } => return vec![(error_message(&to, &error), Delivery::Keep)],
        Outgoing::ConfigState(_) => return Vec::new(),
        Outgoing::Forwarded(messages) => return messages,
        Outgoing::Result(result) => result,
    };
    match result {
        Output::Caption(caption) => {
            let caption = wire::Caption::from(&caption);
            let payload = serde_json::to_vec(&caption).unwrap_or_default();
            vec![(SpooledMessage::json(topics.caption(), payload, true, &caption.timings_ms), Delivery::Keep)]
        }
        Output::ScenePicture(picture) => {
            let content_type = picture.format.content_type().to_owned();
            vec![(picture_message(topics.image(), true, picture.bytes, content_type, Vec::new()), Delivery::LatestOnly)]
        }
        Output::Answer { to, answer } => {
            let reply = Reply::Answer(wire::Answer::new(to.id.clone(), &answer));
            vec![(reply_message(&to, reply), Delivery::Keep)]
        }
        Output::Rendered { to, picture, info } => {
            let mut properties = wire::image_properties(to.id.as_deref(), &info);
            properties.extend(to.device.clone().map(|d| ("device".to_owned(), d)));
            let content_type = picture.format.content_type().to_owned();
            image_messages(topics, &to, picture.bytes, content_type, properties)
        }
        Output::Failed { to, error } => {
            // The refusal class, and so the error code, comes from the one `From<&JobError>`.
            vec![(error_message(&to, &RequestError::from(&error)), Delivery::Keep)]
        }
        // Counted, or (an offloaded job) published by the publisher, which tracks it.
        Output::Expired { .. } | Output::Offload { .. } => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::ImageFormat;
    use crate::worker::{Answer, Caption, JobError, Picture, RenderInfo};

    fn to() -> ReplyAddress {
        ReplyAddress {
            topic: "hub/r".into(),
            correlation: Some(b"c".to_vec()),
            id: Some("7".into()),
            retain: false,
            device: Some("cam".into()),
            ack: None,
        }
    }

    fn info() -> RenderInfo {
        RenderInfo {
            prompt: "p".into(),
            seed: 3,
            steps: 1,
            width: 64,
            height: 32,
            sampler: "euler".into(),
            warning: None,
            timings_ms: Default::default(),
        }
    }

    /// Every kind of output, with the topics and deliveries it maps to.
    #[test]
    fn each_output_maps_to_its_topics_and_delivery() {
        let topics = Topics::new("cam");
        let picture = Picture { bytes: vec![1], format: ImageFormat::Jpeg };
        let info = info();
        let caption = Caption {
            text: "t".into(),
            unsupported: vec![],
            guided: None,
            objects: None,
            moved: vec![],
            frame_seq: 1,
            frame_ts_ms: 2,
            timings_ms: Default::default(),
            model: "m".into(),
        };
        let answer = Answer {
            text: "a".into(),
            done: true,
            guided: None,
            frame_seq: None,
            frame_ts_ms: None,
            timings_ms: Default::default(),
        };
        let cases: Vec<(Outgoing, Vec<(&str, bool, Delivery)>)> = vec![
            (Outgoing::Result(Output::Caption(caption)), vec![("cam/caption", true, Delivery::Keep)]),
            (Outgoing::Result(Output::ScenePicture(picture.clone())), vec![("cam/image", true, Delivery::LatestOnly)]),
            (
                Outgoing::Result(Output::Rendered { to: to(), picture, info }),
                vec![("cam/image", true, Delivery::LatestOnly), ("hub/r", false, Delivery::Keep)],
            ),
            (Outgoing::Result(Output::Answer { to: to(), answer }), vec![("hub/r", false, Delivery::Keep)]),
            (
                Outgoing::Result(Output::Failed { to: to(), error: JobError::NoScene }),
                vec![("hub/r", false, Delivery::Keep)],
            ),
            (Outgoing::Refused { to: to(), error: RequestError::Busy(3) }, vec![("hub/r", false, Delivery::Keep)]),
            (Outgoing::Result(Output::Expired { to: to() }), vec![]),
        ];
        for (outgoing, expected) in cases {
            let shown = format!("{outgoing:?}");
            let got: Vec<_> = messages(&topics, outgoing).into_iter().map(|(m, d)| (m.topic, m.retain, d)).collect();
            let expected: Vec<_> = expected.into_iter().map(|(t, r, d)| (t.to_owned(), r, d)).collect();
            assert_eq!(got, expected, "{shown}");
        }
    }

    /// A worker acknowledges a job once, after its last message: a final answer, an image, a
    /// failure, a refusal or its expiry; never after a partial answer.
    #[test]
    fn only_the_last_message_of_a_job_acknowledges_it() {
        let acked = ReplyAddress { ack: Some(AckToken::for_test(7)), ..to() };
        let answer = |done| Answer {
            text: "a".into(),
            done,
            guided: None,
            frame_seq: None,
            frame_ts_ms: None,
            timings_ms: Default::default(),
        };
        let picture = Picture { bytes: vec![1], format: ImageFormat::Png };
        let info = info();
        let cases: Vec<(Outgoing, bool)> = vec![
            (Outgoing::Result(Output::Answer { to: acked.clone(), answer: answer(false) }), false),
            (Outgoing::Result(Output::Answer { to: acked.clone(), answer: answer(true) }), true),
            (Outgoing::Result(Output::Rendered { to: acked.clone(), picture, info }), true),
            (Outgoing::Result(Output::Failed { to: acked.clone(), error: JobError::NoScene }), true),
            (Outgoing::Result(Output::Expired { to: acked.clone() }), true),
            (Outgoing::Refused { to: acked.clone(), error: RequestError::Busy(1) }, true),
            (Outgoing::Result(Output::Answer { to: to(), answer: answer(true) }), false),
        ];
        for (outgoing, acks) in cases {
            assert_eq!(outgoing.ack().is_some(), acks, "{outgoing:?}");
        }
    }

    #[test]
    fn failed_jobs_carry_their_stable_code() {
        let (m, _) =
            messages(&Topics::new("cam"), Outgoing::Result(Output::Failed { to: to(), error: JobError::NoGenerator }))
                .remove(0);
        let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(body["error"]["code"], "unavailable");
        assert_eq!(body["id"], "7");
        assert_eq!(body["device"], "cam", "a reply names the device that gives it");
        assert_eq!(m.correlation.as_deref(), Some(&b"c"[..]));
    }
}
