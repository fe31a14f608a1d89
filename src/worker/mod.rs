//! The inference worker: one thread that owns the models. It takes the newest frame from the
//! [`FrameSlot`], encodes it, lets the [`SceneGate`] decide whether the scene changed, captions
//! changed scenes, and answers questions about the latest frame — questions first. Results go to
//! the transport as [`Output`] values; the worker knows nothing of MQTT.

mod gate;
mod job;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::Deserialize;
use tokio::sync::mpsc::Sender;

use crate::camera::FrameSlot;
use crate::frame::{Frame, ImageFormat, RgbImage};
use crate::generate::{ConditionPath, Generator, GeneratorError, OnDemand};
use crate::llm::{Backbone, GenerateOptions, StopReason};
use crate::pipeline::{render_description, StackError};
use crate::util::ms_since;
use crate::vision::{EncodeTimings, ImageTokens, Vision};

pub use crate::util::cosine_distance;
pub use gate::{Decision, GateConfig, SceneGate};
pub use job::{
    Answer, AttachedFrame, Caption, GenerateJob, Job, JobError, JobKind, OffloadJob, OffloadKind, Output, Picture,
    RenderInfo, RuntimeSettings, SettingError, Timings, MAX_CAPTION_PROMPT_CHARS,
};

/// What the daemon may publish about what the camera sees.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Never publish camera pixels: the Home Assistant image entity shows only generated
    /// re-renderings of the described scene, and requests for a snapshot are refused. Off by
    /// default: then each caption's frame is published there as a JPEG snapshot.
    pub no_camera_pixels: bool,
    /// With `no_camera_pixels`, publish a re-rendering of each caption to the image entity
    /// (costs one generator run per caption).
    pub rerender_captions: bool,
}

/// What the worker has done, for the watchdog, `STATUS=` lines and benchmarks.
#[derive(Debug)]
pub struct Progress {
    heartbeat: Mutex<Instant>,
    /// Frames encoded.
    pub frames: AtomicU64,
    /// LLM runs (captions and answers).
    pub llm_runs: AtomicU64,
    /// Captions published.
    pub captions: AtomicU64,
    /// Questions answered.
    pub answers: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            heartbeat: Mutex::new(Instant::now()),
            frames: AtomicU64::new(0),
            llm_runs: AtomicU64::new(0),
            captions: AtomicU64::new(0),
            answers: AtomicU64::new(0),
        }
    }
}

impl Progress {
    fn beat(&self) {
        if let Ok(mut at) = self.heartbeat.lock() {
            *at = Instant::now();
        }
    }

    /// Time since the worker last showed progress (a loop turn or a generated token).
    pub fn stalled_for(&self) -> Duration {
        self.heartbeat.lock().map(|at| at.elapsed()).unwrap_or_default()
    }
}

/// What the worker owns.
pub struct Worker {
    /// The vision path.
    pub vision: Vision,
    /// The LLM.
    pub backbone: Backbone,
    /// The newest frame from the capture thread.
    pub frames: Arc<FrameSlot>,
    /// Reloadable settings.
    pub settings: Arc<RwLock<RuntimeSettings>>,
    /// Progress counters and heartbeat.
    pub progress: Arc<Progress>,
    /// The model stack's name, reported with captions.
    pub model: String,
    /// The generator, loaded on demand (None: the manifest has none, or it is disabled).
    pub generator: Option<OnDemand>,
    /// What may be published about the scene.
    pub privacy: PrivacyConfig,
    /// The format of pictures.
    pub image_format: ImageFormat,
    /// The kinds of job handed to workers elsewhere instead of running here (`offload.kinds`).
    pub offload: Vec<OffloadKind>,
}

/// A seed from the clock, for requests that give none (echoed in the reply, so a render can be repeated).
fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64 & 0xFFFF_FFFF)
}

/// A frame the worker has encoded.
#[derive(Debug, Clone)]
struct Seen {
    seq: u64,
    ts_ms: u64,
    signature: Vec<f32>,
}

