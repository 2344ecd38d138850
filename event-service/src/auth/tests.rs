//! Token verification: every algorithm family and every way a token can be refused.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::json;

use super::*;

const HMAC_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";
const RSA_KEY: &[u8] = include_bytes!("../../tests/fixtures/keys/rsa.key");
const RSA_PUB: &[u8] = include_bytes!("../../tests/fixtures/keys/rsa.pub");
const RSA2_KEY: &[u8] = include_bytes!("../../tests/fixtures/keys/rsa2.key");
const EC_KEY: &[u8] = include_bytes!("../../tests/fixtures/keys/ec.key");
const EC_PUB: &[u8] = include_bytes!("../../tests/fixtures/keys/ec.pub");
const ED_KEY: &[u8] = include_bytes!("../../tests/fixtures/keys/ed.key");
const ED_PUB: &[u8] = include_bytes!("../../tests/fixtures/keys/ed.pub");

/// A directory of its own under the system temp dir, removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "eventrouter-auth-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        Self(dir)
    }

    pub(crate) fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write a temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings() -> AuthSettings {
    AuthSettings {
        issuer: None,
        audience: None,
        leeway: Duration::from_secs(5),
        subscribe_claim: "subscribe".into(),
        grant_templates: vec![],
        anonymous: vec![],
        max_token_bytes: 8192,
        max_pattern_length: 255,
    }
}

struct Setup {
    _dir: TempDir,
    auth: Auth,
}

fn setup(settings: AuthSettings) -> Setup {
    let dir = TempDir::new();
    let mut pems = Vec::new();
    for pem in [RSA_PUB, EC_PUB, ED_PUB] {
        pems.extend_from_slice(pem);
    }
    let files = KeyFiles {
        hmac_secret: Some(dir.write("hmac", HMAC_SECRET)),
        public_keys: Some(dir.write("keys.pem", &pems)),
        jwks: Some(dir.write("jwks.json", &jwks(&[("k2", RSA2_KEY)]))),
    };
    let auth = Auth::new(settings, files).expect("keys load");
    Setup { _dir: dir, auth }
}

fn jwks(keys: &[(&str, &[u8])]) -> Vec<u8> {
    let keys: Vec<Jwk> = keys
        .iter()
        .map(|(kid, pem)| {
            let enc = EncodingKey::from_rsa_pem(pem).expect("rsa key");
            let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::RS256).expect("jwk");
            jwk.common.key_id = Some((*kid).to_owned());
            jwk
        })
        .collect();
    serde_json::to_vec(&json!({ "keys": keys })).expect("json")
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign")
}

