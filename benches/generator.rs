//! Generator benchmarks: the shipped trained generator (models/reference.toml's `[generator]`,
//! scenegen) next to the tiny random SD-Turbo-layout test models (models/generator/tiny.toml), each
//! in its own process so that peak memory is its own, and each against a baseline in that process:
//!
//! 1. Time per denoising step through scenecast (`Generator::render`: sampler math, input
//!    scaling, the UNet session, output checks) against a bare `ort` session running the same UNet
//!    on the same tensors. The ratio is scenecast's per-step overhead.
//! 2. Load and unload times of the whole generator (tokenizer + three sessions), and what a render
//!    costs end to end.
//! 3. Memory: resident set before loading, peak (VmHWM) after loading and rendering, and after
//!    unloading, from /proc/self/status.
//!
//! 4. The shipped model's one-step render (its default: 1 Euler step at its size), the number a
//!    user waits for.
//!
//! Run with `cargo bench --bench generator` after `make models`.

use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use ort::session::Session;
use ort::value::TensorRef;
use scenecast::config::Config;
use scenecast::generate::{Conditioning, Generator};
use scenecast::manifest::Manifest;
use scenecast::onnx::OnnxRuntime;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn status_kib(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

const WHICH: &str = "SCENECAST_BENCH_GENERATOR";

fn main() {
    match std::env::var(WHICH).as_deref() {
        Ok("shipped") => bench("shipped (trained scenegen)", Manifest::reference().unwrap()),
        Ok("tiny") => bench("tiny random SD-Turbo layout", common::tiny_generator_manifest()),
        _ => {
            // Each model in a fresh process: VmHWM only ever grows.
            let exe = std::env::current_exe().expect("the bench's own path");
            for which in ["shipped", "tiny"] {
                let status = std::process::Command::new(&exe).env(WHICH, which).status().expect("running the bench");
                assert!(status.success(), "the {which} generator bench failed");
            }
        }
    }
}

fn bench(label: &str, manifest: Manifest) {
    let config = Config::builtin();
    let root = config.cache_root();
    let spec = manifest.generator.clone().expect("the manifest has a generator");
    let runtime = OnnxRuntime::init(&config.onnx, &root).expect("ONNX Runtime (run `make models` first)");
    let rss_before = status_kib("VmRSS:");

    // Load / unload.
    let (mut loads, mut unloads) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let start = Instant::now();
        let g = Generator::load(&runtime, &manifest, &root).unwrap();
        loads.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        drop(g);
        scenecast::release_free_memory();
        unloads.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mut generator = Generator::load(&runtime, &manifest, &root).unwrap();

    // Per step: 4 Euler steps at the default size, 20 renders.
    let mut options = Generator::default_options(&spec, 1);
    options.steps = 4;
    let mut steps = Vec::new();
    let mut totals = Vec::new();
    for seed in 0..20 {
        options.seed = seed;
        let r = generator.render(Conditioning::Prompt("a quiet street after rain"), &options).unwrap();
        steps.extend(r.timings.step_ms.iter().copied());
        totals.push(r.timings.total_ms);
    }
    // The model's own default: steps and size from the manifest (the shipped one: 1 step).
    let default = Generator::default_options(&spec, 3);
    let mut one = Vec::new();
    for seed in 0..20 {
        let r = generator
            .render(Conditioning::Prompt("a dog on the left"), &Generator::default_options(&spec, seed))
            .unwrap();
        one.push(r.timings.total_ms);
    }
    let hwm = status_kib("VmHWM:");

    // Baseline: the bare UNet session on the same shapes.
    let unet_path = manifest.resolve(&spec.unet.file, &root);
    let mut bare = Session::builder(runtime.ort_environment()).unwrap().commit_from_file(&unet_path).unwrap();
    let [h, w] = spec.size;
    let latent = vec![0.1f32; spec.latent_channels * (h / spec.vae_scale) * (w / spec.vae_scale)];
    let context = vec![0.01f32; spec.context_tokens * spec.text_width];
    let timestep = [999i64];
    let mut bare_steps = Vec::new();
    for _ in 0..80 {
        let start = Instant::now();
        let out = bare
            .run(ort::inputs![
                spec.unet.sample.as_str() => TensorRef::from_array_view(([1usize, spec.latent_channels, h / spec.vae_scale, w / spec.vae_scale], &latent[..])).unwrap(),
                spec.unet.timestep.as_str() => TensorRef::from_array_view(([1usize], &timestep[..])).unwrap(),
                spec.unet.context.as_str() => TensorRef::from_array_view(([1usize, spec.context_tokens, spec.text_width], &context[..])).unwrap(),
            ])
            .unwrap();
        std::hint::black_box(out[spec.unet.output.as_str()].try_extract_tensor::<f32>().unwrap().1.len());
        bare_steps.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let rss_loaded = status_kib("VmRSS:");
    drop(bare);
    drop(generator);
    // What OnDemand does when it unloads after idling.
    scenecast::release_free_memory();
    std::thread::sleep(Duration::from_millis(50));
    let rss_after = status_kib("VmRSS:");

    let (step, bare_step) = (median(steps), median(bare_steps));
    println!("generator: {label}, {w}x{h}, Euler, 4 steps (medians):");
    println!(
        "  step through scenecast {step:7.2} ms   bare ort UNet {bare_step:7.2} ms   ratio {:.2}",
        step / bare_step
    );
    println!("  render end to end      {:7.2} ms", median(totals));
    println!(
        "  default render         {:7.2} ms   ({} step(s) at {}x{}, the manifest's default)",
        median(one),
        default.steps,
        default.size[1],
        default.size[0]
    );
    println!("  load                   {:7.2} ms   unload {:.2} ms", median(loads), median(unloads));
    println!(
        "  memory: RSS before load {:.0} MiB, peak (VmHWM) {:.0} MiB (+{:.0} MiB), loaded {:.0} MiB, after unload {:.0} MiB",
        mib(rss_before),
        mib(hwm),
        mib(hwm.saturating_sub(rss_before)),
        mib(rss_loaded),
        mib(rss_after)
    );
}
