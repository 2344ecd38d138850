//! Publish keys: who may `POST /publish`, and which event names each key may publish.
//!
//! The keys file (a mounted Secret) is JSON:
//!
//! ```json
//! [
//!   {"name": "billing", "key": "…at least 16 characters…", "events": ["order.#", "invoice.*"]},
//!   {"name": "admin",   "key": "…"}
//! ]
//! ```
//!
//! `events` is optional (any event name). A request presents `Authorization: Bearer <key>`. The
//! presented key is compared with every configured key in constant time (both hashed with
//! SHA-256 first, so neither the comparison nor the lengths leak anything), and the request is
//! refused as a whole (nothing published) when one of its events is outside the key's patterns.

use std::{
    path::PathBuf,
    sync::{Mutex, RwLock},
};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::topics;

/// Shortest publish key accepted.
pub const MIN_KEY_BYTES: usize = 16;

/// Most keys one file may hold.
pub const MAX_KEYS: usize = 1024;

/// Largest keys file read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    key: String,
    #[serde(default)]
    events: Option<Vec<String>>,
}

/// One loaded key.
#[derive(Debug)]
pub struct PublishKey {
    pub name: String,
    digest: [u8; 32],
    /// Canonical patterns; `None` allows every event name.
    pub events: Option<Vec<String>>,
}

impl PublishKey {
    /// True when this key may publish an event called `name`.
    pub fn may_publish(&self, name: &str) -> bool {
        match &self.events {
            None => true,
            Some(patterns) => patterns.iter().any(|p| topics::matches(p, name)),
        }
    }
}

/// Why a publish request was refused; `label()` is the metric's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishAuthError {
    #[error("this endpoint needs \"Authorization: Bearer <publish key>\"")]
    Missing,
    #[error("the publish key is not valid")]
    BadKey,
    #[error("the key {key:?} may not publish {event:?}")]
    Forbidden { key: String, event: String },
}

impl PublishAuthError {
    pub fn label(&self) -> &'static str {
        match self {
            PublishAuthError::Missing => "missing_key",
            PublishAuthError::BadKey => "bad_key",
            PublishAuthError::Forbidden { .. } => "forbidden",
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Parses a keys file.
pub fn parse(raw: &[u8], max_pattern_length: usize) -> Result<Vec<PublishKey>, String> {
    let entries: Vec<KeyEntry> =
        serde_json::from_slice(raw).map_err(|e| format!("not a JSON list of keys: {e}"))?;
    if entries.is_empty() {
        return Err("the file holds no key".into());
    }
    if entries.len() > MAX_KEYS {
        return Err(format!("{} keys; at most {MAX_KEYS}", entries.len()));
    }
    let mut keys: Vec<PublishKey> = Vec::with_capacity(entries.len());
    for entry in entries {
        let name = entry.name;
        if name.is_empty() || keys.iter().any(|k| k.name == name) {
            return Err(format!("key names must be unique and non-empty: {name:?}"));
        }
        if entry.key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "key {name:?} is {} bytes; at least {MIN_KEY_BYTES} are required",
                entry.key.len()
            ));
        }
        let events = match entry.events {
            None => None,
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for p in list {
                    topics::validate_pattern(&p, max_pattern_length)
                        .map_err(|e| format!("key {name:?}: pattern {p:?}: {e}"))?;
                    out.push(topics::canonical(&p));
                }
                Some(out)
            }
        };
        keys.push(PublishKey {
            digest: digest(entry.key.as_bytes()),
            name,
            events,
        });
    }
    Ok(keys)
}

