//! The MQTT side against a real Mosquitto broker on a free loopback port, with the real inference
//! worker (DINOv2-S, projector, SmolLM2 on llama.cpp) answering. Payloads are validated against the
//! JSON Schemas that docs/asyncapi.yaml references.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use scenecast::config::Config;
use scenecast::llm::Backbone;
use scenecast::llm::LlmConfig;
use scenecast::mqtt::{self, MqttHandle, Request};
use scenecast::mqtt::{MqttConfig, MqttProtocol};
use scenecast::worker::Output;
use std::sync::RwLock;

use scenecast::camera::FrameSlot;
use scenecast::vision::Vision;
use scenecast::worker::GateConfig;
use scenecast::worker::{Progress, RuntimeSettings, Worker};

const WAIT: Duration = Duration::from_secs(30);

fn mqtt_config(port: u16, device: &str) -> MqttConfig {
    MqttConfig {
        port,
        device: Some(device.into()),
        reconnect_min_s: 0.2,
        reconnect_max_s: 1.0,
        ..MqttConfig::default()
    }
}

/// The MQTT side plus, when started, the real worker.
struct Daemon {
    handle: Option<MqttHandle>,
    questions: Option<std::sync::mpsc::Receiver<Request>>,
    stop: Arc<AtomicBool>,
    worker: Option<std::thread::JoinHandle<()>>,
    settings: Arc<RwLock<RuntimeSettings>>,
    _state: tempfile::TempDir,
}

impl Daemon {
    async fn start(config: MqttConfig) -> Daemon {
        let state = tempfile::tempdir().unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(config.request_queue);
        let settings = Arc::new(RwLock::new(RuntimeSettings {
            caption_prompt: "Describe the image.".into(),
            gate: GateConfig::default(),
        }));
        let mut handle = mqtt::start(
            &config,
            &Default::default(),
            state.path(),
            tx,
            settings.clone(),
            "dinov2s-smollm2-135m",
            mqtt::RequestSettings { max_question_chars: 200, ..Default::default() },
        )
        .unwrap();
        assert!(handle.wait_connected(WAIT).await, "daemon connects");
        Daemon {
            handle: Some(handle),
            questions: Some(rx),
            stop: Arc::new(AtomicBool::new(false)),
            worker: None,
            settings,
            _state: state,
        }
    }

    fn handle(&self) -> &MqttHandle {
        self.handle.as_ref().unwrap()
    }

    /// Starts the real worker on one photo (its frames: that photo once).
    fn start_worker(&mut self) {
        self.start_worker_on("coffee.png");
    }

    /// Starts the real worker on `photo` (in the fetched sample photos).
    fn start_worker_on(&mut self, photo: &str) {
        let privacy = scenecast::worker::PrivacyConfig { no_camera_pixels: true, rerender_captions: false };
        self.start_worker_with(photo, false, privacy);
    }

    /// The real worker on `photo` with the reference generator (loaded on demand) and a privacy setting.
    fn start_worker_with(&mut self, photo: &str, generator: bool, privacy: scenecast::worker::PrivacyConfig) {
        let root = cache_root();
        let m = manifest();
        let backbone =
            Backbone::load(&m, &root, &LlmConfig { threads: 1, max_tokens: 24, ..LlmConfig::default() }).unwrap();
        let vision = Vision::load(&runtime(), &m, &root, Some(backbone.summary().gguf.llm_width())).unwrap();
        // One frame of a still scene, as the capture thread would deliver it.
        let frames = Arc::new(FrameSlot::new());
        let image = scenecast::frame::RgbImage::open(&root.join("models/photos").join(photo)).unwrap();
        frames.put(scenecast::frame::Frame { seq: 0, captured_at: std::time::SystemTime::now(), image });
        let generator = generator
            .then(|| scenecast::generate::OnDemand::new(runtime(), m.clone(), root.clone(), Default::default()));
        let worker = Worker {
            vision,
            backbone,
            frames,
            settings: self.settings.clone(),
            progress: Arc::new(Progress::default()),
            model: m.name.clone(),
            generator,
            privacy,
            image_format: Default::default(),
            offload: Vec::new(),
        };
        let (questions, out, stop) = (self.questions.take().unwrap(), self.handle().results.clone(), self.stop.clone());
        self.worker = Some(std::thread::spawn(move || worker.run(questions, out, stop)));
    }

