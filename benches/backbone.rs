//! Backbone benchmarks, each against a baseline in the same process, same GGUF, same threads:
//!
//! 1. Decode speed: scenecast's generation loop (sys-crate decode, Rust sampler, stop filter)
//!    against a bare llama.cpp decode loop written with the `llama-cpp-2` crate (greedy sampler),
//!    without a repeat penalty and with the captions' default one (llama.cpp's penalty sampler).
//! 2. Time to first token for a question about the current scene: with the scene prefix cached,
//!    against re-encoding the image and re-prefilling the prefix.
//! 3. The cost of the projector's LoRA adapter: scene prefill and decode of the fetched base GGUF
//!    alone, with the adapter applied at run time on every token, on the scene prefix only
//!    (`llm.adapter_scope = "scene"`) and on the scene prefix and each question (`"prompt"`), the
//!    same adapter on every token (its products without the switching), and merged into the GGUF
//!    (made at `make models`).
//!
//! The machine's speed drifts within minutes, so the sides of each comparison take turns, round by
//! round, and each reports the median of its per-round ratios with their middle half.
//!
//! Run with `cargo bench --bench backbone` after `make models`; `SCENECAST_BENCH_ADAPTER=<gguf>` adds a
//! row for another adapter file on the scene prefix (the same weights stored otherwise, a retrained one).

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use scenecast::config::Config;
use scenecast::frame::RgbImage;
use scenecast::llm::LlmConfig;
use scenecast::llm::SamplingParams;
use scenecast::llm::{Backbone, GenerateOptions, Part};
use scenecast::manifest::{AdapterScope, FileRef, Manifest};
use scenecast::onnx::OnnxRuntime;
use scenecast::vision::ImageTokens;
use scenecast::vision::Vision;

#[path = "../tests/common/mod.rs"]
mod common;

const PROMPT: &str =
    "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n";
const N_GEN: usize = 96;

fn options(max_tokens: usize) -> GenerateOptions {
    options_with(max_tokens, 1.0)
}

/// Greedy, with a repeat penalty over the last 64 tokens (1.0: none).
fn options_with(max_tokens: usize, repeat_penalty: f32) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams { repeat_penalty, repeat_last_n: 64, ..SamplingParams::default() },
        deadline: None,
        cancel: None,
    }
}

