//! Daemon benchmarks, in one process with the real models and an embedded broker:
//!
//! 1. LLM runs per minute with a 2 fps camera: captioning every frame (no gating: the baseline),
//!    a static scene with gating, and a scene that changes on every frame with gating.
//! 2. End-to-end latency from a frame entering the slot to its caption arriving at an MQTT
//!    subscriber (embedded rumqttd broker on loopback).
//!
//! Run with `cargo bench --bench daemon` after `make models`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use scenecast::camera::FrameSlot;
use scenecast::config::Config;
use scenecast::frame::{Frame, RgbImage};
use scenecast::llm::Backbone;
use scenecast::llm::LlmConfig;
use scenecast::manifest::Manifest;
use scenecast::mqtt::MqttConfig;
use scenecast::onnx::OnnxRuntime;
use scenecast::vision::Vision;
use scenecast::worker::GateConfig;
use scenecast::worker::{Progress, RuntimeSettings, Worker};

const FPS: f64 = 2.0;
const PHASE: Duration = Duration::from_secs(15);

fn main() {
    let config = Config::builtin();
    let root = config.cache_root();
    let manifest = Manifest::reference().unwrap();
    let photos: Vec<RgbImage> = ["chelsea.png", "rocket.jpg", "coffee.png", "astronaut.png"]
        .iter()
        .map(|n| RgbImage::open(&root.join("models/photos").join(n)).expect("photos (run `make models`)"))
        .collect();

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let link = scenecast::mqtt::start_broker(addr, true, "bench/#").unwrap();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<(u64, Instant)>();
    std::thread::spawn(move || {
        let mut link = link;
        while let Some(f) = link.recv() {
            if let Ok(c) = serde_json::from_slice::<scenecast::mqtt::wire::Caption>(&f.payload) {
                let _ = seen_tx.send((c.frame_seq, Instant::now()));
            }
        }
    });

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (questions_tx, questions_rx) = std::sync::mpsc::sync_channel(4);
    let mqtt_config = MqttConfig { port, topic_prefix: Some("bench/cam".into()), ..MqttConfig::default() };
    let ungated = GateConfig { change_threshold: 0.0, min_interval_s: 0.0, max_interval_s: 0.0 };
    let settings =
        Arc::new(RwLock::new(RuntimeSettings { caption_prompt: "Describe the image.".into(), gate: ungated.clone() }));
    let mut mqtt = rt.block_on(async {
        scenecast::mqtt::start(
            &mqtt_config,
            &Default::default(),
            state.path(),
            questions_tx,
            settings.clone(),
            &manifest.name,
            scenecast::mqtt::RequestSettings { max_question_chars: 200, ..Default::default() },
        )
        .unwrap()
    });
    assert!(rt.block_on(mqtt.wait_connected(Duration::from_secs(10))));

    let ort = OnnxRuntime::init(&config.onnx, &root).unwrap();
    let backbone = Backbone::load(&manifest, &root, &LlmConfig { max_tokens: 32, ..LlmConfig::default() }).unwrap();
    let vision = Vision::load(&ort, &manifest, &root, Some(backbone.summary().gguf.llm_width())).unwrap();
    let slot = Arc::new(FrameSlot::new());
    let progress = Arc::new(Progress::default());
    let worker = Worker {
        vision,
        backbone,
        frames: slot.clone(),
        settings: settings.clone(),
        progress: progress.clone(),
        model: manifest.name.clone(),
        generator: None,
        privacy: Default::default(),
        image_format: Default::default(),
        offload: Vec::new(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (out, worker_stop) = (mqtt.results.clone(), stop.clone());
    let thread = std::thread::spawn(move || worker.run(questions_rx, out, worker_stop));

    let mut seq = 0u64;
    let mut put_at = std::collections::HashMap::new();
    let mut phase = |name: &str, gate: GateConfig, changing: bool| -> f64 {
        *settings.write().unwrap() = RuntimeSettings { caption_prompt: "Describe the image.".into(), gate };
        let runs_before = progress.llm_runs.load(Ordering::SeqCst);
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < PHASE {
            let image = if changing { photos[i % photos.len()].clone() } else { photos[0].clone() };
            put_at.insert(seq, Instant::now());
            slot.put(Frame { seq, captured_at: SystemTime::now(), image });
            seq += 1;
            i += 1;
            std::thread::sleep(Duration::from_secs_f64(1.0 / FPS));
        }
        std::thread::sleep(Duration::from_secs(2));
        let runs = progress.llm_runs.load(Ordering::SeqCst) - runs_before;
        let per_minute = runs as f64 * 60.0 / (PHASE.as_secs_f64() + 2.0);
        println!("  {name:<34} {runs:3} LLM runs  ({per_minute:5.1}/min)");
        per_minute
    };
    println!("LLM runs with a {FPS} fps camera, {} s per phase:", PHASE.as_secs());
    let baseline = phase("every frame (no gating, baseline)", ungated, true);
    let gated = GateConfig::default();
    let static_scene = phase("static scene, gated (defaults)", gated.clone(), false);
    let changing = phase("changing scene, gated (defaults)", gated, true);
    println!("  ratio to baseline: static {:.3}, changing {:.3}", static_scene / baseline, changing / baseline);

    let mut latencies: Vec<f64> = seen_rx
        .try_iter()
        .filter_map(|(frame_seq, at)| put_at.get(&frame_seq).map(|put| at.duration_since(*put).as_secs_f64() * 1e3))
        .collect();
    latencies.sort_by(f64::total_cmp);
    if !latencies.is_empty() {
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
        println!(
            "frame to MQTT caption (n = {}): median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
            latencies.len(),
            pct(0.5),
            pct(0.9),
            pct(1.0)
        );
    }
    stop.store(true, Ordering::SeqCst);
    thread.join().unwrap();
    rt.block_on(mqtt.shutdown(Duration::from_secs(3)));
}
