//! Training data for the generator's output projector (`models/train_generator.py
//! --signal-states TOOL`, run by `make generator`): for each image, the stack's own caption and the
//! LLM's final hidden states at the signal tokens after it, exactly what `generate --hidden` and a
//! `condition: "hidden"` request feed the output projector. A tool, not part of the daemon.
//!
//! ```sh
//! cargo run --release --example signal_states -- IMAGES.txt OUT.jsonl " Picture:"
//! ```
//! IMAGES.txt: one image path per line. OUT.jsonl: one `{"image", "caption", "n_embd", "states"}`
//! object per line, `states` the `[n_signal_tokens, n_embd]` rows flattened.

use std::io::Write;

use anyhow::{Context, Result};
use scenecast::config::Config;
use scenecast::frame::RgbImage;
use scenecast::pipeline::Pipeline;
use scenecast::vision::ImageTokens;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [list, out, signal] = args.as_slice() else {
        anyhow::bail!("usage: signal_states IMAGES.txt OUT.jsonl SIGNAL (the manifest's output_projector.signal)");
    };
    let config = Config::builtin();
    let mut pipeline = Pipeline::load(config.manifest()?, &config.cache_root(), &config.onnx, &config.llm)
        .context("loading the stack")?;
    let n_embd = pipeline.backbone.summary().gguf.n_embd;
    let question = pipeline.backbone.caption_prompt().to_owned();
    let images = std::fs::read_to_string(list).with_context(|| format!("reading {list}"))?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).with_context(|| format!("creating {out}"))?);
    let mut tokens = ImageTokens::default();
    for (seq, path) in images.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let image = RgbImage::open(std::path::Path::new(path))?;
        pipeline.set_scene(seq as u64, &image, &mut tokens)?;
        let caption = pipeline.caption()?.text;
        let states = pipeline.backbone.signal_states(&question, &caption, signal)?;
        let line = serde_json::json!({ "image": path, "caption": caption, "n_embd": n_embd, "states": states });
        writeln!(file, "{line}")?;
        if (seq + 1) % 50 == 0 {
            eprintln!("{} images", seq + 1);
        }
    }
    file.flush()?;
    Ok(())
}
