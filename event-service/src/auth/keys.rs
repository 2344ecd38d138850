//! The keys connection tokens are verified with, read from files (mounted Secrets).
//!
//! - **HMAC secret file**: the raw shared secret for HS256/HS384/HS512 (a trailing newline is
//!   dropped; at least 32 bytes, the size of an HS256 digest, as RFC 7518 §3.2 requires).
//! - **Public keys file**: one or more PEM blocks (`PUBLIC KEY` or `RSA PUBLIC KEY`). RSA keys
//!   verify RS256/384/512 and PS256/384/512, EC keys ES256/ES384 (the curve must match the
//!   algorithm, or the signature check fails), Ed25519 keys EdDSA.
//! - **JWKS file**: a JSON Web Key Set; a key's `kid` is matched against the token's, and a key's
//!   `alg`, when present, is the only algorithm it verifies. Symmetric (`oct`) keys are refused
//!   there: a shared secret belongs in the HMAC secret file, never next to public keys.
//!
//! Every key carries the algorithms it may verify, and a token is only checked against keys
//! whose list holds the token's `alg`: an HS256 token is never checked against an RSA public key
//! (the HS/RS confusion attack), and `alg: none` matches no key at all.

use std::path::{Path, PathBuf};

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm},
};

/// Shortest HMAC secret accepted, in bytes.
pub const MIN_HMAC_SECRET_BYTES: usize = 32;

/// Largest key file read, in bytes (a JWKS of many keys is still far below).
pub const MAX_KEY_FILE_BYTES: u64 = 1024 * 1024;

/// Where the keys come from (each optional; auth is on when one is set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyFiles {
    pub hmac_secret: Option<PathBuf>,
    pub public_keys: Option<PathBuf>,
    pub jwks: Option<PathBuf>,
}

impl KeyFiles {
    pub fn any(&self) -> bool {
        self.hmac_secret.is_some() || self.public_keys.is_some() || self.jwks.is_some()
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [&self.hmac_secret, &self.public_keys, &self.jwks]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// The files' current contents, to notice a change (Secret rotation) cheaply.
    pub fn snapshot(&self) -> Result<Vec<Vec<u8>>, String> {
        self.paths().map(read_bounded).collect()
    }
}

/// One verification key and the algorithms it may verify.
pub struct VerifyKey {
    pub kid: Option<String>,
    pub algorithms: Vec<Algorithm>,
    pub key: DecodingKey,
}

/// Every key loaded from the files.
#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<VerifyKey>,
}

impl KeySet {
    /// Reads and parses every configured file; any error names the file.
    pub fn load(files: &KeyFiles) -> Result<Self, String> {
        let mut keys = Vec::new();
        if let Some(path) = &files.hmac_secret {
            keys.push(hmac_key(&read_bounded(path)?).map_err(|e| at(path, e))?);
        }
        if let Some(path) = &files.public_keys {
            keys.extend(pem_keys(&read_bounded(path)?).map_err(|e| at(path, e))?);
        }
        if let Some(path) = &files.jwks {
            keys.extend(jwks_keys(&read_bounded(path)?).map_err(|e| at(path, e))?);
        }
        if keys.is_empty() {
            return Err("no verification key configured".into());
        }
        Ok(Self { keys })
    }

    /// The keys that may verify a token with this `alg` and `kid`: the algorithm must be one
    /// the key allows; a key with a `kid` is only used for tokens naming it.
    pub fn candidates<'a>(
        &'a self,
        alg: Algorithm,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        self.keys.iter().filter(move |k| {
            k.algorithms.contains(&alg)
                && match (&k.kid, kid) {
                    (Some(a), Some(b)) => a == b,
                    (Some(_), None) => false,
                    (None, _) => true,
                }
        })
    }
}

fn at(path: &Path, error: String) -> String {
    format!("{}: {error}", path.display())
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| at(path, e.to_string()))?;
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(at(
            path,
            format!("{} bytes; the limit is {MAX_KEY_FILE_BYTES}", meta.len()),
        ));
    }
    std::fs::read(path).map_err(|e| at(path, e.to_string()))
}

fn hmac_key(raw: &[u8]) -> Result<VerifyKey, String> {
    let secret = raw
        .strip_suffix(b"\r\n")
        .or_else(|| raw.strip_suffix(b"\n"))
        .unwrap_or(raw);
    if secret.len() < MIN_HMAC_SECRET_BYTES {
        return Err(format!(
            "the HMAC secret is {} bytes; at least {MIN_HMAC_SECRET_BYTES} are required",
            secret.len()
        ));
    }
    Ok(VerifyKey {
        kid: None,
        algorithms: vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
        key: DecodingKey::from_secret(secret).map_err(|e| e.to_string())?,
    })
}

