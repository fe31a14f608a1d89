//! The daemon as systemd runs it: sd_notify datagrams on a test NOTIFY_SOCKET, the watchdog that
//! stops when frames stop, SIGTERM and SIGHUP; and the worker's scene gating on real frames.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use scenecast::camera::FrameSlot;
use scenecast::frame::Frame;
use scenecast::llm::Backbone;
use scenecast::llm::LlmConfig;
use scenecast::vision::Vision;
use scenecast::worker::GateConfig;
use scenecast::worker::{Progress, RuntimeSettings, Worker};

const WAIT: Duration = Duration::from_secs(60);

/// The daemon binary under a fake service manager.
struct Service {
    child: std::process::Child,
    notify: UnixDatagram,
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts `scenecast run` with `config` (TOML), a notify socket and a 1 s watchdog.
    fn start(dir: tempfile::TempDir, config: &str) -> Service {
        let socket_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&socket_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let config_path = write_temp(dir.path(), "scenecast.toml", config.as_bytes());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_scenecast"))
            .args(["--config", config_path.to_str().unwrap(), "run"])
            .env_remove("ORT_DYLIB_PATH")
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "1000000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Service { child, notify, _dir: dir }
    }

    fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("scenecast.toml")
    }

    /// Discards the datagrams already queued.
    fn drain(&self) {
        self.notify.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        while self.notify.recv(&mut buf).is_ok() {}
        self.notify.set_nonblocking(false).unwrap();
        self.notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    }

    /// Datagrams received within `window`.
    fn collect(&self, window: Duration) -> Vec<String> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }

    /// Waits for a datagram that starts with `prefix`; returns all seen up to it.
    fn wait_for(&self, prefix: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.starts_with(prefix);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
        }
        panic!("no {prefix:?} within {timeout:?}; saw {seen:?}");
    }

    fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn service_config(dir: &Path, broker_port: u16, device: &str, frames: &Path, extra: &str) -> String {
    format!(
        "state_dir = {:?}\n[mqtt]\nport = {broker_port}\ndevice = {device:?}\n[camera]\npath = {:?}\ninterval_s = 0.3\n[llm]\nthreads = 1\nmax_tokens = 24\n[watchdog]\nmax_frame_age_s = 2.0\n{extra}",
        dir.display().to_string(),
        frames.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_watchdog_that_stops_with_the_frames_and_stopping() {
    let broker = Broker::start();
    let mut watcher = TestClient::connect(broker.port, "watch-d1", &["scenecast/svc1/status"]).await;
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    std::fs::copy(cache_root().join("models/photos/coffee.png"), frames.join("a.png")).unwrap();
    let config = service_config(dir.path(), broker.port, "svc1", &frames, "");
    let service = Service::start(dir, &config);

    let before_ready = service.wait_for("READY=1", WAIT);
    assert!(before_ready.iter().any(|m| m.starts_with("STATUS=loading models")), "{before_ready:?}");
    assert!(before_ready.last().unwrap().contains("STATUS=running"), "{before_ready:?}");
    assert!(!before_ready.iter().any(|m| m == "WATCHDOG=1"), "no watchdog ping before READY");
    let pings = service.collect(Duration::from_secs(2)).iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pings >= 2, "{pings} watchdog pings in 2 s with fresh frames");

    // The camera dies: no more frames, so after max_frame_age_s the pings stop.
    std::fs::remove_file(frames.join("a.png")).unwrap();
    std::thread::sleep(Duration::from_millis(3000));
    service.drain();
    let late = service.collect(Duration::from_secs(2));
    assert!(!late.iter().any(|m| m == "WATCHDOG=1"), "pings went on without frames: {late:?}");
    assert!(late.iter().any(|m| m.contains("unhealthy: no frame for")), "{late:?}");

    assert_eq!(watcher.next_on("scenecast/svc1/status", WAIT).await.unwrap().payload, b"online");
    let start = Instant::now();
    service.signal("-TERM");
    let stopping = service.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(stopping.last().unwrap().contains("STATUS=stopping (SIGTERM)"), "{stopping:?}");
    let mut service = service;
    let status = service.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(start.elapsed() < Duration::from_secs(15), "stopped within the deadline");
    assert_eq!(watcher.next_on("scenecast/svc1/status", WAIT).await.unwrap().payload, b"stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_caption_prompt() {
    let broker = Broker::start();
    let mut watcher = TestClient::connect(broker.port, "watch-d2", &["scenecast/svc2/caption"]).await;
    let dir = tempfile::tempdir().unwrap();
    let photo = cache_root().join("models/photos/rocket.jpg");
    // A still image, re-captioned every 2 s (max_interval_s) so the new prompt shows quickly.
    let gating = "[scene]\nmin_interval_s = 0.0\nmax_interval_s = 2.0\n";
    let config = service_config(dir.path(), broker.port, "svc2", &photo, gating);
    let service = Service::start(dir, &config);
    service.wait_for("READY=1", WAIT);
    let first = watcher.next_on("scenecast/svc2/caption", WAIT).await.expect("a first caption");
    assert!(!first.json()["text"].as_str().unwrap().contains("Paris"));

    let reloaded = config.replace("[llm]\n", "[llm]\ncaption_prompt = \"What is the capital of France?\"\n");
    std::fs::write(service.config_path(), reloaded).unwrap();
    service.signal("-HUP");
    let reload = service.wait_for("READY=1", Duration::from_secs(10));
    assert!(reload.iter().any(|m| m == "RELOADING=1"), "{reload:?}");
    let deadline = Instant::now() + WAIT;
    loop {
        let caption = watcher.next_on("scenecast/svc2/caption", WAIT).await.expect("captions go on");
        if caption.json()["text"].as_str().unwrap().contains("Paris") {
            break;
        }
        assert!(Instant::now() < deadline, "the new prompt was not applied");
    }
}

fn frame(seq: u64, name: &str) -> Frame {
    Frame { seq, captured_at: SystemTime::now(), image: photo(name) }
}

#[test]
fn an_unchanged_scene_runs_the_llm_once_and_a_change_triggers_a_caption() {
    let m = manifest();
    let backbone =
        Backbone::load(&m, &cache_root(), &LlmConfig { threads: 1, max_tokens: 8, ..LlmConfig::default() }).unwrap();
    let vision = Vision::load(&runtime(), &m, &cache_root(), Some(backbone.summary().gguf.llm_width())).unwrap();
    let slot = Arc::new(FrameSlot::new());
    let progress = Arc::new(Progress::default());
    let gate = GateConfig { change_threshold: 0.05, min_interval_s: 0.0, max_interval_s: 3600.0 };
    let settings = Arc::new(RwLock::new(RuntimeSettings { caption_prompt: "Describe the image.".into(), gate }));
    let worker = Worker {
        vision,
        backbone,
        frames: slot.clone(),
        settings,
        progress: progress.clone(),
        model: m.name.clone(),
        generator: None,
        privacy: Default::default(),
        image_format: Default::default(),
        offload: Vec::new(),
    };
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(64);
    let (_questions_tx, questions_rx) = std::sync::mpsc::sync_channel::<scenecast::worker::Job<()>>(1);
    let stop = Arc::new(AtomicBool::new(false));
    let worker_stop = stop.clone();
    let thread = std::thread::spawn(move || worker.run(questions_rx, out_tx, worker_stop));

    let feed = |seq: u64, name: &str| {
        let before = progress.frames.load(Ordering::SeqCst);
        slot.put(frame(seq, name));
        let deadline = Instant::now() + WAIT;
        while progress.frames.load(Ordering::SeqCst) == before {
            assert!(Instant::now() < deadline, "frame {seq} was not encoded");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    for seq in 0..6 {
        feed(seq, "chelsea.png");
    }
    assert_eq!(progress.llm_runs.load(Ordering::SeqCst), 1, "six frames of one scene: one LLM run");
    feed(6, "rocket.jpg");
    // Wait for the caption of the changed scene.
    let deadline = Instant::now() + WAIT;
    while progress.captions.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the changed scene was not captioned");
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    thread.join().unwrap();
    let (mut seqs, mut snapshots) = (Vec::new(), 0);
    while let Ok(message) = out_rx.try_recv() {
        match message {
            scenecast::worker::Output::Caption(c) => seqs.push(c.frame_seq),
            // Privacy off (the default): each captioned frame goes to the image entity.
            scenecast::worker::Output::ScenePicture(_) => snapshots += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seqs, [0, 6], "captions for the first frame and the changed scene only");
    assert_eq!(snapshots, 2, "one snapshot per caption");
}