    async fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.worker.take() {
            tokio::task::spawn_blocking(move || w.join()).await.unwrap().unwrap();
        }
        self.handle.take().unwrap().shutdown(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captions_status_discovery_and_clean_stop() {
    let broker = Broker::start();
    let mut watcher = TestClient::connect(broker.port, "watch-1", &["#"]).await;
    // Object sensors as a user configures them, settled against the reference stack as `run` does.
    let objects = "[mqtt.discovery]\nobjects = [\"person\", \"cup\"]\n";
    let configured = Config::parse(objects, "cam1.toml").unwrap().with_objects(&manifest()).unwrap();
    let mut d =
        Daemon::start(MqttConfig { discovery: configured.mqtt.discovery, ..mqtt_config(broker.port, "cam1") }).await;

    let status = watcher.next_on("scenecast/cam1/status", WAIT).await.unwrap();
    assert_eq!(status.payload, b"online");
    let discovery = watcher.next_on("homeassistant/device/cam1/config", WAIT).await.unwrap().json();
    assert_schema("ha_device_discovery.schema.json", &discovery);
    for name in ["person", "cup"] {
        let sensor = &discovery["cmps"][format!("object_{name}")];
        assert_eq!(sensor["p"], "binary_sensor", "{discovery}");
        assert_eq!(sensor["dev_cla"], "occupancy");
        assert_eq!(sensor["stat_t"], "scenecast/cam1/caption");
    }

    d.start_worker();
    let caption = watcher.next_on("scenecast/cam1/caption", WAIT).await.expect("a caption");
    let json = caption.json();
    assert_schema("caption.schema.json", &json);
    assert_eq!(json["frame_seq"], 0);
    let text = json["text"].as_str().unwrap();
    assert!(!text.is_empty());
    // The categories the caption names, which the object sensors read: the coffee photo's cup.
    let vocabulary = manifest().grounding.unwrap().categories;
    let named: Vec<&str> = scenecast::llm::mentions(text, &vocabulary);
    assert_eq!(json["objects"], serde_json::json!(named), "{json}");
    assert!(named.contains(&"cup"), "{json}");
    assert!(caption.user_properties.iter().any(|(k, _)| k == "total_ms"), "{:?}", caption.user_properties);

    // Retained: a client that connects now still sees `online` and the caption.
    let topics = ["scenecast/cam1/status", "scenecast/cam1/caption", "homeassistant/device/cam1/config"];
    let mut late = TestClient::connect(broker.port, "late-1", &topics).await;
    let retained = late.next_on("scenecast/cam1/status", WAIT).await.unwrap();
    assert!(retained.retain && retained.payload == b"online");
    assert!(late.next_on("scenecast/cam1/caption", WAIT).await.unwrap().retain);
    assert!(late.next_on("homeassistant/device/cam1/config", WAIT).await.unwrap().retain);

    // Home Assistant restarts: discovery is published again.
    watcher
        .client
        .publish("homeassistant/status", rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, "online")
        .await
        .unwrap();
    assert!(watcher.next_on("homeassistant/device/cam1/config", WAIT).await.is_some(), "discovery republished");

    d.shutdown().await;
    let stopped = watcher.next_on("scenecast/cam1/status", WAIT).await.unwrap();
    assert_eq!(stopped.payload, b"stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_request_response_with_correlation_expiry_and_busy() {
    let broker = Broker::start();
    let mut client = TestClient::connect(
        broker.port,
        "asker-1",
        &["replies/#", "scenecast/cam2/status/attributes", "scenecast/cam2/caption"],
    )
    .await;
    let mut d = Daemon::start(MqttConfig { request_queue: 1, ..mqtt_config(broker.port, "cam2") }).await;

    // No worker yet: one request fills the queue of 1 and expires there; the next one is busy.
    client
        .request(
            "scenecast/cam2/ask",
            br#"{"question":"Is anyone there?"}"#,
            Some("replies/expired"),
            Some(b"c-0"),
            Some(1),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.request("scenecast/cam2/ask", br#"{"question":"And now?"}"#, Some("replies/busy"), Some(b"c-1"), None).await;
    let busy = client.next_on("replies/busy", WAIT).await.unwrap();
    assert_eq!(busy.correlation.as_deref(), Some(&b"c-1"[..]));
    assert_schema("reply.schema.json", &busy.json());
    assert_eq!(busy.json()["error"]["code"], "busy");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    d.start_worker();
    // The worker takes questions first, so by its first caption the expired request is gone.
    client.next_on("scenecast/cam2/caption", WAIT).await.expect("the worker runs");
    client
        .request(
            "scenecast/cam2/ask",
            br#"{"question":"What is the capital of France?","id":"q7"}"#,
            Some("replies/ok"),
            Some(b"\x00\x01corr"),
            None,
        )
        .await;
    let answer = client.next_on("replies/ok", WAIT).await.expect("an answer");
    assert_eq!(answer.correlation.as_deref(), Some(&b"\x00\x01corr"[..]), "correlation data echoed");
    let json = answer.json();
    assert_schema("reply.schema.json", &json);
    assert_eq!((json["id"].as_str(), json["done"].as_bool()), (Some("q7"), Some(true)));
    assert!(json["text"].as_str().unwrap().contains("Paris"), "{json}");
    assert!(json["frame_seq"].is_u64() || json["frame_seq"].is_null());
    assert!(answer.user_properties.iter().any(|(k, _)| k == "total_ms"));
    assert!(
        client.next_on("replies/expired", Duration::from_secs(2)).await.is_none(),
        "an expired request is not answered"
    );
    let attributes = loop {
        let m = client.next_on("scenecast/cam2/status/attributes", WAIT).await.expect("status attributes");
        if m.json()["expired_requests"] == 1 {
            break m;
        }
    };
    assert_schema("status_attributes.schema.json", &attributes.json());
    assert_eq!(attributes.json()["busy_replies"], 1);

    // Streaming: partial answers, then the final one.
    client
        .request(
            "scenecast/cam2/ask",
            br#"{"question":"Describe the picture.","stream":true}"#,
            Some("replies/stream"),
            None,
            None,
        )
        .await;
    let mut partials = 0;
    loop {
        let m = client.next_on("replies/stream", WAIT).await.expect("stream messages");
        assert_schema("reply.schema.json", &m.json());
        if m.json()["done"] == true {
            break;
        }
        partials += 1;
    }
    assert!(partials > 1, "{partials} partial answers");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_begun_by_a_guide_says_which_category_in_the_reply() {
    // The held-out Nubian ibex photo: the LLM says there is no goat, the ImageNet classifier is
    // sure of one, and it places the goat on the right where the image tokens point at it in the
    // middle (tests/projector.rs). The streamed partials carry the answer that stands only, and
    // the final reply names the category (reply schema).
    let broker = Broker::start();
    let mut client = TestClient::connect(broker.port, "asker-8", &["replies/#", "scenecast/cam8/caption"]).await;
    let mut d = Daemon::start(mqtt_config(broker.port, "cam8")).await;
    d.start_worker_on("gcompris/erase-nubian_ibex.webp");
    client.next_on("scenecast/cam8/caption", WAIT).await.expect("the worker runs");
    let questions = [
        ("Is there a goat in the image?", Some("goat"), "Yes"),
        ("Where is the goat?", Some("goat"), "In the centre"),
        ("Is there a goat on the left?", None, ""),
    ];
    for (question, guided, begun) in questions {
        let payload = serde_json::json!({ "question": question, "stream": true }).to_string();
        client.request("scenecast/cam8/ask", payload.as_bytes(), Some("replies/goat"), None, None).await;
        let mut partials = Vec::new();
        let last = loop {
            let m = client.next_on("replies/goat", WAIT).await.expect("stream messages");
            let json = m.json();
            assert_schema("reply.schema.json", &json);
            if json["done"] == true {
                break json;
            }
            assert!(json.get("guided").is_none(), "partials do not say it: {json}");
            partials.push(json["text"].as_str().unwrap().to_owned());
        };
        assert_eq!(last["guided"].as_str(), guided, "{question}: {last}");
        if guided.is_some() {
            let text = last["text"].as_str().unwrap();
            assert!(text.starts_with(begun), "{last}");
            assert!(partials.iter().all(|p| text.starts_with(p.as_str())), "{partials:?} against {text:?}");
        }
    }
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_round_trip_with_id_and_reply_to() {
    let broker = Broker::start();
    let mut client = TestClient::connect(broker.port, "asker-3", &["replies/#"]).await;
    let mut d = Daemon::start(MqttConfig { protocol: MqttProtocol::V311, ..mqtt_config(broker.port, "cam3") }).await;
    d.start_worker();
    client
        .request(
            "scenecast/cam3/ask",
            br#"{"question":"What is the capital of France?","id":"a1","reply_to":"replies/v3"}"#,
            None,
            None,
            None,
        )
        .await;
    let answer = client.next_on("replies/v3", WAIT).await.expect("an answer");
    let json = answer.json();
    assert_schema("reply.schema.json", &json);
    assert_eq!(json["id"], "a1");
    assert!(json["text"].as_str().unwrap().contains("Paris"), "{json}");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_replies_and_the_daemon_keeps_serving() {
    let broker = Broker::start();
    let mut client = TestClient::connect(broker.port, "asker-4", &["replies/#", "elsewhere/#"]).await;
    let config = MqttConfig {
        max_payload_bytes: 512,
        allowed_reply_topics: vec!["replies/#".into()],
        ..mqtt_config(broker.port, "cam4")
    };
    let mut d = Daemon::start(config).await;
    d.start_worker();
    let long_question = format!(r#"{{"question":"{}"}}"#, "why ".repeat(60));
    let oversized = format!(r#"{{"question":"{}"}}"#, "x".repeat(600));
    // (payload, expected error code, fragment of the message)
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"{not json".to_vec(), "bad_request", "key must be a string"),
        (br#"{"question":7}"#.to_vec(), "bad_request", "invalid type: integer `7`, expected a string"),
        (br#"{"stream":true}"#.to_vec(), "bad_request", "missing field `question`"),
        (br#"{"question":"hi","priority":1}"#.to_vec(), "bad_request", "unknown field `priority`"),
        (oversized.into_bytes(), "too_large", "exceeds the limit of 512 bytes"),
        (long_question.into_bytes(), "bad_question", "the limit is 200"),
        (b"{\"question\":\"caf\xe9\"}".to_vec(), "bad_request", "not valid UTF-8"),
        (br#"{"question":""}"#.to_vec(), "bad_question", "the question is empty"),
    ];
    for (i, (payload, code, fragment)) in cases.iter().enumerate() {
        let corr = format!("bad-{i}");
        client.request("scenecast/cam4/ask", payload, Some("replies/bad"), Some(corr.as_bytes()), None).await;
        let reply = client.next_on("replies/bad", WAIT).await.unwrap_or_else(|| panic!("no reply to case {i}"));
        assert_eq!(reply.correlation.as_deref(), Some(corr.as_bytes()));
        let json = reply.json();
        assert_schema("reply.schema.json", &json);
        assert_eq!(json["error"]["code"], *code, "case {i}: {json}");
        assert!(json["error"]["message"].as_str().unwrap().contains(fragment), "case {i}: {json}");
    }
    // A reply topic the config forbids gets no reply at all (and certainly not on that topic).
    client.request("scenecast/cam4/ask", br#"{"question":"hi"}"#, Some("elsewhere/x"), None, None).await;
    assert!(client.next_on("elsewhere/x", Duration::from_secs(2)).await.is_none());
    // After all that, a valid request is still answered.
    client
        .request(
            "scenecast/cam4/ask",
            br#"{"question":"What is the capital of France?"}"#,
            Some("replies/good"),
            None,
            None,
        )
        .await;
    let good = client.next_on("replies/good", WAIT).await.expect("still serving");
    assert!(good.json()["text"].as_str().unwrap().contains("Paris"));
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captions_produced_while_the_broker_is_down_arrive_in_order() {
    let mut broker = Broker::start();
    let mut client = TestClient::connect(broker.port, "archive-5", &["scenecast/cam5/caption"]).await;
    let d = Daemon::start(mqtt_config(broker.port, "cam5")).await;

    broker.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for seq in 0..20u64 {
        let caption = scenecast::worker::Caption {
            text: format!("scene {seq}"),
            // Every other caption had a name removed by the check: the field is then in the payload.
            unsupported: if seq % 2 == 0 { vec!["dog".into()] } else { vec![] },
            // Every third was begun with the classifier's category: the field is then in the payload.
            guided: (seq % 3 == 0).then(|| "goat".to_owned()),
            // The categories it names: none for every fourth ("No known object."), absent for a
            // stack without a vocabulary every fifth.
            objects: (seq % 5 != 0).then(|| if seq % 4 == 0 { vec![] } else { vec!["goat".to_owned()] }),
            // Every seventh had an object placed again: the field is then in the payload.
            moved: if seq % 7 == 0 { vec!["goat".into()] } else { vec![] },
            frame_seq: seq,
            frame_ts_ms: 1_700_000_000_000 + seq,
            timings_ms: Default::default(),
            model: "test".into(),
        };
        d.handle().results.send(Output::Caption(caption)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart();

    let mut seqs = Vec::new();
    while seqs.len() < 20 {
        let m = client
            .next_on("scenecast/cam5/caption", WAIT)
            .await
            .unwrap_or_else(|| panic!("only {} captions arrived: {seqs:?}", seqs.len()));
        assert_schema("caption.schema.json", &m.json());
        let seq = m.json()["frame_seq"].as_u64().unwrap();
        let removed = if seq % 2 == 0 { serde_json::json!(["dog"]) } else { serde_json::Value::Null };
        assert_eq!(m.json()["unsupported"], removed, "{}", m.json());
        let guided = if seq % 3 == 0 { serde_json::json!("goat") } else { serde_json::Value::Null };
        assert_eq!(m.json()["guided"], guided, "{}", m.json());
        // An empty list stays in the payload (the object sensors turn off); no vocabulary, no field.
        let objects = match (seq % 5, seq % 4) {
            (0, _) => serde_json::Value::Null,
            (_, 0) => serde_json::json!([]),
            _ => serde_json::json!(["goat"]),
        };
        assert_eq!(m.json()["objects"], objects, "{}", m.json());
        let moved = if seq % 7 == 0 { serde_json::json!(["goat"]) } else { serde_json::Value::Null };
        assert_eq!(m.json()["moved"], moved, "{}", m.json());
        seqs.push(seq);
    }
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    let extra = client.next_on("scenecast/cam5/caption", Duration::from_secs(3)).await;
    assert!(extra.is_none(), "a caption arrived twice: {:?}", extra.map(|m| (m.json()["frame_seq"].clone(), m.retain)));
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_says_offline_when_the_daemon_is_killed() {
    let broker = Broker::start();
    let mut watcher = TestClient::connect(broker.port, "watch-6", &["scenecast/cam6/status"]).await;
    let dir = tempfile::tempdir().unwrap();
    let photo = cache_root().join("models/photos/rocket.jpg");
    let config = format!(
        "state_dir = {:?}\n[mqtt]\nport = {}\ndevice = \"cam6\"\n[camera]\npath = {:?}\n[llm]\nthreads = 1\n",
        dir.path().display().to_string(),
        broker.port,
        photo.display().to_string()
    );
    Config::parse(&config, "test").unwrap();
    let config_path = write_temp(dir.path(), "scenecast.toml", config.as_bytes());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_scenecast"))
        .args(["--config", config_path.to_str().unwrap(), "run"])
        .env_remove("ORT_DYLIB_PATH")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let online = watcher.next_on("scenecast/cam6/status", WAIT).await.expect("the daemon comes online");
    assert_eq!(online.payload, b"online");
    child.kill().unwrap();
    child.wait().unwrap();
    let will = watcher.next_on("scenecast/cam6/status", WAIT).await.expect("the last will");
    assert_eq!(will.payload, b"offline");
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &str) {
    let status = std::process::Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl {args}");
}

/// A CA, a server certificate for localhost and a client certificate, all EC P-256.
fn make_certs(dir: &std::path::Path) {
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
    for name in ["ca", "server", "client"] {
        openssl(dir, &format!("genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {name}.key"));
    }
    openssl(dir, "req -x509 -new -key ca.key -days 2 -subj /CN=scenecast-test-ca -out ca.pem");
    for (name, cn) in [("server", "localhost"), ("client", "scenecast-client")] {
        openssl(dir, &format!("req -new -key {name}.key -subj /CN={cn} -out {name}.csr"));
        openssl(dir, &format!("x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out {name}.pem"));
    }
    use std::os::unix::fs::PermissionsExt;
    for f in ["server.key", "server.pem", "ca.pem"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    let broker = Broker::start_with(|dir| {
        make_certs(dir);
        format!(
            "cafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\nrequire_certificate true",
            dir.display()
        )
    });
    let certs = broker.dir.path();
    let tls = scenecast::mqtt::TlsConfig {
        ca_file: certs.join("ca.pem"),
        client_cert: Some(certs.join("client.pem")),
        client_key: Some(certs.join("client.key")),
    };
    let config = MqttConfig { host: "localhost".into(), tls: Some(tls.clone()), ..mqtt_config(broker.port, "cam7") };
    let d = Daemon::start(config).await;
    d.shutdown().await;

    // Without the client certificate the broker refuses the handshake: never connected.
    let state = tempfile::tempdir().unwrap();
    let (tx, _rx) = std::sync::mpsc::sync_channel(1);
    let no_cert = MqttConfig {
        host: "localhost".into(),
        tls: Some(scenecast::mqtt::TlsConfig { client_cert: None, client_key: None, ..tls }),
        ..mqtt_config(broker.port, "cam8")
    };
    let settings = Arc::new(RwLock::new(RuntimeSettings { caption_prompt: "x".into(), gate: GateConfig::default() }));
    let mut handle = mqtt::start(
        &no_cert,
        &Default::default(),
        state.path(),
        tx,
        settings.clone(),
        "m",
        mqtt::RequestSettings { max_question_chars: 200, ..Default::default() },
    )
    .unwrap();
    assert!(!handle.wait_connected(Duration::from_secs(3)).await);
    handle.shutdown(Duration::from_secs(2)).await;

    // A CA file that does not exist is a clear error naming it.
    let missing = MqttConfig {
        tls: Some(scenecast::mqtt::TlsConfig {
            ca_file: "/nonexistent/ca.pem".into(),
            client_cert: None,
            client_key: None,
        }),
        ..mqtt_config(broker.port, "cam9")
    };
    let (tx, _rx) = std::sync::mpsc::sync_channel(1);
    let err = mqtt::start(
        &missing,
        &Default::default(),
        state.path(),
        tx,
        settings,
        "m",
        mqtt::RequestSettings { max_question_chars: 200, ..Default::default() },
    )
    .err()
    .expect("a missing CA file is refused")
    .to_string();
    assert!(err.starts_with("mqtt.tls: cannot read /nonexistent/ca.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_discovery_removes_the_device_from_home_assistant() {
    let broker = Broker::start();
    let mut watcher = TestClient::connect(broker.port, "watch-10", &["homeassistant/device/cam10/config"]).await;
    let d = Daemon::start(mqtt_config(broker.port, "cam10")).await;
    assert!(!watcher.next_on("homeassistant/device/cam10/config", WAIT).await.unwrap().payload.is_empty());
    d.shutdown().await;

    let mut off = mqtt_config(broker.port, "cam10");
    off.discovery.enabled = false;
    let d = Daemon::start(off).await;
    let removal = watcher.next_on("homeassistant/device/cam10/config", WAIT).await.unwrap();
    assert!(removal.payload.is_empty(), "an empty payload removes the device");
    d.shutdown().await;
    // Nothing retained is left for Home Assistant to find.
    let mut late = TestClient::connect(broker.port, "late-10", &["homeassistant/device/cam10/config"]).await;
    assert!(late.next_on("homeassistant/device/cam10/config", Duration::from_secs(2)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_set_is_validated_applied_and_acknowledged() {
    let broker = Broker::start();
    let mut client = TestClient::connect(broker.port, "admin-11", &["scenecast/cam11/config/state", "replies/#"]).await;
    let d = Daemon::start(mqtt_config(broker.port, "cam11")).await;
    let initial = client.next_on("scenecast/cam11/config/state", WAIT).await.expect("the state is retained on connect");
    assert!(initial.retain || initial.json()["caption_prompt"] == "Describe the image.");
    assert_schema("config_state.schema.json", &initial.json());

    let set = br#"{"caption_prompt":"Count the people.","scene":{"change_threshold":0.2}}"#;
    client.request("scenecast/cam11/config/set", set, Some("replies/cfg"), None, None).await;
    let state = client.next_on("scenecast/cam11/config/state", WAIT).await.unwrap().json();
    assert_schema("config_state.schema.json", &state);
    assert_eq!(state["caption_prompt"], "Count the people.");
    assert!((state["scene"]["change_threshold"].as_f64().unwrap() - 0.2).abs() < 1e-6, "{state}");
    assert_eq!(d.settings.read().unwrap().caption_prompt, "Count the people.", "the worker sees it");

    client
        .request(
            "scenecast/cam11/config/set",
            br#"{"scene":{"change_threshold":9}}"#,
            Some("replies/cfg"),
            Some(b"k"),
            None,
        )
        .await;
    let refused = client.next_on("replies/cfg", WAIT).await.unwrap();
    assert_schema("reply.schema.json", &refused.json());
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`scene.change_threshold`: 9 is outside 0..2"));
    assert_eq!(d.settings.read().unwrap().gate.change_threshold, 0.2, "a refused change leaves the settings alone");
    d.shutdown().await;
}

/// A `generate` request returns a decodable PNG on its response topic (and retained on the image
/// topic), deterministic for a seed; bad requests get error replies; captions and answers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_returns_a_png_and_bad_requests_get_errors() {
    let broker = Broker::start();
    let mut c = TestClient::connect(broker.port, "gen-watch", &["scenecast/gen1/#", "replies/#"]).await;
    let mut d = Daemon::start(mqtt_config(broker.port, "gen1")).await;
    d.start_worker_with(
        "coffee.png",
        true,
        scenecast::worker::PrivacyConfig { no_camera_pixels: true, rerender_captions: false },
    );
    c.next_on("scenecast/gen1/caption", WAIT).await.expect("a caption first");

    let request = br#"{"prompt":"a red bicycle in the rain","seed":7,"steps":2,"width":64,"height":48}"#;
    assert_schema("generate.schema.json", &serde_json::from_slice(request).unwrap());
    c.request("scenecast/gen1/generate", request, Some("replies/g1"), Some(b"corr-1"), None).await;
    let reply = c.next_on("replies/g1", WAIT).await.expect("an image reply");
    assert_eq!(reply.content_type.as_deref(), Some("image/png"));
    assert_eq!(reply.correlation.as_deref(), Some(&b"corr-1"[..]));
    let image = image::load_from_memory(&reply.payload).expect("a decodable PNG");
    assert_eq!((image.width(), image.height()), (64, 48));
    assert_eq!((reply.property("seed"), reply.property("steps")), (Some("7"), Some("2")));
    assert!(reply.property("load_ms").is_some(), "the first request loads the generator: {:?}", reply.user_properties);
    // Privacy on: the image topic carries the generated image, never the camera's frame.
    let published = c.next_on("scenecast/gen1/image", WAIT).await.expect("the image entity's copy");
    assert_eq!(published.payload, reply.payload);

    // Same seed, same image; the generator stays loaded.
    c.request("scenecast/gen1/generate", request, Some("replies/g2"), None, None).await;
    let again = c.next_on("replies/g2", WAIT).await.unwrap();
    assert_eq!(again.payload, reply.payload, "deterministic for a seed");
    assert!(again.property("load_ms").is_none(), "already loaded");

    // The description of the scene through the LLM's hidden states and the output projector.
    c.request(
        "scenecast/gen1/generate",
        br#"{"from_scene":true,"condition":"hidden","width":32,"height":32}"#,
        Some("replies/g3"),
        None,
        None,
    )
    .await;
    let scene = c.next_on("replies/g3", WAIT).await.unwrap();
    assert_eq!(scene.content_type.as_deref(), Some("image/png"), "{:?}", String::from_utf8_lossy(&scene.payload));
    assert!(!scene.property("prompt").unwrap_or_default().is_empty());

    // An over-long prompt is cut at the tokenizer's 77 tokens with a warning.
    let long = format!(r#"{{"prompt":"{}","width":32,"height":32}}"#, "cat ".repeat(120));
    c.request("scenecast/gen1/generate", long.as_bytes(), Some("replies/g4"), None, None).await;
    let cut = c.next_on("replies/g4", WAIT).await.unwrap();
    assert!(cut.property("warning").is_some_and(|w| w.contains("77 tokens")), "{:?}", cut.user_properties);

    for (payload, code) in [
        (&br#"{"prompt":"  "}"#[..], "bad_prompt"),
        (br#"{"seed":1}"#, "bad_prompt"),
        (br#"{"prompt":"x","steps":99}"#, "out_of_range"),
        (br#"{"prompt":"x","width":100}"#, "out_of_range"),
        (br#"{"prompt":"x","colour":"red"}"#, "bad_request"),
        (b"\xff\xfe", "bad_request"),
    ] {
        c.request("scenecast/gen1/generate", payload, Some("replies/bad"), None, None).await;
        let err = c.next_on("replies/bad", WAIT).await.expect("an error reply").json();
        assert_schema("reply.schema.json", &err);
        assert_eq!(err["error"]["code"], code, "{:?}: {err}", String::from_utf8_lossy(payload));
    }

    // The daemon keeps answering.
    c.request("scenecast/gen1/ask", br#"{"question":"What is this?"}"#, Some("replies/q"), None, None).await;
    let answer = c.next_on("replies/q", WAIT).await.unwrap().json();
    assert_eq!(answer["done"], true, "{answer}");
    d.shutdown().await;
}

/// Without a generator the request is refused as unavailable; with privacy off, each caption's
/// frame is the image entity's picture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_generator_is_unavailable_and_snapshots_follow_captions() {
    let broker = Broker::start();
    let mut c = TestClient::connect(broker.port, "snap-watch", &["scenecast/snap1/#", "replies/#"]).await;
    let mut d = Daemon::start(mqtt_config(broker.port, "snap1")).await;
    d.start_worker_with("coffee.png", false, scenecast::worker::PrivacyConfig::default());
    c.next_on("scenecast/snap1/caption", WAIT).await.expect("a caption");
    let snapshot = c.next_on("scenecast/snap1/image", WAIT).await.expect("the captioned frame");
    let frame = image::load_from_memory(&snapshot.payload).unwrap();
    let photo = photo("coffee.png");
    assert_eq!((frame.width(), frame.height()), (photo.width(), photo.height()));
    assert_eq!(frame.to_rgb8().into_raw(), photo.pixels(), "the frame itself, lossless");

    c.request("scenecast/snap1/generate", br#"{"prompt":"a cup"}"#, Some("replies/n"), None, None).await;
    let err = c.next_on("replies/n", WAIT).await.unwrap().json();
    assert_eq!(err["error"]["code"], "unavailable", "{err}");
    d.shutdown().await;
}

/// Privacy with re-rendering: the image entity gets a rendering of each caption, never the frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_rerenders_captions_instead_of_publishing_the_frame() {
    let broker = Broker::start();
    let mut c = TestClient::connect(broker.port, "priv-watch", &["scenecast/priv1/#"]).await;
    let mut d = Daemon::start(mqtt_config(broker.port, "priv1")).await;
    d.start_worker_with(
        "coffee.png",
        true,
        scenecast::worker::PrivacyConfig { no_camera_pixels: true, rerender_captions: true },
    );
    c.next_on("scenecast/priv1/caption", WAIT).await.expect("a caption");
    let picture = c.next_on("scenecast/priv1/image", WAIT).await.expect("a re-rendering");
    let image = image::load_from_memory(&picture.payload).unwrap();
    let spec = manifest().generator.unwrap();
    assert_eq!(
        (image.width() as usize, image.height() as usize),
        (spec.size[1], spec.size[0]),
        "the generator's size, not the photo's"
    );
    assert_ne!((image.width(), image.height()), (photo("coffee.png").width(), photo("coffee.png").height()));
    d.shutdown().await;
}

/// Issue 14: a picture for the retained image topic is never spooled, not even when it is still
/// queued at shutdown (the shutdown path had its own copy of the message mapping and spooled it);
/// captions and replies to requests still wait in the spool for the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_14_pictures_are_never_spooled_also_at_shutdown() {
    use scenecast::frame::ImageFormat;
    use scenecast::worker::{Caption, Picture, RenderInfo};
    // No broker on this port: everything that may wait goes to the spool.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let state = tempfile::tempdir().unwrap();
    let (tx, _rx) = std::sync::mpsc::sync_channel(1);
    let settings =
        Arc::new(RwLock::new(RuntimeSettings { caption_prompt: "Describe.".into(), gate: GateConfig::default() }));
    let handle = mqtt::start(
        &mqtt_config(port, "cam14"),
        &Default::default(),
        state.path(),
        tx,
        settings,
        "m",
        Default::default(),
    )
    .unwrap();
    let picture = Picture { bytes: vec![0x89, b'P', b'N', b'G'], format: ImageFormat::Png };
    let to = mqtt::ReplyAddress {
        topic: "hub/replies".into(),
        correlation: None,
        id: Some("r1".into()),
        retain: false,
        device: None,
        ack: None,
    };
    let info = RenderInfo {
        prompt: "a cat".into(),
        seed: 1,
        steps: 1,
        width: 64,
        height: 64,
        sampler: "euler".into(),
        warning: None,
        timings_ms: Default::default(),
    };
    let caption = Caption {
        text: "a cat".into(),
        unsupported: vec!["dog".into()],
        guided: Some("cat".into()),
        objects: Some(vec!["cat".into()]),
        moved: vec![],
        frame_seq: 1,
        frame_ts_ms: 0,
        timings_ms: Default::default(),
        model: "m".into(),
    };
    handle.results.send(Output::Caption(caption)).await.unwrap();
    handle.results.send(Output::Rendered { to, picture: picture.clone(), info }).await.unwrap();
    // Many pictures right before shutdown, so that some are still queued when it starts.
    for _ in 0..50 {
        handle.results.send(Output::ScenePicture(picture.clone())).await.unwrap();
    }
    handle.shutdown(Duration::from_secs(5)).await;
    let mut spooled: Vec<String> = std::fs::read_dir(state.path().join("spool"))
        .unwrap()
        .map(|e| String::from_utf8_lossy(&std::fs::read(e.unwrap().path()).unwrap()).into_owned())
        .collect();
    spooled.sort();
    assert_eq!(spooled.len(), 2, "the caption and the reply wait; no copy for the image topic: {spooled:?}");
    assert!(spooled.iter().any(|m| m.contains("scenecast/cam14/caption")), "{spooled:?}");
    assert!(spooled.iter().any(|m| m.contains("hub/replies")), "{spooled:?}");
    assert!(!spooled.iter().any(|m| m.contains("scenecast/cam14/image")), "{spooled:?}");
}
