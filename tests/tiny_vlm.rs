//! An off-the-shelf VLM's layout runs in scenecast exactly as in transformers: a tiny, RANDOMLY
//! INITIALISED model of SmolVLM's architecture (models/tiny-vlm, made by models/make_tiny_vlm.py:
//! SigLIP + pixel-shuffle connector as one ONNX with the published export's names, the text model
//! as a GGUF from llama.cpp's own converter) captions a real photo, and scenecast's prompt tokens
//! and greedy tokens equal those transformers' `Idefics3ForConditionalGeneration.generate` gave for
//! the same photo and question (models/tiny-vlm/reference.json). A wrong mean/std, a wrong layout
//! or a wrong image-token count in the manifest breaks the equality or is refused.

mod common;

use std::path::PathBuf;

use common::*;
use scenecast::llm::{Backbone, LlmConfig, SamplingParams};
use scenecast::manifest::Manifest;
use scenecast::vision::{ImageTokens, Vision};

fn dir() -> PathBuf {
    common::repo().join("models/tiny-vlm")
}

struct Reference {
    question: String,
    input_ids: Vec<i32>,
    tokens: Vec<i32>,
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(dir().join("reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |key: &str| v[key].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect();
    Reference {
        question: v["question"].as_str().unwrap().to_owned(),
        input_ids: ids("input_ids"),
        tokens: ids("tokens"),
    }
}

fn manifest_with(edit: impl Fn(String) -> String) -> Result<Manifest, scenecast::manifest::ManifestError> {
    let path = dir().join("manifest.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    Manifest::parse(&edit(text), &path.display().to_string(), &dir())
}

/// The prompt's token ids as scenecast feeds them (the image tokens as `image_id`), and the greedy
/// tokens it generates for the reference question about astronaut.png.
fn run(m: &Manifest, image_id: i32, question: &str) -> (Vec<i32>, Vec<i32>) {
    let root = cache_root();
    let greedy = SamplingParams { temperature: 0.0, repeat_penalty: 1.0, ..SamplingParams::default() };
    let config = LlmConfig { threads: 1, max_tokens: 24, sampling: greedy, ..LlmConfig::default() };
    let mut backbone = Backbone::load(m, &root, &config).unwrap();
    let mut vision = Vision::load(&runtime(), m, &root, Some(backbone.summary().gguf.llm_width())).unwrap();
    let mut tokens = ImageTokens::default();
    vision.run(&photo("astronaut.png"), &mut tokens).unwrap();
    assert_eq!(tokens.n_tokens, m.n_image_tokens());
    let mut prompt = backbone.tokenize(backbone.prefix_text(), true);
    prompt.extend(std::iter::repeat_n(image_id, tokens.n_tokens));
    prompt.extend(backbone.tokenize(&backbone.request_text(question), false));
    backbone.set_scene(1, Some(&tokens)).unwrap();
    let options = backbone.default_options();
    backbone.ask(question, &options, &mut |_| true).unwrap();
    (prompt, backbone.generated().to_vec())
}

#[test]
fn a_smolvlm_layout_gives_transformers_greedy_tokens() {
    let r = reference();
    let image_id = r.input_ids[5]; // `<image>`, after <|im_start|> User : <fake..> <global-img>
    let (prompt, generated) = run(&manifest_with(|t| t).unwrap(), image_id, &r.question);
    assert_eq!(prompt, r.input_ids, "the prompt's tokens differ from the Idefics3 processor's");
    assert!(r.tokens.len() >= 16);
    assert_eq!(generated, r.tokens, "greedy tokens differ from transformers' generate");
}

#[test]
fn a_wrong_normalisation_or_layout_changes_the_tokens() {
    let r = reference();
    let image_id = r.input_ids[5];
    let std = manifest_with(|t| t.replace("std = [0.5, 0.5, 0.5]", "std = [0.6, 0.6, 0.6]")).unwrap();
    let (_, generated) = run(&std, image_id, &r.question);
    assert_ne!(generated, r.tokens, "a wrong std must show");
    let layout = manifest_with(|t| t.replace("<fake_token_around_image><global-img>\"", "\"")).unwrap();
    let (prompt, generated) = run(&layout, image_id, &r.question);
    assert_ne!(prompt, r.input_ids);
    assert_ne!(generated, r.tokens, "a wrong layout must show");
}

#[test]
fn a_wrong_image_token_count_or_width_is_refused() {
    let err = manifest_with(|t| t.replace("patch_grid = [8, 8]", "patch_grid = [4, 4]")).unwrap_err().to_string();
    assert!(err.contains("`encoder.patch_grid`: 4x4 patches + 0 prefix tokens = 16 tokens"), "{err}");
    let err = manifest_with(|t| t.replace("n_embd = 32", "n_embd = 576")).unwrap_err().to_string();
    assert!(err.contains("`encoder.output_shape`: without a [projector]"), "{err}");
    assert!(err.contains("llm.n_embd 576; it is 32"), "{err}");
    let err = manifest_with(|t| t.replace("[-1, 1, 3, 512, 512]", "[-1, 2, 3, 512, 512]")).unwrap_err().to_string();
    assert!(err.contains("`encoder.input_shape`: expected [batch, 3, height, width] or [batch, 1, 3"), "{err}");
}

#[test]
fn a_layout_marker_the_gguf_lacks_is_refused_at_load() {
    let m = manifest_with(|t| t.replace("<global-img>", "<global-image>")).unwrap();
    let err = match Backbone::load(&m, &cache_root(), &LlmConfig { threads: 1, ..LlmConfig::default() }) {
        Ok(_) => panic!("a layout with a marker that is not a token must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("llm.chat: `<global-image>` is not a token of"), "{err}");
    assert!(err.contains("text-f32.gguf (it splits into"), "{err}");
}

#[test]
fn the_real_smolvlm_manifest_has_the_tested_layout() {
    // models/smolvlm-256m.toml (the real model, downloaded by users) must be the layout the tiny
    // model proves: the same tensor names and shapes up to the text width, pre-processing and chat.
    let real = Manifest::load(&common::repo().join("models/smolvlm-256m.toml")).unwrap();
    let tiny = manifest_with(|t| t).unwrap();
    let (r, t) = (&real.encoder, &tiny.encoder);
    assert!(real.projector.is_none() && tiny.projector.is_none());
    assert!(tiny.random && !real.random, "the tiny model says it is random, the real one is not");
    assert_eq!(
        (&r.input, &r.input_shape, &r.mask_input, &r.output),
        (&t.input, &t.input_shape, &t.mask_input, &t.output)
    );
    assert_eq!(r.output_shape[..2], t.output_shape[..2]);
    assert_eq!(r.output_shape[2], real.llm.n_embd as i64);
    assert_eq!((r.prefix_tokens, r.patch_grid), (t.prefix_tokens, t.patch_grid));
    let (rp, tp) = (&r.preprocess, &t.preprocess);
    assert_eq!((rp.size, rp.resize, rp.mean, rp.std), (tp.size, tp.resize, tp.mean, tp.std));
    let (rc, tc) = (&real.llm.chat, &tiny.llm.chat);
    assert_eq!((&rc.prefix, &rc.suffix, &rc.stop), (&tc.prefix, &tc.suffix, &tc.stop));
    assert_eq!(real.n_image_tokens(), 64);
}
