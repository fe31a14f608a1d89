//! The MQTT wire format: topics, JSON payloads and their parsing, and Home Assistant discovery.
//!
//! Serialisable types are a compatibility promise, so they all live here, at the edge, and each
//! has a JSON Schema under `docs/schemas/` (referenced by `docs/asyncapi.yaml`). Parsing is pure:
//! bytes in, a typed request or a typed error out, never a panic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, RgbImage};
use crate::generate::{check_prompt, ConditionPath, GeneratorError, PromptError, RenderRequest};
use crate::llm::{check_question, QuestionError};
use crate::worker::{self, AttachedFrame, GenerateJob, JobError, JobKind, OffloadJob, OffloadKind, RuntimeSettings};

/// The topics of one device, under a prefix (default `scenecast/<device>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topics under `prefix` (no trailing slash).
    pub fn new(prefix: &str) -> Self {
        Topics { prefix: prefix.trim_end_matches('/').to_owned() }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn at(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.prefix)
    }

    /// `online` / `offline` (last will) / `stopped`, retained.
    pub fn status(&self) -> String {
        self.at("status")
    }
    /// Counters of the MQTT side (spool, drops), retained JSON.
    pub fn status_attributes(&self) -> String {
        self.at("status/attributes")
    }
    /// The latest caption, retained JSON.
    pub fn caption(&self) -> String {
        self.at("caption")
    }
    /// Questions (JSON requests).
    pub fn ask(&self) -> String {
        self.at("ask")
    }
    /// Questions as plain text (Home Assistant's text entity); answers go to [`Topics::answer`].
    pub fn ask_text(&self) -> String {
        self.at("ask/text")
    }
    /// The last answer to a plain-text question, retained JSON.
    pub fn answer(&self) -> String {
        self.at("answer")
    }
    /// The latest published image (binary), retained.
    pub fn image(&self) -> String {
        self.at("image")
    }
    /// Image generation requests (JSON); the image goes to the reply topic and to [`Topics::image`].
    pub fn generate(&self) -> String {
        self.at("generate")
    }
    /// Runtime configuration changes.
    pub fn config_set(&self) -> String {
        self.at("config/set")
    }
    /// The configuration in effect, retained.
    pub fn config_state(&self) -> String {
        self.at("config/state")
    }
    /// Where workers send the results of this device's offloaded jobs (`offload.kinds`).
    pub fn job_results(&self) -> String {
        self.at("jobs/result")
    }
}

/// Questions to every device of a fleet group: `<group>/ask`.
pub fn group_ask(group: &str) -> String {
    format!("{group}/ask")
}

/// A device's retained member record in a fleet group: `<group>/members/<device>`.
pub fn group_member(group: &str, device_id: &str) -> String {
    format!("{group}/members/{device_id}")
}

/// The filter of all member records of a group.
pub fn group_members(group: &str) -> String {
    format!("{group}/members/+")
}

/// Where jobs of `kind` are published: `<jobs_prefix>/<kind>`.
pub fn job_topic(jobs_prefix: &str, kind: OffloadKind) -> String {
    format!("{jobs_prefix}/{}", kind.as_str())
}

/// The shared subscription a worker of `share_group` takes jobs of `kind` from:
/// `$share/<share_group>/<jobs_prefix>/<kind>`.
pub fn job_subscription(share_group: &str, jobs_prefix: &str, kind: OffloadKind) -> String {
    format!("$share/{share_group}/{}", job_topic(jobs_prefix, kind))
}

/// Whether `topic` matches the MQTT filter `filter` (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        match (f, levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// A question, as its JSON request body.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AskRequest {
    /// The question.
    pub question: String,
    /// Stream partial answers to the reply topic before the final one.
    #[serde(default)]
    pub stream: bool,
    /// Request id, echoed in the reply (MQTT v3.1.1 correlation; optional with v5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Reply topic (MQTT v3.1.1; with v5 the Response Topic property takes precedence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// Limits applied to incoming requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted payload.
    pub max_payload_bytes: usize,
    /// Longest accepted question, in characters.
    pub max_question_chars: usize,
}

/// Why a request was refused. `code()` is the stable identifier sent in error replies.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The payload exceeds the limit.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not UTF-8.
    #[error("payload is not valid UTF-8 (at byte {at})")]
    NotUtf8 {
        /// Where decoding failed.
        at: usize,
    },
    /// Not JSON, a wrong type, a missing or unknown field.
    #[error("payload is not a valid request: {0}")]
    Invalid(String),
    /// An empty question, or one over the limit.
    #[error(transparent)]
    Question(#[from] QuestionError),
    /// The reply topic is not allowed by the configuration.
    #[error("reply topic {0:?} is not allowed by mqtt.allowed_reply_topics")]
    ForbiddenReplyTopic(String),
    /// The request queue is full.
    #[error("busy: {0} requests are waiting; try again later")]
    Busy(usize),
    /// An empty generation prompt, or one over the limit.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// A value out of the range the model or the config allows.
    #[error("{0}")]
    OutOfRange(String),
    /// The feature is not available on this device now (not configured, disabled, memory short).
    #[error("{0}")]
    Unavailable(String),
    /// Answering failed.
    #[error("{0}")]
    Internal(String),
}