/// tokens/s of a bare llama-cpp-2 greedy decode loop, with llama.cpp's repeat penalty over the last
/// 64 tokens (1.0: none).
fn bare_decode(backend: &LlamaBackend, model: &LlamaModel, threads: i32, repeat_penalty: f32) -> f64 {
    // The same context length as scenecast's default, so both sides hold the same KV cache.
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(scenecast::llm::LlmConfig::default().context))
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(backend, params).unwrap();
    let tokens = model.vocab().tokenize(PROMPT.as_bytes(), false, true);
    let mut batch = LlamaBatch::new(512, 1);
    for (i, t) in tokens.iter().enumerate() {
        batch.add(*t, i as i32, &[0], i == tokens.len() - 1).unwrap();
    }
    ctx.decode(&mut batch).unwrap();
    let mut sampler = if repeat_penalty == 1.0 {
        LlamaSampler::greedy()
    } else {
        LlamaSampler::chain_simple([
            LlamaSampler::penalties(model.n_vocab(), 64, repeat_penalty, 0.0, 0.0),
            LlamaSampler::greedy(),
        ])
    };
    let mut pos = tokens.len() as i32;
    let start = Instant::now();
    let mut n = 0;
    while n < N_GEN {
        let token = sampler.sample(&ctx, batch.n_tokens() - 1);
        sampler.accept(token);
        n += 1;
        batch.clear();
        batch.add(token, pos, &[0], true).unwrap();
        pos += 1;
        ctx.decode(&mut batch).unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let config = Config::builtin();
    let root = config.cache_root();
    let manifest = Manifest::reference().unwrap();
    let threads = scenecast::physical_cores();
    let llm = LlmConfig { threads, ..LlmConfig::default() };
    // Bare llama.cpp runs the GGUF alone, so the loop is compared without an adapter (the cost of
    // one applied at run time, on every token or on the scene only, is measured below).
    let plain = fetched_base(&manifest);
    let mut ours = Backbone::load(&plain, &root, &llm).expect("SmolLM2 (run `make models` first)");

    let backend = LlamaBackend::init().unwrap();
    let path = plain.resolve(&plain.llm.file, &root);
    let model = LlamaModel::load_from_file(&backend, &path, &LlamaModelParams::default()).unwrap();

    // This machine's speed drifts by a fifth within minutes, so the two loops alternate (which
    // one goes first alternates too) and the ratio is taken round by round, each round's two runs
    // a second apart; the median of those ratios is what the bench reports. Without a repeat
    // penalty, and with the one captions use by default (1.1 over the last 64 tokens; llama.cpp's
    // penalty sampler in the bare loop).
    for penalty in [1.0, SamplingParams::default().repeat_penalty] {
        let (mut ours_tps, mut bare_tps, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let mut ours_round = || {
                ours.set_prefix(1, &[Part::Text(PROMPT)]).unwrap();
                let g = ours.generate(&[], &options_with(N_GEN, penalty), &mut |_| true).unwrap();
                // Generation stops at the end token if the model gets there; count what it decoded.
                g.n_tokens as f64 / (g.decode_ms / 1e3)
            };
            let bare = || bare_decode(&backend, &model, threads as i32, penalty);
            let (o, b) = if round % 2 == 0 {
                let o = ours_round();
                (o, bare())
            } else {
                let b = bare();
                (ours_round(), b)
            };
            ours_tps.push(o);
            bare_tps.push(b);
            ratios.push(o / b);
        }
        println!(
            "decode, SmolLM2-135M Q4_1, {threads} threads, greedy, repeat penalty {penalty}, up to {N_GEN} tokens (medians of {ROUNDS} alternating rounds):"
        );
        println!("  bare llama.cpp loop (llama-cpp-2)  {:7.1} tok/s  (baseline)", median(bare_tps));
        println!(
            "  scenecast Backbone::generate       {:7.1} tok/s  ratio {:.3} (per round {})",
            median(ours_tps),
            median(ratios.clone()),
            spread(&ratios)
        );
    }

    let runtime = OnnxRuntime::init(&config.onnx, &root).unwrap();
    let mut vision = Vision::load(&runtime, &manifest, &root, Some(ours.summary().gguf.llm_width())).unwrap();
    let photo = RgbImage::open(&root.join("models/photos/chelsea.png")).unwrap();
    let mut tokens = ImageTokens::default();
    let question = "What is in the picture?";
    let (mut cached, mut uncached) = (Vec::new(), Vec::new());
    for i in 0..5u64 {
        let start = Instant::now();
        vision.run(&photo, &mut tokens).unwrap();
        ours.set_scene(i, Some(&tokens)).unwrap();
        let setup_ms = start.elapsed().as_secs_f64() * 1e3;
        let g = ours.ask(question, &options(1), &mut |_| true).unwrap();
        uncached.push(setup_ms + g.ttft_ms);
        let g = ours.ask(question, &options(1), &mut |_| true).unwrap();
        cached.push(g.ttft_ms);
    }
    let (cached, uncached) = (median(cached), median(uncached));
    println!("time to first token, question about the current scene (median of 5):");
    println!("  re-encode image + re-prefill prefix  {uncached:7.1} ms  (baseline)");
    println!("  scene prefix cached                  {cached:7.1} ms  {:.1}x faster", uncached / cached);

    drop(ours);
    // 3. The projector's adapter: the fetched base GGUF alone (baseline), the adapter applied at
    //    run time on every token and on the scene prefix only, and merged into the GGUF.
    let stacks = adapter_stacks(&manifest);
    // Every stack decodes the story up to N_GEN tokens, or until it ends it (an adapter on every
    // token changes the text; v5's ends it after 7). At about 100 tokens of context, decode speed
    // hardly depends on how many came before, so each row times and prints its own count.
    // All stacks are loaded at once and take turns, round by round, in an order that rotates, so
    // each ratio to the base GGUF compares runs seconds apart (see the decode bench above).
    let mut backbones: Vec<Backbone> = stacks.iter().map(|(_, m)| Backbone::load(m, &root, &llm).unwrap()).collect();
    let n = stacks.len();
    let (mut prefill, mut tps, mut n_gen) = (vec![Vec::new(); n], vec![Vec::new(); n], vec![None; n]);
    for round in 0..ROUNDS as u64 {
        // Each round starts with the next stack, so no stack always runs first (or right after
        // the same one): the first run of a round was measurably slower.
        for k in (0..n).map(|i| (i + round as usize) % n) {
            let b = &mut backbones[k];
            // The scene's prefill, then the first question's (after a scene-only adapter is
            // switched off, llama.cpp re-plans its graph on that decode).
            let scene = b.set_scene(100 + round, Some(&tokens)).unwrap();
            let question = b.request_text("Is there a cat in the image?");
            let g = b.generate(&[Part::Text(&question)], &options(1), &mut |_| true).unwrap();
            prefill[k].push(scene + g.prefill_ms);
            b.set_prefix(200 + round, &[Part::Text(PROMPT)]).unwrap();
            let g = b.generate(&[], &options(N_GEN), &mut |_| true).unwrap();
            // Greedy: every round writes the same story.
            assert_eq!(*n_gen[k].get_or_insert(g.n_tokens), g.n_tokens, "{}", stacks[k].0);
            tps[k].push(g.n_tokens as f64 / (g.decode_ms / 1e3));
        }
    }
    drop(backbones);
    println!(
        "the projector's LoRA adapter: prefill of a scene ({} image tokens) and a question, decode of the story prompt, up to {N_GEN} tokens (medians of {ROUNDS} rounds; ratios to the base GGUF's run in the same round):",
        tokens.n_tokens
    );
    let name = |p: &std::path::Path| p.file_name().unwrap_or_default().to_string_lossy().into_owned();
    for (k, (label, m)) in stacks.iter().enumerate() {
        let per_round = |v: &[Vec<f64>]| v[k].iter().zip(&v[0]).map(|(x, base)| x / base).collect::<Vec<_>>();
        let (prefill_ratio, decode_ratio) = (per_round(&prefill), per_round(&tps));
        let adapter = match (&m.llm.scene_model, &m.llm.adapter) {
            (Some(scene), _) => Some(format!("scene model {}", name(&m.resolve(scene, &root)))),
            (None, adapter) => adapter.as_ref().map(|a| name(&m.resolve(a, &root))),
        };
        println!(
            "  {label:<26} prefill {:7.1} ms  decode {:6.1} tok/s ({:2} tokens)  ratio prefill {:.3} {}, decode {:.3} {}  {}{}",
            median(prefill[k].clone()),
            median(tps[k].clone()),
            n_gen[k].expect("rounds ran"),
            median(prefill_ratio.clone()),
            spread(&prefill_ratio),
            median(decode_ratio.clone()),
            spread(&decode_ratio),
            name(&m.resolve(&m.llm.file, &root)),
            adapter.map_or(String::new(), |a| format!(" + {a}"))
        );
    }
}

