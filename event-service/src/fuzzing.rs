//! Fuzzing harnesses for the service's input parsers, shared by the cargo-fuzz targets in
//! `fuzz/` and the replay test below.
//!
//! Each harness takes arbitrary bytes, feeds them to one parser and asserts what must hold for
//! every input; a panic is a finding. The test at the bottom runs every committed corpus file
//! (`fuzz/corpus/<target>/`) and every regression input (`fuzz/regressions/<target>/`) through
//! the same harness, so the corpora replay in the ordinary test run.
//!
//! Compiled for the crate's tests and with the `fuzzing` feature only; not part of the API.

use std::{
    sync::OnceLock,
    time::{Duration, Instant, SystemTime},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};
use serde::de::IgnoredAny;
use serde_json::Value;

use crate::{
    auth::{Auth, AuthSettings, KeyFiles, MAX_GRANTED_PATTERNS, Verified, containment},
    event::{Event, validate_event_name},
    main_port::parse_publish,
    protocol::{self, ClientOp, MAX_ID_BYTES, RequestId},
    source::amqp::message,
    topics::{self, TopicTrie},
};

/// The limits the harnesses use: the service's defaults.
const MAX_EVENTS: usize = 100;
const MAX_PATTERN: usize = 255;
const MAX_NAME: usize = 255;

/// A harness: takes the fuzzer's bytes, panics on a finding.
pub type Harness = fn(&[u8]);

/// Every target: its name (the cargo-fuzz target and corpus directory) and its harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("client_frame", client_frame),
    ("patterns", patterns),
    ("token", token),
    ("publish", publish),
    ("amqp_message", amqp_message),
];

/// `protocol::parse_client_frame`: never panics; what it accepts respects the limits, and a
/// parsed request re-encoded parses to the same request.
pub fn client_frame(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = protocol::parse_client_frame(text, MAX_EVENTS);
    // A tighter limit refuses or accepts the same frame, never panics.
    let tight = protocol::parse_client_frame(text, 1);
    let Ok(op) = parsed else {
        assert!(tight.is_err());
        return;
    };
    if let Some(RequestId::Text(id)) = op.id() {
        assert!(id.len() <= MAX_ID_BYTES);
    }
    let mut again = serde_json::Map::new();
    if let Some(id) = op.id() {
        again.insert("id".into(), serde_json::json!(id));
    }
    match &op {
        ClientOp::Subscribe { events, .. } | ClientOp::Unsubscribe { events, .. } => {
            assert!(!events.is_empty() && events.len() <= MAX_EVENTS);
            assert_eq!(tight.is_ok(), events.len() == 1);
            // The reply names the same events.
            let reply: Value = serde_json::from_str(&protocol::subscribed(op.id(), events))
                .expect("a reply is JSON");
            assert_eq!(reply["events"], serde_json::json!(events));
            for e in events {
                if topics::validate_pattern(e, MAX_PATTERN).is_ok() {
                    let c = topics::canonical(e);
                    assert!(topics::validate_pattern(&c, MAX_PATTERN).is_ok());
                }
            }
            let name = if matches!(op, ClientOp::Subscribe { .. }) {
                "subscribe"
            } else {
                "unsubscribe"
            };
            again.insert("op".into(), name.into());
            again.insert("events".into(), serde_json::json!(events));
        }
        ClientOp::Ping { .. } => {
            again.insert("op".into(), "ping".into());
        }
        ClientOp::Auth { token, .. } | ClientOp::Refresh { token, .. } => {
            let name = if matches!(op, ClientOp::Auth { .. }) {
                "auth"
            } else {
                "refresh"
            };
            again.insert("op".into(), name.into());
            again.insert("token".into(), token.as_str().into());
        }
    }
    let text = Value::Object(again).to_string();
    assert_eq!(protocol::parse_client_frame(&text, MAX_EVENTS), Ok(op));
}

