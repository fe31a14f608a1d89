//! Shared helpers for the integration tests: the real fetched models and photos.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use scenecast::config::Config;
use scenecast::frame::RgbImage;
use scenecast::manifest::Manifest;
use scenecast::onnx::OnnxRuntime;

/// The repository's root, as cargo names it when it runs the test. Not `env!`: the build directory
/// is shared between checkouts (`make test` here and CI's fresh clone), and a test binary built in
/// one of them would otherwise read the other's files.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The model cache `make test` filled.
pub fn cache_root() -> PathBuf {
    scenecast::cache::default_root()
}

/// A fetched sample photo.
pub fn photo(name: &str) -> RgbImage {
    let path = cache_root().join("models/photos").join(name);
    RgbImage::open(&path).unwrap_or_else(|e| panic!("{e}; run `make models` first"))
}

/// The reference manifest.
pub fn manifest() -> Manifest {
    Manifest::reference().unwrap()
}

/// The projector-v4 stack (models/dinov2s-nanodet.toml): NanoDet alone, COCO's 80 columns.
pub fn nanodet_manifest() -> Manifest {
    Manifest::load(&repo().join("models/dinov2s-nanodet.toml")).unwrap()
}

/// The reference manifest with the tiny random generator test models (models/generator/tiny.toml)
/// as its `[generator]`, in place of the trained one.
pub fn tiny_generator_manifest() -> Manifest {
    let reference = include_str!("../../models/reference.toml");
    let head = &reference[..reference.find("\n[generator]").expect("the reference manifest has a generator")];
    let tiny = include_str!("../../models/generator/tiny.toml");
    let dir = repo().join("models");
    Manifest::parse(&format!("{head}\n{tiny}"), "models/reference.toml + models/generator/tiny.toml", &dir).unwrap()
}

/// The ONNX Runtime library with the default (CPU) config.
pub fn runtime() -> OnnxRuntime {
    OnnxRuntime::init(&Config::builtin().onnx, &cache_root()).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs the `scenecast` binary with `args` and extra environment; returns (status ok, stdout, stderr).
pub fn scenecast(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_scenecast"));
    cmd.args(args).env_remove("ORT_DYLIB_PATH").env_remove("SCENECAST_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run scenecast");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A temporary file with `contents`.
pub fn write_temp(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A real Mosquitto broker on a free loopback port, with persistence in its own directory so that
/// sessions survive a restart.
pub struct Broker {
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Extra lines for the listener (TLS files, ...).
    listener_options: String,
    child: Option<std::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(|_| String::new())
    }

    /// A broker whose listener gets the lines `options` returns, given the broker's directory.
    pub fn start_with(options: impl FnOnce(&Path) -> String) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root drops to its own user: let it write its persistence file.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let listener_options = options(dir.path());
        let mut broker = Broker { port: free_port(), dir, listener_options, child: None };
        broker.restart();
        broker
    }

    /// Starts the broker process (again) on the same port and persistence directory.
    pub fn restart(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\n{}\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 1\n",
                self.port,
                self.listener_options,
                self.dir.path().display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto (make test installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "mosquitto did not start on port {}", self.port);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Stops the broker (SIGTERM, so it saves its sessions) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A message a test client received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub correlation: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

impl Received {
    /// A user property's value.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.user_properties.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {:?}", self.topic, String::from_utf8_lossy(&self.payload)))
    }
}

/// A v5 test client that subscribes to `filters` and collects what arrives. With a fixed
/// `client_id` its session persists (clean start off), so it gets QoS 1 messages sent while it
/// was disconnected.
pub struct TestClient {
    pub client: rumqttc::v5::AsyncClient,
    rx: tokio::sync::mpsc::UnboundedReceiver<Received>,
    /// Messages received while waiting for another topic, in arrival order.
    backlog: std::collections::VecDeque<Received>,
}

impl TestClient {
    pub async fn connect(port: u16, client_id: &str, filters: &[&str]) -> TestClient {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::mqttbytes::QoS;
        let mut options = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some(600));
        options.set_keep_alive(std::time::Duration::from_secs(5));
        // Generated images are tens of kilobytes: above rumqttc's default packet limit.
        options.set_max_packet_size(Some(1 << 24));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let sub = client.clone();
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        tokio::spawn(async move {
            let mut subscribed = false;
            loop {
                match eventloop.poll().await {
                    // A resumed session keeps its subscriptions. Subscribing again would make the
                    // broker replay each filter's retained message: a second copy of the latest
                    // caption, in the middle of the stream the session delivers.
                    Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(ack))) if !(subscribed && ack.session_present) => {
                        subscribed = true;
                        for f in &filters {
                            sub.subscribe(f.clone(), QoS::AtLeastOnce).await.unwrap();
                        }
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(ready) = ready_tx.take() {
                            let _ = ready.send(());
                        }
                    }
                    Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.clone().unwrap_or_default();
                        let _ = tx.send(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            correlation: props.correlation_data.map(|b| b.to_vec()),
                            user_properties: props.user_properties,
                            content_type: props.content_type,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), ready_rx)
            .await
            .expect("test client subscribed")
            .unwrap();
        TestClient { client, rx, backlog: Default::default() }
    }

    /// The next message on `topic` within `timeout`; messages on other topics are kept for later.
    pub async fn next_on(&mut self, topic: &str, timeout: std::time::Duration) -> Option<Received> {
        if let Some(i) = self.backlog.iter().position(|m| m.topic == topic) {
            return self.backlog.remove(i);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if m.topic == topic => return Some(m),
                Ok(Some(m)) => self.backlog.push_back(m),
                _ => return None,
            }
        }
    }

    /// Publishes a request with v5 properties.
    pub async fn request(
        &self,
        topic: &str,
        payload: &[u8],
        response_topic: Option<&str>,
        correlation: Option<&[u8]>,
        expiry_s: Option<u32>,
    ) {
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            response_topic: response_topic.map(str::to_owned),
            correlation_data: correlation.map(|c| c.to_vec().into()),
            message_expiry_interval: expiry_s,
            ..Default::default()
        };
        self.client
            .publish_with_properties(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload.to_vec(), props)
            .await
            .unwrap();
    }
}