/// The keys of one file, re-read when its contents change.
#[derive(Debug)]
pub struct PublishKeys {
    path: PathBuf,
    max_pattern_length: usize,
    keys: RwLock<std::sync::Arc<Vec<PublishKey>>>,
    loaded: Mutex<Vec<u8>>,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{}: {} bytes; the limit is {MAX_FILE_BYTES}",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

impl PublishKeys {
    pub fn load(path: PathBuf, max_pattern_length: usize) -> Result<Self, String> {
        let raw = read(&path)?;
        let keys =
            parse(&raw, max_pattern_length).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            path,
            max_pattern_length,
            keys: RwLock::new(std::sync::Arc::new(keys)),
            loaded: Mutex::new(raw),
        })
    }

    /// Re-reads the file; `Ok(true)` when new keys are in use.
    pub fn reload(&self) -> Result<bool, String> {
        let raw = read(&self.path)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if *loaded == raw {
            return Ok(false);
        }
        let keys = parse(&raw, self.max_pattern_length)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(keys);
        *loaded = raw;
        Ok(true)
    }

    /// Checks an `Authorization` header value against the keys and every event name against the
    /// key's patterns. Returns the key's name.
    pub fn check<'a>(
        &self,
        authorization: Option<&[u8]>,
        mut names: impl Iterator<Item = &'a str>,
    ) -> Result<String, PublishAuthError> {
        let presented = authorization
            .and_then(bearer)
            .ok_or(PublishAuthError::Missing)?;
        let presented = digest(presented);
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        // Compare with every key (no early exit), so timing does not tell which one matched.
        let mut found: Option<&PublishKey> = None;
        for key in keys.iter() {
            if bool::from(key.digest.ct_eq(&presented)) && found.is_none() {
                found = Some(key);
            }
        }
        let key = found.ok_or(PublishAuthError::BadKey)?;
        if let Some(event) = names.find(|n| !key.may_publish(n)) {
            return Err(PublishAuthError::Forbidden {
                key: key.name.clone(),
                event: event.to_owned(),
            });
        }
        Ok(key.name.clone())
    }
}

/// The credentials of an `Authorization: Bearer <token>` header value (scheme case-insensitive).
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(json: &str) -> PublishKeys {
        PublishKeys {
            path: PathBuf::new(),
            max_pattern_length: 255,
            keys: RwLock::new(std::sync::Arc::new(
                parse(json.as_bytes(), 255).expect("keys"),
            )),
            loaded: Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn keys_and_scopes() {
        let k = keys(
            r#"[{"name":"billing","key":"billing-key-0123456789","events":["order.#"]},
                {"name":"admin","key":"admin-key-0123456789"}]"#,
        );
        let check = |auth: Option<&str>, names: &[&str]| {
            k.check(auth.map(str::as_bytes), names.iter().copied())
        };
        assert_eq!(check(None, &["a"]), Err(PublishAuthError::Missing));
        assert_eq!(
            check(Some("Basic abc"), &["a"]),
            Err(PublishAuthError::Missing)
        );
        assert_eq!(
            check(Some("Bearer nope"), &["a"]),
            Err(PublishAuthError::BadKey)
        );
        assert_eq!(
            check(Some("Bearer billing-key-0123456789"), &["order.created"]),
            Ok("billing".into())
        );
        assert_eq!(
            check(
                Some("bearer billing-key-0123456789"),
                &["order.created", "user.1"]
            ),
            Err(PublishAuthError::Forbidden {
                key: "billing".into(),
                event: "user.1".into()
            })
        );
        assert_eq!(
            check(Some("Bearer admin-key-0123456789"), &["user.1"]),
            Ok("admin".into())
        );
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let e = |json: &str| parse(json.as_bytes(), 255).err().unwrap_or_default();
        assert!(e("[]").contains("no key"));
        assert!(e(r#"[{"name":"a","key":"short"}]"#).contains("at least 16"));
        assert!(
            e(r#"[{"name":"a","key":"0123456789abcdef"},{"name":"a","key":"0123456789abcdefg"}]"#)
                .contains("unique")
        );
        assert!(
            e(r#"[{"name":"a","key":"0123456789abcdef","events":["a*"]}]"#).contains("pattern")
        );
        assert!(
            e(r#"[{"name":"a","key":"0123456789abcdef","extra":1}]"#).contains("unknown field")
        );
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"  BEARER   abc  "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Token abc"), None);
    }
}
