//! What goes into the worker and what comes out: its own small message types, so the worker
//! knows nothing of MQTT. A job carries an opaque reply address `A` (the transport's) that the
//! worker only copies into its outputs.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::frame::{Frame, ImageFormat};
use crate::generate::{ConditionPath, GeneratorError, RenderRequest};
use crate::llm::LlmError;
use crate::pipeline::StackError;

use super::gate::GateConfig;

/// Milliseconds per stage.
pub type Timings = BTreeMap<String, f64>;

/// A validated request for the worker.
#[derive(Debug, Clone)]
pub struct Job<A> {
    /// The question (for [`JobKind::Generate`], the prompt, possibly empty).
    pub text: String,
    /// What to do.
    pub kind: JobKind,
    /// Where the result goes; copied into the outputs.
    pub reply: A,
    /// When it arrived.
    pub received_at: Instant,
    /// When it expires: not worked on after that.
    pub expires_at: Option<Instant>,
    /// The frame the job is about, when it brought its own (a job offloaded by a camera);
    /// otherwise it is about the latest frame of this device's camera.
    pub frame: Option<Frame>,
}

impl<A> Job<A> {
    /// True when its expiry has passed.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// The kinds of job, as the configuration names them (`offload.kinds`, `offload.serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OffloadKind {
    /// Questions ([`JobKind::Answer`]).
    Ask,
    /// Renders ([`JobKind::Generate`]).
    Generate,
}

impl OffloadKind {
    /// Its name in topics and the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            OffloadKind::Ask => "ask",
            OffloadKind::Generate => "generate",
        }
    }
}

/// A job handed to another machine: what to do and, when it is about the scene, the frame.
#[derive(Debug, Clone)]
pub struct OffloadJob {
    /// The job's text (question or prompt).
    pub text: String,
    /// What to do.
    pub kind: JobKind,
    /// The frame the job is about (questions, and renders `from_scene`), as a JPEG.
    pub frame: Option<AttachedFrame>,
}

/// A frame sent along with an offloaded job.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachedFrame {
    /// The frame's sequence number on its camera.
    pub seq: u64,
    /// Its capture time, ms since the Unix epoch.
    pub ts_ms: u64,
    /// The encoded picture.
    pub picture: Picture,
}

/// What a job asks for.
#[derive(Debug, Clone)]
pub enum JobKind {
    /// Answer the question about the latest frame.
    Answer {
        /// Send partial answers while generating.
        stream: bool,
    },
    /// Render an image.
    Generate(GenerateJob),
}

impl JobKind {
    /// Its kind, as the configuration names it.
    pub fn offload_kind(&self) -> OffloadKind {
        match self {
            JobKind::Answer { .. } => OffloadKind::Ask,
            JobKind::Generate(_) => OffloadKind::Generate,
        }
    }
}

/// A render request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateJob {
    /// Describe the current scene and render that (the job's text is added to the description).
    pub from_scene: bool,
    /// Text or hidden-state conditioning for `from_scene` (default: the config's).
    pub condition: Option<ConditionPath>,
    /// Changes to the model's defaults.
    pub render: RenderRequest,
}

/// A caption of a changed scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    /// The caption.
    pub text: String,
    /// Names the LLM wrote that no image token supports, removed from `text` (the manifest's
    /// `[grounding]` check); empty when the check changed nothing or is off.
    pub unsupported: Vec<String>,
    /// The category the caption was begun with, when the detector's category columns guided it
    /// (`grounding.guide_threshold`: the checks left the LLM's own caption naming nothing).
    pub guided: Option<String>,
    /// The categories of the manifest's vocabulary that the caption names (empty for "No known
    /// object."); None when the manifest has no vocabulary.
    pub objects: Option<Vec<String>>,
    /// The categories the LLM placed on another side than the detector's class of their name or
    /// their image tokens do, placed there (`grounding.positions`); empty when none was.
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

/// An answer, or a partial one while streaming.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The answer text (so far, when `done` is false).
    pub text: String,
    /// False for a partial answer.
    pub done: bool,
    /// The category the question asked about, when a guide began the answer: yes to a presence
    /// question whose category the detector's category columns are sure of
    /// (`grounding.guide_threshold`) or the frame's caption names, or the side the image tokens place the object on for a
    /// position question (`grounding.positions`), the LLM's own answer having said otherwise.
    /// Final answers only.
    pub guided: Option<String>,
    /// The frame the answer is about (none without a camera frame).
    pub frame_seq: Option<u64>,
    /// That frame's capture time, ms since the Unix epoch.
    pub frame_ts_ms: Option<u64>,
    /// Per-stage timings (final answers).
    pub timings_ms: Timings,
}

