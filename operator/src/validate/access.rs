//! Checks of `spec.auth` and `spec.limits` beyond the schema: the CEL rules already refuse most
//! of this at the API server, but an object stored before the CRD was upgraded never met them,
//! and the messages here name the exact item and word. The referenced Secrets are looked up by
//! the reconciler (`ClusterFacts::key_files`), because a pod cannot start without its mounts.

use std::collections::BTreeMap;

use crate::crd::{AuthSpec, EventRouterSpec, KeyFile, LimitsSpec};

/// The longest pattern the event service accepts by default (`EVENTROUTER_MAX_PATTERN_LENGTH`).
const MAX_PATTERN_BYTES: usize = 255;
/// The placeholder a grant template may use for the token's subject.
const SUBJECT_PLACEHOLDER: &str = "{sub}";

/// Whether a Secret key that the pods mount exists (its content is the event service's business).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPresence {
    Present,
    SecretMissing,
    KeyMissing,
}

/// Why `pattern` is not a RabbitMQ topic pattern the event service accepts, or `None`: words
/// separated by `.`, where `*` and `#` are whole words, no `,` or whitespace, at most 255 bytes.
pub(crate) fn topic_pattern_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("is empty".into());
    }
    if pattern.len() > MAX_PATTERN_BYTES {
        return Some(format!(
            "is {} bytes; the limit is {MAX_PATTERN_BYTES}",
            pattern.len()
        ));
    }
    if pattern.contains(',') {
        return Some("contains ',', which separates the patterns passed to the pods".into());
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("contains whitespace or control characters".into());
    }
    for word in pattern.split('.') {
        if word.is_empty() {
            return Some("has an empty word (leading, trailing or doubled '.')".into());
        }
        if word.len() > 1 && word.contains(['*', '#']) {
            return Some(format!(
                "has the word {word:?}: '*' and '#' must be whole words (e.g. 'order.*', not 'order*')"
            ));
        }
    }
    None
}

/// Why `pattern` is not a pattern of `spec.auth` the event service accepts, or `None`.
/// `template`: a grant template, where `{sub}` stands for the token's subject.
pub(crate) fn pattern_problem(pattern: &str, template: bool) -> Option<String> {
    if let Some(problem) = topic_pattern_problem(pattern) {
        return Some(problem);
    }
    if template {
        let rest = pattern.replace(SUBJECT_PLACEHOLDER, "");
        if rest.contains(['{', '}']) {
            return Some(format!(
                "uses a placeholder other than {SUBJECT_PLACEHOLDER} (the only one replaced)"
            ));
        }
    } else if pattern.contains(SUBJECT_PLACEHOLDER) {
        return Some(format!(
            "uses {SUBJECT_PLACEHOLDER}, but anonymous clients have no subject (use grantTemplates)"
        ));
    }
    None
}

/// Whether `origin` is `scheme://host[:port]` as browsers send it: lowercase, no path.
fn is_origin(origin: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
        && scheme
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c));
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((address, rest)) = bracketed.split_once(']') else {
            return false;
        };
        let address_ok = !address.is_empty()
            && address
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c) || ":.".contains(c));
        if !address_ok {
            return false;
        }
        match rest {
            "" => (None, None),
            rest => match rest.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return false,
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(authority), None),
        }
    };
    let host_ok = host.is_none_or(|host| {
        host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
    });
    let port_ok = port.is_none_or(|port| {
        (1..=5).contains(&port.len())
            && port.chars().all(|c| c.is_ascii_digit())
            && port.parse::<u16>().is_ok()
    });
    scheme_ok && host_ok && port_ok
}

/// A rate as the pods parse it: a finite, non-negative number; `Some(rate)` or a problem.
fn rate(problems: &mut Vec<String>, field: &str, value: &str) -> Option<f64> {
    match value.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Some(rate),
        _ => {
            problems.push(format!(
                "{field} {value:?} must be a non-negative decimal number like \"10\" or \"0.5\""
            ));
            None
        }
    }
}

fn check_patterns(problems: &mut Vec<String>, field: &str, patterns: &[String], template: bool) {
    for (index, pattern) in patterns.iter().enumerate() {
        if let Some(problem) = pattern_problem(pattern, template) {
            problems.push(format!("{field}[{index}] {pattern:?} {problem}"));
        }
    }
}

