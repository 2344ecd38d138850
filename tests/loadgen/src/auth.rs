//! Connection tokens for benchmarks with authentication on: one HS256 token minted from the
//! service's HMAC secret file, sent by every connection in its `auth` message.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// How long a minted token is valid: longer than any benchmark.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// An HS256 token for subject `loadgen` granting `#`, signed with the secret in `path` (read as
/// the service reads it: one trailing newline dropped).
pub fn mint_token(path: &Path) -> anyhow::Result<String> {
    let raw = std::fs::read(path)?;
    let secret = raw
        .strip_suffix(b"\r\n")
        .or_else(|| raw.strip_suffix(b"\n"))
        .unwrap_or(&raw);
    let exp = (SystemTime::now().duration_since(UNIX_EPOCH)? + TOKEN_LIFETIME).as_secs();
    let claims = serde_json::json!({ "sub": "loadgen", "exp": exp, "subscribe": ["#"] });
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret)?,
    )?)
}