fn sign_kid(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let mut c =
        json!({ "sub": "42", "exp": unix_now() + 300, "subscribe": ["public.#", "user.42.*"] });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn hmac() -> EncodingKey {
    EncodingKey::from_secret(HMAC_SECRET).expect("hmac key")
}

#[test]
fn every_algorithm_family_verifies() {
    let s = setup(settings());
    let c = claims(json!({}));
    let rsa = EncodingKey::from_rsa_pem(RSA_KEY).expect("rsa");
    let ec = EncodingKey::from_ec_pem(EC_KEY).expect("ec");
    let ed = EncodingKey::from_ed_pem(ED_KEY).expect("ed");
    let rsa2 = EncodingKey::from_rsa_pem(RSA2_KEY).expect("rsa2");
    let tokens = [
        sign(Algorithm::HS256, &hmac(), &c),
        sign(Algorithm::HS384, &hmac(), &c),
        sign(Algorithm::HS512, &hmac(), &c),
        sign(Algorithm::RS256, &rsa, &c),
        sign(Algorithm::RS512, &rsa, &c),
        sign(Algorithm::PS256, &rsa, &c),
        sign(Algorithm::ES256, &ec, &c),
        sign(Algorithm::EdDSA, &ed, &c),
        sign_kid(Algorithm::RS256, "k2", &rsa2, &c),
    ];
    for token in tokens {
        let v = s.auth.verify(&token).expect("valid token");
        assert_eq!(v.subject.as_deref(), Some("42"));
        assert!(v.allows("user.42.x"));
        assert!(v.allows("public.a.b"));
        assert!(!v.allows("user.43.x"));
        assert!(!v.allows("#"));
    }
}

#[test]
fn refusals_have_reasons() {
    let mut st = settings();
    st.issuer = Some("https://issuer.example".into());
    st.audience = Some("events".into());
    let s = setup(st);
    let good = json!({ "iss": "https://issuer.example", "aud": "events" });
    let ok = sign(Algorithm::HS256, &hmac(), &claims(good.clone()));
    assert!(s.auth.verify(&ok).is_ok());

    let with = |extra: serde_json::Value| {
        let mut c = claims(good.clone());
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                if v.is_null() {
                    c.remove(k);
                } else {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
        s.auth.verify(&sign(Algorithm::HS256, &hmac(), &c))
    };
    let now = unix_now();
    assert_eq!(with(json!({ "exp": now - 60 })), Err(AuthError::Expired));
    // Inside the leeway (5 s) an expired token still passes.
    assert!(with(json!({ "exp": now - 2 })).is_ok());
    assert_eq!(
        with(json!({ "nbf": now + 60 })),
        Err(AuthError::NotYetValid)
    );
    assert_eq!(
        with(json!({ "iss": "someone-else" })),
        Err(AuthError::Issuer)
    );
    assert_eq!(with(json!({ "aud": "other" })), Err(AuthError::Audience));
    assert!(matches!(with(json!({ "exp": null })), Err(AuthError::Claims(m)) if m.contains("exp")));
    assert!(matches!(with(json!({ "iss": null })), Err(AuthError::Claims(m)) if m.contains("iss")));
    assert!(matches!(
        with(json!({ "subscribe": ["ok.#", "bad*"] })),
        Err(AuthError::Claims(m)) if m.contains("bad*")
    ));
    assert!(matches!(
        with(json!({ "subscribe": "public.#" })),
        Err(AuthError::Claims(m)) if m.contains("list")
    ));

    // A signature made with another secret.
    let other = EncodingKey::from_secret(b"another-secret-another-secret-another").expect("key");
    assert_eq!(
        s.auth
            .verify(&sign(Algorithm::HS256, &other, &claims(good.clone()))),
        Err(AuthError::BadSignature)
    );
    // A tampered payload.
    let mut parts: Vec<&str> = ok.split('.').collect();
    let forged = {
        use base64::Engine as _;
        let mut c = claims(good.clone());
        c["subscribe"] = json!(["#"]);
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&c).expect("json"))
    };
    parts[1] = &forged;
    assert_eq!(
        s.auth.verify(&parts.join(".")),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn alg_none_and_algorithm_confusion_are_refused() {
    use base64::Engine as _;
    let s = setup(settings());
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(v).expect("json"))
    };
    let body = b64(&claims(json!({})));
    for alg in ["none", "None", "NONE", ""] {
        let token = format!("{}.{body}.", b64(&json!({ "alg": alg, "typ": "JWT" })));
        let e = s.auth.verify(&token).expect_err("alg none");
        assert!(matches!(e, AuthError::Algorithm(_)), "{alg}: {e:?}");
    }
    // HS256 signed with the RSA *public* key as the HMAC secret: the classic confusion. HMAC
    // tokens are only checked against the HMAC secret, so it fails as a bad signature.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(RSA_PUB).expect("key"),
        &claims(json!({})),
    );
    assert_eq!(s.auth.verify(&confused), Err(AuthError::BadSignature));

    // With public keys only, an HS256 token has no key at all.
    let dir = TempDir::new();
    let only_rsa = Auth::new(
        settings(),
        KeyFiles {
            public_keys: Some(dir.write("rsa.pem", RSA_PUB)),
            ..KeyFiles::default()
        },
    )
    .expect("rsa only");
    assert!(matches!(
        only_rsa.verify(&confused),
        Err(AuthError::Algorithm(_))
    ));
    // An RS256 token whose kid names no JWKS key, and one signed by an unknown RSA key.
    let rsa2 = EncodingKey::from_rsa_pem(RSA2_KEY).expect("rsa2");
    assert_eq!(
        only_rsa.verify(&sign(Algorithm::RS256, &rsa2, &claims(json!({})))),
        Err(AuthError::BadSignature)
    );
    // A key without an id is tried whatever id the token names.
    assert_eq!(
        only_rsa.verify(&sign_kid(
            Algorithm::RS256,
            "nope",
            &rsa2,
            &claims(json!({}))
        )),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn malformed_and_oversized_tokens() {
    let mut st = settings();
    st.max_token_bytes = 512;
    let s = setup(st);
    for junk in [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.!!!.sig",
    ] {
        assert!(
            matches!(
                s.auth.verify(junk),
                Err(AuthError::Malformed(_) | AuthError::BadSignature)
            ),
            "{junk:?}"
        );
    }
    let big = sign(
        Algorithm::HS256,
        &hmac(),
        &claims(json!({ "pad": "x".repeat(1000) })),
    );
    assert_eq!(
        s.auth.verify(&big),
        Err(AuthError::TooLarge {
            len: big.len(),
            max: 512
        })
    );
}

#[test]
fn templates_grant_per_subject_patterns() {
    let mut st = settings();
    st.grant_templates = vec!["user.{sub}.#".into(), "inbox.{sub}".into()];
    let s = setup(st);
    let v = s
        .auth
        .verify(&sign(
            Algorithm::HS256,
            &hmac(),
            &claims(json!({ "subscribe": [] })),
        ))
        .expect("valid");
    assert!(v.allows("user.42.a.b"));
    assert!(v.allows("inbox.42"));
    assert!(!v.allows("user.43.a"));
    // A subject that is not one plain word gets no template grant (no `a.#` injection).
    let v = s
        .auth
        .verify(&sign(
            Algorithm::HS256,
            &hmac(),
            &claims(json!({ "sub": "*.x", "subscribe": [] })),
        ))
        .expect("valid");
    assert!(v.grant.is_empty(), "{:?}", v.grant);
}

#[test]
fn keys_rotate_when_the_files_change() {
    let dir = TempDir::new();
    let path = dir.write("jwks.json", &jwks(&[("k1", RSA_KEY)]));
    let auth = Auth::new(
        settings(),
        KeyFiles {
            jwks: Some(path.clone()),
            ..KeyFiles::default()
        },
    )
    .expect("load");
    let rsa = EncodingKey::from_rsa_pem(RSA_KEY).expect("rsa");
    let rsa2 = EncodingKey::from_rsa_pem(RSA2_KEY).expect("rsa2");
    let old = sign_kid(Algorithm::RS256, "k1", &rsa, &claims(json!({})));
    let new = sign_kid(Algorithm::RS256, "k2", &rsa2, &claims(json!({})));
    assert!(auth.verify(&old).is_ok());
    assert_eq!(auth.verify(&new), Err(AuthError::UnknownKey("k2".into())));
    assert_eq!(auth.reload(), Ok(false), "unchanged files are not reparsed");
    std::fs::write(&path, jwks(&[("k2", RSA2_KEY)])).expect("rotate");
    assert_eq!(auth.reload(), Ok(true));
    assert!(auth.verify(&new).is_ok());
    assert!(auth.verify(&old).is_err());
    // A broken file keeps the last good keys.
    std::fs::write(&path, b"{not json").expect("break");
    assert!(auth.reload().is_err());
    assert!(auth.verify(&new).is_ok());
}

#[test]
fn bad_settings_are_refused_at_start() {
    let dir = TempDir::new();
    let files = KeyFiles {
        hmac_secret: Some(dir.write("hmac", HMAC_SECRET)),
        ..KeyFiles::default()
    };
    let mut st = settings();
    st.anonymous = vec!["public*".into()];
    assert!(
        Auth::new(st, files.clone())
            .expect_err("bad")
            .contains("public*")
    );
    let missing = KeyFiles {
        hmac_secret: Some(dir.0.join("nope")),
        ..KeyFiles::default()
    };
    assert!(
        Auth::new(settings(), missing)
            .expect_err("missing")
            .contains("nope")
    );
}

#[test]
fn an_exp_beyond_system_time_is_the_far_future_not_a_panic() {
    // Found by review while fuzzing: `exp` + leeway past `SystemTime`'s range overflowed it.
    let s = setup(settings());
    let key = EncodingKey::from_secret(HMAC_SECRET).expect("hmac key");
    for exp in [10_000_000_000_000_000_000u64, u64::MAX] {
        let token = sign(Algorithm::HS256, &key, &json!({ "exp": exp }));
        let v = s.auth.verify(&token).expect("a valid token");
        assert_eq!(v.exp, exp);
        assert!(v.expires > UNIX_EPOCH + Duration::from_secs(1 << 62));
    }
}