fn check_auth(problems: &mut Vec<String>, auth: &AuthSpec) {
    if !auth.tokens_enabled() {
        let token_settings = [
            ("issuer", auth.issuer.is_some()),
            ("audience", auth.audience.is_some()),
            ("leeway", auth.leeway.is_some()),
            ("subscribeClaim", auth.subscribe_claim.is_some()),
            ("maxTokenBytes", auth.max_token_bytes.is_some()),
            ("grantTemplates", !auth.grant_templates.is_empty()),
            ("anonymousPatterns", !auth.anonymous_patterns.is_empty()),
        ];
        let set: Vec<&str> = token_settings
            .iter()
            .filter(|(_, set)| *set)
            .map(|(name, _)| *name)
            .collect();
        if !set.is_empty() {
            problems.push(format!(
                "spec.auth.{} only apply to token authentication: set hmacSecretRef, publicKeysRef or jwksRef (without one every client may subscribe to anything)",
                set.join(", ")
            ));
        }
    }
    if auth.reload_interval.is_some() && auth.key_files().next().is_none() {
        problems.push(
            "spec.auth.reloadInterval needs a key file: set hmacSecretRef, publicKeysRef, jwksRef or publishKeysRef"
                .into(),
        );
    }
    // Zero leeway is valid (no skew allowed); only the syntax is checked.
    if let Some(leeway) = &auth.leeway
        && let Err(error) = humantime::parse_duration(leeway)
    {
        problems.push(format!(
            "spec.auth.leeway {leeway:?} is not a duration like 10s or 1m: {error}"
        ));
    }
    if let Some(interval) = &auth.reload_interval {
        super::duration(problems, "spec.auth.reloadInterval", interval);
    }
    check_patterns(
        problems,
        "spec.auth.grantTemplates",
        &auth.grant_templates,
        true,
    );
    check_patterns(
        problems,
        "spec.auth.anonymousPatterns",
        &auth.anonymous_patterns,
        false,
    );
    for (index, origin) in auth.allowed_origins.iter().enumerate() {
        if origin == "*" {
            problems.push(format!(
                "spec.auth.allowedOrigins[{index}] '*' is not an origin: leave allowedOrigins empty to allow any origin"
            ));
        } else if !is_origin(origin) {
            problems.push(format!(
                "spec.auth.allowedOrigins[{index}] {origin:?} must be scheme://host[:port] in lowercase, without path or trailing slash (e.g. https://app.example.com)"
            ));
        }
    }
}

fn check_limits(problems: &mut Vec<String>, limits: &LimitsSpec) {
    let connect_rate = limits
        .connect_rate_per_ip
        .as_deref()
        .map(|value| rate(problems, "spec.limits.connectRatePerIP", value));
    if limits.connect_burst_per_ip.is_some() && !matches!(connect_rate, Some(Some(r)) if r > 0.0) {
        problems.push(
            "spec.limits.connectBurstPerIP only applies with a connectRatePerIP above 0".into(),
        );
    }
    let frame_rate = limits
        .frame_rate
        .as_deref()
        .map(|value| rate(problems, "spec.limits.frameRate", value));
    if limits.frame_burst.is_some() && matches!(frame_rate, Some(Some(r)) if r <= 0.0) {
        problems.push("spec.limits.frameBurst has no effect with frameRate 0 (no limit)".into());
    }
}

