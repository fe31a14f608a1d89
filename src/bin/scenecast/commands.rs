//! One function per command, each a thin layer over the library: load, call, print.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use scenecast::generate::{check_prompt, RenderRequest};
use scenecast::llm::{GgufInfo, GuideKind};
use scenecast::manifest::{with_grounding, GroundingSpec, Manifest, SamplerKind};
use scenecast::mqtt::{self, wire, MqttProtocol};
use scenecast::pipeline::{self, render_description};
use scenecast::{cache, eval, ms_since, Config, Generator, ImageTokens, OnnxRuntime, Pipeline, RgbImage, Vision};

/// Where the model tools are: `$SCENECAST_FETCH_SCRIPT`, the package's
/// `/usr/share/scenecast/models/fetch.py` (next to the binary's `../share`), or the source tree.
fn fetch_script() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("SCENECAST_FETCH_SCRIPT").map(PathBuf::from).into_iter().collect();
    if let Some(prefix) = std::env::current_exe().ok().and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf)) {
        candidates.push(prefix.join("share/scenecast/models/fetch.py"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fetch.py"));
    candidates.into_iter().find(|p| p.is_file())
}

pub fn fetch(config: &Config, gemma: bool, arch: Option<String>) -> Result<ExitCode> {
    let script = fetch_script().context("models/fetch.py not found; set SCENECAST_FETCH_SCRIPT to its path")?;
    let root = config.cache_root();
    let venv = root.join("venv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        // First fetch on this device: the model tools' venv (onnx, numpy) next to the models.
        let requirements = script.with_file_name("requirements.txt");
        out!("creating the model tools' Python venv in {}", venv.display());
        let ok = std::process::Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .context("running python3 (install python3 and python3-venv)")?;
        anyhow::ensure!(ok.success(), "`python3 -m venv {}` failed; install python3-venv", venv.display());
        let ok = std::process::Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(&requirements)
            .status()?;
        anyhow::ensure!(
            ok.success(),
            "installing {} into {} failed (is PyPI reachable?)",
            requirements.display(),
            venv.display()
        );
    }
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&script).arg("--cache").arg(&root);
    if gemma {
        cmd.arg("--gemma");
    }
    if let Some(arch) = arch {
        cmd.args(["--arch", &arch]);
    }
    let status = cmd.status().with_context(|| format!("running {}", python.display()))?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `models check`: one line per part of the stack; exits non-zero if any fails.
pub fn check(config: &Config) -> Result<ExitCode> {
    let root = config.cache_root();
    let manifest = config.manifest()?;
    out!("manifest {} ({}); cache {}", manifest.name, manifest.origin, root.display());
    let checks = pipeline::check(&manifest, &root, &config.onnx, &config.llm);
    let failed = checks.iter().filter(|c| c.outcome.is_err()).count();
    for c in &checks {
        match &c.outcome {
            Ok(detail) => out!("{:<5} {:<12} {}", "ok", c.part, detail),
            Err(e) => out!("{:<5} {:<12} {}", "FAIL", c.part, e),
        }
    }
    if failed > 0 {
        eprintln!("{failed} part(s) failed; `make models` fetches and verifies the reference models");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn encode(config: &Config, image_path: &Path, json: bool) -> Result<ExitCode> {
    let root = config.cache_root();
    let manifest = config.manifest()?;
    let (image, decode_ms) = open_image(image_path)?;
    let runtime = OnnxRuntime::init(&config.onnx, &root)?;
    let llm_path = manifest.resolve(&manifest.llm.file, &root);
    // The width check needs the GGUF; without it the image tokens are still computed.
    let llm = match GgufInfo::read(&llm_path) {
        Ok(info) => Some(info),
        Err(e) => {
            tracing::warn!("projector width not checked against the LLM: {e}");
            None
        }
    };
    let mut vision =
        Vision::load(&runtime, &manifest, &root, llm.as_ref().map(|info| (info.path.as_path(), info.n_embd)))?;
    let mut tokens = ImageTokens::default();
    let timings = vision.run(&image, &mut tokens)?;
    let (encoder_ep, projector_ep) = vision.providers();
    if json {
        let out = json!({
            "image": image_path,
            "width": image.width(),
            "height": image.height(),
            "image_tokens": [tokens.n_tokens, tokens.n_embd],
            "ep": { "encoder": encoder_ep, "projector": projector_ep },
            "timings_ms": {
                "decode": decode_ms,
                "preprocess": timings.preprocess_ms,
                "encode": timings.encode_ms,
                "project": timings.project_ms,
            },
            "manifest": manifest.name,
        });
        out!("{out}");
    } else {
        out!(
            "{}: {}x{} -> image tokens [{}, {}]",
            image_path.display(),
            image.width(),
            image.height(),
            tokens.n_tokens,
            tokens.n_embd
        );
        out!("ep: encoder {encoder_ep}, projector {projector_ep}");
        out!(
            "timings ms: decode {decode_ms:.1}, preprocess {:.1}, encode {:.1}, project {:.1}",
            timings.preprocess_ms,
            timings.encode_ms,
            timings.project_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Decodes an image file; returns it with the decode time in ms.
fn open_image(path: &Path) -> Result<(RgbImage, f64)> {
    let start = Instant::now();
    let image = RgbImage::open(path)?;
    Ok((image, ms_since(start)))
}

/// The fetched sample photos, sorted by name.
fn sample_photos(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = cache::models_dir(root).join("photos");
    let mut photos: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("sample photos in {} (run `make models`)", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| RgbImage::is_image_file(p))
        .collect();
    photos.sort();
    anyhow::ensure!(!photos.is_empty(), "no sample photos in {} (run `make models`)", dir.display());
    Ok(photos)
}

fn load_pipeline(config: &Config) -> Result<Pipeline> {
    Ok(Pipeline::load(config.manifest()?, &config.cache_root(), &config.onnx, &config.llm)?)
}

pub fn demo(config: &Config) -> Result<ExitCode> {
    let mut pipeline = load_pipeline(config)?;
    if pipeline.manifest.untrained() {
        out!("note: the stack is untrained (placeholder projector or random weights), so captions do not describe the photos");
    }
    let mut tokens = ImageTokens::default();
    for (seq, path) in sample_photos(&pipeline.cache_root)?.iter().enumerate() {
        let image = match RgbImage::open(path) {
            Ok(image) => image,
            Err(e) => {
                eprintln!("skipping: {e}");
                continue;
            }
        };
        let start = Instant::now();
        pipeline.set_scene(seq as u64, &image, &mut tokens)?;
        let caption = pipeline.caption()?;
        out!(
            "[{seq}] {}: {} ({} tokens, {:.0} ms)",
            path.file_name().unwrap_or_default().to_string_lossy(),
            caption.text,
            caption.n_tokens,
            ms_since(start)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub struct GenerateArgs {
    pub prompt: Option<String>,
    pub output: PathBuf,
    pub from_image: Option<PathBuf>,
    pub hidden: bool,
    pub seed: u64,
    pub steps: Option<usize>,
    pub size: Option<String>,
    pub guidance: Option<f32>,
    pub sampler: Option<String>,
    pub json: bool,
}

fn parse_size(text: &str) -> Result<[usize; 2]> {
    let (w, h) =
        text.split_once(['x', 'X']).with_context(|| format!("--size {text:?}: expected WIDTHxHEIGHT, e.g. 512x512"))?;
    let parse = |v: &str| {
        v.trim().parse::<usize>().with_context(|| format!("--size {text:?}: {v:?} is not a whole number of pixels"))
    };
    Ok([parse(h)?, parse(w)?])
}

pub fn generate(config: &Config, args: &GenerateArgs) -> Result<ExitCode> {
    use scenecast::frame::ImageFormat;
    use scenecast::generate::{ConditionPath, Conditioning, GeneratorError};
    let format = ImageFormat::from_path(&args.output)
        .with_context(|| format!("{}: expected a .png, .jpg or .jpeg file name", args.output.display()))?;
    let root = config.cache_root();
    let manifest = config.manifest()?;
    let spec = manifest.generator.clone().ok_or_else(|| GeneratorError::NotConfigured(manifest.origin.clone()))?;
    let size = args.size.as_deref().map(parse_size).transpose()?;
    let sampler = match args.sampler.as_deref() {
        None => None,
        Some("euler") => Some(SamplerKind::Euler),
        Some("lcm") => Some(SamplerKind::Lcm),
        Some(other) => anyhow::bail!("--sampler {other:?}: expected euler or lcm"),
    };
    let request = RenderRequest {
        seed: Some(args.seed),
        steps: args.steps,
        width: size.map(|[_, w]| w),
        height: size.map(|[h, _]| h),
        guidance: args.guidance,
        sampler,
    };
    let options = request.options(&spec, config.generator.limits(), args.seed)?;
    let prompt = args.prompt.as_deref().map(str::trim).filter(|p| !p.is_empty());
    check_prompt(prompt, args.from_image.is_some(), config.generator.max_prompt_chars)?;
    let prompt = prompt.unwrap_or_default();
    let condition = if args.hidden { ConditionPath::Hidden } else { ConditionPath::Text };
    // The LLM is needed to describe an image, and for hidden-state conditioning.
    let mut pipeline = if args.from_image.is_some() || args.hidden { Some(load_pipeline(config)?) } else { None };
    let mut text = prompt.to_owned();
    if let (Some(image_path), Some(pipeline)) = (&args.from_image, pipeline.as_mut()) {
        let (image, _) = open_image(image_path)?;
        pipeline.set_scene(0, &image, &mut ImageTokens::default())?;
        let description = pipeline.caption()?.text;
        text = if prompt.is_empty() { description } else { format!("{description} {prompt}") };
    }
    // Random test weights are announced by a WARN from the loader.
    let runtime = match &pipeline {
        Some(p) => p.runtime.clone(),
        None => OnnxRuntime::init(&config.onnx, &root)?,
    };
    let mut generator = Generator::load(&runtime, &manifest, &root)?;
    let rendered = match pipeline.as_mut() {
        Some(pipeline) => {
            let question = pipeline.backbone.caption_prompt().to_owned();
            render_description(&mut pipeline.backbone, &mut generator, condition, &question, &text, &options)?
        }
        None => generator.render(Conditioning::Prompt(&text), &options)?,
    };
    let bytes = rendered.image.encode(format)?;
    std::fs::write(&args.output, &bytes).with_context(|| format!("writing {}", args.output.display()))?;
    let warning = rendered.warning();
    if args.json {
        out!(
            "{}",
            json!({
                "output": args.output, "prompt": text, "options": options, "condition": condition,
                "prompt_tokens": rendered.prompt_tokens, "warning": warning,
                "load_ms": generator.load_ms(), "timings_ms": rendered.timings, "bytes": bytes.len(),
            })
        );
    } else {
        if let Some(w) = &warning {
            eprintln!("warning: {w}");
        }
        let [height, width] = options.size;
        out!(
            "{}: {width}x{height} {} ({} bytes) from {:?}",
            args.output.display(),
            format.content_type(),
            bytes.len(),
            text
        );
        out!(
            "  [{} {} step(s), seed {}, load {:.0} ms, condition {:.0} ms, steps {:.0} ms, vae {:.0} ms, total {:.0} ms]",
            options.sampler, options.steps, options.seed, generator.load_ms(), rendered.timings.condition_ms,
            rendered.timings.step_ms.iter().sum::<f64>(), rendered.timings.vae_ms, rendered.timings.total_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn evaluate(
    config: &Config,
    set_path: &Path,
    report: Option<&Path>,
    samples: usize,
    kinds: &[String],
    verbose: bool,
) -> Result<ExitCode> {
    let mut set = eval::EvalSet::load(set_path)?;
    set.keep_kinds(kinds).with_context(|| format!("--kind in {}", set_path.display()))?;
    let mut pipeline = load_pipeline(config)?;
    if pipeline.manifest.untrained() {
        eprintln!("note: the stack is untrained (placeholder projector or random weights); expect scores near zero");
    }
    let start = Instant::now();
    let total = set.scenes.len();
    let results = eval::run(&set, &mut pipeline, &mut |i, r| {
        if verbose {
            let wrong = r.answers.iter().filter(|a| !a.2).count();
            eprintln!(
                "[{}/{total}] {} {}: \"{}\" ({} wrong answers)",
                i + 1,
                r.kind,
                r.image.display(),
                r.caption,
                wrong
            );
        } else if (i + 1) % 20 == 0 {
            eprintln!("  {}/{total} scenes, {:.0} s", i + 1, start.elapsed().as_secs_f64());
        }
    })?;
    let m = &pipeline.manifest;
    let tokens_by = m.projector.as_ref().map_or(&m.encoder.file, |p| &p.file);
    let file = m.resolve(tokens_by, &pipeline.cache_root);
    let name = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
    let stack = format!("the stack `{}` (image tokens from `{name}`)", m.name);
    let text = eval::markdown(&set, &stack, &results, samples, start.elapsed().as_secs_f64());
    out!("{text}");
    if let Some(path) = report {
        std::fs::write(path, &text).with_context(|| format!("writing the report {}", path.display()))?;
        let json_path = path.with_extension("json");
        let detail = json!({ "manifest": pipeline.manifest.name, "categories": set.categories, "summary": eval::summarize(&results),
            "summary_unchecked": eval::summarize_unchecked(&results),
            "per_category": eval::per_category(&results), "confusions": eval::confusions(&results, 30), "scenes": results });
        std::fs::write(&json_path, serde_json::to_string_pretty(&detail)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Which scenes of an evaluation set `scenecast calibrate` reads.
pub struct CalibrationScenes<'a> {
    /// The scenes captioned (objects the projector trained on).
    pub kinds: &'a [String],
    /// Of those, the kinds whose names calibrate the classifier's threshold (empty: all).
    pub classifier_kinds: &'a [String],
    /// Scenes of unknown things (not captioned): the classifier's threshold is the one that best
    /// tells the correct names from them (empty: it keeps `keep` of the correct names).
    pub unknown_kinds: &'a [String],
}

/// The guides `scenecast calibrate` sets (they are not calibrated; each defaults to the loaded
/// manifest's).
pub struct Guides {
    /// `grounding.guide_threshold`.
    pub threshold: Option<f32>,
    /// `grounding.positions` with the default phrases.
    pub place: bool,
}

/// `scenecast calibrate`: the threshold of the caption check on the set's scenes of `kinds`, as a
/// `[grounding]` section printed or written into the manifest `write`.
pub fn calibrate(
    config: &Config,
    set_path: &Path,
    scenes: CalibrationScenes<'_>,
    keep: f64,
    nothing: &str,
    write: Option<&Path>,
    guides: Guides,
) -> Result<ExitCode> {
    let guide = guides.threshold;
    anyhow::ensure!(keep > 0.0 && keep <= 1.0, "--keep {keep}: expected a share in (0, 1], e.g. 0.95");
    if let Some(p) = guide {
        anyhow::ensure!(p > 0.0 && p <= 1.0, "--guide {p}: expected a score in (0, 1], e.g. 0.99");
    }
    let CalibrationScenes { kinds, classifier_kinds, unknown_kinds } = scenes;
    if let Some(k) = classifier_kinds.iter().find(|k| !kinds.contains(k)) {
        anyhow::bail!(
            "--classifier-kind {k}: not among the scenes calibrated on; expected one of --kind {}",
            kinds.join(", ")
        );
    }
    if let Some(k) = unknown_kinds.iter().find(|k| kinds.contains(k)) {
        anyhow::bail!("--unknown-kind {k}: also a --kind; expected scenes of unknown things, not of the vocabulary");
    }
    let mut set = eval::EvalSet::load(set_path)?;
    let name = set.name.clone();
    let read: Vec<String> = kinds.iter().chain(unknown_kinds).cloned().collect();
    set.keep_kinds(&read).with_context(|| format!("--kind or --unknown-kind in {}", set_path.display()))?;
    let mut pipeline = load_pipeline(config)?;
    if guides.place && pipeline.manifest.cell_grid().is_none() {
        anyhow::bail!("--place: the stack's image tokens are no grid of cells (its manifest has no [projector])");
    }
    let start = Instant::now();
    let total = set.scenes.len();
    let captioned = set.scenes.iter().filter(|s| kinds.contains(&s.kind)).count();
    let t = eval::calibrate(&set, &mut pipeline, keep, classifier_kinds, unknown_kinds, &mut |i| {
        if (i + 1) % 20 == 0 {
            eprintln!("  {}/{total} scenes, {:.0} s", i + 1, start.elapsed().as_secs_f64());
        }
    })?;
    let c = &t.tokens;
    let current = pipeline.manifest.grounding.as_ref();
    let spec = GroundingSpec {
        categories: set.categories.clone(),
        threshold: c.threshold,
        nothing: nothing.to_owned(),
        classifier_threshold: t.classifier.as_ref().map(|k| k.threshold),
        classifier_exempt: t.classifier_exempt.clone(),
        guide_threshold: guide.or_else(|| current.and_then(|g| g.guide_threshold)),
        guide: current.map_or_else(scenecast::manifest::default_guide, |g| g.guide.clone()),
        guide_yes: current.map_or_else(scenecast::manifest::default_guide_yes, |g| g.guide_yes.clone()),
        positions: if guides.place {
            Some(scenecast::manifest::default_positions())
        } else {
            current.and_then(|g| g.positions.clone())
        },
        centre: current.map_or_else(scenecast::manifest::default_centre, |g| g.centre),
        region: current.and_then(|g| g.region),
    };
    let mut comment = format!(
        "The check of captions by the image tokens (`llm.ground_captions`): a caption keeps a category's name \
         only when some image token points at it (cosine with the name's direction in the LLM's input space \
         >= threshold); a caption left with no name says `nothing`. Written by `scenecast calibrate` on the set \
         {name}: {captioned} scenes of kinds {}, objects the projector trained on; the threshold keeps {:.0} % of the \
         {} names their captions got right and removes {} of the {} wrong ones.",
        kinds.join(", "),
        keep * 100.0,
        c.correct,
        c.wrong_removed,
        c.wrong,
    );
    eprintln!(
        "threshold {:.4}: keeps {:.0} % of {} correct names; {} of {} wrong names fall below it ({:.0} s)",
        c.threshold,
        keep * 100.0,
        c.correct,
        c.wrong_removed,
        c.wrong,
        start.elapsed().as_secs_f64()
    );
    if let Some(k) = &t.classifier {
        let unknown = if k.unknown == 0 {
            String::new()
        } else {
            format!(
                " It is the score that best tells those names from {} photos of unknown things (kinds {}), whose \
                 best category it leaves below it in {}: the share of correct names kept less the share of unknown \
                 photos let through is highest there.{}",
                k.unknown,
                unknown_kinds.join(", "),
                k.unknown_removed,
                if t.classifier_exempt.is_empty() {
                    String::new()
                } else {
                    format!(
                        " The classifier does not recognise {} on the photos that show them (two or more, its \
                         median score of each there below the threshold): classifier_exempt, their names stand on \
                         the image tokens alone, and the threshold is taken without them.",
                        t.classifier_exempt.join(", ")
                    )
                },
            )
        };
        comment += &format!(
            "\nThe detector's own scores of the categories (its columns named `detector.category_prefix` + \
             category) check the names the image tokens keep: a name it scores below classifier_threshold in the \
             frame goes too. The threshold keeps {:.0} % of the {} correct names that have such a score{} and \
             removes {} of the {} wrong ones.{unknown}",
            k.keep * 100.0,
            k.correct,
            if classifier_kinds.is_empty() {
                String::new()
            } else {
                format!(" in the scenes of kinds {}", classifier_kinds.join(", "))
            },
            k.wrong_removed,
            k.wrong,
        );
        eprintln!(
            "classifier_threshold {:.5}: keeps {:.0} % of {} correct names with a score; removes {} of {} wrong ones{}",
            k.threshold,
            k.keep * 100.0,
            k.correct,
            k.wrong_removed,
            k.wrong,
            if k.unknown == 0 {
                String::new()
            } else {
                format!(
                    "; {} of {} unknown photos score no category as much; exempt: {}",
                    k.unknown_removed,
                    k.unknown,
                    if t.classifier_exempt.is_empty() { "none".to_owned() } else { t.classifier_exempt.join(", ") }
                )
            }
        );
    }
    if let Some(p) = spec.guide_threshold {
        comment += "\nA caption the checks leave naming no category is guided: when the detector's category columns \
             score one category at least guide_threshold in the frame (set, not calibrated), the LLM writes it \
             again begun with `guide` and that category, and the rest of it is checked as above. A presence question \
             about a category scored that much that the LLM does not answer with `guide_yes` is answered again \
             begun with it.";
        eprintln!("guide_threshold {p}: captions that name nothing are begun with a category scored at least {p}");
    }
    if spec.positions.is_some() {
        comment += "\nA position question whose answer places the object elsewhere than the detector's class of its \
             name scores best, or else the image tokens place it (the centre of the grid cells around the best one \
             that reach `region` of its cosine; without `region`, the best cell), is answered again begun with that \
             side's phrase of `positions` (left, centre, right; set, not calibrated).";
        eprintln!("positions: answers to \"Where is ...?\" and captions' sides are placed by the detector's classes or the image tokens");
    }
    let section = spec.to_toml(&comment);
    match write {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading the manifest {}", path.display()))?;
            let text = with_grounding(&text, &section);
            let base = path.parent().unwrap_or(Path::new("."));
            Manifest::parse(&text, &path.display().to_string(), base)
                .context("the manifest with the new [grounding] section does not validate; it was not written")?;
            std::fs::write(path, text).with_context(|| format!("writing the manifest {}", path.display()))?;
            eprintln!("wrote [grounding] into {}", path.display());
        }
        None => out!("{section}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The image through the whole stack, then each question against the one cached scene prefix.
/// Answers `questions` about each image in turn; the models are loaded once. With `caption`, the
/// one question is the caption prompt and is asked as a caption (`Backbone::describe`: checked
/// against the image tokens).
pub fn describe(
    config: &Config,
    image_paths: &[PathBuf],
    questions: &[String],
    caption: bool,
    json: bool,
) -> Result<ExitCode> {
    let mut pipeline = load_pipeline(config)?;
    for question in questions {
        pipeline.backbone.check_question(question)?;
    }
    let mut tokens = ImageTokens::default();
    for (n, image_path) in image_paths.iter().enumerate() {
        if image_paths.len() > 1 && !json {
            out!("{}", image_path.display());
        }
        describe_one(&mut pipeline, &mut tokens, n as u64, image_path, questions, caption, json)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_one(
    pipeline: &mut Pipeline,
    tokens: &mut ImageTokens,
    scene: u64,
    image_path: &Path,
    questions: &[String],
    caption: bool,
    json: bool,
) -> Result<()> {
    let (image, decode_ms) = open_image(image_path)?;
    let vision_start = Instant::now();
    let (vt, scene_prefill_ms) = pipeline.set_scene(scene, &image, tokens)?;
    let vision_ms = ms_since(vision_start) - scene_prefill_ms;
    let backbone = &mut pipeline.backbone;
    for (i, question) in questions.iter().enumerate() {
        let request_start = Instant::now();
        let options = backbone.default_options();
        let answer = if caption {
            backbone.describe(question, &options, &mut |_| true)?
        } else {
            backbone.ask(question, &options, &mut |_| true)?
        };
        // The first request pays for the image (vision + scene prefill); later ones reuse it.
        let (first, scene_ms) = if i == 0 { (true, scene_prefill_ms) } else { (false, 0.0) };
        let total_ms = ms_since(request_start) + if first { decode_ms + vision_ms + scene_prefill_ms } else { 0.0 };
        let ttft_ms = answer.ttft_ms + if first { vision_ms + scene_prefill_ms } else { 0.0 };
        if json {
            let out = json!({
                "image": image_path,
                "question": question,
                "text": answer.text,
                "checked": answer.checked,
                "guided": answer.guided,
                "objects": answer.objects,
                "moved": answer.moved,
                "tokens": answer.n_tokens,
                "stop": answer.stop,
                "timings_ms": {
                    "decode_image": if first { decode_ms } else { 0.0 },
                    "preprocess": if first { vt.preprocess_ms } else { 0.0 },
                    "encode": if first { vt.encode_ms } else { 0.0 },
                    "project": if first { vt.project_ms } else { 0.0 },
                    "prefill": scene_ms + answer.prefill_ms,
                    "decode": answer.decode_ms,
                    "total": total_ms,
                },
                "ttft_ms": ttft_ms,
                "prefix_cached": !first,
                "model": backbone.summary(),
            });
            out!("{out}");
        } else {
            if !caption {
                out!("Q: {question}");
            }
            out!("{}", answer.text);
            if let Some(checked) = &answer.checked {
                out!(
                    "  [the scene does not support {} (image tokens or detector scores): removed from \"{}\"]",
                    checked.dropped.join(", "),
                    checked.unchecked
                );
            }
            if let Some(moved) = &answer.moved {
                out!(
                    "  [placed again: {}, where the detector or the image tokens place them; as placed: \"{}\"]",
                    moved.categories.join(", "),
                    moved.unmoved
                );
            }
            if let Some(g) = &answer.guided {
                let (by, own) = match g.guide.kind {
                    GuideKind::Caption => {
                        ("the classifier scores", "and the checks left nothing of the LLM's own caption")
                    }
                    GuideKind::Presence => ("the classifier scores", "and the LLM's own answer did not say so"),
                    GuideKind::Named => (
                        "the scene's caption names it, the image tokens point at",
                        "and the LLM's own answer did not say so",
                    ),
                    GuideKind::Position => (
                        "the detector's class of its name or its image tokens place it there; the tokens point at",
                        "and the LLM's own answer placed it elsewhere",
                    ),
                };
                out!(
                    "  [begun with \"{}\": {by} {} {:.3}, {own}: \"{}\"]",
                    g.guide.start,
                    g.guide.category,
                    g.guide.score,
                    g.written
                );
            }
            out!(
                "  [{} tokens, ttft {:.0} ms, prefill {:.0} ms, decode {:.0} ms ({:.1} tok/s), total {:.0} ms{}]",
                answer.n_tokens,
                ttft_ms,
                scene_ms + answer.prefill_ms,
                answer.decode_ms,
                answer.n_tokens as f64 / (answer.decode_ms / 1e3).max(1e-9),
                total_ms,
                if first { "" } else { ", scene prefix cached" }
            );
        }
    }
    Ok(())
}

pub fn run_daemon(config: &Config, config_path: Option<&Path>, demo: bool) -> Result<ExitCode> {
    let mut config = config.clone();
    if demo {
        let mut addr: std::net::SocketAddr = format!("127.0.0.1:{}", config.mqtt.port).parse()?;
        if std::net::TcpStream::connect(addr).is_ok() {
            // Another broker (Debian's mosquitto starts one) holds the port: take a free one, so
            // the demo still prints what it publishes.
            let taken = addr;
            addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            config.mqtt.port = addr.port();
            out!("demo: {taken} is taken by another broker; the embedded broker listens on {addr} instead");
        }
        let v5 = config.mqtt.protocol == MqttProtocol::V5;
        let prefix = config.mqtt.topic_prefix();
        let broker = mqtt::start_broker(addr, v5, &format!("{prefix}/#")).context("the demo's embedded broker")?;
        out!("demo: embedded MQTT broker on {addr}; topics under {prefix}/ (try: mosquitto_sub -h 127.0.0.1 -p {} -t '{prefix}/#' -v)", config.mqtt.port);
        print_captions(broker);
    }

    anyhow::ensure!(
        config.mqtt.enabled,
        "`mqtt.enabled` is false: the daemon has nowhere to publish (use `scenecast demo` to print captions)"
    );
    scenecast::daemon::run(config, config_path.map(Path::to_path_buf))?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the captions and status changes the embedded broker sees.
fn print_captions(mut broker: mqtt::EmbeddedBroker) {
    std::thread::spawn(move || {
        while let Some(forwarded) = broker.recv() {
            let (topic, payload) = (forwarded.topic, String::from_utf8_lossy(&forwarded.payload).into_owned());
            match serde_json::from_str::<wire::Caption>(&payload) {
                Ok(c) if topic.ends_with("/caption") => {
                    out!(
                        "{topic} [frame {}] {} ({:.0} ms)",
                        c.frame_seq,
                        c.text,
                        c.timings_ms.get("total").copied().unwrap_or(0.0)
                    )
                }
                _ if topic.ends_with("/status") => out!("{topic}: {payload}"),
                _ => {}
            }
        }
    });
}

pub fn run_worker(config: &Config) -> Result<ExitCode> {
    anyhow::ensure!(config.mqtt.enabled, "`mqtt.enabled` is false: a worker takes its jobs over MQTT");
    anyhow::ensure!(
        config.mqtt.protocol == MqttProtocol::V5,
        "`mqtt.protocol` is v3.1.1: a worker needs MQTT v5 (shared subscriptions, Response Topic, message expiry)"
    );
    anyhow::ensure!(!config.offload.serve.is_empty(), "`offload.serve` is empty: the worker would serve nothing");
    scenecast::daemon::run_worker(config.clone())?;
    Ok(ExitCode::SUCCESS)
}

fn fleet_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")
}

fn check_group(group: &str) -> Result<()> {
    if let Some(problem) = mqtt::topic_problem(group) {
        anyhow::bail!("--group {group:?} {problem} (expected a topic such as scenecast/all)");
    }
    Ok(())
}

/// Cuts `text` to `width` characters for a table cell.
fn cell(text: &str, width: usize) -> String {
    let mut cut: String = text.chars().take(width).collect();
    if text.chars().count() > width {
        cut.pop();
        cut.push('…');
    }
    cut
}

pub fn fleet_ask(config: &Config, group: &str, question: &str, timeout_s: f64, json: bool) -> Result<ExitCode> {
    check_group(group)?;
    anyhow::ensure!(
        timeout_s.is_finite() && (0.1..=3600.0).contains(&timeout_s),
        "--timeout {timeout_s} is outside 0.1..=3600 seconds"
    );
    let timeout = std::time::Duration::from_secs_f64(timeout_s);
    let report = fleet_runtime()?.block_on(mqtt::fleet::ask(
        &config.mqtt,
        group,
        question,
        config.llm.max_question_chars,
        timeout,
    ))?;
    if json {
        out!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    out!("{:<16} {:<56} {:>10} {:>9}", "DEVICE", "ANSWER", "FRAME AGE", "LATENCY");
    for a in &report.answers {
        let answer = match (&a.text, &a.error) {
            (Some(text), _) => text.clone(),
            (None, Some(e)) => format!("error {}: {}", e.code, e.message),
            (None, None) => String::new(),
        };
        let age = a.frame_age_ms.map_or("-".into(), |ms| format!("{:.1} s", ms as f64 / 1e3));
        out!("{:<16} {:<56} {:>10} {:>6.0} ms", cell(&a.device, 16), cell(&answer, 56), age, a.latency_ms);
    }
    for d in &report.silent {
        let status = d.status.as_deref().unwrap_or("unknown");
        out!(
            "{:<16} {:<56} {:>10} {:>9}",
            cell(&d.member.device, 16),
            format!("(no answer; status {status})"),
            "-",
            "-"
        );
    }
    out!(
        "{} of {} device{} answered on {group}",
        report.answers.len(),
        report.answers.len() + report.silent.len(),
        if report.answers.len() + report.silent.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn fleet_list(config: &Config, group: &str, json: bool) -> Result<ExitCode> {
    check_group(group)?;
    let devices = fleet_runtime()?.block_on(mqtt::fleet::list(&config.mqtt, group))?;
    if json {
        out!("{}", serde_json::to_string(&devices)?);
        return Ok(ExitCode::SUCCESS);
    }
    out!("{:<16} {:<8} {:<28} {}", "DEVICE", "STATUS", "PREFIX", "MODEL");
    for d in &devices {
        let status = d.status.as_deref().unwrap_or("unknown");
        out!("{:<16} {:<8} {:<28} {}", cell(&d.member.device, 16), status, cell(&d.member.prefix, 28), d.member.model);
    }
    out!("{} device{} in {group}", devices.len(), if devices.len() == 1 { "" } else { "s" });
    Ok(ExitCode::SUCCESS)
}
