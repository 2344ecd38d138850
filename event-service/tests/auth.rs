//! Authentication and the hardened edge over real sockets: connection tokens (the `auth` message
//! and the `Authorization` header), grants and forbidden patterns, refresh and expiry, anonymous
//! access, allowed origins, per-address and per-connection limits, publish keys, and key
//! rotation without a restart.

mod support;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use event_service::{config::Config, server::RunningServer};
use eventrouter_contract::close;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use support::{Client, WAIT, metric, publish_event, start};
use tokio_tungstenite::{
    connect_async,
    tungstenite::{self, client::IntoClientRequest, http::HeaderValue},
};

const SECRET: &[u8] = b"an-hmac-secret-of-at-least-32-bytes-for-tests";
const RSA_KEY: &[u8] = include_bytes!("fixtures/keys/rsa.key");
const RSA_PUB: &[u8] = include_bytes!("fixtures/keys/rsa.pub");
const EC_KEY: &[u8] = include_bytes!("fixtures/keys/ec.key");
const EC_PUB: &[u8] = include_bytes!("fixtures/keys/ec.pub");
const ED_KEY: &[u8] = include_bytes!("fixtures/keys/ed.key");
const ED_PUB: &[u8] = include_bytes!("fixtures/keys/ed.pub");

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "eventrouter-auth-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        // Written aside and renamed in, as a Secret update is: a reader never sees half a file.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hs256(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET).expect("key"),
        claims,
    )
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).expect("sign")
}

fn claims(sub: &str, ttl: u64, grant: &[&str]) -> Value {
    json!({ "sub": sub, "exp": now() + ttl, "subscribe": grant })
}

/// A server with the HMAC secret and every public-key family configured, no leeway.
async fn auth_server(dir: &TempDir, tweak: impl FnOnce(&mut Config)) -> RunningServer {
    let mut pems = Vec::new();
    for pem in [RSA_PUB, EC_PUB, ED_PUB] {
        pems.extend_from_slice(pem);
    }
    let secret = dir.write("hmac", SECRET);
    let keys = dir.write("keys.pem", &pems);
    start(|c| {
        c.auth_hmac_secret_file = Some(secret);
        c.auth_public_keys_file = Some(keys);
        c.auth_leeway = Duration::ZERO;
        tweak(c);
    })
    .await
}

impl Client {
    async fn auth(&mut self, token: &str) -> Value {
        self.send_json(json!({"op":"auth","id":"a","token":token}))
            .await;
        self.recv_json().await
    }
}