/// Every problem of `spec.auth` and `spec.limits`, given what the cluster holds.
pub(super) fn check(
    problems: &mut Vec<String>,
    spec: &EventRouterSpec,
    key_files: &BTreeMap<KeyFile, KeyPresence>,
) {
    if let Some(auth) = &spec.auth {
        check_auth(problems, auth);
    }
    if let Some(limits) = &spec.limits {
        check_limits(problems, limits);
    }
    for (file, secret_ref) in spec.key_files() {
        let field = file.field_path();
        match key_files.get(&file) {
            Some(KeyPresence::SecretMissing) => problems.push(format!(
                "Secret {:?} ({field}) does not exist",
                secret_ref.name
            )),
            Some(KeyPresence::KeyMissing) => problems.push(format!(
                "Secret {:?} has no key {:?} ({field}.key)",
                secret_ref.name, secret_ref.key
            )),
            Some(KeyPresence::Present) | None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{EventRouter, SecretFileRef};
    use crate::validate::tests::{a_cluster_with_the_secret, a_router_named};
    use crate::validate::{ClusterFacts, validate};

    fn with_auth(auth: AuthSpec) -> EventRouter {
        let mut router = a_router_named("chat");
        router.spec.auth = Some(auth);
        router
    }

    fn with_limits(limits: LimitsSpec) -> EventRouter {
        let mut router = a_router_named("chat");
        router.spec.limits = Some(limits);
        router
    }

    fn hmac() -> Option<SecretFileRef> {
        Some(SecretFileRef::new("tokens", "secret"))
    }

    fn problems_of(router: &EventRouter) -> Vec<String> {
        validate(router, &a_cluster_with_the_secret())
            .expect_err("the spec must be rejected")
            .problems
    }

    #[test]
    fn a_complete_auth_and_limits_spec_is_valid() {
        let mut router = with_auth(AuthSpec {
            hmac_secret_ref: hmac(),
            jwks_ref: Some(SecretFileRef::new("idp", "jwks.json")),
            publish_keys_ref: Some(SecretFileRef::new("publishers", "keys.json")),
            issuer: Some("https://idp.example.com/".into()),
            audience: Some("events".into()),
            leeway: Some("0s".into()),
            subscribe_claim: Some("topics".into()),
            grant_templates: vec!["user.{sub}.#".into(), "tenant-{sub}.*".into(), "#".into()],
            anonymous_patterns: vec!["public.#".into(), "news.*.headline".into()],
            allowed_origins: vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into(),
                "http://[::1]:8080".into(),
                "capacitor://localhost".into(),
            ],
            max_token_bytes: Some(4096),
            reload_interval: Some("30s".into()),
            ..AuthSpec::default()
        });
        router.spec.limits = Some(LimitsSpec {
            max_connections_per_ip: Some(100),
            connect_rate_per_ip: Some("0.5".into()),
            connect_burst_per_ip: Some(10),
            trusted_proxy_header: Some("X-Forwarded-For".into()),
            frame_rate: Some("0".into()),
            frame_burst: None,
        });
        let facts = ClusterFacts {
            key_files: KeyFile::ALL
                .into_iter()
                .map(|file| (file, KeyPresence::Present))
                .collect(),
            ..a_cluster_with_the_secret()
        };
        validate(&router, &facts).expect("valid");
        // A publish-keys file alone (no token authentication) is valid too.
        let router = with_auth(AuthSpec {
            publish_keys_ref: Some(SecretFileRef::new("publishers", "keys.json")),
            reload_interval: Some("5s".into()),
            allowed_origins: vec!["https://app.example.com".into()],
            ..AuthSpec::default()
        });
        validate(&router, &a_cluster_with_the_secret()).expect("valid");
    }

    #[test]
    fn token_settings_without_a_verification_key_are_refused() {
        let router = with_auth(AuthSpec {
            issuer: Some("https://idp.example.com/".into()),
            anonymous_patterns: vec!["public.#".into()],
            publish_keys_ref: Some(SecretFileRef::new("publishers", "keys.json")),
            ..AuthSpec::default()
        });
        assert_eq!(
            problems_of(&router),
            [
                "spec.auth.issuer, anonymousPatterns only apply to token authentication: set hmacSecretRef, publicKeysRef or jwksRef (without one every client may subscribe to anything)"
            ]
        );
        let router = with_auth(AuthSpec {
            reload_interval: Some("30s".into()),
            ..AuthSpec::default()
        });
        assert_eq!(
            problems_of(&router),
            [
                "spec.auth.reloadInterval needs a key file: set hmacSecretRef, publicKeysRef, jwksRef or publishKeysRef"
            ]
        );
    }

    #[test]
    fn auth_durations_are_checked_like_the_service_does() {
        let router = with_auth(AuthSpec {
            hmac_secret_ref: hmac(),
            leeway: Some("ten seconds".into()),
            reload_interval: Some("0s".into()),
            ..AuthSpec::default()
        });
        let problems = problems_of(&router);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(r#"spec.auth.leeway "ten seconds" is not a duration"#),
            "{problems:?}"
        );
        assert_eq!(
            problems[1],
            "spec.auth.reloadInterval must be longer than zero"
        );
    }

    #[test]
    fn each_malformed_pattern_is_refused_with_its_index_and_reason() {
        let router = with_auth(AuthSpec {
            hmac_secret_ref: hmac(),
            grant_templates: vec![
                "user.{sub}.#".into(),
                "order*".into(),
                "a..b".into(),
                "a,b".into(),
                "a b".into(),
                "user.{user}".into(),
                String::new(),
                format!("a.{}", "b".repeat(255)),
            ],
            anonymous_patterns: vec!["public.#".into(), "user.{sub}".into(), ".news".into()],
            ..AuthSpec::default()
        });
        assert_eq!(
            problems_of(&router),
            [
                r#"spec.auth.grantTemplates[1] "order*" has the word "order*": '*' and '#' must be whole words (e.g. 'order.*', not 'order*')"#.to_string(),
                r#"spec.auth.grantTemplates[2] "a..b" has an empty word (leading, trailing or doubled '.')"#.into(),
                r#"spec.auth.grantTemplates[3] "a,b" contains ',', which separates the patterns passed to the pods"#.into(),
                r#"spec.auth.grantTemplates[4] "a b" contains whitespace or control characters"#.into(),
                r#"spec.auth.grantTemplates[5] "user.{user}" uses a placeholder other than {sub} (the only one replaced)"#.into(),
                r#"spec.auth.grantTemplates[6] "" is empty"#.into(),
                format!(r#"spec.auth.grantTemplates[7] "a.{}" is 257 bytes; the limit is 255"#, "b".repeat(255)),
                r#"spec.auth.anonymousPatterns[1] "user.{sub}" uses {sub}, but anonymous clients have no subject (use grantTemplates)"#.into(),
                r#"spec.auth.anonymousPatterns[2] ".news" has an empty word (leading, trailing or doubled '.')"#.into(),
            ]
        );
    }

    #[test]
    fn origins_must_be_scheme_host_and_port_only() {
        for ok in [
            "https://app.example.com",
            "http://localhost:3000",
            "http://[::1]",
            "http://10.0.0.1:65535",
        ] {
            assert!(is_origin(ok), "{ok}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "HTTPS://app.example.com",
            "https://App.example.com",
            "https://app.example.com:99999",
            "https://app.example.com:",
            "https://",
            "https://a..b",
            "http://[::1",
            "http://[::1]x",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
        let router = with_auth(AuthSpec {
            allowed_origins: vec!["*".into(), "https://app.example.com/".into()],
            ..AuthSpec::default()
        });
        assert_eq!(
            problems_of(&router),
            [
                "spec.auth.allowedOrigins[0] '*' is not an origin: leave allowedOrigins empty to allow any origin",
                r#"spec.auth.allowedOrigins[1] "https://app.example.com/" must be scheme://host[:port] in lowercase, without path or trailing slash (e.g. https://app.example.com)"#,
            ]
        );
    }

    #[test]
    fn rates_must_be_non_negative_numbers_and_bursts_need_a_rate() {
        let router = with_limits(LimitsSpec {
            connect_rate_per_ip: Some("-1".into()),
            frame_rate: Some("fast".into()),
            ..LimitsSpec::default()
        });
        assert_eq!(
            problems_of(&router),
            [
                r#"spec.limits.connectRatePerIP "-1" must be a non-negative decimal number like "10" or "0.5""#,
                r#"spec.limits.frameRate "fast" must be a non-negative decimal number like "10" or "0.5""#,
            ]
        );
        for rate in [None, Some("0"), Some("0.000")] {
            let router = with_limits(LimitsSpec {
                connect_rate_per_ip: rate.map(str::to_string),
                connect_burst_per_ip: Some(5),
                ..LimitsSpec::default()
            });
            assert_eq!(
                problems_of(&router),
                ["spec.limits.connectBurstPerIP only applies with a connectRatePerIP above 0"],
                "{rate:?}"
            );
        }
        let router = with_limits(LimitsSpec {
            frame_rate: Some("0".into()),
            frame_burst: Some(10),
            ..LimitsSpec::default()
        });
        assert_eq!(
            problems_of(&router),
            ["spec.limits.frameBurst has no effect with frameRate 0 (no limit)"]
        );
        // The frame rate has a service default (50/s): a burst alone is meaningful.
        let router = with_limits(LimitsSpec {
            frame_burst: Some(10),
            max_connections_per_ip: Some(0),
            ..LimitsSpec::default()
        });
        validate(&router, &a_cluster_with_the_secret()).expect("valid");
    }

    #[test]
    fn a_missing_key_secret_or_key_is_refused_naming_the_field() {
        let router = with_auth(AuthSpec {
            hmac_secret_ref: hmac(),
            publish_keys_ref: Some(SecretFileRef::new("publishers", "keys.json")),
            ..AuthSpec::default()
        });
        let facts = ClusterFacts {
            key_files: [
                (KeyFile::HmacSecret, KeyPresence::SecretMissing),
                (KeyFile::PublishKeys, KeyPresence::KeyMissing),
            ]
            .into(),
            ..a_cluster_with_the_secret()
        };
        assert_eq!(
            validate(&router, &facts).expect_err("invalid").problems,
            [
                r#"Secret "tokens" (spec.auth.hmacSecretRef) does not exist"#,
                r#"Secret "publishers" has no key "keys.json" (spec.auth.publishKeysRef.key)"#,
            ]
        );
    }
}