/// Pattern validation, canonical form, matching, the trie and containment. The input is up to
/// ten lines: a granted pattern, a requested pattern, then event names to try.
pub fn patterns(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let granted = lines.next().unwrap_or_default();
    let requested = lines.next().unwrap_or(granted);
    let extra: Vec<&str> = lines.take(8).collect();
    for p in [granted, requested] {
        let _ = topics::validate_pattern(p, MAX_PATTERN);
        let _ = topics::canonical(p);
    }
    if granted.len() > MAX_PATTERN || requested.len() > MAX_PATTERN {
        return;
    }
    // Invalid patterns: the answer is unspecified but must come back.
    let started = Instant::now();
    let contained = containment::contains(granted, requested);
    let took = started.elapsed();
    let valid = |p: &str| topics::validate_pattern(p, MAX_PATTERN).is_ok();
    if !valid(granted) || !valid(requested) {
        return;
    }
    // Bounded in time (generous: a loaded machine, an instrumented build).
    assert!(took < Duration::from_secs(5), "contains took {took:?}");

    let names = derived_names(&[granted, requested], &extra);
    let mut trie: TopicTrie<String> = TopicTrie::new();
    for p in [granted, requested] {
        let c = topics::canonical(p);
        assert_eq!(topics::canonical(&c), c, "canonical is idempotent");
        assert!(valid(&c), "the canonical form of {p:?} is valid");
        assert!(containment::contains(p, p));
        // Equivalent patterns contain each other; exactly so while the search stays within its
        // bounds, which patterns of at most four words always do (longer ones may be answered
        // "not contained", the documented safe answer).
        if p.split('.').count() <= 4 {
            assert!(containment::contains(p, &c) && containment::contains(&c, p));
        }
        for n in &names {
            assert_eq!(
                topics::matches(p, n),
                topics::matches(&c, n),
                "{p} / {c} on {n}"
            );
        }
        trie.get_or_insert_with(p, || c.clone());
    }
    for n in &names {
        if contained && topics::matches(requested, n) {
            assert!(
                topics::matches(granted, n),
                "{requested:?} ⊆ {granted:?} but only the first matches {n:?}"
            );
        }
        // The trie reports exactly the patterns that match.
        let mut got: Vec<&str> = Vec::new();
        trie.for_each_match(n, |c| got.push(c));
        got.sort_unstable();
        let mut want: Vec<String> = [granted, requested]
            .into_iter()
            .filter(|p| topics::matches(p, n))
            .map(topics::canonical)
            .collect();
        want.sort_unstable();
        want.dedup();
        assert_eq!(got, want, "trie on {n:?}");
    }
}

/// Event names derived from patterns: each wildcard filled with one of the patterns' literals
/// or a fresh word (`#` as zero, one or two words), plus the given names; valid names only.
fn derived_names(patterns: &[&str], extra: &[&str]) -> Vec<String> {
    let mut fillers: Vec<&str> = patterns
        .iter()
        .flat_map(|p| p.split('.'))
        .filter(|w| *w != "*" && *w != "#")
        .take(4)
        .collect();
    fillers.push("z");
    let mut names: Vec<String> = extra.iter().map(|n| (*n).to_owned()).collect();
    for p in patterns {
        for filler in &fillers {
            for hash_words in 0..3 {
                let mut words: Vec<&str> = Vec::new();
                for w in p.split('.') {
                    match w {
                        "*" => words.push(filler),
                        "#" => words.extend(std::iter::repeat_n(*filler, hash_words)),
                        literal => words.push(literal),
                    }
                }
                names.push(words.join("."));
            }
        }
    }
    names.retain(|n| validate_event_name(n, MAX_NAME).is_ok());
    names.sort_unstable();
    names.dedup();
    names
}