/// Connects with extra request headers; `Err(status, body)` when the upgrade is refused.
async fn connect_with(
    server: &RunningServer,
    headers: &[(&'static str, &str)],
) -> Result<Client, (u16, String)> {
    let mut request = server.ws_url().into_client_request().expect("request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_str(value).expect("header value"));
    }
    match tokio::time::timeout(WAIT, connect_async(request))
        .await
        .expect("answer in time")
    {
        Ok((ws, _)) => Ok(Client { ws }),
        Err(tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        )),
        Err(other) => panic!("upgrade failed: {other}"),
    }
}

#[tokio::test]
async fn a_token_in_the_first_message_grants_its_patterns_only() {
    let dir = TempDir::new();
    let server = auth_server(&dir, |_| {}).await;
    let mut c = Client::connect(&server).await;
    let reply = c
        .auth(&hs256(claims("42", 300, &["public.#", "user.42.*"])))
        .await;
    assert_eq!(reply["op"], "authenticated", "{reply}");
    assert_eq!(reply["sub"], "42");
    assert_eq!(reply["id"], "a");

    // Part allowed, part not: the allowed part is subscribed, the rest named as forbidden.
    c.send_json(
        json!({"op":"subscribe","id":1,"events":["user.42.*","user.43.*","#","public.news"]}),
    )
    .await;
    let mut replies = vec![c.recv_json().await, c.recv_json().await];
    replies.sort_by_key(|r| r["op"].as_str().unwrap_or_default().to_owned());
    assert_eq!(replies[0]["op"], "error", "{replies:?}");
    assert_eq!(replies[0]["code"], "forbidden");
    assert_eq!(replies[0]["events"], json!(["user.43.*", "#"]));
    assert_eq!(replies[1]["op"], "subscribed");
    assert_eq!(replies[1]["events"], json!(["user.42.*", "public.news"]));

    publish_event(&server, "user.43.secret", json!(1)).await;
    publish_event(&server, "user.42.inbox", json!(2)).await;
    let event = c.recv_json().await;
    assert_eq!(
        event["event"], "user.42.inbox",
        "user.43 never arrives: {event}"
    );
    assert_eq!(
        metric(&server, "eventrouter_auth_checks_total", r#"result="ok""#).await,
        1.0
    );
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn every_key_family_and_the_authorization_header() {
    let dir = TempDir::new();
    let server = auth_server(&dir, |_| {}).await;
    let c = claims("7", 300, &["a.#"]);
    let tokens = [
        hs256(c.clone()),
        sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RSA_KEY).expect("rsa"),
            c.clone(),
        ),
        sign(
            Algorithm::PS384,
            &EncodingKey::from_rsa_pem(RSA_KEY).expect("rsa"),
            c.clone(),
        ),
        sign(
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(EC_KEY).expect("ec"),
            c.clone(),
        ),
        sign(
            Algorithm::EdDSA,
            &EncodingKey::from_ed_pem(ED_KEY).expect("ed"),
            c.clone(),
        ),
    ];
    for token in &tokens {
        let mut first_message = Client::connect(&server).await;
        assert_eq!(first_message.auth(token).await["op"], "authenticated");
        first_message.subscribe(1, &["a.b"]).await;

        let bearer = format!("Bearer {token}");
        let mut header = connect_with(&server, &[("authorization", &bearer)])
            .await
            .expect("a valid header token upgrades");
        header.subscribe(1, &["a.c"]).await;
    }
    // A bad header token is refused at the upgrade, before any WebSocket exists.
    let Err((status, body)) = connect_with(&server, &[("authorization", "Bearer nope")]).await
    else {
        panic!("a malformed header token was accepted");
    };
    assert_eq!(status, 401);
    assert!(body.contains("unauthorized"), "{body}");
    let expired = format!("Bearer {}", hs256(json!({"sub":"7","exp": now() - 10})));
    let Err((status, body)) = connect_with(&server, &[("authorization", &expired)]).await else {
        panic!("an expired header token was accepted");
    };
    assert_eq!((status, body.contains("expired")), (401, true), "{body}");
    assert_eq!(
        metric(
            &server,
            "eventrouter_connections_rejected_total",
            r#"reason="unauthorized""#
        )
        .await,
        2.0
    );
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn refused_tokens_close_with_4004_and_say_why() {
    let dir = TempDir::new();
    let server = auth_server(&dir, |c| {
        c.auth_issuer = Some("https://id.example".into());
        c.auth_audience = Some("events".into());
        c.auth_max_token_bytes = 1024;
    })
    .await;
    let good = |extra: Value| {
        let mut c =
            json!({"sub":"1","exp": now() + 300, "iss":"https://id.example", "aud":"events"});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    };
    let mut ok = Client::connect(&server).await;
    assert_eq!(
        ok.auth(&hs256(good(json!({})))).await["op"],
        "authenticated"
    );

    let b64 = |v: Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let other_secret =
        EncodingKey::from_secret(b"a-different-secret-of-32-bytes-or-more!!").expect("key");
    let hs_with_public_key = EncodingKey::from_secret(RSA_PUB).expect("key");
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", hs256(good(json!({"exp": now() - 5}))), "expired"),
        (
            "not yet valid",
            hs256(good(json!({"nbf": now() + 600}))),
            "not valid yet",
        ),
        (
            "bad signature",
            sign(Algorithm::HS256, &other_secret, good(json!({}))),
            "signature",
        ),
        (
            "wrong issuer",
            hs256(good(json!({"iss":"https://evil.example"}))),
            "issuer",
        ),
        (
            "wrong audience",
            hs256(good(json!({"aud":"other"}))),
            "audience",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(json!({"alg":"none","typ":"JWT"})),
                b64(good(json!({})))
            ),
            "algorithm",
        ),
        (
            "HS256 signed with the RSA public key",
            sign(Algorithm::HS256, &hs_with_public_key, good(json!({}))),
            "signature",
        ),
        ("malformed", "not.a.jwt".to_owned(), "well-formed"),
        (
            "too large",
            hs256(good(json!({"pad": "x".repeat(2000)}))),
            "limit is 1024",
        ),
    ];
    for (what, token, says) in cases {
        let mut c = Client::connect(&server).await;
        let reply = c.auth(&token).await;
        assert_eq!(reply["op"], "error", "{what}: {reply}");
        assert_eq!(reply["code"], "unauthorized", "{what}");
        let message = reply["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {message}");
        assert_eq!(c.expect_close().await, Some(close::UNAUTHORIZED), "{what}");
    }
    assert_eq!(
        metric(
            &server,
            "eventrouter_auth_checks_total",
            r#"result="bad_signature""#
        )
        .await,
        2.0
    );
    support::eventually(
        "every refused token counted as an unauthorized disconnect",
        || async {
            metric(
                &server,
                "eventrouter_disconnects_total",
                r#"reason="unauthorized""#,
            )
            .await
                == 9.0
        },
    )
    .await;
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn without_anonymous_access_a_token_is_required_in_time() {
    let dir = TempDir::new();
    let server = auth_server(&dir, |c| c.handshake_timeout = Duration::from_millis(800)).await;
    // Silence: closed with 4005 once the handshake timeout passes.
    let mut silent = Client::connect(&server).await;
    let started = std::time::Instant::now();
    assert_eq!(silent.expect_close().await, Some(close::AUTH_TIMEOUT));
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );
    // Another op first: an error naming the fix, then 4004.
    let mut eager = Client::connect(&server).await;
    eager
        .send_json(json!({"op":"subscribe","id":1,"events":["a"]}))
        .await;
    let reply = eager.recv_json().await;
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_u64()),
        (Some("unauthorized"), Some(1))
    );
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or_default()
            .contains("\"auth\"")
    );
    assert_eq!(eager.expect_close().await, Some(close::UNAUTHORIZED));
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn anonymous_clients_get_the_anonymous_patterns_only() {
    let dir = TempDir::new();
    let server = auth_server(&dir, |c| {
        c.auth_anonymous_patterns = vec!["public.#".into()];
        c.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    let mut c = Client::connect(&server).await;
    c.subscribe(1, &["public.news"]).await;
    c.send_json(json!({"op":"subscribe","id":2,"events":["private.x"]}))
        .await;
    let reply = c.recv_json().await;
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_u64()),
        (Some("forbidden"), Some(2))
    );
    // `auth` is only the first message; later it is an error, not a close.
    c.send_json(json!({"op":"auth","id":3,"token": hs256(claims("1", 60, &["#"]))}))
        .await;
    assert_eq!(c.recv_json().await["code"], "invalid_request");
    // No deadline for anonymous clients: still open after the handshake timeout.
    tokio::time::sleep(Duration::from_millis(800)).await;
    publish_event(&server, "public.news", json!("hi")).await;
    assert_eq!(c.recv_json().await["data"], "hi");
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn refresh_extends_or_narrows_and_expiry_closes_with_4003() {
    let dir = TempDir::new();
    let server = auth_server(&dir, |_| {}).await;

    // Expiry: a 2 s token and no refresh.
    let mut short = Client::connect(&server).await;
    short.auth(&hs256(claims("9", 2, &["a.#"]))).await;
    let started = std::time::Instant::now();
    assert_eq!(short.expect_close().await, Some(close::TOKEN_EXPIRED));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // Extend: a 2 s token refreshed with a 60 s one outlives the first.
    let mut kept = Client::connect(&server).await;
    kept.auth(&hs256(claims("9", 2, &["a.#"]))).await;
    kept.send_json(json!({"op":"refresh","id":5,"token": hs256(claims("9", 60, &["a.#"]))}))
        .await;
    let reply = kept.recv_json().await;
    assert_eq!(
        (reply["op"].as_str(), reply["id"].as_u64()),
        (Some("refreshed"), Some(5))
    );
    assert!(reply.get("removed").is_none(), "{reply}");
    kept.expect_silence(Duration::from_secs(3)).await;

    // Narrow: the subscription outside the new grant is removed, and the reply says which.
    let mut narrowed = Client::connect(&server).await;
    narrowed
        .auth(&hs256(claims("9", 60, &["a.#", "b.#"])))
        .await;
    narrowed.subscribe(1, &["a.x", "b.*"]).await;
    narrowed
        .send_json(json!({"op":"refresh","id":2,"token": hs256(claims("9", 60, &["a.#"]))}))
        .await;
    let reply = narrowed.recv_json().await;
    assert_eq!(reply["op"], "refreshed", "{reply}");
    assert_eq!(reply["removed"], json!(["b.*"]));
    publish_event(&server, "b.1", json!("gone")).await;
    publish_event(&server, "a.x", json!("kept")).await;
    assert_eq!(narrowed.recv_json().await["data"], "kept");

    // A failed refresh (another subject, or a bad token) keeps the connection and its token.
    narrowed
        .send_json(json!({"op":"refresh","id":3,"token": hs256(claims("10", 60, &["#"]))}))
        .await;
    assert_eq!(narrowed.recv_json().await["code"], "unauthorized");
    narrowed
        .send_json(json!({"op":"refresh","id":4,"token": "junk"}))
        .await;
    assert_eq!(narrowed.recv_json().await["code"], "unauthorized");
    narrowed
        .send_json(json!({"op":"subscribe","id":6,"events":["b.2"]}))
        .await;
    assert_eq!(narrowed.recv_json().await["code"], "forbidden");
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn origins_outside_the_allow_list_get_403() {
    let server = start(|c| c.allowed_origins = vec!["https://app.example.com".into()]).await;
    let Err((status, _)) = connect_with(&server, &[("origin", "https://evil.example")]).await
    else {
        panic!("a foreign origin upgraded");
    };
    assert_eq!(status, 403);
    connect_with(&server, &[("origin", "https://app.example.com")])
        .await
        .expect("the allowed origin upgrades");
    Client::connect(&server).await; // no Origin: not a browser page
    assert_eq!(
        metric(
            &server,
            "eventrouter_connections_rejected_total",
            r#"reason="origin""#
        )
        .await,
        1.0
    );
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn connections_and_connect_rate_per_address() {
    let server = start(|c| c.max_connections_per_ip = 2).await;
    let a = Client::connect(&server).await;
    let _b = Client::connect(&server).await;
    let Err((status, body)) = connect_with(&server, &[]).await else {
        panic!("a third connection from one address was accepted");
    };
    assert_eq!(status, 429, "{body}");
    drop(a);
    support::eventually("the slot comes back when a connection closes", || async {
        connect_with(&server, &[]).await.is_ok()
    })
    .await;
    server.stop().await.expect("stop");

    // The trusted proxy header: each forwarded client has its own budget.
    let server = start(|c| {
        c.max_connections_per_ip = 1;
        c.trusted_proxy_header = Some("X-Forwarded-For".into());
    })
    .await;
    let _one = connect_with(&server, &[("x-forwarded-for", "198.51.100.1")])
        .await
        .expect("first client");
    let _two = connect_with(&server, &[("x-forwarded-for", "10.0.0.9, 198.51.100.2")])
        .await
        .expect("another client behind the proxy");
    assert_eq!(
        connect_with(&server, &[("x-forwarded-for", "198.51.100.1")])
            .await
            .err()
            .map(|e| e.0),
        Some(429)
    );
    server.stop().await.expect("stop");

    let server = start(|c| {
        c.connect_rate_per_ip = 1.0;
        c.connect_burst_per_ip = 2;
    })
    .await;
    let _x = Client::connect(&server).await;
    let _y = Client::connect(&server).await;
    let Err((status, body)) = connect_with(&server, &[]).await else {
        panic!("a third connection within the burst window was accepted");
    };
    assert_eq!(status, 429);
    assert!(body.contains("too fast"), "{body}");
    assert_eq!(
        metric(
            &server,
            "eventrouter_connections_rejected_total",
            r#"reason="ip_rate""#
        )
        .await,
        1.0
    );
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn a_frame_flood_gets_rate_limited_then_1008() {
    let server = start(|c| {
        c.client_frame_rate = 5.0;
        c.client_frame_burst = 5;
    })
    .await;
    let mut c = Client::connect(&server).await;
    for id in 0..8 {
        c.send_json(json!({"op":"ping","id":id})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    for _ in 0..8 {
        let r = c.recv_json().await;
        match (r["op"].as_str(), r["code"].as_str()) {
            (Some("pong"), _) => pongs += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected {r}"),
        }
    }
    // The burst of 5 (plus at most one token refilled meanwhile) is answered, the rest refused.
    assert!(
        (5..=6).contains(&pongs) && pongs + limited == 8,
        "{pongs} pongs, {limited} refused"
    );
    for id in 0..20 {
        c.send_json(json!({"op":"ping","id":id})).await;
    }
    assert_eq!(c.expect_close().await, Some(close::POLICY));
    drop(c);
    support::eventually("the disconnect is counted as rate_limited", || async {
        metric(
            &server,
            "eventrouter_disconnects_total",
            r#"reason="rate_limited""#,
        )
        .await
            == 1.0
    })
    .await;
    server.stop().await.expect("stop");
}

async fn post(server: &RunningServer, key: Option<&str>, body: Value) -> (u16, Value) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![(http::header::CONTENT_TYPE, "application/json")];
    if let Some(auth) = &auth {
        headers.push((http::header::AUTHORIZATION, auth.as_str()));
    }
    let response = eventrouter_test_support::http::request(
        http::Method::POST,
        &format!("{}/publish", server.http_url()),
        &headers,
        body.to_string().into(),
    )
    .await
    .expect("answered");
    (
        response.status,
        serde_json::from_slice(&response.body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn publish_needs_a_key_scoped_to_its_events_and_keys_rotate() {
    let dir = TempDir::new();
    let keys = dir.write(
        "publish-keys.json",
        json!([
            {"name":"billing","key":"billing-key-0123456789","events":["order.#"]},
            {"name":"ops","key":"ops-key-0123456789abcdef"}
        ])
        .to_string()
        .as_bytes(),
    );
    let server = start(|c| {
        c.publish_keys_file = Some(keys);
        c.auth_reload_interval = Duration::from_millis(100);
    })
    .await;
    let mut sub = Client::connect(&server).await;
    sub.subscribe(1, &["#"]).await;
    let order = json!({"event":"order.created","data":1});
    assert_eq!(post(&server, None, order.clone()).await.0, 401);
    assert_eq!(
        post(&server, Some("wrong-key-0123456789"), order.clone())
            .await
            .0,
        401
    );
    let (status, body) = post(
        &server,
        Some("billing-key-0123456789"),
        json!([{"event":"order.created","data":2},{"event":"user.1","data":3}]),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("user.1"),
        "{body}"
    );
    assert_eq!(
        post(&server, Some("billing-key-0123456789"), order.clone())
            .await
            .0,
        202
    );
    assert_eq!(
        post(
            &server,
            Some("ops-key-0123456789abcdef"),
            json!({"event":"user.1","data":4})
        )
        .await
        .0,
        202
    );
    // The refused batch published nothing: the first event to arrive is the accepted one.
    assert_eq!(sub.recv_json().await["data"], 1);
    assert_eq!(sub.recv_json().await["data"], 4);
    assert_eq!(
        metric(
            &server,
            "eventrouter_publish_rejected_total",
            r#"reason="forbidden""#
        )
        .await,
        1.0
    );

    // Rotation: the file changes, the old key stops working, the new one works. No restart.
    dir.write(
        "publish-keys.json",
        json!([{"name":"billing","key":"billing-key-rotated-42"}])
            .to_string()
            .as_bytes(),
    );
    support::eventually("the rotated publish key is in use", || async {
        post(
            &server,
            Some("billing-key-rotated-42"),
            json!({"event":"a","data":5}),
        )
        .await
        .0 == 202
    })
    .await;
    assert_eq!(
        post(&server, Some("billing-key-0123456789"), order).await.0,
        401
    );
    server.stop().await.expect("stop");
}

#[tokio::test]
async fn connection_keys_rotate_without_a_restart() {
    let dir = TempDir::new();
    let secret_path = dir.write("hmac", SECRET);
    let server = start(|c| {
        c.auth_hmac_secret_file = Some(secret_path);
        c.auth_reload_interval = Duration::from_millis(100);
    })
    .await;
    let old = hs256(claims("1", 300, &["a"]));
    let mut before = Client::connect(&server).await;
    assert_eq!(before.auth(&old).await["op"], "authenticated");

    let new_secret = b"the-rotated-secret-also-32-bytes-long!!";
    dir.write("hmac", new_secret);
    let new = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(new_secret).expect("key"),
        claims("1", 300, &["a"]),
    );
    support::eventually(
        "tokens signed with the rotated secret are accepted",
        || async {
            let mut c = Client::connect(&server).await;
            c.auth(&new).await["op"] == "authenticated"
        },
    )
    .await;
    let mut stale = Client::connect(&server).await;
    assert_eq!(stale.auth(&old).await["code"], "unauthorized");
    // A connection authenticated before the rotation keeps its session.
    before.subscribe(1, &["a"]).await;
    server.stop().await.expect("stop");
}
