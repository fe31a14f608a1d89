//! The daemon: wires the frame source, the inference worker, MQTT and systemd together, and runs
//! until SIGTERM or SIGINT. SIGHUP re-reads the config and applies prompts and gating without
//! reloading models.
//!
//! Threads: a capture thread (source → [`FrameSlot`]), the inference worker (models), and a small
//! tokio runtime for MQTT, signals and the watchdog. Nothing CPU-heavy runs on the runtime.

pub mod systemd;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::backbone::{Backbone, EngineError};
use crate::config::{Config, ConfigError};
use crate::encoder::VisionError;
use crate::manifest::ManifestError;
use crate::mqtt::MqttError;
use crate::onnx::{OnnxError, OnnxRuntime};
use crate::source::{FrameSlot, FrameSource, SourceError};
use crate::systemd::Notifier;
use crate::vision::Vision;
use crate::worker::{Progress, Worker, RuntimeSettings};

/// An error that stops the daemon from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The model manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// ONNX Runtime.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The vision models.
    #[error(transparent)]
    Vision(#[from] VisionError),
    /// The LLM.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The frame source.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// MQTT.
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// Threads, signals, the runtime.
    #[error("{0}")]
    Runtime(String),
}

fn runtime_err(what: &str) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |e| DaemonError::Runtime(format!("{what}: {e}"))
}

fn worker_settings(config: &Config) -> RuntimeSettings {
    RuntimeSettings { caption_prompt: config.llm.caption_prompt.clone(), gate: config.scene.clone() }
}


fn open_source(config: &Config) -> Result<Box<dyn FrameSource>, DaemonError> {
    Ok(match &config.camera.v4l2 {
        Some(v4l2) => Box::new(crate::camera::V4l2Source::new(v4l2.clone())),
        None => {
            let path = config.camera.path.clone().unwrap_or_else(|| crate::cache::models_dir(&config.cache_root()).join("photos"));
            Box::new(crate::source::Slideshow::open(&path, Duration::from_secs_f64(config.camera.interval_s))?)
        }
    })
}