impl RequestError {
    /// The stable error code of the reply.
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::TooLarge { .. } => "too_large",
            RequestError::NotUtf8 { .. } | RequestError::Invalid(_) => "bad_request",
            RequestError::Question(_) => "bad_question",
            RequestError::ForbiddenReplyTopic(_) => "forbidden_reply_topic",
            RequestError::Busy(_) => "busy",
            RequestError::Prompt(_) => "bad_prompt",
            RequestError::OutOfRange(_) => "out_of_range",
            RequestError::Unavailable(_) => "unavailable",
            RequestError::Internal(_) => "internal",
        }
    }
}

/// The one place where a failed job becomes a refusal class (and so a stable error code).
impl From<&JobError> for RequestError {
    fn from(error: &JobError) -> Self {
        let message = error.to_string();
        match error {
            JobError::NoGenerator | JobError::NoScene => RequestError::Unavailable(message),
            JobError::Generator(e) => match e {
                GeneratorError::Request(_) => RequestError::OutOfRange(message),
                GeneratorError::Prompt(p) => RequestError::Prompt(p.clone()),
                GeneratorError::Memory { .. }
                | GeneratorError::Disabled
                | GeneratorError::NotConfigured(_)
                | GeneratorError::NoOutputProjector => RequestError::Unavailable(message),
                _ => RequestError::Internal(message),
            },
            JobError::Llm(_) | JobError::Stack(_) => RequestError::Internal(message),
        }
    }
}

fn utf8(payload: &[u8], limits: &Limits) -> Result<String, RequestError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(RequestError::TooLarge { size: payload.len(), limit: limits.max_payload_bytes });
    }
    std::str::from_utf8(payload).map(str::to_owned).map_err(|e| RequestError::NotUtf8 { at: e.valid_up_to() })
}

/// Parses a JSON ask request.
pub fn parse_ask(payload: &[u8], limits: &Limits) -> Result<AskRequest, RequestError> {
    let text = utf8(payload, limits)?;
    let request: AskRequest = serde_json::from_str(&text).map_err(|e| RequestError::Invalid(e.to_string()))?;
    check_question(&request.question, limits.max_question_chars)?;
    Ok(request)
}

/// An image generation request, as its JSON body. Give `prompt`, or `from_scene: true` to have the
/// LLM describe the current scene and render the description.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// What to render.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Describe the current scene and render that (with `prompt`, the prompt is added to the
    /// description, e.g. "as a watercolour").
    #[serde(default)]
    pub from_scene: bool,
    /// Noise seed (default: from the clock; echoed in the reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Denoising steps (default: the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Image width in pixels (default: the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    /// Classifier-free guidance (default: the model's; SD-Turbo: 0, off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    /// `text` or `hidden` conditioning for `from_scene` (default: the config's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<Condition>,
    /// Request id, echoed in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Reply topic (MQTT v3.1.1; with v5 the Response Topic property takes precedence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// How a `from_scene` rendering is conditioned, as the request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    /// The text encoder on the description.
    Text,
    /// The output projector on the LLM's hidden states.
    Hidden,
}

impl From<Condition> for ConditionPath {
    fn from(c: Condition) -> Self {
        match c {
            Condition::Text => ConditionPath::Text,
            Condition::Hidden => ConditionPath::Hidden,
        }
    }
}

impl From<ConditionPath> for Condition {
    fn from(c: ConditionPath) -> Self {
        match c {
            ConditionPath::Text => Condition::Text,
            ConditionPath::Hidden => Condition::Hidden,
        }
    }
}

impl GenerateRequest {
    /// The request for a worker's job (the inverse of [`GenerateRequest::job`]), without a reply
    /// address; an empty prompt is none.
    pub fn from_job(prompt: &str, job: &GenerateJob) -> Self {
        let r = &job.render;
        GenerateRequest {
            prompt: (!prompt.trim().is_empty()).then(|| prompt.to_owned()),
            from_scene: job.from_scene,
            seed: r.seed,
            steps: r.steps,
            width: r.width,
            height: r.height,
            guidance: r.guidance,
            condition: job.condition.map(Condition::from),
            id: None,
            reply_to: None,
        }
    }

    /// The worker's job for this request.
    pub fn job(&self) -> GenerateJob {
        GenerateJob {
            from_scene: self.from_scene,
            condition: self.condition.map(ConditionPath::from),
            render: RenderRequest {
                seed: self.seed,
                steps: self.steps,
                width: self.width,
                height: self.height,
                guidance: self.guidance,
                sampler: None,
            },
        }
    }
}