const ROUNDS: usize = 9;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The middle half of per-round ratios, "[q1, q3]", to show how much a median can be trusted.
fn spread(ratios: &[f64]) -> String {
    let mut v = ratios.to_vec();
    v.sort_by(f64::total_cmp);
    format!("[{:.2}-{:.2}]", v[v.len() / 4], v[v.len() * 3 / 4])
}

/// models/sources.toml's `merge` part: v5's adapter folded into a copy of the fetched GGUF.
fn merge_part() -> toml::Value {
    let sources = common::repo().join("models/sources.toml");
    let sources: toml::Value = toml::from_str(&std::fs::read_to_string(sources).unwrap()).unwrap();
    sources["part"].as_array().unwrap().iter().find_map(|p| p.get("merge")).expect("a merge part").clone()
}

/// The file of `key` in the merge part, in the model cache.
fn merge_file(key: &str) -> FileRef {
    FileRef { cache: Some(merge_part()[key].as_str().unwrap().into()), path: None, sha256: None, size: None }
}

/// The reference stack with the fetched GGUF alone: one file, no adapter, no scene model.
fn fetched_base(reference: &Manifest) -> Manifest {
    let mut base = reference.clone();
    base.llm.file = merge_file("base");
    base.llm.splits.clear();
    base.llm.scene_model = None;
    base.llm.adapter = None;
    base.llm.adapter_scope = AdapterScope::All;
    base
}

/// The stacks whose adapter cost is compared, each a manifest: the fetched base GGUF alone (the
/// baseline); an adapter trained on every token (the one models/sources.toml's `merge` folds into
/// a copy of the GGUF, v5's) applied at run time, and merged; the reference's adapter on the
/// scene prefix only (`llm.adapter_scope = "scene"`, as it was trained) applied at run time and,
/// to show what that scope costs, on the scene prefix and the question (`"prompt"`); and the
/// reference as it ships, that adapter folded into its scene model (`llm.scene_model`).
fn adapter_stacks(reference: &Manifest) -> Vec<(&'static str, Manifest)> {
    let base = fetched_base(reference);
    let mut every = base.clone();
    every.llm.adapter = Some(merge_file("adapter"));
    let mut scene = base.clone();
    scene.llm.adapter = Some(reference.llm.adapter.clone().unwrap_or_else(|| merge_file("adapter")));
    scene.llm.adapter_scope = AdapterScope::Scene;
    let mut prompt = scene.clone();
    prompt.llm.adapter_scope = AdapterScope::Prompt;
    // The reference's adapter on every token: what its matrix products cost without the switching.
    let mut scene_all = scene.clone();
    scene_all.llm.adapter_scope = AdapterScope::All;
    let mut merged = base.clone();
    merged.llm.file = merge_file("dest");
    let mut stacks = vec![
        ("base GGUF alone", base),
        ("adapter on every token", every),
        ("adapter merged", merged),
        ("adapter on the scene only", scene.clone()),
        ("adapter on scene + prompts", prompt),
        ("scene adapter, every token", scene_all),
        ("scene adapter folded in", reference.clone()),
    ];
    // Another adapter file to compare on the scene (e.g. the same weights stored otherwise).
    if let Some(path) = std::env::var_os("SCENECAST_BENCH_ADAPTER") {
        let mut other = scene;
        other.llm.adapter = Some(FileRef { cache: None, path: Some(path.into()), sha256: None, size: None });
        stacks.push(("$SCENECAST_BENCH_ADAPTER on the scene", other));
    }
    stacks
}