/// The HMAC secret the token harness's `Auth` uses (claims are signed with it).
pub const HMAC_SECRET: &[u8] = b"fuzzing-hmac-secret-0123456789abcdefghijklmnop";
const PUBLIC_KEYS: [&str; 4] = [
    include_str!("../tests/fixtures/keys/rsa.pub"),
    include_str!("../tests/fixtures/keys/rsa2.pub"),
    include_str!("../tests/fixtures/keys/ec.pub"),
    include_str!("../tests/fixtures/keys/ed.pub"),
];

/// One `Auth` for the whole run: the HMAC secret and the fixture public keys, written to a
/// temporary directory (removed once loaded), anonymous and template grants configured.
fn auth() -> &'static Auth {
    static AUTH: OnceLock<Auth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("event-service-fuzz-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        let secret = dir.join("hmac.secret");
        let public = dir.join("public.pem");
        std::fs::write(&secret, HMAC_SECRET).expect("write the HMAC secret");
        std::fs::write(&public, PUBLIC_KEYS.concat()).expect("write the public keys");
        let settings = AuthSettings {
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(10),
            subscribe_claim: "subscribe".into(),
            grant_templates: vec!["user.{sub}.#".into()],
            anonymous: vec!["public.#".into()],
            max_token_bytes: 8192,
            max_pattern_length: MAX_PATTERN,
        };
        let files = KeyFiles {
            hmac_secret: Some(secret),
            public_keys: Some(public),
            jwks: None,
        };
        let auth = Auth::new(settings, files).expect("the fuzzing keys load");
        let _ = std::fs::remove_dir_all(&dir);
        auth
    })
}

/// `Auth::verify`. The first byte picks the mode: 0 (and 4..) verifies the rest as a token;
/// 1, 2, 3 sign the rest, as claims JSON, with the HMAC secret (HS256/384/512) first, so the
/// fuzzer reaches the claims and grant handling.
pub fn token(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let alg = match mode {
        1 => Algorithm::HS256,
        2 => Algorithm::HS384,
        3 => Algorithm::HS512,
        _ => {
            if let Ok(token) = std::str::from_utf8(rest)
                && let Ok(verified) = auth().verify(token)
            {
                check_verified(&verified);
            }
            return;
        }
    };
    let Ok(claims) = serde_json::from_slice::<Value>(rest) else {
        return;
    };
    let key = EncodingKey::from_secret(HMAC_SECRET).expect("an HMAC encoding key");
    let Ok(token) = jsonwebtoken::encode(&Header::new(alg), &claims, &key) else {
        return;
    };
    if let Ok(verified) = auth().verify(&token) {
        check_verified(&verified);
    }
}

fn check_verified(v: &Verified) {
    assert!(v.grant.len() <= MAX_GRANTED_PATTERNS);
    assert!(
        v.grant.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
    for p in v.grant.iter() {
        assert!(topics::validate_pattern(p, MAX_PATTERN).is_ok(), "{p:?}");
        assert_eq!(&topics::canonical(p), p);
        assert!(v.allows(p));
    }
    // The session turns the expiry into a deadline on the monotonic clock.
    let left = v
        .expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        Instant::now().checked_add(left).is_some(),
        "exp {} is not a usable deadline",
        v.exp
    );
}

/// `main_port::parse_publish`: every accepted event has a valid name and JSON data, and its
/// event frame is JSON.
pub fn publish(data: &[u8]) {
    let Ok(events) = parse_publish(data, MAX_NAME) else {
        return;
    };
    assert!(!events.is_empty());
    for e in &events {
        assert!(
            validate_event_name(&e.name, MAX_NAME).is_ok(),
            "{:?}",
            e.name
        );
        assert!(serde_json::from_slice::<IgnoredAny>(&e.data).is_ok());
        check_frame(e);
    }
}

fn check_frame(e: &Event) {
    let frame = protocol::event_frame(e);
    if std::str::from_utf8(&e.data).is_ok() && std::str::from_utf8(&frame).is_ok() {
        let frame: Value = match serde_json::from_slice(&frame) {
            Ok(v) => v,
            // `data` was checked without building a value; a string the checker skips but a
            // `Value` refuses (a lone surrogate escape) is fine for clients.
            Err(_) => return,
        };
        assert_eq!(frame["event"].as_str(), Some(e.name.as_str()));
    }
}

