//! The generator on the real ONNX Runtime: the trained scenegen model the reference manifest ships
//! (models/generator/scenegen-v1) and the tiny randomly initialised models of SD-Turbo's layout
//! (models/generator/tiny.toml: a network VAE, 4 latent channels), with CLIP's real tokenizer; the
//! output-projector path with the real SmolLM2 hidden states on llama.cpp.

mod common;

use common::*;
use scenecast::generate::{ConditionPath, GeneratorConfig};
use scenecast::generate::{Conditioning, Generator, GeneratorError, OnDemand, RenderLimits};
use scenecast::llm::Backbone;
use scenecast::llm::LlmConfig;
use scenecast::manifest::SamplerKind;

fn generator() -> (Generator, scenecast::manifest::GeneratorSpec) {
    let m = manifest();
    let g = Generator::load(&runtime(), &m, &cache_root()).unwrap_or_else(|e| panic!("{e}"));
    (g, m.generator.unwrap())
}

#[test]
fn the_clip_tokenizer_gives_clips_ids_and_truncates_to_77_tokens() {
    let (g, spec) = generator();
    let (ids, used, cut) = g.tokenize("a photo of a cat").unwrap();
    // CLIP's ids (as transformers' CLIPTokenizer gives them), then padding.
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!((used, cut, ids.len()), (7, 0, 77));
    assert!(ids[7..].iter().all(|&i| i == i64::from(spec.pad_token)));
    let (ids, used, cut) = g.tokenize(&"cat ".repeat(100)).unwrap();
    assert_eq!((used, cut), (77, 25), "100 words + BOS + EOS = 102 tokens, 25 over");
    assert_eq!((ids[0], ids[76]), (49406, 49407), "BOS first, EOS kept last");
}

#[test]
fn renders_are_deterministic_for_a_seed_and_have_the_requested_size() {
    for m in [manifest(), tiny_generator_manifest()] {
        let g = Generator::load(&runtime(), &m, &cache_root()).unwrap_or_else(|e| panic!("{e}"));
        renders_are_deterministic(g, m.generator.unwrap());
    }
}

fn renders_are_deterministic(mut g: Generator, spec: scenecast::manifest::GeneratorSpec) {
    let mut options = Generator::default_options(&spec, 42);
    let a = g.render(Conditioning::Prompt("a lighthouse at dusk"), &options).unwrap();
    let b = g.render(Conditioning::Prompt("a lighthouse at dusk"), &options).unwrap();
    assert_eq!((a.image.width() as usize, a.image.height() as usize), (spec.size[1], spec.size[0]));
    assert_eq!(a.image.pixels(), b.image.pixels(), "same seed, same image");
    assert_eq!(a.timings.step_ms.len(), spec.steps);
    options.seed = 43;
    let c = g.render(Conditioning::Prompt("a lighthouse at dusk"), &options).unwrap();
    assert_ne!(a.image.pixels(), c.image.pixels(), "another seed, another image");
    let other = g.render(Conditioning::Prompt("a bowl of soup"), &Generator::default_options(&spec, 42)).unwrap();
    assert_ne!(a.image.pixels(), other.image.pixels(), "the prompt conditions the image");

    // LCM with guidance (two UNet halves per step) at another size, also repeatable.
    let m = spec.size_multiple;
    let lcm = scenecast::generate::RenderOptions {
        seed: 1,
        steps: 4,
        size: [2 * m, 5 * m],
        guidance: 2.5,
        sampler: SamplerKind::Lcm,
    };
    let x = g.render(Conditioning::Prompt("a dog"), &lcm).unwrap();
    let y = g.render(Conditioning::Prompt("a dog"), &lcm).unwrap();
    assert_eq!((x.image.width() as usize, x.image.height() as usize), (5 * m, 2 * m));
    assert_eq!(x.image.pixels(), y.image.pixels());
    assert_eq!(x.timings.step_ms.len(), 4);
}