/// Parses a JSON generate request; `max_prompt_chars` is `generator.max_prompt_chars`. Ranges that
/// depend on the model (steps, sizes) are checked by the worker against the manifest and config.
pub fn parse_generate(
    payload: &[u8],
    limits: &Limits,
    max_prompt_chars: usize,
) -> Result<GenerateRequest, RequestError> {
    let text = utf8(payload, limits)?;
    let request: GenerateRequest = serde_json::from_str(&text).map_err(|e| RequestError::Invalid(e.to_string()))?;
    check_prompt(request.prompt.as_deref(), request.from_scene, max_prompt_chars)?;
    if request.guidance.is_some_and(|g| !g.is_finite()) {
        return Err(RequestError::OutOfRange("guidance must be a finite number".into()));
    }
    Ok(request)
}

/// What a generated image's reply carries besides the image bytes, as MQTT v5 user properties:
/// the request's `id`, seed, steps, size, sampler, the prompt rendered, a warning, `<stage>_ms`.
pub fn image_properties(id: Option<&str>, info: &worker::RenderInfo) -> Vec<(String, String)> {
    let mut p = vec![
        ("seed".to_owned(), info.seed.to_string()),
        ("steps".to_owned(), info.steps.to_string()),
        ("width".to_owned(), info.width.to_string()),
        ("height".to_owned(), info.height.to_string()),
        ("sampler".to_owned(), info.sampler.clone()),
        // User properties are UTF-8 strings of at most 64 KiB; a prompt is far below that.
        ("prompt".to_owned(), info.prompt.chars().take(2000).collect()),
    ];
    if let Some(id) = id {
        p.push(("id".to_owned(), id.to_owned()));
    }
    if let Some(w) = &info.warning {
        p.push(("warning".to_owned(), w.clone()));
    }
    for (k, v) in &info.timings_ms {
        p.push((format!("{k}_ms"), format!("{v:.1}")));
    }
    p
}

/// Parses a plain-text question (Home Assistant's text entity).
pub fn parse_text_question(payload: &[u8], limits: &Limits) -> Result<String, RequestError> {
    let text = utf8(payload, limits)?;
    check_question(&text, limits.max_question_chars)?;
    Ok(text.trim().to_owned())
}

/// The id and reply address a request gives, as far as they can be recovered from a payload that
/// did not parse, so that even a malformed request gets its error reply.
pub fn salvage_reply_address(payload: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return (None, None);
    };
    let get = |key: &str| map.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    (get("id"), get("reply_to"))
}

/// Milliseconds per stage.
pub type Timings = BTreeMap<String, f64>;

/// A published caption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caption {
    /// The caption.
    pub text: String,
    /// Names the LLM wrote that no image token supports, removed from `text` (the manifest's
    /// `[grounding]` check); empty when the check changed nothing or is off.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<String>,
    /// The category the caption was begun with, when the detector's category columns guided it
    /// (the manifest's `grounding.guide_threshold`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided: Option<String>,
    /// The categories of the model stack's vocabulary that `text` names, in the vocabulary's
    /// order (empty when it names none: "No known object."); absent when the stack has no
    /// vocabulary. Home Assistant's object sensors read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<Vec<String>>,
    /// The categories the LLM placed on another side than the detector's own class of their name
    /// or their image tokens do, which `text` places there instead (`grounding.positions`); empty
    /// when none was.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<String>,
    /// The frame's sequence number.
    pub frame_seq: u64,
    /// The frame's capture time, ms since the Unix epoch.
    pub frame_ts_ms: u64,
    /// Per-stage timings.
    pub timings_ms: Timings,
    /// The model stack.
    pub model: String,
}

impl From<&worker::Caption> for Caption {
    fn from(c: &worker::Caption) -> Self {
        Caption {
            text: c.text.clone(),
            unsupported: c.unsupported.clone(),
            guided: c.guided.clone(),
            objects: c.objects.clone(),
            moved: c.moved.clone(),
            frame_seq: c.frame_seq,
            frame_ts_ms: c.frame_ts_ms,
            timings_ms: c.timings_ms.clone(),
            model: c.model.clone(),
        }
    }
}

/// A reply to an ask request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// The answer, or a partial one while streaming.
    Answer(Answer),
    /// A refusal or failure.
    Error(ErrorReply),
}

impl Reply {
    /// The same reply addressed as another request's: its id and the device that answers it.
    pub fn readdressed(mut self, id: Option<String>, device: Option<String>) -> Self {
        match &mut self {
            Reply::Answer(a) => (a.id, a.device) = (id, device),
            Reply::Error(e) => (e.id, e.device) = (id, device),
        }
        self
    }