/// Reads fuzz bytes as structured input; past the end everything is zero.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }

    fn byte(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or_default()
    }

    fn u64(&mut self) -> u64 {
        let mut raw = [0u8; 8];
        let head = self.bytes(8);
        raw[..head.len()].copy_from_slice(head);
        u64::from_le_bytes(raw)
    }

    /// A string of up to `max` bytes, length first.
    fn string(&mut self, max: usize) -> String {
        let len = usize::from(self.byte()) % (max + 1);
        String::from_utf8_lossy(self.bytes(len)).into_owned()
    }

    fn value(&mut self) -> AMQPValue {
        let v = self.u64();
        match self.byte() % 7 {
            0 => AMQPValue::LongLongInt(v as i64),
            1 => AMQPValue::LongInt(v as i32),
            2 => AMQPValue::LongUInt(v as u32),
            3 => AMQPValue::Timestamp(v),
            4 => AMQPValue::Boolean(v & 1 == 1),
            5 => AMQPValue::ShortInt(v as i16),
            _ => AMQPValue::Double(f64::from_bits(v)),
        }
    }
}

/// `source::amqp::message::decode` on a message built from the bytes: a flags byte, the
/// routing key, optionally a message id, a timestamp and headers, the body limit, the body.
/// An accepted message keeps its routing key and body, gets an id, and encodes as a frame.
pub fn amqp_message(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.byte();
    let routing_key = input.string(255);
    let mut props = BasicProperties::default();
    if flags & 1 != 0
        && let Ok(id) = ShortString::try_new(input.string(255))
    {
        props = props.with_message_id(id);
    }
    if flags & 2 != 0 {
        props = props.with_timestamp(input.u64());
    }
    if flags & 4 != 0 {
        let mut headers = FieldTable::default();
        for i in 0..input.byte() % 4 {
            let key = if i == 0 && flags & 8 != 0 {
                message::TIMESTAMP_MS_HEADER.to_owned()
            } else {
                input.string(32)
            };
            let value = input.value();
            if let Ok(key) = ShortString::try_new(key) {
                headers.insert(key, value);
            }
        }
        props = props.with_headers(headers);
    }
    let max_body = usize::from(u16::from_le_bytes([input.byte(), input.byte()]));
    let body = input.0.to_vec();
    let Ok(event) = message::decode(&routing_key, &props, body.clone(), max_body) else {
        return;
    };
    assert_eq!(event.name, routing_key);
    assert_eq!(&event.data[..], &body[..]);
    assert!(body.len() <= max_body);
    assert!(!event.id.is_empty());
    check_frame(&event);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Runs every file under `dir` (when it exists) through `harness`; returns how many files
    /// there were and adds the ones that panic to `failed`.
    fn replay(dir: &Path, harness: Harness, failed: &mut Vec<String>) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut n = 0;
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_file() {
                let data = std::fs::read(&path).expect("a corpus file");
                if std::panic::catch_unwind(|| harness(&data)).is_err() {
                    failed.push(path.display().to_string());
                }
                n += 1;
            }
        }
        n
    }

    /// Every committed corpus and regression input goes through its harness without a panic.
    #[test]
    fn fuzz_corpora_replay() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut failed = Vec::new();
        for (target, harness) in TARGETS {
            let corpus = replay(&root.join("corpus").join(target), *harness, &mut failed);
            let regressions = replay(
                &root.join("regressions").join(target),
                *harness,
                &mut failed,
            );
            assert!(corpus > 0, "no corpus committed for {target}");
            eprintln!("{target}: {corpus} corpus files, {regressions} regressions");
        }
        assert!(failed.is_empty(), "inputs that panic: {failed:#?}");
    }
}
