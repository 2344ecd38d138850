//! Authentication and authorisation: connection tokens (JWT), what they grant, and publish keys.
//!
//! - [`Auth`] verifies a connection token against the configured keys ([`keys`]) and turns its
//!   claims into a *grant*: the patterns the client may subscribe to (the token's claim, plus
//!   server-side templates such as `user.{sub}.#`).
//! - [`containment`] decides whether a requested pattern lies within a grant.
//! - [`publish`] checks the `Authorization` header of `POST /publish`.
//!
//! Keys and publish keys are files (mounted Secrets) re-read every `--auth-reload-interval`: a
//! rotated Secret takes effect without a restart. A file that no longer parses keeps the last
//! good keys and is logged; a restart with it refuses to start.

pub mod containment;
pub mod keys;
pub mod publish;

use std::{
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::topics;
pub use keys::{KeyFiles, KeySet};

/// Most patterns one token may grant (claim and templates together).
pub const MAX_GRANTED_PATTERNS: usize = 256;

/// How many keys one token is tried against at most (keys without `kid` of its algorithm).
pub const MAX_KEYS_TRIED: usize = 8;

/// Everything about connection tokens except the keys.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    /// The claim holding the granted patterns.
    pub subscribe_claim: String,
    /// Patterns granted to every authenticated client; `{sub}` is replaced by the subject.
    pub grant_templates: Vec<String>,
    /// Patterns clients without a token may subscribe to.
    pub anonymous: Vec<String>,
    pub max_token_bytes: usize,
    /// Longest pattern (the service's `--max-pattern-length`).
    pub max_pattern_length: usize,
}

/// Why a token was refused. The label is the `result` of `eventrouter_auth_checks_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token is {len} bytes; the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("the token's algorithm {0} is not accepted by any configured key")]
    Algorithm(String),
    #[error("no configured key has the id {0:?}")]
    UnknownKey(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's issuer is not the configured one")]
    Issuer,
    #[error("the token's audience does not include the configured one")]
    Audience,
    #[error("the token's claims are not acceptable: {0}")]
    Claims(String),
}

impl AuthError {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::TooLarge { .. } => "too_large",
            AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm(_) => "bad_algorithm",
            AuthError::UnknownKey(_) => "unknown_key",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Issuer => "bad_issuer",
            AuthError::Audience => "bad_audience",
            AuthError::Claims(_) => "bad_claims",
        }
    }
}

/// A verified token: who, until when, and what it grants (canonical patterns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub subject: Option<String>,
    /// The token's `exp` (seconds since the epoch).
    pub exp: u64,
    /// `exp` plus the leeway: when the connection must be closed without a refresh.
    pub expires: SystemTime,
    pub grant: Arc<[String]>,
}