    /// True for the last reply to a request: a final answer or an error.
    pub fn is_final(&self) -> bool {
        match self {
            Reply::Answer(a) => a.done,
            Reply::Error(_) => true,
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// The request's id, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The device that answered (its id, as in its topics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The answer text (so far, when `done` is false).
    pub text: String,
    /// False for a partial answer while streaming.
    pub done: bool,
    /// The category the question asked about, when a guide began the answer (yes to a presence
    /// question by the detector's category columns, `grounding.guide_threshold`, or because the
    /// frame's caption names it; the side for a
    /// position question by the image tokens, `grounding.positions`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided: Option<String>,
    /// The sequence number of the frame the answer is about (absent without a camera frame).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_seq: Option<u64>,
    /// That frame's capture time, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_ts_ms: Option<u64>,
    /// Per-stage timings (final answers).
    #[serde(default, skip_serializing_if = "Timings::is_empty")]
    pub timings_ms: Timings,
}

impl Answer {
    /// The payload of the worker's answer to the request with id `id`.
    pub fn new(id: Option<String>, a: &worker::Answer) -> Self {
        Answer {
            id,
            device: None,
            text: a.text.clone(),
            done: a.done,
            guided: a.guided.clone(),
            frame_seq: a.frame_seq,
            frame_ts_ms: a.frame_ts_ms,
            timings_ms: a.timings_ms.clone(),
        }
    }
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// The request's id, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The device that refused (its id, as in its topics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// What went wrong.
    pub error: ErrorBody,
}

/// The error of an [`ErrorReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Stable code ([`RequestError::code`]): `bad_request`, `too_large`, `bad_question`, `bad_prompt`,
    /// `forbidden_reply_topic`, `busy`, `out_of_range`, `unavailable`, `internal`.
    pub code: String,
    /// A sentence for humans.
    pub message: String,
}

impl ErrorReply {
    /// The reply for `err`.
    pub fn new(id: Option<String>, err: &RequestError) -> Self {
        ErrorReply { id, device: None, error: ErrorBody { code: err.code().to_owned(), message: err.to_string() } }
    }
}

/// The settings in effect, as retained on `config/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigState {
    /// The question that asks for a caption.
    pub caption_prompt: String,
    /// Scene-change gating.
    pub scene: SceneState,
}

/// The gating part of [`ConfigState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceneState {
    /// Cosine distance above which the scene counts as changed.
    pub change_threshold: f32,
    /// Never caption more often than this (seconds).
    pub min_interval_s: f64,
    /// Caption at least this often (seconds).
    pub max_interval_s: f64,
}

impl From<&RuntimeSettings> for ConfigState {
    fn from(s: &RuntimeSettings) -> Self {
        let g = &s.gate;
        ConfigState {
            caption_prompt: s.caption_prompt.clone(),
            scene: SceneState {
                change_threshold: g.change_threshold,
                min_interval_s: g.min_interval_s,
                max_interval_s: g.max_interval_s,
            },
        }
    }
}

/// A `config/set` request: any subset of the runtime settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    /// New caption prompt.
    pub caption_prompt: Option<String>,
    /// New gating values (each optional).
    pub scene: Option<GatePatch>,
    /// Echoed in the error reply (v3.1.1 correlation).
    pub id: Option<String>,
    /// Where an error reply goes (MQTT v3.1.1; v5: the Response Topic).
    pub reply_to: Option<String>,
}

/// Part of a [`ConfigPatch`].
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatePatch {
    /// See [`GateConfig::change_threshold`].
    pub change_threshold: Option<f32>,
    /// See [`GateConfig::min_interval_s`].
    pub min_interval_s: Option<f64>,
    /// See [`GateConfig::max_interval_s`].
    pub max_interval_s: Option<f64>,
}

/// Parses a `config/set` request.
pub fn parse_config_patch(payload: &[u8], limits: &Limits) -> Result<ConfigPatch, RequestError> {
    let text = utf8(payload, limits)?;
    serde_json::from_str(&text).map_err(|e| RequestError::Invalid(e.to_string()))
}

impl ConfigPatch {
    /// The settings after this patch, validated; an error names the key.
    pub fn apply(&self, current: &RuntimeSettings) -> Result<RuntimeSettings, RequestError> {
        let mut next = current.clone();
        if let Some(prompt) = &self.caption_prompt {
            next.caption_prompt = prompt.clone();
        }
        if let Some(scene) = &self.scene {
            next.gate.change_threshold = scene.change_threshold.unwrap_or(next.gate.change_threshold);
            next.gate.min_interval_s = scene.min_interval_s.unwrap_or(next.gate.min_interval_s);
            next.gate.max_interval_s = scene.max_interval_s.unwrap_or(next.gate.max_interval_s);
        }
        // The same rule as the config file's; the payload names the prompt without `llm.`.
        next.check()
            .map_err(|e| RequestError::Invalid(format!("`{}`: {}", e.key.trim_start_matches("llm."), e.message)))?;
        Ok(next)
    }
}