#[test]
fn the_output_projector_path_runs_end_to_end_on_the_llms_hidden_states() {
    let root = cache_root();
    let m = manifest();
    let mut backbone = Backbone::load(&m, &root, &LlmConfig { threads: 1, ..LlmConfig::default() }).unwrap();
    let (mut g, spec) = generator();
    assert!(g.has_output_projector());
    let signal = &spec.output_projector.as_ref().unwrap().signal;
    let states = backbone.signal_states("Describe the image.", "A cat on a sofa.", signal).unwrap();
    let n_embd = backbone.summary().gguf.n_embd;
    let n_signal = backbone.tokenize(signal, false).len();
    assert_eq!(states.len(), n_signal * n_embd);
    assert!(states.iter().all(|v| v.is_finite()) && states.iter().any(|v| *v != 0.0));
    // The same text gives the same states; another text other states.
    assert_eq!(states, backbone.signal_states("Describe the image.", "A cat on a sofa.", signal).unwrap());
    assert_ne!(states, backbone.signal_states("Describe the image.", "A red car.", signal).unwrap());
    // The context returns states for at most 32 positions per decode (llama.cpp sizes its
    // compute buffer for that many outputs): 32 tokens are read, 33 refused with the limit.
    let max = scenecast::llm::MAX_OUTPUTS;
    let long = |n: usize| " Picture".repeat(n);
    assert_eq!(backbone.tokenize(&long(max), false).len(), max);
    let at_limit = backbone.signal_states("Describe the image.", "A cat.", &long(max)).unwrap();
    assert_eq!(at_limit.len(), max * n_embd);
    let err = backbone.signal_states("Describe the image.", "A cat.", &long(max + 1)).unwrap_err().to_string();
    assert!(err.contains(&format!("is {} tokens", max + 1)) && err.contains(&format!("at most {max}")), "{err}");
    // And the backbone still answers as before (the cache was cut back, logits mode restored).
    let answer = backbone.ask("What is the capital of France?", &backbone.default_options(), &mut |_| true).unwrap();
    assert!(!answer.text.is_empty());

    let options = Generator::default_options(&spec, 5);
    let hidden = g.render(Conditioning::Hidden { states: &states, n_embd }, &options).unwrap();
    let text = g.render(Conditioning::Prompt("A cat on a sofa."), &options).unwrap();
    assert_eq!(hidden.image.width() as usize, spec.size[1]);
    assert_ne!(hidden.image.pixels(), text.image.pixels(), "two conditioning paths, two images");
    let via_worker = scenecast::pipeline::render_description(
        &mut backbone,
        &mut g,
        ConditionPath::Hidden,
        "Describe the image.",
        "A cat on a sofa.",
        &options,
    )
    .unwrap();
    assert_eq!(via_worker.image.pixels(), hidden.image.pixels());

    // Rows of the wrong width are refused by name.
    let err = g.render(Conditioning::Hidden { states: &states[..10], n_embd }, &options).unwrap_err().to_string();
    assert!(err.contains("rows of the LLM's width 576"), "{err}");
}

/// The trained generator's text encoder reads only the words it learned: a caption as the LLM writes
/// it (capital, full stop, a word never seen in training) renders exactly what its known words
/// render, while a change of object or position changes the image.
#[test]
fn the_trained_generator_reads_its_own_words_and_drops_the_rest() {
    let (mut g, spec) = generator();
    assert!(!spec.random, "the reference manifest ships the trained generator");
    let options = Generator::default_options(&spec, 9);
    let mut render = |prompt: &str| g.render(Conditioning::Prompt(prompt), &options).unwrap().image.pixels().to_vec();
    let plain = render("a dog on the left");
    assert_eq!(render("A Dog on the left there."), plain, "unknown words and punctuation are dropped");
    assert_ne!(render("a dog on the right"), plain, "the position conditions the image");
    assert_ne!(render("a cup on the left"), plain, "the object conditions the image");
}

#[test]
fn requests_out_of_range_are_refused_with_the_allowed_range() {
    let (_, spec) = generator();
    let limits = RenderLimits { max_steps: 4, max_side: 256, max_prompt_chars: 2000 };
    let ok = Generator::default_options(&spec, 0);
    assert!(Generator::check(&spec, &ok, limits).is_ok());
    let m = spec.size_multiple;
    let sides = format!("multiple of {m} between {m} and 256");
    let cases = [
        (scenecast::generate::RenderOptions { steps: 0, ..ok.clone() }, "expected 1 to 4"),
        (scenecast::generate::RenderOptions { steps: 5, ..ok.clone() }, "expected 1 to 4"),
        (scenecast::generate::RenderOptions { size: [100, 128], ..ok.clone() }, sides.as_str()),
        (scenecast::generate::RenderOptions { size: [512, 128], ..ok.clone() }, sides.as_str()),
        (scenecast::generate::RenderOptions { guidance: -1.0, ..ok.clone() }, "guidance"),
    ];
    for (options, message) in cases {
        let err = Generator::check(&spec, &options, limits).unwrap_err().to_string();
        assert!(err.contains(message), "{options:?}: {err}");
    }
}

