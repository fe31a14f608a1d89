//! The daemon: wires the frame source, the inference worker, MQTT and systemd together, and runs
//! until SIGTERM or SIGINT. SIGHUP re-reads the config and applies prompts and gating without
//! reloading models.
//!
//! Threads: a capture thread (source → [`FrameSlot`]), the inference worker (models), and a small
//! tokio runtime for MQTT, signals and the watchdog. Nothing CPU-heavy runs on the runtime.

mod systemd;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::cache;
use crate::camera::{self, CameraError, FrameSlot, FrameSource};
use crate::config::{Config, WatchdogConfig};
use crate::generate::OnDemand;
use crate::mqtt::{self, MqttError};
use crate::pipeline::{Pipeline, StackError};
use crate::worker::{Progress, RuntimeSettings, Worker};

pub use systemd::{logs_to_journal, watchdog_interval, Notifier};

/// An error that stops the daemon from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The model stack.
    #[error(transparent)]
    Stack(#[from] StackError),
    /// The frame source.
    #[error(transparent)]
    Camera(#[from] CameraError),
    /// MQTT.
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// A setting that does not fit the model stack.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Threads, signals, the runtime.
    #[error("{what}: {source}")]
    Runtime {
        /// What could not be started.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// The small tokio runtime for MQTT, signals and the watchdog (nothing CPU-heavy runs on it).
fn small_runtime() -> Result<tokio::runtime::Runtime, DaemonError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(runtime_err("tokio runtime"))
}

fn runtime_err(what: &'static str) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Runtime { what, source }
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

/// Tells the service manager, loads the model stack; returns them and the state directory.
fn load(config: &Config) -> Result<(Arc<Notifier>, Pipeline, PathBuf), DaemonError> {
    let notifier = Arc::new(Notifier::from_env());
    notifier.status("loading models");
    let manifest = config.manifest().map_err(StackError::from)?;
    let pipeline = Pipeline::load(manifest, &config.cache_root(), &config.onnx, &config.llm)?;
    let state_dir = config.state_dir.clone().unwrap_or_else(crate::config::default_state_dir);
    Ok((notifier, pipeline, state_dir))
}

/// Runs the daemon. `config_path` is re-read on SIGHUP.
pub fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), DaemonError> {
    let (notifier, pipeline, state_dir) = load(&config)?;
    let manifest = pipeline.manifest.clone();
    let config = config.with_objects(&manifest)?;
    let source = camera::open(&config.camera, &cache::models_dir(&pipeline.cache_root))?;

    let stop = Arc::new(AtomicBool::new(false));
    let slot = Arc::new(FrameSlot::new());
    let (capture_slot, capture_stop) = (slot.clone(), stop.clone());
    // The capture thread is not joined at shutdown: it may sit in a camera read or a slideshow
    // pause, and holds nothing that needs flushing.
    std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || capture(source, capture_slot, capture_stop))
        .map_err(runtime_err("capture thread"))?;

    let tokio_rt = small_runtime()?;
    tokio_rt.block_on(async move {
        let (questions_tx, questions_rx) = std::sync::mpsc::sync_channel(config.mqtt.request_queue);
        let settings = Arc::new(RwLock::new(config.runtime_settings()));
        let mqtt = mqtt::start(&config.mqtt, &config.offload, &state_dir, questions_tx, settings.clone(), &manifest.name, mqtt::RequestSettings::new(&config.llm, &config.generator))?;
        let progress = Arc::new(Progress::default());
        // The generator is loaded on the first request that needs it, not here.
        let worker = inference_worker(&config, pipeline, slot.clone(), settings.clone(), progress.clone(), config.offload.kinds.clone());
        let (out, worker_stop) = (mqtt.results.clone(), stop.clone());
        let worker_thread = std::thread::Builder::new().name("inference".into()).spawn(move || worker.run(questions_rx, out, worker_stop)).map_err(runtime_err("inference thread"))?;

        // READY=1 once the models are loaded (above) and the first frame is in.
        notifier.status("waiting for the first frame");
        while slot.age().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(prefix = mqtt.topics.prefix(), broker = %format!("{}:{}", config.mqtt.host, config.mqtt.port), "scenecast running");
        notifier.ready(&format!("running: {} on {}", manifest.name, mqtt.topics.prefix()));

        let running = Running { notifier, frames: Some(slot), progress, watchdog: config.watchdog.clone(), stop, worker_thread, mqtt };
        running.until_stopped(config_path, settings).await;
        Ok(())
    })
}

/// `scenecast worker`: the model stack without a camera, serving jobs that cameras offload
/// (`[offload]`) from MQTT v5 shared subscriptions, until SIGTERM or SIGINT. Each job is
/// acknowledged to the broker only once its result is published.
pub fn run_worker(config: Config) -> Result<(), DaemonError> {
    let (notifier, pipeline, state_dir) = load(&config)?;
    let manifest = pipeline.manifest.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let tokio_rt = small_runtime()?;
    tokio_rt.block_on(async move {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel(config.mqtt.request_queue);
        let requests = mqtt::RequestSettings::new(&config.llm, &config.generator);
        let mqtt = mqtt::start_worker(&config.mqtt, &config.offload, &state_dir, jobs_tx, &manifest.name, requests)?;
        let progress = Arc::new(Progress::default());
        // No camera: the frame slot stays empty, so the worker only runs jobs, each about its own frame.
        let settings = Arc::new(RwLock::new(config.runtime_settings()));
        let worker = inference_worker(&config, pipeline, Arc::new(FrameSlot::new()), settings, progress.clone(), Vec::new());
        let (out, worker_stop) = (mqtt.results.clone(), stop.clone());
        let worker_thread = std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || worker.run(jobs_rx, out, worker_stop))
            .map_err(runtime_err("inference thread"))?;
        let kinds: Vec<&str> = config.offload.serve.iter().map(|k| k.as_str()).collect();
        tracing::info!(kinds = ?kinds, group = %config.offload.share_group, jobs = %config.offload.jobs_prefix, "scenecast worker running");
        notifier.ready(&format!("worker: {} serving {}", manifest.name, kinds.join(", ")));
        let running = Running { notifier, frames: None, progress, watchdog: config.watchdog.clone(), stop, worker_thread, mqtt };
        running.until_stopped(None, Arc::new(RwLock::new(config.runtime_settings()))).await;
        Ok(())
    })
}