/// Counters published on the status attributes topic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusAttributes {
    /// Messages waiting in the on-disk spool.
    pub spooled: u64,
    /// Messages dropped because the spool was full (oldest first).
    pub spool_dropped: u64,
    /// The spool's bound, in messages.
    pub spool_limit: u64,
    /// Requests refused as busy.
    pub busy_replies: u64,
    /// Requests refused as malformed.
    pub bad_requests: u64,
    /// Requests dropped because their message expiry passed while queued.
    pub expired_requests: u64,
}

/// A device's retained record in a fleet group (`<group>/members/<device>`): how a hub finds
/// the devices of a group and their topics; whether one is up is its retained `<prefix>/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The device id (as in its topics).
    pub device: String,
    /// Its display name.
    pub name: String,
    /// Its topic prefix: `<prefix>/status` says `online`, `offline` or `stopped`.
    pub prefix: String,
    /// The model stack it runs.
    pub model: String,
    /// The scenecast version.
    pub version: String,
}

/// A job handed to a worker, on `<jobs_prefix>/<kind>` (MQTT v5; the result goes to the Response
/// Topic with the Correlation Data): the request as its requester sent it, minus the reply
/// address, the device that offloaded it, and the frame when the job is about the scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobMessage {
    /// The device (id) that offloaded the job.
    pub origin: String,
    /// An `ask` job's request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ask: Option<AskRequest>,
    /// A `generate` job's request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GenerateRequest>,
    /// The frame the job is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<JobFrame>,
}

/// The frame of a [`JobMessage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFrame {
    /// The frame's sequence number on its camera.
    pub seq: u64,
    /// Its capture time, ms since the Unix epoch.
    pub ts_ms: u64,
    /// `image/jpeg` or `image/png`.
    pub content_type: String,
    /// The image file, base64 (standard alphabet, padded).
    pub data: String,
}

impl JobMessage {
    /// The message for the worker's offloaded job.
    pub fn new(origin: &str, job: &OffloadJob) -> Self {
        use base64::Engine as _;
        let (ask, generate) = match &job.kind {
            JobKind::Answer { stream } => {
                (Some(AskRequest { question: job.text.clone(), stream: *stream, id: None, reply_to: None }), None)
            }
            JobKind::Generate(g) => (None, Some(GenerateRequest::from_job(&job.text, g))),
        };
        let frame = job.frame.as_ref().map(|f: &AttachedFrame| JobFrame {
            seq: f.seq,
            ts_ms: f.ts_ms,
            content_type: f.picture.format.content_type().to_owned(),
            data: base64::engine::general_purpose::STANDARD.encode(&f.picture.bytes),
        });
        JobMessage { origin: origin.to_owned(), ask, generate, frame }
    }
}

/// A job as a worker runs it.
#[derive(Debug)]
pub struct ParsedJob {
    /// The device that offloaded it.
    pub origin: String,
    /// The question or prompt.
    pub text: String,
    /// What to do.
    pub kind: JobKind,
    /// The frame it is about, decoded.
    pub frame: Option<Frame>,
}

/// Parses a job from `<jobs_prefix>/<kind>`; `limits.max_payload_bytes` is `offload.max_job_bytes`.
/// The request inside is checked as the camera's own parser checks it, the frame is decoded.
pub fn parse_job(
    kind: OffloadKind,
    payload: &[u8],
    limits: &Limits,
    max_prompt_chars: usize,
) -> Result<ParsedJob, RequestError> {
    use base64::Engine as _;
    let text = utf8(payload, limits)?;
    let message: JobMessage = serde_json::from_str(&text).map_err(|e| RequestError::Invalid(e.to_string()))?;
    let (text, job_kind, about_scene) = match (kind, message.ask, message.generate) {
        (OffloadKind::Ask, Some(ask), None) => {
            check_question(&ask.question, limits.max_question_chars)?;
            (ask.question, JobKind::Answer { stream: ask.stream }, true)
        }
        (OffloadKind::Generate, None, Some(generate)) => {
            check_prompt(generate.prompt.as_deref(), generate.from_scene, max_prompt_chars)?;
            if generate.guidance.is_some_and(|g| !g.is_finite()) {
                return Err(RequestError::OutOfRange("guidance must be a finite number".into()));
            }
            let from_scene = generate.from_scene;
            (generate.prompt.clone().unwrap_or_default(), JobKind::Generate(generate.job()), from_scene)
        }
        (kind, _, _) => {
            return Err(RequestError::Invalid(format!(
                "a job on the `{}` topic must carry exactly the `{}` request",
                kind.as_str(),
                kind.as_str()
            )))
        }
    };
    let frame = match (message.frame, about_scene) {
        (None, true) => return Err(RequestError::Invalid("the job is about the scene but carries no `frame`".into())),
        (None, false) | (Some(_), false) => None,
        (Some(f), true) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(f.data.as_bytes())
                .map_err(|e| RequestError::Invalid(format!("`frame.data` is not base64: {e}")))?;
            let image = RgbImage::decode(&bytes, "`frame.data`").map_err(|e| RequestError::Invalid(e.to_string()))?;
            let captured_at = std::time::UNIX_EPOCH
                .checked_add(std::time::Duration::from_millis(f.ts_ms))
                .ok_or_else(|| RequestError::Invalid(format!("`frame.ts_ms` {} is out of range", f.ts_ms)))?;
            Some(Frame { seq: f.seq, captured_at, image })
        }
    };
    Ok(ParsedJob { origin: message.origin, text, kind: job_kind, frame })
}

