//! Property test of the request parser: arbitrary bytes and JSON-shaped text never panic, and
//! every refusal maps to one of the documented error codes. Bounded (a few thousand cases), so it
//! runs in CI on every build.

use proptest::prelude::*;
use scenecast::mqtt::wire::{parse_ask, parse_text_question, salvage_reply_address, Limits};

const LIMITS: Limits = Limits { max_payload_bytes: 1024, max_question_chars: 100 };
const CODES: [&str; 6] = ["bad_request", "too_large", "bad_question", "forbidden_reply_topic", "busy", "internal"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        match parse_ask(&bytes, &LIMITS) {
            Ok(req) => prop_assert!(!req.question.trim().is_empty() && req.question.chars().count() <= 100),
            Err(e) => prop_assert!(CODES.contains(&e.code())),
        }
        let _ = parse_text_question(&bytes, &LIMITS);
        let _ = salvage_reply_address(&bytes);
    }

    #[test]
    fn json_shaped_requests_never_panic(
        question in proptest::option::of(".{0,150}"),
        stream in proptest::option::of(any::<bool>()),
        id in proptest::option::of("[a-z0-9]{0,8}"),
        extra in proptest::option::of("[a-z]{1,6}"),
        number in any::<i64>(),
    ) {
        let mut fields = Vec::new();
        if let Some(q) = &question { fields.push(format!("\"question\":{}", serde_json::to_string(q).unwrap())); }
        if let Some(s) = stream { fields.push(format!("\"stream\":{s}")); }
        if let Some(i) = &id { fields.push(format!("\"id\":\"{i}\"")); }
        if let Some(x) = &extra { fields.push(format!("\"{x}\":{number}")); }
        let payload = format!("{{{}}}", fields.join(","));
        match parse_ask(payload.as_bytes(), &LIMITS) {
            Ok(req) => prop_assert_eq!(Some(req.question), question),
            Err(e) => prop_assert!(CODES.contains(&e.code()), "{}", e),
        }
    }
}
