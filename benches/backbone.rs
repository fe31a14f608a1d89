//! Backbone benchmarks, each against a baseline in the same process, same GGUF, same threads:
//!
//! 1. Decode speed: scenecast's generation loop (sys-crate decode, Rust sampler, stop filter)
//!    against a bare llama.cpp decode loop written with the `llama-cpp-2` crate (greedy sampler).
//! 2. Time to first token for a question about the current scene: with the scene prefix cached,
//!    against re-encoding the image and re-prefilling the prefix.
//! 3. The cost of the projector's LoRA adapter: scene prefill and decode of the fetched base GGUF
//!    alone, with the adapter applied at run time on every token, on the scene prefix only
//!    (`llm.adapter_scope = "scene"`) and on the scene prefix and each question (`"prompt"`), and
//!    merged into the GGUF (made at `make models`).
//!
//! Run with `cargo bench --bench backbone` after `make models`.

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

const PROMPT: &str =
    "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n";
const N_GEN: usize = 96;

fn options(max_tokens: usize) -> GenerateOptions {
    // No repeat penalty: the bare loop's greedy sampler has none either.
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams { repeat_penalty: 1.0, ..SamplingParams::default() },
        deadline: None,
        cancel: None,
    }
}

/// tokens/s of a bare llama-cpp-2 greedy decode loop.
fn bare_decode(backend: &LlamaBackend, model: &LlamaModel, threads: i32) -> f64 {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(2048))
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
    let mut sampler = LlamaSampler::greedy();
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
    let mut plain = manifest.clone();
    plain.llm.adapter = None;
    plain.llm.adapter_scope = AdapterScope::All;
    let mut ours = Backbone::load(&plain, &root, &llm).expect("SmolLM2 (run `make models` first)");

    let backend = LlamaBackend::init().unwrap();
    let path = manifest.resolve(&manifest.llm.file, &root);
    let model = LlamaModel::load_from_file(&backend, &path, &LlamaModelParams::default()).unwrap();

    let (mut ours_tps, mut bare_tps) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        ours.set_prefix(1, &[Part::Text(PROMPT)]).unwrap();
        let g = ours.generate(&[], &options(N_GEN), &mut |_| true).unwrap();
        // Generation stops at the end token if the model gets there; count what it decoded.
        ours_tps.push(g.n_tokens as f64 / (g.decode_ms / 1e3));
        bare_tps.push(bare_decode(&backend, &model, threads as i32));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ours_tps, bare_tps) = (median(ours_tps), median(bare_tps));
    println!("decode, SmolLM2-135M Q4_1, {threads} threads, greedy, up to {N_GEN} tokens (median of 3):");
    println!("  bare llama.cpp loop (llama-cpp-2)  {bare_tps:7.1} tok/s  (baseline)");
    println!("  scenecast Backbone::generate       {ours_tps:7.1} tok/s  ratio {:.3}", ours_tps / bare_tps);

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
    let mut rows = Vec::new();
    for (label, m) in &stacks {
        let mut b = Backbone::load(m, &root, &llm).unwrap();
        let (mut prefill, mut tps, mut n_gen) = (Vec::new(), Vec::new(), None);
        for i in 0..3u64 {
            // The scene's prefill, then the first question's (after a scene-only adapter is
            // switched off, llama.cpp re-plans its graph on that decode).
            let scene = b.set_scene(100 + i, Some(&tokens)).unwrap();
            let question = b.request_text("Is there a cat in the image?");
            let g = b.generate(&[Part::Text(&question)], &options(1), &mut |_| true).unwrap();
            prefill.push(scene + g.prefill_ms);
            b.set_prefix(200 + i, &[Part::Text(PROMPT)]).unwrap();
            let g = b.generate(&[], &options(N_GEN), &mut |_| true).unwrap();
            // Greedy: every round writes the same story.
            assert_eq!(*n_gen.get_or_insert(g.n_tokens), g.n_tokens, "{label}");
            tps.push(g.n_tokens as f64 / (g.decode_ms / 1e3));
        }
        let adapter = m.llm.adapter.as_ref().map(|a| m.resolve(a, &root));
        let n_gen = n_gen.expect("three rounds ran");
        rows.push((label, median(prefill), median(tps), n_gen, m.resolve(&m.llm.file, &root), adapter));
    }
    println!(
        "the projector's LoRA adapter: prefill of a scene ({} image tokens) and a question, decode of the story prompt, up to {N_GEN} tokens (median of 3):",
        tokens.n_tokens
    );
    let (base_prefill, base_tps) = (rows[0].1, rows[0].2);
    let name = |p: &std::path::Path| p.file_name().unwrap_or_default().to_string_lossy().into_owned();
    for (label, prefill, tps, n_gen, file, adapter) in &rows {
        println!(
            "  {label:<26} prefill {prefill:7.1} ms  decode {tps:6.1} tok/s ({n_gen:2} tokens)  ratio prefill {:.2}, decode {:.2}  {}{}",
            prefill / base_prefill,
            tps / base_tps,
            name(file),
            adapter.as_ref().map_or(String::new(), |a| format!(" + {}", name(a)))
        );
    }
}

/// The stacks whose adapter cost is compared, each a manifest: the fetched base GGUF alone (the
/// baseline); an adapter trained on every token (the one models/sources.toml's `merge` folds into
/// a copy of the GGUF, v5's) applied at run time, and merged; and the reference's adapter on the
/// scene prefix only (`llm.adapter_scope = "scene"`, as it was trained) and, to show what that
/// scope costs, on the scene prefix and the question (`"prompt"`).
fn adapter_stacks(reference: &Manifest) -> Vec<(&'static str, Manifest)> {
    let sources = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/sources.toml");
    let sources: toml::Value = toml::from_str(&std::fs::read_to_string(sources).unwrap()).unwrap();
    let merge = sources["part"].as_array().unwrap().iter().find_map(|p| p.get("merge")).expect("a merge part");
    let cached =
        |key: &str| FileRef { cache: Some(merge[key].as_str().unwrap().into()), path: None, sha256: None, size: None };
    let mut base = reference.clone();
    base.llm.file = cached("base");
    base.llm.adapter = None;
    base.llm.adapter_scope = AdapterScope::All;
    let mut every = base.clone();
    every.llm.adapter = Some(cached("adapter"));
    let mut scene = base.clone();
    scene.llm.adapter = Some(reference.llm.adapter.clone().unwrap_or_else(|| cached("adapter")));
    scene.llm.adapter_scope = AdapterScope::Scene;
    let mut prompt = scene.clone();
    prompt.llm.adapter_scope = AdapterScope::Prompt;
    let mut merged = base.clone();
    merged.llm.file = cached("dest");
    vec![
        ("base GGUF alone", base),
        ("adapter on every token", every),
        ("adapter merged", merged),
        ("adapter on the scene only", scene),
        ("adapter on scene + prompts", prompt),
    ]
}