#[test]
fn the_loader_checks_tensor_names_against_the_export() {
    // The manifest's names are an Optimum export's; a model with others is refused, naming both.
    let mut m = manifest();
    let g = m.generator.as_mut().unwrap();
    g.unet.timestep = "t".into();
    let err = Generator::load(&runtime(), &m, &cache_root()).err().expect("refused").to_string();
    assert!(
        err.contains("expected input `t`") && err.contains("`timestep`") && err.contains("`encoder_hidden_states`"),
        "{err}"
    );

    let mut m = manifest();
    let g = m.generator.as_mut().unwrap();
    g.vae_decoder.file = g.unet.file.clone();
    let err = Generator::load(&runtime(), &m, &cache_root()).err().expect("refused").to_string();
    assert!(err.contains("expected input `latent_sample`"), "{err}");

    let mut m = manifest();
    m.generator = None;
    let err = Generator::load(&runtime(), &m, &cache_root()).err().expect("refused");
    assert!(matches!(err, GeneratorError::NotConfigured(_)), "{err}");
}

#[test]
fn on_demand_loads_when_needed_and_unloads_when_idle() {
    let m = manifest();
    let config = GeneratorConfig { idle_unload_s: 0.0, ..GeneratorConfig::default() };
    let mut slot = OnDemand::new(runtime(), m.clone(), cache_root(), config);
    assert!(!slot.is_loaded(), "nothing loaded up front");
    assert!(slot.unload_if_idle().is_none());
    let (_, load_ms) = slot.get().unwrap();
    assert!(load_ms.is_some_and(|ms| ms > 0.0), "the first use reports its load time");
    assert!(slot.get().unwrap().1.is_none(), "loaded once");
    assert!(slot.unload_if_idle().is_some() && !slot.is_loaded(), "idle 0 s: unloaded");
    assert!(slot.get().unwrap().1.is_some(), "loaded again on demand");

    let mut off = OnDemand::new(
        runtime(),
        m.clone(),
        cache_root(),
        GeneratorConfig { enabled: false, ..GeneratorConfig::default() },
    );
    assert!(matches!(off.get().err(), Some(GeneratorError::Disabled)));
    let mut short = OnDemand::new(
        runtime(),
        m,
        cache_root(),
        GeneratorConfig { min_free_mib: u64::MAX / 2, ..GeneratorConfig::default() },
    );
    let err = short.get().err().expect("refused").to_string();
    assert!(err.contains("not enough memory"), "{err}");
}

#[test]
fn the_generate_command_writes_an_image_and_names_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let (ok, stdout, stderr) = scenecast(
        &["generate", "a harbour at noon", "-o", out.to_str().unwrap(), "--size", "96x32", "--seed", "9"],
        &[],
    );
    assert!(ok, "{stdout}{stderr}");
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (96, 32));
    let jpg = dir.path().join("out.jpg");
    let (ok, _, stderr) =
        scenecast(&["generate", "a harbour", "-o", jpg.to_str().unwrap(), "--sampler", "lcm", "--steps", "2"], &[]);
    assert!(ok, "{stderr}");
    assert_eq!(
        image::ImageFormat::from_path(&jpg).unwrap(),
        image::guess_format(&std::fs::read(&jpg).unwrap()).unwrap()
    );
    for (args, message) in [
        (vec!["generate", "x", "-o", "a.gif"], "expected a .png, .jpg or .jpeg"),
        (vec!["generate", "-o", "a.png"], "give a prompt"),
        (vec!["generate", "x", "-o", "a.png", "--size", "big"], "expected WIDTHxHEIGHT"),
        (vec!["generate", "x", "-o", "a.png", "--steps", "50"], "steps 50 is out of range"),
        (vec!["generate", "x", "-o", "a.png", "--sampler", "ddim"], "expected euler or lcm"),
    ] {
        let (ok, _, stderr) = scenecast(&args, &[]);
        assert!(!ok && stderr.contains(message), "{args:?}: {stderr}");
    }
}