/// Home Assistant device-based discovery for one device.
pub struct Discovery<'a> {
    /// The discovery prefix (`homeassistant`).
    pub prefix: &'a str,
    /// A stable device id (letters, digits, `_`, `-`).
    pub device_id: &'a str,
    /// A display name.
    pub device_name: &'a str,
    /// The model stack, shown as the model.
    pub model: &'a str,
    /// The device's topics.
    pub topics: &'a Topics,
    /// The MIME type of what `<prefix>/image` carries.
    pub image_type: &'a str,
    /// The categories that get an occupancy binary sensor (`mqtt.discovery.objects`).
    pub objects: &'a [String],
}

impl Discovery<'_> {
    /// `<prefix>/device/<id>/config`.
    pub fn topic(&self) -> String {
        format!("{}/device/{}/config", self.prefix, self.device_id)
    }

    /// The discovery payload: a caption sensor (state cut to Home Assistant's 255 characters, the
    /// full caption in the attributes), an image entity, a text entity to ask, a sensor with the
    /// last answer, and an occupancy binary sensor per category of `objects` (on while the latest
    /// caption's `objects` has it); availability bound to the status topic.
    pub fn payload(&self) -> serde_json::Value {
        let mut payload = self.entities();
        for name in self.objects {
            // A component key and unique id from the name ("teddy bear": `object_teddy_bear`), and
            // the name as a JSON string literal in the template, which Jinja reads as its own.
            let key: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
            let literal = serde_json::Value::from(name.as_str()).to_string();
            payload["cmps"][format!("object_{key}")] = serde_json::json!({
                "p": "binary_sensor",
                "name": capitalised(name),
                "uniq_id": format!("{}_object_{key}", self.device_id),
                "stat_t": self.topics.caption(),
                "val_tpl": format!("{{{{ 'ON' if {literal} in (value_json.objects | default([])) else 'OFF' }}}}"),
                "dev_cla": "occupancy",
            });
        }
        payload
    }

    /// The payload's fixed entities.
    fn entities(&self) -> serde_json::Value {
        let id = self.device_id;
        let t = self.topics;
        serde_json::json!({
            "dev": {
                "ids": [format!("scenecast_{id}")],
                "name": self.device_name,
                "mf": "scenecast",
                "mdl": self.model,
                "sw": env!("CARGO_PKG_VERSION"),
            },
            "o": { "name": "scenecast", "sw": env!("CARGO_PKG_VERSION") },
            "avty_t": t.status(),
            "pl_avail": "online",
            "pl_not_avail": "offline",
            "qos": 1,
            "cmps": {
                "caption": {
                    "p": "sensor",
                    "name": "Caption",
                    "uniq_id": format!("{id}_caption"),
                    "stat_t": t.caption(),
                    "val_tpl": "{{ value_json.text[:255] }}",
                    "json_attr_t": t.caption(),
                    "icon": "mdi:cctv",
                },
                "image": {
                    "p": "image",
                    "name": "Image",
                    "uniq_id": format!("{id}_image"),
                    "image_topic": t.image(),
                    "content_type": self.image_type,
                },
                "question": {
                    "p": "text",
                    "name": "Ask",
                    "uniq_id": format!("{id}_question"),
                    "cmd_t": t.ask_text(),
                    "max": 255,
                    "icon": "mdi:comment-question",
                },
                "answer": {
                    "p": "sensor",
                    "name": "Answer",
                    "uniq_id": format!("{id}_answer"),
                    "stat_t": t.answer(),
                    "val_tpl": "{{ value_json.text[:255] }}",
                    "json_attr_t": t.answer(),
                    "icon": "mdi:comment-text",
                },
            },
        })
    }
}