fn ts_ms(frame: &Frame) -> u64 {
    frame.captured_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn rounded(pairs: &[(&str, f64)]) -> Timings {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (v * 10.0).round() / 10.0)).collect()
}

/// The worker's state between jobs: the latest frame, the cached scene, the image-token buffer.
#[derive(Default)]
struct State {
    tokens: ImageTokens,
    latest: Option<Seen>,
    scene: Option<Seen>,
    /// The latest frame's pixels, kept only when jobs about the scene are offloaded.
    frame: Option<Frame>,
}

impl Worker {
    fn settings(&self) -> RuntimeSettings {
        crate::util::read(&self.settings).clone()
    }

    /// Runs until `stop` is set or the job channel closes.
    pub fn run<A: Clone>(mut self, jobs: Receiver<Job<A>>, out: Sender<Output<A>>, stop: Arc<AtomicBool>) {
        let mut gate = SceneGate::new();
        let mut state = State::default();
        while !stop.load(Ordering::SeqCst) {
            self.progress.beat();
            if let Some(g) = self.generator.as_mut() {
                g.unload_if_idle();
            }
            match jobs.recv_timeout(Duration::from_millis(20)) {
                Ok(job) => {
                    if job.expired(Instant::now()) {
                        tracing::warn!(question = %job.text, "request expired while queued; not answered");
                        let _ = out.blocking_send(Output::Expired { to: job.reply });
                        continue;
                    }
                    if self.offload.contains(&job.kind.offload_kind()) && job.frame.is_none() {
                        let _ = out.blocking_send(self.offload_job(job, &state));
                        continue;
                    }
                    match job.kind.clone() {
                        JobKind::Answer { stream } => self.answer(job, stream, &mut state, &out, &stop),
                        JobKind::Generate(request) => {
                            let to = job.reply.clone();
                            let output = match self.render_request(&job, &request, &mut state, &stop) {
                                Ok((picture, info)) => Output::Rendered { to, picture, info },
                                Err(error) => {
                                    tracing::warn!("generate request failed: {error}");
                                    Output::Failed { to, error }
                                }
                            };
                            let _ = out.blocking_send(output);
                        }
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            let Some(frame) = self.frames.take() else { continue };
            let start = Instant::now();
            let encoded = match self.vision.encode(&frame.image) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(frame = frame.seq, "encoding failed: {e}");
                    continue;
                }
            };
            self.progress.frames.fetch_add(1, Ordering::Relaxed);
            // The previous frame's signature buffer is reused: no allocation per frame.
            let mut signature = state.latest.take().map(|seen| seen.signature).unwrap_or_default();
            self.vision.signature(&mut signature);
            let settings = self.settings();
            let now = Instant::now();
            let decision = gate.decide(&settings.gate, &signature, now);
            let seen = state.latest.insert(Seen { seq: frame.seq, ts_ms: ts_ms(&frame), signature });
            tracing::debug!(frame = frame.seq, ?decision, "scene gate");
            if !decision.caption() {
                if !self.offload.is_empty() {
                    state.frame = Some(frame);
                }
                continue;
            }
            match self.caption(&frame, &settings.caption_prompt, &mut state.tokens, &stop, start, encoded) {
                Ok(caption) => {
                    gate.captioned(&seen.signature, now);
                    state.scene = Some(seen.clone());
                    self.progress.captions.fetch_add(1, Ordering::Relaxed);
                    let picture = self.scene_picture(&frame, &caption.text, &settings.caption_prompt);
                    if out.blocking_send(Output::Caption(caption)).is_err() {
                        break;
                    }
                    if let Some(picture) = picture {
                        let _ = out.blocking_send(Output::ScenePicture(picture));
                    }
                }
                Err(e) => tracing::error!(frame = frame.seq, "captioning failed: {e}"),
            }
            // The newest frame's pixels go with offloaded jobs about the scene.
            if !self.offload.is_empty() {
                state.frame = Some(frame);
            }
        }
    }

    /// The output that hands `job` to a worker elsewhere, with the latest frame when the job is
    /// about the scene.
    fn offload_job<A>(&self, job: Job<A>, state: &State) -> Output<A> {
        let about_scene = match &job.kind {
            JobKind::Answer { .. } => true,
            JobKind::Generate(g) => g.from_scene,
        };
        let frame = match (about_scene, &state.frame) {
            (false, _) => None,
            (true, None) => return Output::Failed { to: job.reply, error: JobError::NoScene },
            (true, Some(frame)) => {
                // JPEG: a tenth of PNG's size on camera frames, and the encoder sees it resized anyway.
                match frame.image.encode(ImageFormat::Jpeg) {
                    Ok(bytes) => Some(AttachedFrame {
                        seq: frame.seq,
                        ts_ms: ts_ms(frame),
                        picture: Picture { bytes, format: ImageFormat::Jpeg },
                    }),
                    Err(e) => return Output::Failed { to: job.reply, error: StackError::from(e).into() },
                }
            }
        };
        tracing::info!(kind = job.kind.offload_kind().as_str(), "job offloaded");
        Output::Offload { to: job.reply, job: OffloadJob { text: job.text, kind: job.kind, frame } }
    }

    /// Makes a job's own frame the scene (a job offloaded by a camera): encoded, projected and
    /// prefilled. This device's cached scene is no longer current, and the encoder's features are
    /// no longer its latest frame's (`make_current` relies on them), so both are forgotten.
    fn use_job_frame(&mut self, frame: &Frame, state: &mut State) -> Result<(), JobError> {
        state.scene = None;
        state.latest = None;
        self.vision.encode(&frame.image).map_err(StackError::from)?;
        self.vision.project(&mut state.tokens).map_err(StackError::from)?;
        self.backbone.set_scene(frame.seq, Some(&state.tokens))?;
        Ok(())
    }

    fn options(&self, stop: &Arc<AtomicBool>) -> GenerateOptions {
        GenerateOptions { cancel: Some(stop.clone()), ..self.backbone.default_options() }
    }

    fn caption(
        &mut self,
        frame: &Frame,
        prompt: &str,
        tokens: &mut ImageTokens,
        stop: &Arc<AtomicBool>,
        start: Instant,
        encoded: EncodeTimings,
    ) -> Result<Caption, Box<dyn std::error::Error>> {
        let project_ms = self.vision.project(tokens)?;
        let prefill_ms = self.backbone.set_scene(frame.seq, Some(tokens))?;
        let options = self.options(stop);
        let progress = self.progress.clone();
        self.progress.llm_runs.fetch_add(1, Ordering::Relaxed);
        let g = self.backbone.describe(prompt, &options, &mut |_| {
            progress.beat();
            true
        })?;
        if g.stop == StopReason::Cancelled {
            return Err("cancelled by shutdown".into());
        }
        let timings = rounded(&[
            ("preprocess", encoded.preprocess_ms),
            ("encode", encoded.encode_ms),
            ("project", project_ms),
            ("prefill", prefill_ms + g.prefill_ms),
            ("decode", g.decode_ms),
            ("total", ms_since(start)),
        ]);
        tracing::info!(frame = frame.seq, total_ms = timings["total"], "caption: {}", g.text);
        let unsupported = match g.checked {
            Some(checked) => {
                tracing::info!(
                    frame = frame.seq,
                    "the scene does not support {:?} (image tokens or detector scores): removed from {:?}",
                    checked.dropped,
                    checked.unchecked
                );
                checked.dropped
            }
            None => Vec::new(),
        };
        if let Some(moved) = &g.moved {
            tracing::info!(
                frame = frame.seq,
                "the caption placed {:?} elsewhere than the detector or the image tokens: {:?} as placed",
                moved.categories,
                moved.unmoved
            );
        }
        if let Some(guided) = &g.guided {
            tracing::info!(
                frame = frame.seq,
                "the checks left the caption naming nothing ({:?} as written); the classifier scores {} at {:.3}: begun with it",
                guided.written,
                guided.guide.category,
                guided.guide.score
            );
        }
        Ok(Caption {
            text: g.text,
            unsupported,
            guided: g.guided.map(|g| g.guide.category),
            objects: g.objects,
            moved: g.moved.map(|m| m.categories).unwrap_or_default(),
            frame_seq: frame.seq,
            frame_ts_ms: ts_ms(frame),
            timings_ms: timings,
            model: self.model.clone(),
        })
    }

    fn picture(&self, image: &RgbImage) -> Result<Picture, StackError> {
        Ok(Picture { bytes: image.encode(self.image_format).map_err(StackError::from)?, format: self.image_format })
    }

    /// What the image topic gets for a new caption: the frame itself (unless privacy forbids
    /// camera pixels), or a re-rendering of the caption (privacy with `rerender_captions`).
    fn scene_picture(&mut self, frame: &Frame, caption: &str, prompt: &str) -> Option<Picture> {
        if !self.privacy.no_camera_pixels {
            return self.picture(&frame.image).map_err(|e| tracing::warn!("snapshot: {e}")).ok();
        }
        if !self.privacy.rerender_captions {
            return None;
        }
        let generator = self.generator.as_mut()?;
        let spec = generator.spec().ok()?.clone();
        let condition = generator.config().condition;
        let (g, _) = generator.get().map_err(|e| tracing::warn!("re-rendering the caption: {e}")).ok()?;
        let options = Generator::default_options(&spec, frame.seq);
        let rendered = render_description(&mut self.backbone, g, condition, prompt, caption, &options)
            .map_err(|e| tracing::warn!("re-rendering the caption: {e}"))
            .ok()?;
        self.picture(&rendered.image).map_err(|e| tracing::warn!("re-rendering the caption: {e}")).ok()
    }

    /// Makes the latest frame the cached scene unless the current scene still shows it.
    fn make_current(&mut self, state: &mut State) {
        let threshold = self.settings().gate.change_threshold;
        let Some(latest) = &state.latest else { return };
        let current = state
            .scene
            .as_ref()
            .is_some_and(|s| s.seq == latest.seq || cosine_distance(&s.signature, &latest.signature) <= threshold);
        if current {
            return;
        }
        // The features in `vision` are the latest frame's (it was the last encoded).
        let made = self
            .vision
            .project(&mut state.tokens)
            .map_err(StackError::from)
            .and_then(|_| Ok(self.backbone.set_scene(latest.seq, Some(&state.tokens))?));
        match made {
            Ok(_) => state.scene = Some(latest.clone()),
            Err(e) => tracing::error!("cannot make frame {} the scene: {e}", latest.seq),
        }
    }

    /// Renders an image for a generate job.
    fn render_request<A>(
        &mut self,
        job: &Job<A>,
        request: &GenerateJob,
        state: &mut State,
        stop: &Arc<AtomicBool>,
    ) -> Result<(Picture, RenderInfo), JobError> {
        let start = Instant::now();
        let generator = self.generator.as_ref().ok_or(JobError::NoGenerator)?;
        let spec = generator.spec()?.clone();
        let condition = request.condition.unwrap_or(generator.config().condition);
        let options = request.render.options(&spec, generator.limits(), clock_seed())?;
        if condition == ConditionPath::Hidden && spec.output_projector.is_none() {
            return Err(GeneratorError::NoOutputProjector.into());
        }
        let caption_prompt = self.settings().caption_prompt;
        let text = if request.from_scene {
            match &job.frame {
                Some(frame) => self.use_job_frame(frame, state)?,
                None if state.latest.is_none() => return Err(JobError::NoScene),
                None => self.make_current(state),
            }
            let options = self.options(stop);
            self.progress.llm_runs.fetch_add(1, Ordering::Relaxed);
            let description = self.backbone.describe(&caption_prompt, &options, &mut |_| true)?;
            match job.text.trim() {
                "" => description.text,
                extra => format!("{} {extra}", description.text),
            }
        } else {
            job.text.clone()
        };
        let on_demand = self.generator.as_mut().ok_or(JobError::NoGenerator)?;
        let (generator, load_ms) = on_demand.get()?;
        self.progress.beat();
        let rendered = render_description(&mut self.backbone, generator, condition, &caption_prompt, &text, &options)?;
        self.progress.beat();
        let picture = self.picture(&rendered.image)?;
        let steps_ms: f64 = rendered.timings.step_ms.iter().sum();
        let mut timings = vec![
            ("condition", rendered.timings.condition_ms),
            ("steps", steps_ms),
            ("vae", rendered.timings.vae_ms),
            ("total", ms_since(start)),
        ];
        if let Some(ms) = load_ms {
            timings.push(("load", ms));
        }
        let [height, width] = options.size;
        let info = RenderInfo {
            prompt: text,
            seed: options.seed,
            steps: options.steps,
            width,
            height,
            sampler: options.sampler.to_string(),
            warning: rendered.warning(),
            timings_ms: rounded(&timings),
        };
        Ok((picture, info))
    }

    /// Answers about the latest frame: its cached scene prefix when it is the current scene, else
    /// the latest frame is made the scene first.
    fn answer<A: Clone>(
        &mut self,
        job: Job<A>,
        stream: bool,
        state: &mut State,
        out: &Sender<Output<A>>,
        stop: &Arc<AtomicBool>,
    ) {
        let start = Instant::now();
        let to = job.reply.clone();
        let about = match &job.frame {
            Some(frame) => match self.use_job_frame(frame, state) {
                Ok(()) => Some((frame.seq, ts_ms(frame))),
                Err(error) => {
                    tracing::warn!("the job's frame: {error}");
                    let _ = out.blocking_send(Output::Failed { to, error });
                    return;
                }
            },
            None => {
                self.make_current(state);
                state.scene.as_ref().map(|s| (s.seq, s.ts_ms))
            }
        };
        let options = self.options(stop);
        let mut so_far = String::new();
        let progress = self.progress.clone();
        self.progress.llm_runs.fetch_add(1, Ordering::Relaxed);
        let result = self.backbone.ask(&job.text, &options, &mut |piece| {
            progress.beat();
            if stream {
                so_far.push_str(piece);
                let partial = Answer {
                    text: so_far.trim().to_owned(),
                    done: false,
                    guided: None,
                    frame_seq: None,
                    frame_ts_ms: None,
                    timings_ms: Timings::new(),
                };
                let _ = out.blocking_send(Output::Answer { to: to.clone(), answer: partial });
            }
            true
        });
        let output = match result {
            Ok(g) => {
                self.progress.answers.fetch_add(1, Ordering::Relaxed);
                let timings = rounded(&[
                    ("queue", (start - job.received_at).as_secs_f64() * 1e3),
                    ("prefill", g.prefill_ms),
                    ("decode", g.decode_ms),
                    ("ttft", g.ttft_ms),
                    ("total", ms_since(start)),
                ]);
                if let Some(guided) = &g.guided {
                    tracing::info!(
                        question = %job.text,
                        "the LLM answered {:?}; the {} guide ({}, score {:.3}) answered again begun with {:?}",
                        guided.written,
                        guided.guide.kind.as_str(),
                        guided.guide.category,
                        guided.guide.score,
                        guided.guide.start
                    );
                }
                let answer = Answer {
                    text: g.text,
                    done: true,
                    guided: g.guided.map(|g| g.guide.category),
                    frame_seq: about.map(|(seq, _)| seq),
                    frame_ts_ms: about.map(|(_, ts)| ts),
                    timings_ms: timings,
                };
                Output::Answer { to, answer }
            }
            Err(e) => {
                tracing::warn!(question = %job.text, "answering failed: {e}");
                Output::Failed { to, error: e.into() }
            }
        };
        let _ = out.blocking_send(output);
    }
}
