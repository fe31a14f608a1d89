//! The `scenecast` command: argument parsing and logging, then one library call per command.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use scenecast::Config;

/// Prints a line to stdout; a closed pipe (`scenecast models check | head`) ends output quietly
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod cli;
mod commands;

use cli::{Cli, Command, FleetCommand, ModelsCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs at INFO; the demo prints its captions itself, so it only needs warnings.
    let log = cli.log.clone().unwrap_or_else(|| {
        if matches!(cli.command, Command::Run { demo: false } | Command::Worker) {
            "info".into()
        } else {
            "warn".into()
        }
    });
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
    if scenecast::daemon::logs_to_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(env_filter)
                .with(journald.with_syslog_identifier("scenecast".into()))
                .init();
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
        Command::Models(ModelsCommand::Fetch { gemma, arch }) => commands::fetch(&config, gemma, arch),
        Command::Models(ModelsCommand::Check) => commands::check(&config),
        Command::Encode { image, json } => commands::encode(&config, &image, json),
        Command::Demo => commands::demo(&config),
        Command::Generate { prompt, output, from_image, hidden, seed, steps, size, guidance, sampler, json } => {
            let args = commands::GenerateArgs {
                prompt,
                output,
                from_image,
                hidden,
                seed,
                steps,
                size,
                guidance,
                sampler,
                json,
            };
            commands::generate(&config, &args)
        }
        Command::Eval { set, report, samples, kinds, verbose } => {
            commands::evaluate(&config, &set, report.as_deref(), samples, &kinds, verbose)
        }
        Command::Calibrate { set, kinds, keep, classifier_kinds, unknown_kinds, nothing, write, guide, place } => {
            let scenes = commands::CalibrationScenes {
                kinds: &kinds,
                classifier_kinds: &classifier_kinds,
                unknown_kinds: &unknown_kinds,
            };
            let guides = commands::Guides { threshold: guide, place };
            commands::calibrate(&config, &set, scenes, keep, &nothing, write.as_deref(), guides)
        }
        Command::Config => {
            // The object sensors depend on the model stack's vocabulary: settled against it here,
            // as `run` does at start.
            let manifest = config.manifest()?;
            let config = config.with_objects(&manifest)?;
            out!("{} is valid; in effect:\n{config:#?}", config.origin);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { demo } => commands::run_daemon(&config, cli.config.as_deref(), demo),
        Command::Worker => commands::run_worker(&config),
        Command::Fleet(FleetCommand::Ask { question, group, timeout, json }) => {
            commands::fleet_ask(&config, &group, &question, timeout, json)
        }
        Command::Fleet(FleetCommand::List { group, json }) => commands::fleet_list(&config, &group, json),
        Command::Caption { images, json } => {
            let prompt = config.llm.caption_prompt.clone();
            commands::describe(&config, &images, &[prompt], true, json)
        }
        Command::Ask { image, question, questions, json } => {
            let all: Vec<String> = question.into_iter().chain(questions).collect();
            anyhow::ensure!(!all.is_empty(), "give a question: scenecast ask IMAGE \"What is on the table?\"");
            commands::describe(&config, std::slice::from_ref(&image), &all, false, json)
        }
    }
}
