//! The LLM backbone on real GGUFs with real llama.cpp: SmolLM2-135M-Instruct (llama, ChatML) and
//! Gemma-3-270M (gemma3, Gemma's turn format).

mod common;

use std::path::Path;

use common::*;
use scenecast::llm::LlmConfig;
use scenecast::llm::SamplingParams;
use scenecast::llm::{token_embeddings, Backbone, GenerateOptions, LlmError, Part, StopReason};
use scenecast::manifest::{Manifest, REFERENCE_MANIFEST};
use scenecast::vision::ImageTokens;
use scenecast::vision::Vision;

fn llm_config() -> LlmConfig {
    // One thread each: the harness runs two tests at once on this 2-core machine, and llama.cpp
    // threads that outnumber the cores spin-wait for each other.
    LlmConfig { threads: 1, ..LlmConfig::default() }
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions { max_tokens, sampling: SamplingParams::default(), deadline: None, cancel: None }
}

fn smollm() -> Backbone {
    Backbone::load(&manifest(), &cache_root(), &llm_config()).unwrap_or_else(|e| panic!("{e}"))
}

fn ask(backbone: &mut Backbone, question: &str) -> String {
    backbone.ask(question, &greedy(48), &mut |_| true).unwrap().text
}

#[test]
fn text_question_with_an_unambiguous_answer() {
    let mut b = smollm();
    let answer = ask(&mut b, "What is the capital of France?");
    assert!(answer.contains("Paris"), "{answer}");
    let summary = b.summary();
    assert_eq!((summary.gguf.architecture.as_str(), summary.gguf.n_embd), ("llama", 576));
    assert!(summary.n_params > 100_000_000 && summary.n_params < 200_000_000, "{}", summary.n_params);
}

#[test]
fn the_scene_model_replaces_the_adapter_unless_the_config_turns_it_off() {
    // The reference folds its scene adapter into a scene model: loaded, the adapter file is not.
    let folded = smollm();
    let s = folded.summary();
    assert!(s.scene_model.as_ref().is_some_and(|p| p.ends_with("SmolLM2-135M-Instruct.v15-scene.gguf")), "{s:?}");
    assert_eq!(s.adapter, None, "the adapter is folded in, not applied");
    // `llm.scene_model = false`: the adapter applied at run time, no second model.
    let unfolded = smollm_with(LlmConfig { scene_model: false, ..llm_config() });
    let s = unfolded.summary();
    assert_eq!(s.scene_model, None);
    assert!(s.adapter.as_ref().is_some_and(|p| p.ends_with("dinov2s-nanodet-imagenet-smollm2-v15.lora.gguf")), "{s:?}");
    // Layers meant for a GPU: the adapter too (this build has no GPU backend; llama.cpp keeps them
    // on the CPU, and the choice is the configuration's).
    let offloaded = smollm_with(LlmConfig { gpu_layers: 99, ..llm_config() });
    assert_eq!((offloaded.summary().scene_model.as_ref(), offloaded.summary().adapter.is_some()), (None, true));
}

#[test]
fn injected_embedding_rows_continue_like_the_tokens_themselves() {
    let mut b = smollm();
    let text = "<|im_start|>user\nName the largest planet of the solar system.<|im_end|>\n<|im_start|>assistant\n";
    let tokens = b.tokenize(text, true);
    let files = b.summary().files();
    let rows = token_embeddings(&files, &tokens).unwrap();
    assert_eq!(rows.len(), tokens.len() * 576);
    // Ids outside the vocabulary are refused with the tensor, its rows and the id, naming the file
    // that holds the matrix (the last split: the reference's LLM is split 0 and a shared split 1).
    let path = files.last().unwrap().display();
    let cases = [
        (49_152, format!("{path}: tensor `token_embd.weight` has 49152 rows; row 49152 was asked for")),
        (-1, format!("{path}: tensor `token_embd.weight` has no row for the negative token id -1")),
    ];
    for (id, expected) in cases {
        let err = token_embeddings(&files, &[1, id]).unwrap_err().to_string();
        assert!(err.starts_with(&expected), "{err}");
    }

    b.set_prefix(1, &[Part::Text(text)]).unwrap();
    let from_tokens = b.generate(&[], &greedy(24), &mut |_| true).unwrap();
    b.set_prefix(2, &[Part::Embeddings(&rows)]).unwrap();
    let from_rows = b.generate(&[], &greedy(24), &mut |_| true).unwrap();
    assert!(from_tokens.n_tokens > 3, "{from_tokens:?}");
    assert_eq!(from_tokens.text, from_rows.text);
}