/// A started daemon or worker: what it takes to watch it and to stop it.
struct Running {
    notifier: Arc<Notifier>,
    /// The camera's frames (none for a worker).
    frames: Option<Arc<FrameSlot>>,
    progress: Arc<Progress>,
    watchdog: WatchdogConfig,
    stop: Arc<AtomicBool>,
    worker_thread: std::thread::JoinHandle<()>,
    mqtt: mqtt::MqttHandle,
}

impl Running {
    /// Pings the watchdog and applies SIGHUP until SIGTERM or SIGINT; then stops the inference
    /// thread (waiting at most 10 s) and shuts MQTT down cleanly.
    async fn until_stopped(self, config_path: Option<PathBuf>, settings: Arc<RwLock<RuntimeSettings>>) {
        let Running { notifier, frames, progress, watchdog, stop, worker_thread, mqtt } = self;
        let watchdog = tokio::spawn(watchdog_loop(notifier.clone(), frames, progress, watchdog));
        let signals = wait_for_stop(config_path, settings, notifier.clone()).await;
        watchdog.abort();
        notifier.stopping(&format!("stopping ({signals})"));
        stop.store(true, Ordering::SeqCst);
        let joined = tokio::task::spawn_blocking(move || worker_thread.join());
        if tokio::time::timeout(Duration::from_secs(10), joined).await.is_err() {
            tracing::warn!("the inference worker did not stop within 10 s");
        }
        mqtt.shutdown(Duration::from_secs(5)).await;
    }
}

/// The inference worker over the loaded stack. The generator is loaded by the first request that
/// needs it, not here.
fn inference_worker(
    config: &Config,
    pipeline: Pipeline,
    frames: Arc<FrameSlot>,
    settings: Arc<RwLock<RuntimeSettings>>,
    progress: Arc<Progress>,
    offload: Vec<crate::worker::OffloadKind>,
) -> Worker {
    let Pipeline { manifest, cache_root, runtime, backbone, vision } = pipeline;
    let generator = (manifest.generator.is_some() && config.generator.enabled)
        .then(|| OnDemand::new(runtime, manifest.clone(), cache_root, config.generator.clone()));
    Worker {
        vision,
        backbone,
        frames,
        settings,
        progress,
        model: manifest.name.clone(),
        generator,
        privacy: config.privacy.clone(),
        image_format: config.generator.format,
        offload,
    }
}

/// Pings the watchdog only while frames are fresh (when there is a camera) and the worker makes
/// progress; refreshes `STATUS=` with counters.
async fn watchdog_loop(
    notifier: Arc<Notifier>,
    slot: Option<Arc<FrameSlot>>,
    progress: Arc<Progress>,
    limits: WatchdogConfig,
) {
    let interval = watchdog_interval().map_or(Duration::from_secs(10), |w| w / 2);
    let mut tick = tokio::time::interval(interval);
    let mut last_status = Instant::now();
    loop {
        tick.tick().await;
        let frame_age = slot.as_ref().map_or(Duration::ZERO, |s| s.age().unwrap_or(Duration::MAX));
        let stalled = progress.stalled_for();
        let fresh = frame_age <= Duration::from_secs_f64(limits.max_frame_age_s);
        let alive = stalled <= Duration::from_secs_f64(limits.max_stall_s);
        if fresh && alive {
            notifier.watchdog();
        } else {
            let why = if fresh {
                format!("the worker made no progress for {stalled:.0?}")
            } else {
                format!("no frame for {frame_age:.0?}")
            };
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
async fn wait_for_stop(
    config_path: Option<PathBuf>,
    settings: Arc<RwLock<RuntimeSettings>>,
    notifier: Arc<Notifier>,
) -> &'static str {
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
            let new = config.runtime_settings();
            let mut current = crate::util::write(settings);
            if *current != new {
                tracing::info!(prompt = %new.caption_prompt, threshold = new.gate.change_threshold, "SIGHUP: applied prompts and scene gating");
                *current = new;
            } else {
                tracing::info!("SIGHUP: nothing to apply");
            }
            tracing::info!("model, MQTT and camera settings apply on restart");
        }
        // A broken file keeps the running settings: a typo must not take the camera down.
        Err(e) => tracing::error!("SIGHUP: keeping the running settings: {e}"),
    }
}