/// `name` with its first letter in capitals ("person": "Person").
fn capitalised(name: &str) -> String {
    let mut chars = name.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::GateConfig;

    const LIMITS: Limits = Limits { max_payload_bytes: 256, max_question_chars: 40 };

    #[test]
    fn ask_requests_parse_or_name_what_is_wrong() {
        // (payload, expected Ok question or Err code + message fragment)
        let cases: &[(&[u8], Result<&str, (&str, &str)>)] = &[
            (br#"{"question":"What is on the table?"}"#, Ok("What is on the table?")),
            (br#"{"question":"hi","stream":true,"id":"7","reply_to":"a/b"}"#, Ok("hi")),
            (br#"{"question":""}"#, Err(("bad_question", "the question is empty"))),
            (br#"{"question":"   "}"#, Err(("bad_question", "the question is empty"))),
            (
                br#"{"question":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#,
                Err(("bad_question", "51 characters; the limit is 40")),
            ),
            (br#"{"question":42}"#, Err(("bad_request", "invalid type: integer `42`, expected a string"))),
            (br#"{"quest":"x"}"#, Err(("bad_request", "unknown field `quest`"))),
            (br#"{}"#, Err(("bad_request", "missing field `question`"))),
            (br#"{"question":"x","colour":"red"}"#, Err(("bad_request", "unknown field `colour`"))),
            (b"not json", Err(("bad_request", "expected ident"))),
            (b"{\"question\":\"\xff\xfe\"}", Err(("bad_request", "not valid UTF-8 (at byte 13)"))),
            (&[b'x'; 300], Err(("too_large", "payload of 300 bytes exceeds the limit of 256 bytes"))),
        ];
        for (payload, expected) in cases {
            let got = parse_ask(payload, &LIMITS);
            match (got, expected) {
                (Ok(req), Ok(q)) => assert_eq!(req.question, *q),
                (Err(e), Err((code, fragment))) => {
                    assert_eq!(e.code(), *code, "{e}");
                    assert!(e.to_string().contains(fragment), "{fragment:?} not in {e}");
                }
                (got, expected) => panic!("{:?}: got {got:?}, expected {expected:?}", String::from_utf8_lossy(payload)),
            }
        }
    }

    #[test]
    fn an_offloaded_job_round_trips_and_bad_jobs_name_what_is_wrong() {
        use crate::frame::ImageFormat;
        let image = RgbImage::from_pixels(4, 2, vec![200; 24]).unwrap();
        let picture = worker::Picture { bytes: image.encode(ImageFormat::Png).unwrap(), format: ImageFormat::Png };
        let job = OffloadJob {
            text: "Is there a cup?".into(),
            kind: JobKind::Answer { stream: false },
            frame: Some(AttachedFrame { seq: 9, ts_ms: 1_700_000_000_123, picture }),
        };
        let payload = serde_json::to_vec(&JobMessage::new("kitchen", &job)).unwrap();
        let limits = Limits { max_payload_bytes: 1 << 20, max_question_chars: 40 };
        let parsed = parse_job(OffloadKind::Ask, &payload, &limits, 100).unwrap();
        assert_eq!((parsed.origin.as_str(), parsed.text.as_str()), ("kitchen", "Is there a cup?"));
        let frame = parsed.frame.unwrap();
        assert_eq!((frame.seq, frame.image), (9, image));
        let ts = frame.captured_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(ts, 1_700_000_000_123);
        // A render that is not about the scene needs no frame.
        let render = br#"{"origin":"c","generate":{"prompt":"a dog","steps":2}}"#;
        let parsed = parse_job(OffloadKind::Generate, render, &limits, 100).unwrap();
        assert!(matches!(&parsed.kind, JobKind::Generate(g) if g.render.steps == Some(2) && !g.from_scene));
        assert!(parsed.frame.is_none());
        let cases: &[(OffloadKind, &[u8], &str, &str)] = &[
            (OffloadKind::Ask, render, "bad_request", "must carry exactly the `ask` request"),
            (OffloadKind::Ask, br#"{"origin":"c","ask":{"question":"hi"}}"#, "bad_request", "carries no `frame`"),
            (
                OffloadKind::Ask,
                br#"{"origin":"c","ask":{"question":"hi"},"frame":{"seq":1,"ts_ms":2,"content_type":"image/jpeg","data":"@@"}}"#,
                "bad_request",
                "`frame.data` is not base64",
            ),
            (
                OffloadKind::Ask,
                br#"{"origin":"c","ask":{"question":"hi"},"frame":{"seq":1,"ts_ms":2,"content_type":"image/jpeg","data":"aGVsbG8="}}"#,
                "bad_request",
                "`frame.data`",
            ),
            (OffloadKind::Ask, br#"{"origin":"c","ask":{"question":" "},"frame":null}"#, "bad_question", "empty"),
            (OffloadKind::Generate, br#"{"origin":"c","generate":{}}"#, "bad_prompt", "prompt"),
            (OffloadKind::Generate, br#"{"generate":{"prompt":"x"}}"#, "bad_request", "missing field `origin`"),
            (OffloadKind::Generate, br#"{"origin":"c","generate":{"prompt":"x"},"extra":1}"#, "bad_request", "unknown field `extra`"),
        ];
        for (kind, payload, code, fragment) in cases {
            let err = parse_job(*kind, payload, &limits, 100).unwrap_err();
            assert_eq!(err.code(), *code, "{err}");
            assert!(err.to_string().contains(fragment), "{fragment:?} not in {err}");
        }
    }

    #[test]
    fn salvage_finds_id_and_reply_to_in_a_bad_request() {
        assert_eq!(
            salvage_reply_address(br#"{"question":5,"id":"9","reply_to":"r/t"}"#),
            (Some("9".into()), Some("r/t".into()))
        );
        assert_eq!(salvage_reply_address(b"garbage"), (None, None));
    }

    #[test]
    fn config_patches_apply_or_name_the_key() {
        let current = RuntimeSettings { caption_prompt: "Describe.".into(), gate: GateConfig::default() };
        let ok =
            parse_config_patch(br#"{"caption_prompt":"Count the people.","scene":{"change_threshold":0.1}}"#, &LIMITS)
                .unwrap()
                .apply(&current)
                .unwrap();
        assert_eq!(
            (ok.caption_prompt.as_str(), ok.gate.change_threshold, ok.gate.min_interval_s),
            ("Count the people.", 0.1, 2.0)
        );
        let cases: &[(&[u8], &str)] = &[
            (br#"{"caption_prompt":" "}"#, "`caption_prompt`: is empty"),
            (br#"{"scene":{"change_threshold":5}}"#, "`scene.change_threshold`: 5 is outside 0..2"),
            (
                br#"{"scene":{"min_interval_s":10,"max_interval_s":1}}"#,
                "`scene.max_interval_s`: need 0 <= min_interval_s (10) <= max_interval_s (1)",
            ),
            (br#"{"prompt":"x"}"#, "unknown field `prompt`"),
            (br#"{"scene":{"threshold":1}}"#, "unknown field `threshold`"),
        ];
        for (payload, expected) in cases {
            let err = parse_config_patch(payload, &LIMITS).and_then(|p| p.apply(&current)).unwrap_err();
            assert_eq!(err.code(), "bad_request");
            assert!(err.to_string().contains(expected), "{expected:?} not in {err}");
        }
    }

    #[test]
    fn topic_filters() {
        let cases = [
            ("#", "a/b", true),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("a/#", "a", true),
            ("a/b", "a/b/c", false),
            ("scenecast/+/reply/#", "scenecast/hub/reply/1", true),
            ("scenecast/+/reply/#", "other/hub/reply/1", false),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(topic_matches(filter, topic), expected, "{filter} vs {topic}");
        }
    }

    #[test]
    fn replies_serialise_without_empty_fields() {
        let err = ErrorReply::new(Some("3".into()), &RequestError::Busy(8));
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"id":"3","error":{"code":"busy","message":"busy: 8 requests are waiting; try again later"}}"#
        );
        let partial = Answer {
            id: None,
            device: None,
            text: "A c".into(),
            done: false,
            guided: None,
            frame_seq: None,
            frame_ts_ms: None,
            timings_ms: Timings::new(),
        };
        assert_eq!(serde_json::to_string(&partial).unwrap(), r#"{"text":"A c","done":false}"#);
    }

    /// Each object of `mqtt.discovery.objects` is an occupancy binary sensor on the caption topic
    /// whose template looks the name up in the caption's `objects`; none without objects.
    #[test]
    fn discovery_has_an_occupancy_sensor_per_object() {
        let topics = Topics::new("scenecast/porch");
        let objects = ["person".to_owned(), "teddy bear".to_owned()];
        let d = Discovery {
            prefix: "homeassistant",
            device_id: "porch",
            device_name: "Porch",
            model: "m",
            topics: &topics,
            image_type: "image/png",
            objects: &objects,
        };
        let payload = d.payload();
        let cmps = payload["cmps"].as_object().unwrap();
        assert_eq!(cmps.len(), 6, "{cmps:?}");
        assert_eq!(
            cmps["object_person"],
            serde_json::json!({
                "p": "binary_sensor",
                "name": "Person",
                "uniq_id": "porch_object_person",
                "stat_t": "scenecast/porch/caption",
                "val_tpl": "{{ 'ON' if \"person\" in (value_json.objects | default([])) else 'OFF' }}",
                "dev_cla": "occupancy",
            })
        );
        assert_eq!(cmps["object_teddy_bear"]["uniq_id"], "porch_object_teddy_bear");
        assert_eq!(cmps["object_teddy_bear"]["name"], "Teddy bear");
        assert!(cmps["object_teddy_bear"]["val_tpl"].as_str().unwrap().contains("\"teddy bear\" in"));
        // The fixed entities are the same with or without objects.
        let bare = Discovery { objects: &[], ..d }.payload();
        assert_eq!(bare["cmps"].as_object().unwrap().len(), 4);
        assert_eq!(bare["cmps"]["caption"], payload["cmps"]["caption"]);
    }
}