impl Verified {
    /// True when the grant covers every name `pattern` (canonical) can match.
    pub fn allows(&self, pattern: &str) -> bool {
        containment::allowed(&self.grant, pattern)
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<Value>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// Connection-token verification with reloadable keys.
pub struct Auth {
    pub settings: AuthSettings,
    files: KeyFiles,
    keys: RwLock<Arc<KeySet>>,
    /// The key files' contents the current keys were parsed from.
    loaded: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("settings", &self.settings)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Loads the keys; fails (naming the file) when one cannot be read or parsed, and checks the
    /// settings' patterns.
    pub fn new(settings: AuthSettings, files: KeyFiles) -> Result<Self, String> {
        for p in &settings.anonymous {
            if p.contains(['{', '}']) {
                return Err(format!(
                    "an anonymous pattern {p:?}: placeholders like {{sub}} belong in grant templates"
                ));
            }
            topics::validate_pattern(p, settings.max_pattern_length)
                .map_err(|e| format!("an anonymous pattern {p:?}: {e}"))?;
        }
        for p in &settings.grant_templates {
            let check = p.replace("{sub}", "sub");
            if check.contains(['{', '}']) {
                return Err(format!(
                    "a grant template {p:?}: the only placeholder is {{sub}}"
                ));
            }
            topics::validate_pattern(&check, settings.max_pattern_length)
                .map_err(|e| format!("a grant template {p:?}: {e}"))?;
        }
        if settings.subscribe_claim.trim().is_empty() {
            return Err("the subscribe claim's name is empty".into());
        }
        let loaded = files.snapshot()?;
        let keys = KeySet::load(&files)?;
        Ok(Self {
            settings,
            files,
            keys: RwLock::new(Arc::new(keys)),
            loaded: Mutex::new(loaded),
        })
    }

    /// Re-reads the key files; swaps the keys in when their contents changed and parse.
    /// `Ok(true)` when new keys are in use.
    pub fn reload(&self) -> Result<bool, String> {
        let now = self.files.snapshot()?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if *loaded == now {
            return Ok(false);
        }
        let keys = KeySet::load(&self.files)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        *loaded = now;
        Ok(true)
    }

    fn key_set(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The canonical patterns anonymous clients may subscribe to.
    pub fn anonymous(&self) -> Vec<String> {
        self.settings
            .anonymous
            .iter()
            .map(|p| topics::canonical(p))
            .collect()
    }

    /// Verifies a token now.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let max = self.settings.max_token_bytes;
        if token.len() > max {
            return Err(AuthError::TooLarge {
                len: token.len(),
                max,
            });
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            // An `alg` outside the supported list (`none` included) fails the header's parse:
            // name it rather than calling the token malformed.
            match header_alg(token) {
                Some(alg) => AuthError::Algorithm(alg),
                None => AuthError::Malformed(e.to_string()),
            }
        })?;
        let keys = self.key_set();
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(iss) = &self.settings.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.settings.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // A token naming an audience is fine when none is configured.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let mut last = match &header.kid {
            Some(kid) if keys.keys.iter().any(|k| k.algorithms.contains(&header.alg)) => {
                AuthError::UnknownKey(kid.chars().take(64).collect())
            }
            _ => AuthError::Algorithm(format!("{:?}", header.alg)),
        };
        for key in keys
            .candidates(header.alg, header.kid.as_deref())
            .take(MAX_KEYS_TRIED)
        {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return self.grant(data.claims),
                Err(e) => {
                    last = map_error(&e);
                    if last != AuthError::BadSignature {
                        // Anything but the signature is the token's own fault: another key
                        // would not change it.
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn grant(&self, claims: Claims) -> Result<Verified, AuthError> {
        let exp = claims
            .rest
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| AuthError::Claims("\"exp\" is not a number of seconds".into()))?;
        let subject = match claims.sub {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(AuthError::Claims("\"sub\" is not a string".into())),
        };
        let mut grant: Vec<String> = Vec::new();
        let max_len = self.settings.max_pattern_length;
        match claims.rest.get(&self.settings.subscribe_claim) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for item in items {
                    let Value::String(p) = item else {
                        return Err(AuthError::Claims(format!(
                            "\"{}\" must be a list of pattern strings",
                            self.settings.subscribe_claim
                        )));
                    };
                    topics::validate_pattern(p, max_len).map_err(|e| {
                        AuthError::Claims(format!(
                            "\"{}\" holds {p:?}: {e}",
                            self.settings.subscribe_claim
                        ))
                    })?;
                    grant.push(topics::canonical(p));
                }
            }
            Some(_) => {
                return Err(AuthError::Claims(format!(
                    "\"{}\" must be a list of pattern strings",
                    self.settings.subscribe_claim
                )));
            }
        }
        if let Some(sub) = subject.as_deref().filter(|s| is_single_word(s)) {
            for template in &self.settings.grant_templates {
                let p = template.replace("{sub}", sub);
                if topics::validate_pattern(&p, max_len).is_ok() {
                    grant.push(topics::canonical(&p));
                }
            }
        }
        grant.sort_unstable();
        grant.dedup();
        if grant.len() > MAX_GRANTED_PATTERNS {
            return Err(AuthError::Claims(format!(
                "{} granted patterns; at most {MAX_GRANTED_PATTERNS}",
                grant.len()
            )));
        }
        // `exp` is any u64 the signer chose: past what `SystemTime` holds, the far future.
        let expires = Duration::from_secs(exp)
            .checked_add(self.settings.leeway)
            .and_then(|d| UNIX_EPOCH.checked_add(d))
            .unwrap_or(UNIX_EPOCH + Duration::MAX / 2);
        Ok(Verified {
            subject,
            exp,
            expires,
            grant: grant.into(),
        })
    }
}

/// A subject usable in a template: one word, no wildcard characters.
fn is_single_word(s: &str) -> bool {
    !s.is_empty() && !s.contains(['.', '*', '#']) && !s.chars().any(char::is_whitespace)
}

/// The `alg` of a token's header as written when it is a string (bounded, printable).
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine as _;
    let head = token.split('.').next()?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    let header = serde_json::from_slice::<Value>(&raw).ok()?;
    let alg = header.get("alg")?.as_str()?;
    Some(alg.chars().filter(|c| !c.is_control()).take(32).collect())
}

fn map_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::Claims(format!("\"{c}\" is missing")),
        ErrorKind::InvalidClaimFormat(c) => AuthError::Claims(format!("\"{c}\" is malformed")),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthError::Algorithm("?".into())
        }
        // A key of the wrong curve or size for the algorithm cannot verify the signature.
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidEddsaKey | ErrorKind::InvalidRsaKey(_) => {
            AuthError::BadSignature
        }
        ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidToken => AuthError::Malformed(e.to_string()),
        _ => AuthError::Malformed(e.to_string()),
    }
}

/// Seconds since the epoch (for tests and token expiry arithmetic).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
