//! The inference worker: one thread that owns the models. It takes the newest frame from the
//! [`FrameSlot`], encodes it, lets the [`SceneGate`] decide whether the scene changed, captions
//! changed scenes, and answers questions about the latest frame — questions first. Results go to
//! the MQTT side as [`Outgoing`] values.

pub mod gate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use tokio::sync::mpsc::Sender;

use crate::backbone::{Backbone, StopReason};
use crate::config::{ConditionPath, PrivacyConfig};
use crate::frame::Frame;
use crate::generator::{encode_image, Conditioning, Generator, GeneratorError, ImageFormat, OnDemand, RenderOptions, Rendered};
use crate::mqtt::{Outgoing, Question, Task};
use crate::projector::ImageTokens;
use crate::scene::{cosine_distance, SceneGate};
use crate::source::FrameSlot;
use crate::vision::Vision;
use crate::wire::{self, Reply, RequestError};

pub use crate::wire::RuntimeSettings;

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
        Progress { heartbeat: Mutex::new(Instant::now()), frames: AtomicU64::new(0), llm_runs: AtomicU64::new(0), captions: AtomicU64::new(0), answers: AtomicU64::new(0) }
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
    /// The format of images on the image topic.
    pub image_format: ImageFormat,
}

/// Renders `text` with the generator: through the text encoder, or (`ConditionPath::Hidden`)
/// through the LLM's hidden states at the manifest's signal tokens and the output projector.
/// `question` is the prompt the description answers (the caption prompt).
pub fn render_description(
    backbone: &mut Backbone,
    generator: &mut Generator,
    condition: ConditionPath,
    question: &str,
    text: &str,
    options: &RenderOptions,
) -> Result<Rendered, Box<dyn std::error::Error + Send + Sync>> {
    match condition {
        ConditionPath::Text => Ok(generator.render(Conditioning::Prompt(text), options)?),
        ConditionPath::Hidden => {
            let signal = generator.spec().output_projector.as_ref().ok_or(GeneratorError::NoOutputProjector)?.signal.clone();
            let states = backbone.signal_states(question, text, &signal)?;
            let n_embd = backbone.summary().gguf.n_embd;
            Ok(generator.render(Conditioning::Hidden { states: &states, n_embd }, options)?)
        }
    }
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

fn rounded(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (v * 10.0).round() / 10.0)).collect()
}

