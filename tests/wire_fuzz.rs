//! Property tests of everything that parses input from outside: the MQTT request parsers (ask,
//! generate, config/set, offloaded jobs) and the configuration file. Arbitrary bytes and
//! well-formed-looking inputs never panic, and every refusal is one of the documented error codes
//! or a config error that names a key.
//!
//! In `make test` each property runs a few thousand cases, plus every input kept in
//! `tests/fixtures/fuzz-corpus/` (the interesting ones found so far). `make fuzz` runs each
//! property with `SCENECAST_FUZZ_CASES` cases (1,000,000).

mod common;

use proptest::prelude::*;
use scenecast::config::Config;
use scenecast::mqtt::wire::{
    parse_ask, parse_config_patch, parse_generate, parse_job, parse_text_question, salvage_reply_address, Limits,
};
use scenecast::worker::{GateConfig, OffloadKind, RuntimeSettings};

const LIMITS: Limits = Limits { max_payload_bytes: 1024, max_question_chars: 100 };
const JOB_LIMITS: Limits = Limits { max_payload_bytes: 1 << 20, max_question_chars: 100 };
/// The codes of docs/schemas/reply.schema.json.
const CODES: [&str; 9] = [
    "bad_request",
    "too_large",
    "bad_question",
    "bad_prompt",
    "out_of_range",
    "unavailable",
    "forbidden_reply_topic",
    "busy",
    "internal",
];

