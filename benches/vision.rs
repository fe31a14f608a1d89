//! Vision benchmarks, each reported as a ratio against a baseline measured in the same process:
//!
//! 1. YUYV 1280x720 -> RGB8 -> normalised 224x224 NCHW f32 (the per-frame camera path), split
//!    into its two steps.
//! 2. The encoder through scenecast (`Encoder::encode`: pre-processing of a 224x224 frame, the ONNX
//!    session, output checks and copy) against a bare `ort` session running the same model on the
//!    same pre-processed tensor. The ratio is scenecast's overhead.
//! 3. The second encoder, the COCO detector (`Detector`: its pre-processing of the same frame at
//!    416x416 and the ONNX session), against the encoder of 2: what the detector adds to each
//!    projected frame.
//!
//! Run with `cargo bench --bench vision` after `make models`.

use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::TensorRef;
use scenecast::camera::FrameConverter;
use scenecast::config::Config;
use scenecast::frame::RgbImage;
use scenecast::manifest::Manifest;
use scenecast::onnx::OnnxRuntime;
use scenecast::vision::Preprocessor;
use scenecast::vision::{Detector, Encoder, PatchFeatures};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let manifest = Manifest::reference().unwrap();
    let (width, height) = (1280u32, 720u32);
    // A synthetic YUYV frame with structure (so the converter and resizer do real work).
    let yuyv: Vec<u8> = (0..height)
        .flat_map(|y| {
            (0..width)
                .flat_map(move |x| {
                    [
                        ((x + y) % 220 + 16) as u8,
                        (x % 240) as u8 + 8,
                        ((x * 3 + y) % 220 + 16) as u8,
                        (y % 240) as u8 + 8,
                    ]
                })
                .take(width as usize * 2)
        })
        .collect();
    let mut converter = FrameConverter::new();
    let mut rgb = RgbImage::empty();
    let mut pre = Preprocessor::new(&manifest.encoder.preprocess);
    let (mut convert, mut preprocess, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..60 {
        let t0 = Instant::now();
        converter.yuyv_to_rgb(&yuyv, width, height, width * 2, &mut rgb).unwrap();
        let t1 = Instant::now();
        std::hint::black_box(pre.run(&rgb).unwrap());
        let t2 = Instant::now();
        convert.push(t1 - t0);
        preprocess.push(t2 - t1);
        total.push(t2 - t0);
    }
    let (convert, preprocess, total) = (median(convert), median(preprocess), median(total));
    println!("camera path YUYV {width}x{height} -> NCHW 224x224 (median of 60):");
    println!(
        "  yuyv->rgb   {:7.2} ms  ({:.0}% of total)",
        ms(convert),
        100.0 * convert.as_secs_f64() / total.as_secs_f64()
    );
    println!(
        "  preprocess  {:7.2} ms  ({:.0}% of total)",
        ms(preprocess),
        100.0 * preprocess.as_secs_f64() / total.as_secs_f64()
    );
    println!("  total       {:7.2} ms", ms(total));

    let config = Config::builtin();
    let root = config.cache_root();
    let runtime = OnnxRuntime::init(&config.onnx, &root).expect("ONNX Runtime (run `make models` first)");
    let mut encoder = Encoder::load(&runtime, &manifest, &root).unwrap();
    let path = manifest.resolve(&manifest.encoder.file, &root);
    let mut bare = Session::builder(runtime.ort_environment()).unwrap().commit_from_file(&path).unwrap();

    let frame = RgbImage::from_pixels(224, 224, (0..224 * 224 * 3).map(|i| (i * 7 % 251) as u8).collect()).unwrap();
    let tensor = Preprocessor::new(&manifest.encoder.preprocess).run(&frame).unwrap().to_vec();
    let mut features = PatchFeatures::default();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..25 {
        // Interleaved so that frequency drift hits both sides alike; the first two are warm-up.
        let t0 = Instant::now();
        encoder.encode(&frame, &mut features).unwrap();
        let t1 = Instant::now();
        let input = TensorRef::from_array_view(([1usize, 3, 224, 224], tensor.as_slice())).unwrap();
        let outputs = bare.run(ort::inputs![manifest.encoder.input.as_str() => input]).unwrap();
        std::hint::black_box(outputs[manifest.encoder.output.as_str()].try_extract_tensor::<f32>().unwrap());
        let t2 = Instant::now();
        if i >= 2 {
            ours.push(t1 - t0);
            theirs.push(t2 - t1);
        }
    }
    let (ours, theirs) = (median(ours), median(theirs));
    println!("encoder DINOv2-S 224x224, CPU EP (median of 23):");
    println!("  bare ort session    {:7.2} ms  (baseline)", ms(theirs));
    println!("  scenecast Encoder   {:7.2} ms  ratio {:.3}", ms(ours), ours.as_secs_f64() / theirs.as_secs_f64());

    if manifest.detector.is_some() {
        let mut detector = Detector::load(&runtime, &manifest, &root).unwrap();
        let mut samples = Vec::new();
        for i in 0..25 {
            let t0 = Instant::now();
            detector.prepare(&frame).unwrap();
            std::hint::black_box(detector.run().unwrap());
            if i >= 2 {
                samples.push(t0.elapsed());
            }
        }
        let det = median(samples);
        println!("detector NanoDet 416x416 on the same frame, CPU EP (median of 23):");
        println!(
            "  scenecast Detector  {:7.2} ms  ratio {:.3} to the encoder",
            ms(det),
            det.as_secs_f64() / ours.as_secs_f64()
        );
    }
}