/// An encoded picture.
#[derive(Debug, Clone, PartialEq)]
pub struct Picture {
    /// PNG or JPEG bytes.
    pub bytes: Vec<u8>,
    /// Their format.
    pub format: ImageFormat,
}

/// What was rendered for a generate job.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderInfo {
    /// The prompt rendered (the description, for `from_scene`).
    pub prompt: String,
    /// The noise seed.
    pub seed: u64,
    /// Denoising steps.
    pub steps: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// `euler` or `lcm`.
    pub sampler: String,
    /// For the requester: the prompt was cut at the tokenizer's limit.
    pub warning: Option<String>,
    /// Per-stage timings (load, condition, steps, vae, total).
    pub timings_ms: Timings,
}

/// Why a job failed. The transport maps each to a stable error code in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The daemon has no generator (the manifest names none, or `generator.enabled` is false).
    #[error(
        "no generator is configured: the model manifest has no [generator] section, or generator.enabled is false"
    )]
    NoGenerator,
    /// The generator cannot be used or loaded now, or the request is out of its range.
    #[error(transparent)]
    Generator(#[from] GeneratorError),
    /// `from_scene` before any frame was seen.
    #[error("no frame has been seen yet, so there is no scene to describe")]
    NoScene,
    /// The LLM failed.
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// The model stack failed (rendering, encoding the picture).
    #[error(transparent)]
    Stack(#[from] StackError),
}

/// What the worker produces. `A` is the reply address of the job that asked.
#[derive(Debug)]
pub enum Output<A> {
    /// A caption of a changed scene.
    Caption(Caption),
    /// The picture of the captioned scene (the frame, or a re-rendering with privacy on): the
    /// latest one only matters.
    ScenePicture(Picture),
    /// An answer (or a partial one) to a job.
    Answer {
        /// The job's reply address.
        to: A,
        /// The answer.
        answer: Answer,
    },
    /// A rendered image for a job.
    Rendered {
        /// The job's reply address.
        to: A,
        /// The picture.
        picture: Picture,
        /// What was rendered.
        info: RenderInfo,
    },
    /// A job that failed.
    Failed {
        /// The job's reply address.
        to: A,
        /// Why.
        error: JobError,
    },
    /// A job whose expiry passed while it waited (counted, not answered).
    Expired {
        /// The job's reply address (a transport that must acknowledge the job needs it).
        to: A,
    },
    /// A job handed to a worker elsewhere (`offload.kinds`): the transport sends it and
    /// forwards the result to `to`.
    Offload {
        /// The job's reply address.
        to: A,
        /// The job.
        job: OffloadJob,
    },
}

/// The settings that can change at run time (SIGHUP, a `config/set` request).
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSettings {
    /// The question that asks for a caption.
    pub caption_prompt: String,
    /// Scene-change gating.
    pub gate: GateConfig,
}

/// The longest caption prompt, in characters.
pub const MAX_CAPTION_PROMPT_CHARS: usize = 1000;

/// A runtime setting that is not usable: the key (as in the config file) and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct SettingError {
    /// The dotted key (`llm.caption_prompt`, `scene.change_threshold`, …).
    pub key: &'static str,
    /// What is wrong and what was expected.
    pub message: String,
}

impl RuntimeSettings {
    /// The one validation of the runtime settings, for the config file, SIGHUP and `config/set`.
    pub fn check(&self) -> Result<(), SettingError> {
        let bad = |key, message: String| Err(SettingError { key, message });
        if self.caption_prompt.trim().is_empty() {
            return bad("llm.caption_prompt", "is empty".into());
        }
        if self.caption_prompt.chars().count() > MAX_CAPTION_PROMPT_CHARS {
            return bad("llm.caption_prompt", format!("is longer than {MAX_CAPTION_PROMPT_CHARS} characters"));
        }
        let gate = &self.gate;
        if !(0.0..=2.0).contains(&gate.change_threshold) {
            return bad(
                "scene.change_threshold",
                format!("{} is outside 0..2 (a cosine distance)", gate.change_threshold),
            );
        }
        if !(gate.min_interval_s >= 0.0
            && gate.max_interval_s >= gate.min_interval_s
            && gate.max_interval_s.is_finite())
        {
            return bad(
                "scene.max_interval_s",
                format!(
                    "need 0 <= min_interval_s ({}) <= max_interval_s ({})",
                    gate.min_interval_s, gate.max_interval_s
                ),
            );
        }
        Ok(())
    }
}
