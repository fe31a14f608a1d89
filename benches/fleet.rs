//! Load on the MQTT side, with real processes on a real Mosquitto broker (not a timed test):
//!
//! 1. **Many clients, one camera**: 20 clients each ask 50 questions, one after the other
//!    (closed loop), of one `scenecast run` daemon. Every request must get an answer or a `busy`
//!    error: none lost, none answered twice. Prints p50/p90/p99 latency of answers and of
//!    refusals, the `busy` share, and the daemon's resident memory before and during the load.
//! 2. **Offload to three workers**: 6 clients each ask one camera for 20 renders, which it hands
//!    to three `scenecast worker` processes through a shared subscription; one worker is killed
//!    (SIGKILL) a third of the way in. Prints how the jobs spread over the workers and that every
//!    request still got exactly one reply.
//!
//! Run with `make bench-fleet` (or `cargo bench --bench fleet`) after `make models`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{base_config, cache_root, wait_online, Broker, Proc, TestClient};

const CLIENTS: usize = 20;
const QUESTIONS: usize = 50;
const RENDER_CLIENTS: usize = 6;
const RENDERS: usize = 20;
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
const ONLINE: Duration = Duration::from_secs(120);

fn camera(dir: &Path, port: u16, device: &str, extra: &str) -> String {
    format!(
        "{}{extra}\n[camera]\npath = {:?}\ninterval_s = 1.0\n[llm]\nthreads = 2\nmax_tokens = 16\n",
        base_config(dir, port, device),
        cache_root().join("models/photos/coffee.png").display().to_string()
    )
}

fn worker(dir: &Path, port: u16, device: &str) -> String {
    format!("{}[llm]\nthreads = 1\n", base_config(dir, port, device))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// What one client saw.
#[derive(Default)]
struct Tally {
    answers: Vec<f64>,
    refusals: BTreeMap<String, Vec<f64>>,
    lost: usize,
    mismatched: usize,
    by_worker: BTreeMap<String, usize>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.answers.extend(other.answers);
        for (code, ms) in other.refusals {
            self.refusals.entry(code).or_default().extend(ms);
        }
        self.lost += other.lost;
        self.mismatched += other.mismatched;
        for (w, n) in other.by_worker {
            *self.by_worker.entry(w).or_default() += n;
        }
    }
}

