//! Bad input to the foundation: each case must give one clear error naming the file and what was
//! expected, never a panic. Library-level cases call the library; process-level ones (the ONNX
//! Runtime library is loaded once per process) run the binary.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use scenecast::llm::LlmConfig;
use scenecast::llm::{Backbone, GgufInfo};
use scenecast::manifest::{Manifest, REFERENCE_MANIFEST};
use scenecast::vision::Encoder;
use scenecast::vision::Vision;

fn models() -> PathBuf {
    cache_root().join("models")
}

/// The reference manifest with the encoder's file reference replaced.
fn encoder_at(file: &str, dir: &Path) -> Manifest {
    let line = REFERENCE_MANIFEST.lines().find(|l| l.starts_with("file = { cache = \"dinov2s/encoder.onnx\"")).unwrap();
    Manifest::parse(&REFERENCE_MANIFEST.replacen(line, &format!("file = {file}"), 1), "test.toml", dir).unwrap()
}

fn encoder_error(manifest: &Manifest) -> String {
    match Encoder::load(&runtime(), manifest, &cache_root()) {
        Ok(_) => panic!("expected the encoder to be refused"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(haystack: &str, needles: &[&str]) {
    for needle in needles {
        assert!(haystack.contains(needle), "expected {needle:?} in:\n{haystack}");
    }
}

#[test]
fn missing_truncated_and_wrong_encoder_files() {
    let dir = tempfile::tempdir().unwrap();
    let m = encoder_at("{ path = \"nope.onnx\" }", dir.path());
    assert_contains(&encoder_error(&m), &["nope.onnx: file not found (expected the encoder ONNX model"]);

    let head = std::fs::read(models().join("dinov2s/encoder.onnx")).unwrap()[..4096].to_vec();
    write_temp(dir.path(), "cut.onnx", &head);
    let m = encoder_at("{ path = \"cut.onnx\", size = 88637696 }", dir.path());
    assert_contains(&encoder_error(&m), &["cut.onnx: 4096 bytes, expected 88637696 bytes"]);
    let m = encoder_at("{ path = \"cut.onnx\" }", dir.path());
    assert_contains(&encoder_error(&m), &["cut.onnx: ONNX Runtime cannot load it as the image encoder"]);

    write_temp(dir.path(), "photo.onnx", &std::fs::read(models().join("photos/chelsea.png")).unwrap());
    let m = encoder_at("{ path = \"photo.onnx\" }", dir.path());
    assert_contains(&encoder_error(&m), &["photo.onnx: ONNX Runtime cannot load it as the image encoder"]);
}

#[test]
fn onnx_with_other_names_or_shapes() {
    let projector = models().join("projector/untrained-384x576.onnx");
    let m = encoder_at(&format!("{{ path = {:?} }}", projector.display().to_string()), Path::new("/"));
    assert_contains(
        &encoder_error(&m),
        &["untrained-384x576.onnx: expected input `input_image` with shape [-1, 3, 224, 224]; the model's inputs are: `image_features`"],
    );

    let text = REFERENCE_MANIFEST
        .replacen("input_shape = [-1, 3, 224, 224]", "input_shape = [-1, 3, 256, 256]", 1)
        .replacen("size = [224, 224]", "size = [256, 256]", 1);
    let m = Manifest::parse(&text, "test.toml", Path::new("/")).unwrap();
    assert_contains(&encoder_error(&m), &["encoder.onnx: input `input_image`: expected f32 [-1, 3, 256, 256] (-1 = any), the model has `input_image` [-1, 3, 224, 224]"]);
}

#[test]
fn gguf_of_another_width_or_not_a_gguf() {
    let gemma = GgufInfo::read(&models().join("gemma3/gemma-3-270m-q4_k_m.gguf")).unwrap();
    assert_eq!((gemma.architecture.as_str(), gemma.n_embd), ("gemma3", 640));
    let err = gemma.check_against(&manifest()).unwrap_err().to_string();
    assert_contains(
        &err,
        &["gemma-3-270m-q4_k_m.gguf: general.architecture is gemma3, but manifest <built-in reference> expects llama"],
    );
    let err = match Vision::load(&runtime(), &manifest(), &cache_root(), Some(gemma.llm_width())) {
        Ok(_) => panic!("a 576-wide projector must not load for a 640-wide LLM"),
        Err(e) => e.to_string(),
    };
    assert_contains(
        &err,
        &[
            "dinov2s-nanodet-imagenet-smollm2-v15.onnx outputs image tokens of width 576",
            "gemma-3-270m-q4_k_m.gguf has n_embd 640",
        ],
    );

    let dir = tempfile::tempdir().unwrap();
    let text = write_temp(dir.path(), "notes.gguf", b"this is not a model\n");
    assert_contains(&GgufInfo::read(&text).unwrap_err().to_string(), &["notes.gguf: not a readable GGUF file"]);
    let smol = std::fs::read(models().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let cut = write_temp(dir.path(), "cut.gguf", &smol[..smol.len() / 2]);
    assert_contains(
        &GgufInfo::read(&cut).unwrap_err().to_string(),
        &["cut.gguf: truncated: 49181216 bytes, but its tensors end at byte 98362432"],
    );
    assert_contains(
        &GgufInfo::read(&dir.path().join("gone.gguf")).unwrap_err().to_string(),
        &["gone.gguf: file not found"],
    );
}

/// `manifest` (a manifest's text) with the `[llm]` line that begins with `key = ` replaced by
/// `line` (or removed, when `line` is empty), or `line` added.
fn with_llm_line(manifest: &str, key: &str, line: &str) -> String {
    match manifest.lines().find(|l| l.starts_with(&format!("{key} = "))) {
        Some(old) => manifest.replacen(&format!("{old}\n"), &format!("{line}\n"), 1),
        None => manifest.replacen("[llm]\n", &format!("[llm]\n{line}\n"), 1),
    }
}

/// `manifest` (a manifest's text) with its `[llm] adapter` line replaced or added, applied at run
/// time (without the reference's `scene_model`, which folds the adapter in instead).
fn with_adapter(manifest: &str, adapter: &Path) -> Manifest {
    let line = format!("adapter = {{ path = {:?} }}", adapter.to_str().unwrap());
    let text = with_llm_line(&with_llm_line(manifest, "adapter", &line), "scene_model", "");
    Manifest::parse(&text, "test.toml", Path::new("/")).unwrap()
}

fn backbone_error(manifest: &Manifest) -> String {
    match Backbone::load(manifest, &cache_root(), &LlmConfig { threads: 1, ..LlmConfig::default() }) {
        Ok(_) => panic!("expected the LLM to be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn splits_or_a_scene_model_that_are_not_the_llms() {
    let parse = |text: String| Manifest::parse(&text, "test.toml", Path::new("/")).unwrap();
    // A whole GGUF as the scene model of a model in two splits.
    let merged = models().join("smollm2/SmolLM2-135M-Instruct.v5-merged.gguf");
    let line = format!("scene_model = {{ path = {:?} }}", merged.to_str().unwrap());
    assert_contains(
        &backbone_error(&parse(with_llm_line(REFERENCE_MANIFEST, "scene_model", &line))),
        &["v5-merged.gguf: the number of split files (split.count) is 1, but manifest test.toml expects 2 (`llm.file` and 1 in `llm.splits`)"],
    );
    // Split 0 without its further split.
    assert_contains(
        &backbone_error(&parse(with_llm_line(REFERENCE_MANIFEST, "splits", ""))),
        &["v15-base.gguf: the number of split files (split.count) is 2, but manifest test.toml expects 1 (`llm.file` and 0 in `llm.splits`)"],
    );
    // A further split that is not there.
    let dir = tempfile::tempdir().unwrap();
    let line = format!("splits = [{{ path = {:?} }}]", dir.path().join("gone.gguf").to_str().unwrap());
    assert_contains(
        &backbone_error(&parse(with_llm_line(REFERENCE_MANIFEST, "splits", &line))),
        &["gone.gguf", "a further split of the LLM GGUF (llm.splits)"],
    );
    // The scene model's file, not there.
    let line = format!("scene_model = {{ path = {:?} }}", dir.path().join("scene.gguf").to_str().unwrap());
    assert_contains(
        &backbone_error(&parse(with_llm_line(REFERENCE_MANIFEST, "scene_model", &line))),
        &["scene.gguf", "the LLM with the scene adapter folded in (llm.scene_model)"],
    );
}

#[test]
fn adapter_missing_not_an_adapter_or_for_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone.lora.gguf");
    assert_contains(
        &backbone_error(&with_adapter(REFERENCE_MANIFEST, &gone)),
        &["gone.lora.gguf", "the LLM's LoRA adapter GGUF"],
    );

    let base = models().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_contains(
        &backbone_error(&with_adapter(REFERENCE_MANIFEST, &base)),
        &[
            "SmolLM2-135M-Instruct.Q4_1.gguf: llama.cpp cannot apply it to the LLM",
            "expect general.type to be 'adapter'",
        ],
    );

    let gemma = std::fs::read_to_string(common::repo().join("models/gemma3.toml")).unwrap();
    let smol_adapter = models().join("projector/dinov2s-smollm2-v3.lora.gguf");
    assert_contains(
        &backbone_error(&with_adapter(&gemma, &smol_adapter)),
        &["dinov2s-smollm2-v3.lora.gguf: llama.cpp cannot apply it to the LLM", "arch mismatch"],
    );
}

#[test]
fn image_that_does_not_decode() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_temp(dir.path(), "frame.png", b"\x89PNG\r\n\x1a\n but then garbage");
    let (ok, _, stderr) = scenecast(&["encode", bad.to_str().unwrap()], &[]);
    assert!(!ok);
    assert_contains(&stderr, &["frame.png", "(expected a PNG, JPEG or WebP file)"]);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn onnx_runtime_library_missing_foreign_or_too_old() {
    let photo = models().join("photos/chelsea.png");
    let photo = photo.to_str().unwrap();
    let (ok, _, stderr) = scenecast(&["encode", photo], &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")]);
    assert!(!ok);
    assert_contains(&stderr, &["ONNX Runtime library /nonexistent/libonnxruntime.so (from ORT_DYLIB_PATH) not found"]);

    // A real shared library that is not ONNX Runtime.
    let dir = tempfile::tempdir().unwrap();
    let not_ort = build_library(dir.path(), "libnotort.so", "int answer(void) { return 42; }");
    let (ok, _, stderr) = scenecast(&["encode", photo], &[("ORT_DYLIB_PATH", not_ort.to_str().unwrap())]);
    assert!(!ok);
    assert_contains(
        &stderr,
        &[
            "libnotort.so (from ORT_DYLIB_PATH)",
            "does not export `OrtGetApiBase`",
            "expected libonnxruntime.so >= 1.17",
        ],
    );

    // A library that answers OrtGetApiBase like ONNX Runtime 1.16 does: refused by its version.
    let old = build_library(
        dir.path(),
        "libonnxruntime.so.1.16.0",
        "static const char* version(void) { return \"1.16.0\"; }\n\
         static const void* api(unsigned v) { (void)v; return 0; }\n\
         struct base { const void* (*get_api)(unsigned); const char* (*get_version)(void); };\n\
         static const struct base b = { api, version };\n\
         const struct base* OrtGetApiBase(void) { return &b; }",
    );
    let (ok, _, stderr) = scenecast(&["encode", photo], &[("ORT_DYLIB_PATH", old.to_str().unwrap())]);
    assert!(!ok);
    assert_contains(
        &stderr,
        &["libonnxruntime.so.1.16.0 (from ORT_DYLIB_PATH)", "but got '1.16.0'", "expected libonnxruntime.so >= 1.17"],
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Compiles a small shared library with the system C compiler.
fn build_library(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = write_temp(dir, &format!("{name}.c"), source.as_bytes());
    let out = dir.join(name);
    let status =
        std::process::Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&out).arg(&src).status().expect("run cc");
    assert!(status.success(), "cc failed for {name}");
    out
}

/// A projector trained on another detector: v7 reads NanoDet's 80 columns, the reference's detector
/// gives 163 (the classifier's too). Refused at load, naming the file and both shapes.
#[test]
fn a_projector_trained_on_another_detector_is_refused_at_load() {
    let mut m = manifest();
    m.projector.as_mut().unwrap().file = scenecast::manifest::FileRef {
        cache: Some("projector/dinov2s-nanodet-smollm2-v7.onnx".into()),
        path: None,
        sha256: None,
        size: None,
    };
    let err = match Vision::load(&runtime(), &m, &cache_root(), None) {
        Ok(_) => panic!("v7's projector must not load with the 163-column detector"),
        Err(e) => e.to_string(),
    };
    assert_contains(
        &err,
        &["dinov2s-nanodet-smollm2-v7.onnx", "input `detections`: expected f32 [1, 3613, 163]", "[1, 3549, 80]"],
    );
}

/// The detector of `models/dinov2s-nanodet.toml` at another file: a missing file, the encoder (an
/// ONNX with other names), and a detector whose scores the manifest says have another class count.
#[test]
fn missing_or_mismatched_detector_files() {
    let text = std::fs::read_to_string(common::repo().join("models/dinov2s-nanodet.toml")).unwrap();
    let line = text.lines().find(|l| l.starts_with("file = { cache = \"detector/nanodet-coco.onnx\"")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let detector_at = |file: &str| {
        Manifest::parse(&text.replacen(line, &format!("file = {file}"), 1), "test.toml", dir.path()).unwrap()
    };
    let error = |m: &Manifest| match scenecast::vision::Detector::load(&runtime(), m, &cache_root()) {
        Ok(_) => panic!("expected the detector to be refused"),
        Err(e) => e.to_string(),
    };
    assert_contains(
        &error(&detector_at("{ path = \"nope.onnx\" }")),
        &["nope.onnx: file not found (expected the detector ONNX model"],
    );
    let encoder = models().join("dinov2s/encoder.onnx").display().to_string();
    assert_contains(
        &error(&detector_at(&format!("{{ path = {encoder:?} }}"))),
        &["encoder.onnx", "expected input `input_1`"],
    );
    // A manifest that says 81 classes (and so another output shape) for the 80-class model.
    let more = text.replacen("\"toothbrush\",", "\"toothbrush\", \"kettle\",", 1).replacen(
        "output_shape = [1, 3549, 80]",
        "output_shape = [1, 3549, 81]",
        1,
    );
    let m = Manifest::parse(&more, "test.toml", dir.path()).unwrap();
    assert_contains(&error(&m), &["nanodet-coco.onnx", "output `scores`: expected f32 [1, 3549, 81]"]);
}

#[test]
fn models_check_verifies_the_split_files_and_the_scene_model() {
    let (ok, out, err) = scenecast(&["models", "check"], &[]);
    assert!(ok, "{out}{err}");
    assert_contains(
        &out,
        &[
            "v15-base.gguf + ",
            "v15-shared.gguf: llama",
            "scene prefix decoded by ",
            "v15-scene.gguf (the scene adapter folded in)",
        ],
    );
    // A scene model that is not the one the manifest pins: `models check` names it and its digest.
    let line = REFERENCE_MANIFEST.lines().find(|l| l.starts_with("scene_model = ")).unwrap();
    let sha = line.split("sha256 = \"").nth(1).unwrap().split('"').next().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_temp(dir.path(), "m.toml", REFERENCE_MANIFEST.replacen(sha, &"0".repeat(64), 1).as_bytes());
    let config = write_temp(dir.path(), "c.toml", format!("[models]\nmanifest = {:?}\n", manifest).as_bytes());
    let (ok, out, _) = scenecast(&["--config", config.to_str().unwrap(), "models", "check"], &[]);
    assert!(!ok, "{out}");
    assert_contains(&out, &["FAIL  llm", "v15-scene.gguf: sha256 ", &format!("expected {}", "0".repeat(64))]);
}