#[test]
fn a_question_after_a_cached_prefix_answers_as_from_scratch() {
    let rt = runtime();
    let m = manifest();
    let mut b = smollm();
    let mut vision = Vision::load(&rt, &m, &cache_root(), Some(b.summary().gguf.llm_width())).unwrap();
    let mut tokens = ImageTokens::default();
    vision.run(&photo("coffee.png"), &mut tokens).unwrap();

    b.set_scene(7, Some(&tokens)).unwrap();
    let first = b.ask("Describe the image.", &greedy(32), &mut |_| true).unwrap();
    let cached = b.ask("What colours do you see?", &greedy(32), &mut |_| true).unwrap();
    assert!(first.prefix_cached && cached.prefix_cached);
    assert_eq!(b.scene_id(), Some(7));

    // From scratch: a new context, the prefix decoded again, the same question.
    let mut fresh = smollm();
    fresh.set_scene(8, Some(&tokens)).unwrap();
    let scratch = fresh.ask("What colours do you see?", &greedy(32), &mut |_| true).unwrap();
    assert!(!cached.text.is_empty());
    assert_eq!(cached.text, scratch.text);
}

#[test]
fn streaming_cancellation_and_limits() {
    let mut b = smollm();
    let mut pieces = Vec::new();
    let answer = b
        .ask("Write a long story about a dragon who learns to fly.", &greedy(12), &mut |p| {
            pieces.push(p.to_owned());
            true
        })
        .unwrap();
    assert_eq!(answer.stop, StopReason::MaxTokens);
    assert_eq!(answer.n_tokens, 12);
    assert_eq!(pieces.concat().trim(), answer.text);

    let mut seen = 0;
    let stopped = b
        .ask("Write a long story about a dragon who learns to fly.", &greedy(40), &mut |_| {
            seen += 1;
            seen < 3
        })
        .unwrap();
    assert_eq!(stopped.stop, StopReason::Cancelled);
    assert!(stopped.n_tokens <= 4, "{stopped:?}");

    let past = GenerateOptions { deadline: Some(std::time::Instant::now()), ..greedy(40) };
    assert_eq!(b.ask("Hello?", &past, &mut |_| true).unwrap().stop, StopReason::Deadline);
}