/// One client: `n` requests on `topic`, each waiting for its reply (matched by correlation).
async fn client(port: u16, i: usize, topic: String, n: usize, render: bool, done: Arc<Mutex<usize>>) -> Tally {
    let reply_topic = format!("bench/replies/{i}");
    let mut c = TestClient::connect(port, &format!("bench-client-{i}"), &[&reply_topic]).await;
    let mut tally = Tally::default();
    for q in 0..n {
        let correlation = format!("{i}-{q}").into_bytes();
        let payload = if render {
            format!(r#"{{"prompt":"a cat on the left","seed":{q},"id":"{i}-{q}"}}"#)
        } else {
            format!(r#"{{"question":"Is there a cup?","id":"{i}-{q}"}}"#)
        };
        let start = Instant::now();
        c.request(&topic, payload.as_bytes(), Some(&reply_topic), Some(&correlation), None).await;
        loop {
            let Some(reply) = c.next_on(&reply_topic, REPLY_TIMEOUT).await else {
                tally.lost += 1;
                break;
            };
            if reply.correlation.as_deref() != Some(&correlation[..]) {
                // A reply to an earlier request: answered twice.
                tally.mismatched += 1;
                continue;
            }
            let ms = start.elapsed().as_secs_f64() * 1e3;
            if render && reply.payload.starts_with(b"\x89PNG") {
                tally.answers.push(ms);
                let w = reply.property("device").unwrap_or("?").to_owned();
                *tally.by_worker.entry(w).or_default() += 1;
            } else {
                let body = reply.json();
                match body["error"]["code"].as_str() {
                    Some(code) => tally.refusals.entry(code.to_owned()).or_default().push(ms),
                    None => tally.answers.push(ms),
                }
            }
            break;
        }
        *done.lock().unwrap() += 1;
    }
    // Anything arriving after the last reply is a duplicate.
    while c.next_on(&reply_topic, Duration::from_secs(3)).await.is_some() {
        tally.mismatched += 1;
    }
    tally
}

async fn run_clients(
    port: u16,
    topic: &str,
    clients: usize,
    n: usize,
    render: bool,
    mut during: impl FnMut(usize) + Send,
) -> (Tally, Duration) {
    let done = Arc::new(Mutex::new(0usize));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            tokio::spawn(client(port, i + if render { 100 } else { 0 }, topic.to_owned(), n, render, done.clone()))
        })
        .collect();
    while !tasks.iter().all(|t| t.is_finished()) {
        during(*done.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut tally = Tally::default();
    for t in tasks {
        tally.merge(t.await.unwrap());
    }
    (tally, start.elapsed())
}

fn report(title: &str, tally: &mut Tally, total: usize, elapsed: Duration) {
    tally.answers.sort_by(f64::total_cmp);
    let refused: usize = tally.refusals.values().map(Vec::len).sum();
    println!("{title}: {total} requests in {:.1} s", elapsed.as_secs_f64());
    println!(
        "  answered {} ({:.1} %), refused {} ({:.1} %), lost {}, answered twice {}",
        tally.answers.len(),
        100.0 * tally.answers.len() as f64 / total as f64,
        refused,
        100.0 * refused as f64 / total as f64,
        tally.lost,
        tally.mismatched
    );
    let a = &tally.answers;
    println!(
        "  answer latency ms: p50 {:.0}  p90 {:.0}  p99 {:.0}",
        percentile(a, 0.5),
        percentile(a, 0.9),
        percentile(a, 0.99)
    );
    for (code, ms) in tally.refusals.iter_mut() {
        ms.sort_by(f64::total_cmp);
        println!(
            "  `{code}` refusals: {} ({:.1} %), latency ms p50 {:.0}  p90 {:.0}  p99 {:.0}",
            ms.len(),
            100.0 * ms.len() as f64 / total as f64,
            percentile(ms, 0.5),
            percentile(ms, 0.9),
            percentile(ms, 0.99)
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let broker = Broker::start();
    let port = broker.port;
    let dir = tempfile::tempdir().unwrap();

    // 1. Many clients, one camera.
    let cam = Proc::start(dir.path(), "cam", "run", &camera(dir.path(), port, "cam", ""));
    rt.block_on(wait_online(port, &["cam"], ONLINE));
    std::thread::sleep(Duration::from_secs(3));
    let idle_rss = cam.rss_mib();
    let mut peak_rss = idle_rss;
    let (mut tally, elapsed) = rt.block_on(run_clients(port, "scenecast/cam/ask", CLIENTS, QUESTIONS, false, |_| {
        peak_rss = peak_rss.max(cam.rss_mib());
    }));
    report(&format!("{CLIENTS} clients x {QUESTIONS} questions, one camera"), &mut tally, CLIENTS * QUESTIONS, elapsed);
    println!("  camera RSS: {idle_rss:.0} MiB idle, peak {peak_rss:.0} MiB under load (sampled every 100 ms)");
    drop(cam);

    // 2. Offload to three workers, one killed a third of the way in.
    let offload = "[offload]\nkinds = [\"generate\"]\ntimeout_s = 60\nretry_s = 3\n";
    let _cam = Proc::start(dir.path(), "cam2", "run", &camera(dir.path(), port, "cam2", offload));
    let mut workers: HashMap<String, Proc> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| ((*w).to_owned(), Proc::start(dir.path(), w, "worker", &worker(dir.path(), port, w))))
        .collect();
    rt.block_on(wait_online(port, &["cam2", "w1", "w2", "w3"], ONLINE));
    let total = RENDER_CLIENTS * RENDERS;
    let mut killed_at = None;
    let (mut tally, elapsed) =
        rt.block_on(run_clients(port, "scenecast/cam2/generate", RENDER_CLIENTS, RENDERS, true, |done| {
            if killed_at.is_none() && done >= total / 3 {
                killed_at = Some(done);
                workers.remove("w2");
            }
        }));
    report(
        &format!(
            "{RENDER_CLIENTS} clients x {RENDERS} renders offloaded to 3 workers (w2 killed after {} replies)",
            killed_at.unwrap_or(0)
        ),
        &mut tally,
        total,
        elapsed,
    );
    let split: Vec<String> = tally.by_worker.iter().map(|(w, n)| format!("{w} {n}")).collect();
    println!("  jobs per worker: {}", split.join(", "));
}