/// Validates `instance` against a schema file under docs/schemas.
pub fn assert_schema(schema_file: &str, instance: &serde_json::Value) {
    let path = repo().join("docs/schemas").join(schema_file);
    let schema: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("{schema_file}: {e}"));
    let errors: Vec<String> =
        validator.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path)).collect();
    assert!(errors.is_empty(), "{schema_file} rejects {instance}: {errors:?}");
}

/// A `scenecast` process (camera daemon or worker) started with its own config file, its log
/// (at `info`) in a file beside it; killed when dropped.
pub struct Proc {
    child: std::process::Child,
    log: PathBuf,
    pub name: String,
}

impl Proc {
    /// Writes `config` to `<dir>/<name>.toml` and runs `scenecast --config it --log info COMMAND`.
    pub fn start(dir: &Path, name: &str, command: &str, config: &str) -> Proc {
        let config_path = write_temp(dir, &format!("{name}.toml"), config.as_bytes());
        let log = dir.join(format!("{name}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_scenecast"))
            .args(["--config", config_path.to_str().unwrap(), "--log", "info", command])
            .env_remove("ORT_DYLIB_PATH")
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc { child, log, name: name.into() }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident set size now, MiB (0 when it cannot be read).
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The start of a daemon's or worker's config: its state directory under `dir`, the broker on
/// `port`, the device name and a quick reconnect. `[mqtt]` keys may follow, then other sections.
pub fn base_config(dir: &Path, port: u16, device: &str) -> String {
    format!(
        "state_dir = {:?}\n[mqtt]\nport = {port}\ndevice = {device:?}\nreconnect_min_s = 0.2\n",
        dir.join(device).display().to_string()
    )
}

/// Waits until the retained status of each device (`scenecast/<device>/status`) is `online`.
pub async fn wait_online(port: u16, devices: &[&str], timeout: std::time::Duration) {
    static WATCHERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = WATCHERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("test-status-watch-{}-{n}", std::process::id());
    let mut watch = TestClient::connect(port, &id, &["scenecast/+/status"]).await;
    for d in devices {
        let topic = format!("scenecast/{d}/status");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let m = watch.next_on(&topic, left).await.unwrap_or_else(|| panic!("{d} did not come online"));
            if m.payload == b"online" {
                break;
            }
        }
    }
}