#[test]
fn gemma3_loads_and_generates_with_its_own_template() {
    let m = Manifest::load(&common::repo().join("models/gemma3.toml")).unwrap();
    let mut b = Backbone::load(&m, &cache_root(), &llm_config()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((b.summary().gguf.architecture.as_str(), b.summary().gguf.n_embd), ("gemma3", 640));
    let answer = b.ask("What is the capital of France?", &greedy(24), &mut |_| true).unwrap();
    assert_eq!(answer.text, "Paris", "{answer:?}");
    assert_eq!(answer.stop, StopReason::End, "the manifest's stop string ends the answer");
    // Plain completion through the same engine.
    b.set_prefix(1, &[Part::Text("The Eiffel Tower is in the city of")]).unwrap();
    let completion = b.generate(&[], &greedy(8), &mut |_| true).unwrap();
    assert!(completion.text.starts_with("Paris"), "{completion:?}");
}

/// The reference manifest with the LLM file (one whole GGUF: no further splits, no scene model)
/// and architecture replaced.
fn llm_at(path: &Path, architecture: &str) -> Manifest {
    let line = REFERENCE_MANIFEST.lines().find(|l| l.starts_with("file = { cache = \"smollm2/")).unwrap();
    let text: String = REFERENCE_MANIFEST
        .lines()
        .filter(|l| !l.starts_with("splits = ") && !l.starts_with("scene_model = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let text = text.replacen(line, &format!("file = {{ path = {:?} }}", path.display().to_string()), 1).replacen(
        "architecture = \"llama\"",
        &format!("architecture = {architecture:?}"),
        1,
    );
    Manifest::parse(&text, "test.toml", Path::new("/")).unwrap()
}

fn load_error(m: &Manifest, config: &LlmConfig) -> String {
    match Backbone::load(m, &cache_root(), config) {
        Ok(_) => panic!("expected the backbone to be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_ggufs_and_contexts_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let smol = std::fs::read(cache_root().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();

    let cut = write_temp(dir.path(), "cut.gguf", &smol[..smol.len() - 1000]);
    let err = load_error(&llm_at(&cut, "llama"), &llm_config());
    assert!(err.contains("cut.gguf: truncated: 98361432 bytes, but its tensors end at byte 98362432"), "{err}");

    let text = write_temp(dir.path(), "readme.gguf", b"# not a model\n");
    let err = load_error(&llm_at(&text, "llama"), &llm_config());
    assert!(err.contains("readme.gguf: not a readable GGUF file"), "{err}");

    // Rename the architecture in the header (value and keys alike): llama.cpp does not know it.
    let header_len = 2_000_000; // the metadata and tensor table of this file are well inside this
    let mut renamed = smol.clone();
    for i in 0..header_len - 5 {
        if &renamed[i..i + 5] == b"llama" {
            renamed[i + 4] = b'x';
        }
    }
    let alien = write_temp(dir.path(), "alien.gguf", &renamed);
    let err = load_error(&llm_at(&alien, "llamx"), &llm_config());
    assert!(err.contains("alien.gguf: llama.cpp cannot load it:") && err.contains("llamx"), "{err}");

    // 300 image tokens plus the chat prefix do not fit in the smallest context (llama.cpp
    // rounds a 64-token request up to 256).
    let mut tiny = smollm_with(LlmConfig { context: 64, ..llm_config() });
    let image = ImageTokens { n_tokens: 300, n_embd: 576, data: vec![0.01; 300 * 576], ..ImageTokens::default() };
    let err = tiny.set_scene(1, Some(&image)).unwrap_err();
    assert!(matches!(err, LlmError::ContextTooSmall { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("the context of 256 tokens is too small: the scene prefix needs 304; raise `llm.context`"),
        "{err}"
    );

    let wrong = ImageTokens { n_tokens: 64, n_embd: 640, data: vec![0.0; 64 * 640], ..ImageTokens::default() };
    let err = smollm().set_scene(1, Some(&wrong)).unwrap_err().to_string();
    assert!(err.contains("image tokens are 640 wide, but the LLM's n_embd is 576"), "{err}");
}

fn smollm_with(config: LlmConfig) -> Backbone {
    Backbone::load(&manifest(), &cache_root(), &config).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_default_context_holds_a_scene_the_longest_question_and_a_whole_answer() {
    // The defaults must fit together: the reference stack's 64 image tokens after the chat
    // prefix, a question of `max_question_chars` of plain English, and `max_tokens` of answer.
    let config = llm_config();
    let mut b = smollm();
    let image = ImageTokens { n_tokens: 64, n_embd: 576, data: vec![0.01; 64 * 576], ..ImageTokens::default() };
    b.set_scene(1, Some(&image)).unwrap_or_else(|e| panic!("{e}"));
    let sentence = "Is the small brown dog that sat near the red car still by the gate of the old house? ";
    let question: String = sentence
        .repeat(config.max_question_chars / sentence.len() + 1)
        .chars()
        .take(config.max_question_chars)
        .collect();
    assert_eq!(question.chars().count(), config.max_question_chars);
    let generation = b.ask(&question, &greedy(config.max_tokens), &mut |_| true).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(generation.stop, StopReason::ContextFull, "{config:?}");
    let needed = 3 + 64 + b.tokenize(&b.request_text(&question), false).len() + config.max_tokens;
    assert!(needed * 2 <= config.context as usize, "the default context holds {needed} tokens twice over");
}

#[test]
fn empty_and_over_long_questions_are_refused_with_the_limit() {
    let mut b = smollm_with(LlmConfig { max_question_chars: 40, ..llm_config() });
    let cases = [
        ("", "the question is empty"),
        ("   \n", "the question is empty"),
        (&"why? ".repeat(10) as &str, "the question has 50 characters; the limit is 40 (`llm.max_question_chars`)"),
    ];
    for (question, expected) in cases {
        let err = b.ask(question, &greedy(8), &mut |_| true).unwrap_err().to_string();
        assert_eq!(err, expected);
    }
    assert!(!ask(&mut b, "Say hi.").is_empty(), "a valid question after refused ones is answered");
}