const RSA_ALGS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Splits a PEM file into its blocks and parses each public key.
fn pem_keys(raw: &[u8]) -> Result<Vec<VerifyKey>, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "not a text (PEM) file".to_owned())?;
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block_and_after = &rest[start..];
        let label_end = block_and_after[11..]
            .find("-----")
            .ok_or_else(|| "a PEM header is not closed".to_owned())?;
        let label = &block_and_after[11..11 + label_end];
        let end_marker = format!("-----END {label}-----");
        let end = block_and_after
            .find(&end_marker)
            .ok_or_else(|| format!("the PEM block {label:?} has no END line"))?;
        let block = &block_and_after[..end + end_marker.len()];
        keys.push(pem_key(label, block.as_bytes(), keys.len() + 1)?);
        rest = &block_and_after[end + end_marker.len()..];
    }
    if keys.is_empty() {
        return Err("no PEM block found".into());
    }
    Ok(keys)
}

fn pem_key(label: &str, block: &[u8], n: usize) -> Result<VerifyKey, String> {
    let key = |algorithms: Vec<Algorithm>, key| VerifyKey {
        kid: None,
        algorithms,
        key,
    };
    match label {
        "RSA PUBLIC KEY" => DecodingKey::from_rsa_pem(block)
            .map(|k| key(RSA_ALGS.to_vec(), k))
            .map_err(|e| format!("key #{n}: {e}")),
        "PUBLIC KEY" => {
            if let Ok(k) = DecodingKey::from_rsa_pem(block) {
                Ok(key(RSA_ALGS.to_vec(), k))
            } else if let Ok(k) = DecodingKey::from_ec_pem(block) {
                Ok(key(vec![Algorithm::ES256, Algorithm::ES384], k))
            } else if let Ok(k) = DecodingKey::from_ed_pem(block) {
                Ok(key(vec![Algorithm::EdDSA], k))
            } else {
                Err(format!(
                    "key #{n} is not an RSA, EC (P-256/P-384) or Ed25519 public key"
                ))
            }
        }
        other if other.contains("PRIVATE") => Err(format!(
            "key #{n} is a private key ({other}); give the public key only"
        )),
        other => Err(format!(
            "key #{n} is a {other:?} block; expected PUBLIC KEY or RSA PUBLIC KEY"
        )),
    }
}

fn jwks_keys(raw: &[u8]) -> Result<Vec<VerifyKey>, String> {
    let set: JwkSet = serde_json::from_slice(raw).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let name = jwk
            .common
            .key_id
            .clone()
            .unwrap_or_else(|| format!("#{}", i + 1));
        let family: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA_ALGS.to_vec(),
            AlgorithmParameters::EllipticCurve(_) => vec![Algorithm::ES256, Algorithm::ES384],
            AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
            AlgorithmParameters::OctetKey(_) => {
                return Err(format!(
                    "key {name} is a symmetric (oct) key; put shared secrets in the HMAC secret file"
                ));
            }
            _ => return Err(format!("key {name} has an unsupported key type")),
        };
        let algorithms = match jwk.common.key_algorithm {
            None => family,
            Some(alg) => {
                let alg = jwk_alg(alg)
                    .filter(|a| family.contains(a))
                    .ok_or_else(|| format!("key {name}: its \"alg\" does not fit its key type"))?;
                vec![alg]
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {name}: {e}"))?;
        keys.push(VerifyKey {
            kid: jwk.common.key_id.clone(),
            algorithms,
            key,
        });
    }
    if keys.is_empty() {
        return Err("the key set holds no key".into());
    }
    Ok(keys)
}

fn jwk_alg(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hmac_secrets_are_refused() {
        let Err(e) = hmac_key(b"too short\n") else {
            panic!("a 9-byte secret was accepted");
        };
        assert!(e.contains("at least 32"), "{e}");
        let k = hmac_key(&[b'x'; 33]).expect("33 bytes");
        assert_eq!(k.algorithms.len(), 3);
    }

    #[test]
    fn pem_errors_are_clear() {
        let e = |raw: &str| pem_keys(raw.as_bytes()).err().unwrap_or_default();
        assert_eq!(e("nothing here"), "no PEM block found");
        assert!(
            e("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .contains("private key")
        );
        assert!(e("-----BEGIN PUBLIC KEY-----\nAAAA\n").contains("no END line"));
        assert!(
            e("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----")
                .contains("CERTIFICATE")
        );
    }

    #[test]
    fn jwks_refuses_symmetric_keys() {
        let raw = br#"{"keys":[{"kty":"oct","kid":"k1","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}"#;
        let e = jwks_keys(raw).err().unwrap_or_default();
        assert!(e.contains("symmetric"), "{e}");
        assert!(jwks_keys(br#"{"keys":[]}"#).is_err());
        assert!(jwks_keys(b"[]").is_err());
    }
}