impl Worker {
    fn settings(&self) -> RuntimeSettings {
        self.settings.read().map(|s| s.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Runs until `stop` is set or the question channel closes.
    pub fn run(mut self, questions: Receiver<Question>, out: Sender<Outgoing>, stop: Arc<AtomicBool>) {
        let mut gate = SceneGate::new();
        let mut tokens = ImageTokens::default();
        let mut latest: Option<Seen> = None;
        let mut scene: Option<Seen> = None;
        while !stop.load(Ordering::SeqCst) {
            self.progress.beat();
            if let Some(g) = self.generator.as_mut() {
                g.unload_if_idle();
            }
            match questions.recv_timeout(Duration::from_millis(20)) {
                Ok(question) => {
                    match question.task.clone() {
                        Task::Answer { stream } => self.answer(question, stream, latest.as_ref(), &mut scene, &mut tokens, &out, &stop),
                        Task::Generate(request) => self.generate(question, &request, latest.as_ref(), &mut scene, &mut tokens, &out, &stop),
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
            let mut signature = latest.take().map(|seen| seen.signature).unwrap_or_default();
            self.vision.signature(&mut signature);
            let settings = self.settings();
            let now = Instant::now();
            let decision = gate.decide(&settings.gate, &signature, now);
            let seen = latest.insert(Seen { seq: frame.seq, ts_ms: ts_ms(&frame), signature });
            tracing::debug!(frame = frame.seq, ?decision, "scene gate");
            if !decision.caption() {
                continue;
            }
            match self.caption(&frame, &settings.caption_prompt, &mut tokens, &stop, start, encoded) {
                Ok(caption) => {
                    gate.captioned(&seen.signature, now);
                    scene = Some(seen.clone());
                    self.progress.captions.fetch_add(1, Ordering::Relaxed);
                    let picture = self.scene_picture(&frame, &caption.text, &settings.caption_prompt);
                    if out.blocking_send(Outgoing::Caption(caption)).is_err() {
                        break;
                    }
                    if let Some(picture) = picture {
                        let _ = out.blocking_send(picture);
                    }
                }
                Err(e) => tracing::error!(frame = frame.seq, "captioning failed: {e}"),
            }
        }
    }

    fn options(&self, stop: &Arc<AtomicBool>) -> crate::backbone::GenerateOptions {
        crate::backbone::GenerateOptions { cancel: Some(stop.clone()), ..self.backbone.default_options() }
    }

    fn caption(
        &mut self,
        frame: &Frame,
        prompt: &str,
        tokens: &mut ImageTokens,
        stop: &Arc<AtomicBool>,
        start: Instant,
        encoded: crate::encoder::EncodeTimings,
    ) -> Result<wire::Caption, Box<dyn std::error::Error>> {
        let project_ms = self.vision.project(tokens)?;
        let prefill_ms = self.backbone.set_scene(frame.seq, Some(tokens))?;
        let options = self.options(stop);
        let progress = self.progress.clone();
        self.progress.llm_runs.fetch_add(1, Ordering::Relaxed);
        let g = self.backbone.ask(prompt, &options, &mut |_| {
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
            ("total", crate::ms_since(start)),
        ]);
        tracing::info!(frame = frame.seq, total_ms = timings["total"], "caption: {}", g.text);
        Ok(wire::Caption { text: g.text, frame_seq: frame.seq, frame_ts_ms: ts_ms(frame), timings_ms: timings, model: self.model.clone() })
    }

    /// What the image topic gets for a new caption: the frame itself (unless privacy forbids
    /// camera pixels), or a re-rendering of the caption (privacy with `rerender_captions`).
    fn scene_picture(&mut self, frame: &Frame, caption: &str, prompt: &str) -> Option<Outgoing> {
        let bytes = if !self.privacy.no_camera_pixels {
            encode_image(&frame.image, self.image_format).map_err(|e| tracing::warn!("snapshot: {e}")).ok()?
        } else if self.privacy.rerender_captions {
            let generator = self.generator.as_mut()?;
            let spec = generator.spec().ok()?.clone();
            let condition = generator.config().condition;
            let (g, _) = generator.get().map_err(|e| tracing::warn!("re-rendering the caption: {e}")).ok()?;
            let options = Generator::default_options(&spec, frame.seq);
            let rendered = render_description(&mut self.backbone, g, condition, prompt, caption, &options).map_err(|e| tracing::warn!("re-rendering the caption: {e}")).ok()?;
            encode_image(&rendered.image, self.image_format).ok()?
        } else {
            return None;
        };
        Some(Outgoing::Image { to: None, bytes, content_type: self.image_format.content_type(), info: None })
    }

    /// Makes the latest frame the cached scene unless the current scene still shows it.
    fn make_current(&mut self, latest: Option<&Seen>, scene: &mut Option<Seen>, tokens: &mut ImageTokens) {
        let threshold = self.settings().gate.change_threshold;
        if let Some(latest) = latest {
            let current = scene.as_ref().is_some_and(|s| s.seq == latest.seq || cosine_distance(&s.signature, &latest.signature) <= threshold);
            if !current {
                // The features in `vision` are the latest frame's (it was the last encoded).
                let made = self.vision.project(tokens).map_err(|e| e.to_string()).and_then(|_| self.backbone.set_scene(latest.seq, Some(tokens)).map_err(|e| e.to_string()));
                match made {
                    Ok(_) => *scene = Some(latest.clone()),
                    Err(e) => tracing::error!("cannot make frame {} the scene: {e}", latest.seq),
                }
            }
        }
    }

    /// Renders an image for a `generate` request; the image or an error goes to the requester.
    #[allow(clippy::too_many_arguments)]
    fn generate(&mut self, question: Question, request: &wire::GenerateRequest, latest: Option<&Seen>, scene: &mut Option<Seen>, tokens: &mut ImageTokens, out: &Sender<Outgoing>, stop: &Arc<AtomicBool>) {
        if question.expired(Instant::now()) {
            let _ = out.blocking_send(Outgoing::Expired);
            return;
        }
        let to = question.reply.clone();
        let id = to.id.clone();
        let message = match self.render_request(&question, request, latest, scene, tokens, stop) {
            Ok((bytes, info)) => Outgoing::Image { to: Some(to), bytes, content_type: self.image_format.content_type(), info: Some(info) },
            Err(e) => {
                tracing::warn!(code = e.code(), "generate request failed: {e}");
                Outgoing::Reply { to, reply: Reply::Error(wire::ErrorReply::new(id, &e)) }
            }
        };
        let _ = out.blocking_send(message);
    }

    fn render_request(
        &mut self,
        question: &Question,
        request: &wire::GenerateRequest,
        latest: Option<&Seen>,
        scene: &mut Option<Seen>,
        tokens: &mut ImageTokens,
        stop: &Arc<AtomicBool>,
    ) -> Result<(Vec<u8>, wire::ImageInfo), RequestError> {
        let start = Instant::now();
        let unavailable = |e: GeneratorError| RequestError::Unavailable(e.to_string());
        let generator = self.generator.as_ref().ok_or_else(|| RequestError::Unavailable("no generator is configured: the model manifest has no [generator] section".into()))?;
        let spec = generator.spec().map_err(unavailable)?.clone();
        let limits = generator.limits();
        let condition = request.condition.unwrap_or(generator.config().condition);
        let mut options = Generator::default_options(&spec, request.seed.unwrap_or_else(clock_seed));
        options.steps = request.steps.unwrap_or(options.steps);
        options.size = [request.height.unwrap_or(options.size[0]), request.width.unwrap_or(options.size[1])];
        options.guidance = request.guidance.unwrap_or(options.guidance);
        Generator::check(&spec, &options, limits).map_err(|e| RequestError::OutOfRange(e.to_string()))?;
        if condition == ConditionPath::Hidden && spec.output_projector.is_none() {
            return Err(RequestError::Unavailable(GeneratorError::NoOutputProjector.to_string()));
        }
        let caption_prompt = self.settings().caption_prompt;
        let text = if request.from_scene {
            if latest.is_none() {
                return Err(RequestError::Unavailable("no frame has been seen yet, so there is no scene to describe".into()));
            }
            self.make_current(latest, scene, tokens);
            let options = self.options(stop);
            self.progress.llm_runs.fetch_add(1, Ordering::Relaxed);
            let description = self.backbone.ask(&caption_prompt, &options, &mut |_| true).map_err(|e| RequestError::Internal(e.to_string()))?;
            match question.text.trim() {
                "" => description.text,
                extra => format!("{} {extra}", description.text),
            }
        } else {
            question.text.clone()
        };
        let on_demand = self.generator.as_mut().expect("checked above");
        let (generator, load_ms) = on_demand.get().map_err(|e| match e {
            GeneratorError::Memory { .. } | GeneratorError::Disabled | GeneratorError::NotConfigured(_) => RequestError::Unavailable(e.to_string()),
            e => RequestError::Internal(e.to_string()),
        })?;
        self.progress.beat();
        let rendered = render_description(&mut self.backbone, generator, condition, &caption_prompt, &text, &options).map_err(|e| RequestError::Internal(e.to_string()))?;
        self.progress.beat();
        let bytes = encode_image(&rendered.image, self.image_format).map_err(|e| RequestError::Internal(e.to_string()))?;
        let warning = (rendered.truncated_tokens > 0).then(|| {
            format!("the prompt was cut to the tokenizer's limit of {} tokens ({} tokens dropped)", spec.context_tokens, rendered.truncated_tokens)
        });
        let steps_ms: f64 = rendered.timings.step_ms.iter().sum();
        let mut timings = vec![
            ("condition", rendered.timings.condition_ms),
            ("steps", steps_ms),
            ("vae", rendered.timings.vae_ms),
            ("total", crate::ms_since(start)),
        ];
        if let Some(ms) = load_ms {
            timings.push(("load", ms));
        }
        let info = wire::ImageInfo {
            id: question.reply.id.clone(),
            prompt: text,
            seed: options.seed,
            steps: options.steps,
            size: options.size,
            sampler: options.sampler.to_string(),
            warning,
            timings_ms: rounded(&timings),
        };
        Ok((bytes, info))
    }

    /// Answers about the latest frame: its cached scene prefix when it is the current scene, else
    /// the latest frame is made the scene first.
    #[allow(clippy::too_many_arguments)]
    fn answer(&mut self, question: Question, stream: bool, latest: Option<&Seen>, scene: &mut Option<Seen>, tokens: &mut ImageTokens, out: &Sender<Outgoing>, stop: &Arc<AtomicBool>) {
        if question.expired(Instant::now()) {
            tracing::warn!(question = %question.text, "request expired while queued; not answered");
            let _ = out.blocking_send(Outgoing::Expired);
            return;
        }
        let start = Instant::now();
        let to = question.reply.clone();
        let id = to.id.clone();
        self.make_current(latest, scene, tokens);
        let options = self.options(stop);
        let mut so_far = String::new();
        let progress = self.progress.clone();
        self.progress.llm_runs.fetch_add(1, Ordering::Relaxed);
        let result = self.backbone.ask(&question.text, &options, &mut |piece| {
            progress.beat();
            if stream {
                so_far.push_str(piece);
                let partial = wire::Answer { id: id.clone(), text: so_far.trim().to_owned(), done: false, frame_seq: None, frame_ts_ms: None, timings_ms: BTreeMap::new() };
                let _ = out.blocking_send(Outgoing::Reply { to: to.clone(), reply: Reply::Answer(partial) });
            }
            true
        });
        let about = scene.as_ref();
        let reply = match result {
            Ok(g) => {
                self.progress.answers.fetch_add(1, Ordering::Relaxed);
                let timings = rounded(&[
                    ("queue", (start - question.received_at).as_secs_f64() * 1e3),
                    ("prefill", g.prefill_ms),
                    ("decode", g.decode_ms),
                    ("ttft", g.ttft_ms),
                    ("total", crate::ms_since(start)),
                ]);
                Reply::Answer(wire::Answer { id, text: g.text, done: true, frame_seq: about.map(|s| s.seq), frame_ts_ms: about.map(|s| s.ts_ms), timings_ms: timings })
            }
            Err(e) => Reply::Error(wire::ErrorReply::new(id, &RequestError::Internal(e.to_string()))),
        };
        let _ = out.blocking_send(Outgoing::Reply { to, reply });
    }
}