fn cases() -> u32 {
    std::env::var("SCENECAST_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

/// Every parser on one input: no panic, refusals with documented codes, configs with errors that
/// name a key or the TOML position.
fn every_parser(bytes: &[u8]) -> Result<(), String> {
    let check = |what: &str, r: Result<(), scenecast::mqtt::wire::RequestError>| match r {
        Ok(()) => Ok(()),
        Err(e) if CODES.contains(&e.code()) && !e.to_string().is_empty() => Ok(()),
        Err(e) => Err(format!("{what}: undocumented refusal {:?}: {e}", e.code())),
    };
    check(
        "ask",
        parse_ask(bytes, &LIMITS).and_then(|r| {
            if r.question.trim().is_empty() || r.question.chars().count() > 100 {
                Err(scenecast::mqtt::wire::RequestError::Internal(format!("accepted a bad question {:?}", r.question)))
            } else {
                Ok(())
            }
        }),
    )?;
    check("ask/text", parse_text_question(bytes, &LIMITS).map(|_| ()))?;
    check("generate", parse_generate(bytes, &LIMITS, 200).map(|_| ()))?;
    let current = RuntimeSettings { caption_prompt: "Describe.".into(), gate: GateConfig::default() };
    check(
        "config/set",
        parse_config_patch(bytes, &LIMITS).and_then(|p| p.apply(&current)).and_then(|next| {
            next.check()
                .map_err(|e| scenecast::mqtt::wire::RequestError::Internal(format!("accepted invalid settings: {e}")))
        }),
    )?;
    for kind in [OffloadKind::Ask, OffloadKind::Generate] {
        check("job", parse_job(kind, bytes, &JOB_LIMITS, 200).map(|_| ()))?;
    }
    let _ = salvage_reply_address(bytes);
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Err(e) = Config::parse(text, "fuzz.toml") {
            let message = e.to_string();
            if !message.starts_with("config fuzz.toml: ") && !message.starts_with("manifest") {
                return Err(format!("config error without its origin: {message}"));
            }
        }
    }
    Ok(())
}

/// Keys of the config file with values of several types, for TOML-shaped inputs.
const CONFIG_LINES: &[&str] = &[
    "[mqtt]",
    "[offload]",
    "[llm]",
    "[camera]",
    "[scene]",
    "[generator]",
    "[onnx]",
    "[camera.v4l2]",
    "[mqtt.tls]",
    "port = ",
    "groups = ",
    "kinds = ",
    "timeout_s = ",
    "retry_s = ",
    "request_queue = ",
    "max_job_bytes = ",
    "share_group = ",
    "jobs_prefix = ",
    "context = ",
    "max_steps = ",
    "change_threshold = ",
    "interval_s = ",
    "topic_prefix = ",
    "protocol = ",
    "fps = ",
];
const CONFIG_VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "65536",
    "18446744073709551616",
    "1e300",
    "inf",
    "nan",
    "-0.0",
    "\"\"",
    "\"a/b\"",
    "\"$share\"",
    "\"+\"",
    "[\"ask\"]",
    "[\"generate\", \"ask\"]",
    "[\"scenecast/all\", \"\"]",
    "[]",
    "{}",
    "true",
    "\"v5\"",
    "\"v3.1.1\"",
    "[[]]",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(every_parser(&bytes).is_ok(), "{}", every_parser(&bytes).unwrap_err());
    }

    #[test]
    fn json_shaped_requests_never_panic(
        question in proptest::option::of(".{0,150}"),
        stream in proptest::option::of(any::<bool>()),
        id in proptest::option::of("[a-z0-9]{0,8}"),
        extra in proptest::option::of("[a-z_]{1,10}"),
        number in any::<i64>(),
        float in any::<f64>(),
    ) {
        let mut fields = Vec::new();
        if let Some(q) = &question { fields.push(format!("\"question\":{}", serde_json::to_string(q).unwrap())); }
        if let Some(s) = stream { fields.push(format!("\"stream\":{s}")); }
        if let Some(i) = &id { fields.push(format!("\"id\":\"{i}\"")); }
        if let Some(x) = &extra { fields.push(format!("\"{x}\":{number}")); }
        let payload = format!("{{{}}}", fields.join(","));
        match parse_ask(payload.as_bytes(), &LIMITS) {
            Ok(req) => prop_assert_eq!(Some(req.question), question.clone()),
            Err(e) => prop_assert!(CODES.contains(&e.code()), "{}", e),
        }
        // The same fields as a render, a settings patch and a job: requests of the wrong kind.
        let render = format!("{{\"prompt\":{},\"steps\":{number},\"guidance\":{}}}",
            serde_json::to_string(&question).unwrap(), serde_json::to_string(&float).unwrap());
        prop_assert!(every_parser(render.as_bytes()).is_ok(), "{}", every_parser(render.as_bytes()).unwrap_err());
        let patch = format!("{{\"scene\":{{\"change_threshold\":{},\"min_interval_s\":{number}}}}}", serde_json::to_string(&float).unwrap());
        prop_assert!(every_parser(patch.as_bytes()).is_ok(), "{}", every_parser(patch.as_bytes()).unwrap_err());
        let job = format!("{{\"origin\":\"c\",\"ask\":{payload},\"frame\":{{\"seq\":{number},\"ts_ms\":1,\"content_type\":\"image/png\",\"data\":{}}}}}",
            serde_json::to_string(&id.unwrap_or_default()).unwrap());
        prop_assert!(every_parser(job.as_bytes()).is_ok(), "{}", every_parser(job.as_bytes()).unwrap_err());
    }

    #[test]
    fn toml_shaped_configs_never_panic(
        lines in proptest::collection::vec((0..CONFIG_LINES.len(), 0..CONFIG_VALUES.len()), 0..12),
    ) {
        let text: String = lines
            .iter()
            .map(|(k, v)| {
                let key = CONFIG_LINES[*k];
                if key.starts_with('[') { format!("{key}\n") } else { format!("{key}{}\n", CONFIG_VALUES[*v]) }
            })
            .collect();
        prop_assert!(every_parser(text.as_bytes()).is_ok(), "{}", every_parser(text.as_bytes()).unwrap_err());
    }
}

/// The kept inputs: every file under tests/fixtures/fuzz-corpus through every parser.
#[test]
fn the_corpus_never_panics() {
    let dir = common::repo().join("tests/fixtures/fuzz-corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        if let Err(e) = every_parser(&bytes) {
            panic!("{}: {e}", path.display());
        }
        n += 1;
    }
    assert!(n >= 10, "the corpus has {n} inputs");
}

/// A job whose frame claims to be 100000 x 100000 pixels is refused before any pixel is allocated.
#[test]
fn a_decompression_bomb_in_a_job_is_refused() {
    let path = common::repo().join("tests/fixtures/fuzz-corpus/job-png-bomb.json");
    let err = parse_job(OffloadKind::Ask, &std::fs::read(path).unwrap(), &JOB_LIMITS, 200).unwrap_err();
    assert_eq!(err.code(), "bad_request");
    assert!(err.to_string().contains("`frame.data`"), "{err}");
}