/// Pulls frames into the slot until `stop`; failures are logged (once per kind of failure in a
/// row) and retried after a pause.
fn capture(mut source: Box<dyn FrameSource>, slot: Arc<FrameSlot>, stop: Arc<AtomicBool>) {
    let mut last_error = String::new();
    while !stop.load(Ordering::SeqCst) {
        match source.next_frame() {
            Ok(frame) => {
                last_error.clear();
                slot.put(frame);
            }
            Err(e) => {
                let message = e.to_string();
                if message != last_error {
                    tracing::warn!("frame source: {message}");
                    last_error = message;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// Runs the daemon. `config_path` is re-read on SIGHUP.
pub fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), DaemonError> {
    let notifier = Arc::new(Notifier::from_env());
    notifier.status("loading models");
    let root = config.cache_root();
    let manifest = config.manifest()?;
    let runtime = OnnxRuntime::init(&config.onnx, &root)?;
    let backbone = Backbone::load(&manifest, &root, &config.llm)?;
    let vision = Vision::load(&runtime, &manifest, &root, Some(&backbone.summary().gguf))?;
    let source = open_source(&config)?;
    let state_dir = config.state_dir.clone().unwrap_or_else(crate::config::default_state_dir);

    let stop = Arc::new(AtomicBool::new(false));
    let slot = Arc::new(FrameSlot::new());
    let (capture_slot, capture_stop) = (slot.clone(), stop.clone());
    // The capture thread is not joined at shutdown: it may sit in a camera read or a slideshow
    // pause, and holds nothing that needs flushing.
    std::thread::Builder::new().name("capture".into()).spawn(move || capture(source, capture_slot, capture_stop)).map_err(runtime_err("capture thread"))?;

    let tokio_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(runtime_err("tokio runtime"))?;
    tokio_rt.block_on(async move {
        let (questions_tx, questions_rx) = std::sync::mpsc::sync_channel(config.mqtt.request_queue);
        let settings = Arc::new(RwLock::new(worker_settings(&config)));
        let mqtt = crate::mqtt::start(&config.mqtt, &state_dir, questions_tx, settings.clone(), &manifest.name, crate::mqtt::RequestSettings::from_config(&config))?;
        let progress = Arc::new(Progress::default());
        // The generator is loaded on the first request that needs it, not here.
        let generator = (manifest.generator.is_some() && config.generator.enabled)
            .then(|| crate::generator::OnDemand::new(runtime.clone(), manifest.clone(), root.clone(), config.generator.clone()));
        let worker = Worker {
            vision,
            backbone,
            frames: slot.clone(),
            settings: settings.clone(),
            progress: progress.clone(),
            model: manifest.name.clone(),
            generator,
            privacy: config.privacy.clone(),
            image_format: config.generator.format,
        };
        let (out, worker_stop) = (mqtt.outgoing.clone(), stop.clone());
        let worker_thread = std::thread::Builder::new().name("inference".into()).spawn(move || worker.run(questions_rx, out, worker_stop)).map_err(runtime_err("inference thread"))?;

        // READY=1 once the models are loaded (above) and the first frame is in.
        notifier.status("waiting for the first frame");
        while slot.age().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(prefix = mqtt.topics.prefix(), broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port), "scenecast running");
        notifier.ready(&format!("running: {} on {}", manifest.name, mqtt.topics.prefix()));

        let watchdog = tokio::spawn(watchdog_loop(notifier.clone(), slot.clone(), progress.clone(), config.watchdog.clone()));
        let signals = wait_for_stop(config_path, settings, notifier.clone()).await;
        watchdog.abort();
        notifier.stopping(&format!("stopping ({signals})"));
        stop.store(true, Ordering::SeqCst);
        let joined = tokio::task::spawn_blocking(move || worker_thread.join());
        if tokio::time::timeout(Duration::from_secs(10), joined).await.is_err() {
            tracing::warn!("the inference worker did not stop within 10 s");
        }
        mqtt.shutdown(Duration::from_secs(5)).await;
        Ok(())
    })
}

/// Pings the watchdog only while frames are fresh and the worker makes progress; refreshes
/// `STATUS=` with counters.
async fn watchdog_loop(notifier: Arc<Notifier>, slot: Arc<FrameSlot>, progress: Arc<Progress>, limits: crate::config::WatchdogConfig) {
    let interval = crate::systemd::watchdog_interval().map_or(Duration::from_secs(10), |w| w / 2);
    let mut tick = tokio::time::interval(interval);
    let mut last_status = Instant::now();
    loop {
        tick.tick().await;
        let frame_age = slot.age().unwrap_or(Duration::MAX);
        let stalled = progress.stalled_for();
        let fresh = frame_age <= Duration::from_secs_f64(limits.max_frame_age_s);
        let alive = stalled <= Duration::from_secs_f64(limits.max_stall_s);
        if fresh && alive {
            notifier.watchdog();
        } else {
            let why = if fresh { format!("the worker made no progress for {stalled:.0?}") } else { format!("no frame for {frame_age:.0?}") };
            tracing::warn!("watchdog withheld: {why}");
            notifier.status(&format!("unhealthy: {why}"));
        }
        if last_status.elapsed() >= Duration::from_secs(10) && fresh && alive {
            last_status = Instant::now();
            notifier.status(&format!(
                "running: {} frames, {} captions, {} answers",
                progress.frames.load(Ordering::Relaxed),
                progress.captions.load(Ordering::Relaxed),
                progress.answers.load(Ordering::Relaxed)
            ));
        }
    }
}

/// Waits for SIGTERM or SIGINT; applies SIGHUP reloads meanwhile. Returns the signal's name.
async fn wait_for_stop(config_path: Option<PathBuf>, settings: Arc<RwLock<RuntimeSettings>>, notifier: Arc<Notifier>) -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
        tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = tokio::signal::ctrl_c() => return "SIGINT",
            _ = hup.recv() => {
                notifier.reloading();
                reload(config_path.as_deref(), &settings);
                notifier.ready("running (config reloaded)");
            }
        }
    }
}

fn reload(config_path: Option<&std::path::Path>, settings: &Arc<RwLock<RuntimeSettings>>) {
    let Some(path) = config_path else {
        tracing::warn!("SIGHUP: no config file to reload (started without --config)");
        return;
    };
    match Config::load(path) {
        Ok(config) => {
            let new = worker_settings(&config);
            if let Ok(mut current) = settings.write() {
                if *current != new {
                    tracing::info!(prompt = %new.caption_prompt, threshold = new.gate.change_threshold, "SIGHUP: applied prompts and scene gating");
                    *current = new;
                } else {
                    tracing::info!("SIGHUP: nothing to apply");
                }
            }
            tracing::info!("model, MQTT and camera settings apply on restart");
        }
        // A broken file keeps the running settings: a typo must not take the camera down.
        Err(e) => tracing::error!("SIGHUP: keeping the running settings: {e}"),
    }
}
