//! Specs the CRD rejects (schema and CEL rules) are refused by the real API server with a clear
//! message; specs it cannot reject (a missing Secret, nonsense durations) get `Ready=False`,
//! reason `InvalidSpec`, a Warning event, and no child.

mod operator_support;

use eventrouter_e2e::rabbitmq::amqp_url;
use eventrouter_e2e::wait::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use operator::crd::{AuthSpec, EventRouterSpec, SecretFileRef};
use operator_support::*;
use serde_json::json;

fn a_router(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "eventrouter.io/v1alpha1", "kind": "EventRouter", "metadata": {"name": name}, "spec": spec})
}

async fn rejection(client: &kube::Client, ns: &str, spec: serde_json::Value) -> String {
    match create_router(client, ns, &a_router("bad", spec.clone())).await {
        Ok(_) => panic!("the API server accepted {spec}"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            status.message
        }
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_crd_rejects_impossible_specs_with_clear_messages() {
    let (client, ns) = setup("op-crd-rules").await;
    let ns = ns.name();
    let secret = json!({"secretRef": {"name": "amqp"}});

    let message = rejection(&client, ns, json!({"rabbitmq": secret, "autoscaling": {"enabled": true, "minReplicas": 5, "maxReplicas": 2}})).await;
    assert!(
        message.contains("minReplicas must not exceed maxReplicas"),
        "{message}"
    );

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": {"secretRef": {"name": "amqp"}, "exchange": "amq.mine"}}),
    )
    .await;
    assert!(message.contains("reserved by RabbitMQ"), "{message}");

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": {"secretRef": {"name": "amqp"}, "exchange": "chat", "upstreams": [{"exchange": "chat", "routingKeys": ["#"]}]}}),
    )
    .await;
    assert!(
        message.contains("must differ from the router's own exchange"),
        "{message}"
    );

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": secret, "autoscaling": {"enabled": true, "provider": "keda"}}),
    )
    .await;
    assert!(
        message.contains("the keda provider needs prometheusAddress"),
        "{message}"
    );

    let message = rejection(&client, ns, json!({"rabbitmq": secret, "replicas": -1})).await;
    assert!(message.contains("spec.replicas"), "{message}");

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": secret, "websocket": {"pingInterval": "twenty seconds"}}),
    )
    .await;
    assert!(message.contains("spec.websocket.pingInterval"), "{message}");

    let message = rejection(
        &client,
        ns,
        json!({"rabbitmq": secret, "service": {"type": "ExternalName"}}),
    )
    .await;
    assert!(message.contains("spec.service.type"), "{message}");

    let message = rejection(&client, ns, json!({"replicas": 2})).await;
    assert!(message.contains("spec.rabbitmq"), "{message}");
}

/// `spec.auth` and `spec.limits` as the API server judges them: well-formed objects are stored
/// exactly as written (rates stay strings), malformed ones are refused with the CEL rule's or the
/// schema's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_crd_checks_auth_and_limits() {
    let (client, ns) = setup("op-crd-auth").await;
    let ns = ns.name();
    let secret = json!({"secretRef": {"name": "amqp"}});
    let hmac = json!({"name": "tokens", "key": "secret"});

    let accepted = [
        json!({
            "hmacSecretRef": hmac,
            "publicKeysRef": {"name": "tokens", "key": "public.pem"},
            "jwksRef": {"name": "idp", "key": "jwks.json"},
            "publishKeysRef": {"name": "publishers", "key": "keys.json"},
            "issuer": "https://idp.example.com/",
            "audience": "events",
            "leeway": "30s",
            "subscribeClaim": "topics",
            "grantTemplates": ["user.{sub}.#", "tenant-{sub}.*", "#"],
            "anonymousPatterns": ["public.#", "news.*.headline"],
            "allowedOrigins": ["https://app.example.com", "http://localhost:3000", "http://[::1]:8080"],
            "maxTokenBytes": 4096,
            "reloadInterval": "1m"
        }),
        // Publish keys and origins need no token authentication.
        json!({"publishKeysRef": {"name": "publishers", "key": "keys.json"}, "reloadInterval": "5s"}),
        json!({"allowedOrigins": ["https://app.example.com"]}),
        json!({}),
    ];
    let limits = [
        json!({
            "maxConnectionsPerIP": 100,
            "connectRatePerIP": "0.5",
            "connectBurstPerIP": 10,
            "trustedProxyHeader": "X-Forwarded-For",
            "frameRate": "20",
            "frameBurst": 40
        }),
        json!({"maxConnectionsPerIP": 0, "frameRate": "0"}),
        json!({"frameBurst": 200}),
        json!({}),
    ];
    for (index, (auth, limits)) in accepted.iter().zip(&limits).enumerate() {
        let name = format!("good-{index}");
        let spec = json!({"rabbitmq": secret, "auth": auth, "limits": limits});
        let stored = create_router(&client, ns, &a_router(&name, spec.clone()))
            .await
            .unwrap_or_else(|error| panic!("the API server refused {spec}: {error}"));
        assert_eq!(stored.data["spec"]["auth"], *auth, "{name}");
        assert_eq!(stored.data["spec"]["limits"], *limits, "{name}");
        // And the operator's types read it back.
        let router = routers(&client, ns).get(&name).await.expect("typed get");
        assert!(router.spec.auth.is_some() && router.spec.limits.is_some());
    }

    let refused = [
        (
            json!({"auth": {"issuer": "https://idp.example.com/"}}),
            "only apply to token authentication",
        ),
        (
            json!({"auth": {"anonymousPatterns": ["public.#"]}}),
            "only apply to token authentication",
        ),
        (
            json!({"auth": {"reloadInterval": "10s"}}),
            "reloadInterval needs a key file",
        ),
        (
            json!({"auth": {"hmacSecretRef": {"name": "tokens"}}}),
            "spec.auth.hmacSecretRef.key",
        ),
        (
            json!({"auth": {"jwksRef": {"name": "", "key": "jwks.json"}}}),
            "spec.auth.jwksRef.name",
        ),
        (
            json!({"auth": {"hmacSecretRef": hmac, "grantTemplates": ["user*.#"]}}),
            "'*' and '#' are whole words",
        ),
        (
            json!({"auth": {"hmacSecretRef": hmac, "grantTemplates": ["a..b"]}}),
            "'*' and '#' are whole words",
        ),
        (
            json!({"auth": {"hmacSecretRef": hmac, "anonymousPatterns": ["a,b"]}}),
            "no ',' or whitespace",
        ),
        (
            json!({"auth": {"hmacSecretRef": hmac, "anonymousPatterns": ["user.{sub}"]}}),
            "anonymous clients have no subject",
        ),
        (
            json!({"auth": {"allowedOrigins": ["*"]}}),
            "leave allowedOrigins empty to allow any origin",
        ),
        (
            json!({"auth": {"allowedOrigins": ["https://app.example.com/"]}}),
            "without path or trailing slash",
        ),
        (
            json!({"auth": {"hmacSecretRef": hmac, "leeway": "ten seconds"}}),
            "spec.auth.leeway",
        ),
        (
            json!({"auth": {"hmacSecretRef": hmac, "maxTokenBytes": 10}}),
            "spec.auth.maxTokenBytes",
        ),
        (
            json!({"limits": {"connectRatePerIP": "-1"}}),
            "spec.limits.connectRatePerIP",
        ),
        (
            json!({"limits": {"frameRate": 50}}),
            "spec.limits.frameRate",
        ),
        (
            json!({"limits": {"connectBurstPerIP": 5}}),
            "connectBurstPerIP only applies with a connectRatePerIP above 0",
        ),
        (
            json!({"limits": {"connectRatePerIP": "0", "connectBurstPerIP": 5}}),
            "connectBurstPerIP only applies with a connectRatePerIP above 0",
        ),
        (
            json!({"limits": {"frameRate": "0.0", "frameBurst": 5}}),
            "frameBurst has no effect with frameRate 0",
        ),
        (
            json!({"limits": {"frameBurst": 0}}),
            "spec.limits.frameBurst",
        ),
        (
            json!({"limits": {"trustedProxyHeader": "X Forwarded For"}}),
            "spec.limits.trustedProxyHeader",
        ),
    ];
    for (mut spec, expected) in refused {
        spec["rabbitmq"] = secret.clone();
        let message = rejection(&client, ns, spec.clone()).await;
        assert!(message.contains(expected), "{spec}: {message}");
    }
}

/// `spec.history` as the API server judges it: valid objects are stored with the CRD's defaults
/// filled in, malformed ones (RabbitMQ's age syntax, pattern syntax, list and number bounds, a
/// segment larger than the stream) are refused with the schema's or the CEL rule's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_crd_checks_history() {
    let (client, ns) = setup("op-crd-history").await;
    let ns = ns.name();
    let secret = json!({"secretRef": {"name": "amqp"}});

    let defaults = json!({
        "enabled": true,
        "maxAge": "24h",
        "maxBytes": 1_073_741_824_i64,
        "patterns": ["#"],
        "recoveryMaxEvents": 10_000,
        "recoveryMaxConcurrent": 64
    });
    let full = json!({
        "enabled": true,
        "maxAge": "7D",
        "maxBytes": 8_589_934_592_i64,
        "maxSegmentBytes": 104_857_600,
        "patterns": ["order.*", "user.#", "audit"],
        "recoveryMaxEvents": 1_000_000,
        "recoveryMaxConcurrent": 4096
    });
    let accepted = [
        (json!({"enabled": true}), defaults.clone()),
        (
            json!({}),
            json!({
                "enabled": false,
                "maxAge": "24h",
                "maxBytes": 1_073_741_824_i64,
                "patterns": ["#"],
                "recoveryMaxEvents": 10_000,
                "recoveryMaxConcurrent": 64
            }),
        ),
        (full.clone(), full),
        (
            json!({"enabled": true, "maxAge": "1Y", "maxBytes": 1_048_576, "maxSegmentBytes": 1_048_576}),
            json!({
                "enabled": true,
                "maxAge": "1Y",
                "maxBytes": 1_048_576,
                "maxSegmentBytes": 1_048_576,
                "patterns": ["#"],
                "recoveryMaxEvents": 10_000,
                "recoveryMaxConcurrent": 64
            }),
        ),
    ];
    for (index, (history, stored_as)) in accepted.iter().enumerate() {
        let name = format!("good-{index}");
        let spec = json!({"rabbitmq": secret, "history": history});
        let stored = create_router(&client, ns, &a_router(&name, spec.clone()))
            .await
            .unwrap_or_else(|error| panic!("the API server refused {spec}: {error}"));
        assert_eq!(stored.data["spec"]["history"], *stored_as, "{name}");
        // And the operator's types read it back.
        let router = routers(&client, ns).get(&name).await.expect("typed get");
        assert_eq!(
            router.spec.history.map(|h| h.enabled),
            stored_as["enabled"].as_bool()
        );
    }

    let too_many: Vec<String> = (0..65).map(|i| format!("p{i}.#")).collect();
    let refused = [
        (json!({"maxAge": "24 hours"}), "spec.history.maxAge"),
        (json!({"maxAge": "0h"}), "spec.history.maxAge"),
        (json!({"maxAge": "1h30m"}), "spec.history.maxAge"),
        (json!({"maxAge": "24d"}), "spec.history.maxAge"),
        (json!({"maxAge": "30"}), "spec.history.maxAge"),
        (json!({"maxBytes": 1024}), "spec.history.maxBytes"),
        (
            json!({"maxSegmentBytes": 4_000_000_000_i64}),
            "spec.history.maxSegmentBytes",
        ),
        (
            json!({"maxBytes": 4_194_304, "maxSegmentBytes": 8_388_608}),
            "maxSegmentBytes must not exceed maxBytes",
        ),
        (json!({"patterns": []}), "spec.history.patterns"),
        (json!({"patterns": too_many}), "spec.history.patterns"),
        (
            json!({"patterns": ["order.#", "order.#"]}),
            "Duplicate value",
        ),
        (
            json!({"patterns": ["order*"]}),
            "'*' and '#' are whole words",
        ),
        (json!({"patterns": ["a..b"]}), "'*' and '#' are whole words"),
        (json!({"patterns": ["a,b"]}), "no ',' or whitespace"),
        (
            json!({"recoveryMaxEvents": 0}),
            "spec.history.recoveryMaxEvents",
        ),
        (
            json!({"recoveryMaxConcurrent": 5000}),
            "spec.history.recoveryMaxConcurrent",
        ),
    ];
    for (mut history, expected) in refused {
        history["enabled"] = json!(true);
        let spec = json!({"rabbitmq": secret, "history": history});
        let message = rejection(&client, ns, spec.clone()).await;
        assert!(message.contains(expected), "{spec}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_invalid_spec_sets_ready_false_emits_a_warning_and_creates_nothing() {
    let (client, ns) = setup("op-invalid").await;
    let ns = ns.name().to_string();
    let operator = RunningOperator::start(&client, &ns, "op-a", "eventrouter-operator").await;

    // The Secret does not exist: the API server cannot know, the operator can.
    let before = operator.reconciles();
    apply_router(
        &client,
        &ns,
        "chat",
        &EventRouterSpec::with_secret("nowhere"),
    )
    .await;
    let ready = wait_condition(&client, &ns, "chat", "Ready", "False", Some("InvalidSpec")).await;
    assert!(
        ready.message.contains(r#"Secret "nowhere""#),
        "{}",
        ready.message
    );
    wait_event(&client, &ns, "chat", "InvalidSpec", "Warning").await;
    // The reconcile that judged the spec has finished, and made no child.
    operator.wait_reconciles(before, 1).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(
        deployments.get_opt("chat").await.expect("get").is_none(),
        "no child for an invalid spec"
    );

    // A ping interval not shorter than the idle timeout: valid to the schema, not to the operator.
    put_amqp_secret(&client, &ns, "amqp", &amqp_url()).await;
    let mut spec = EventRouterSpec::with_secret("amqp");
    spec.websocket.ping_interval = "90s".into();
    apply_router(&client, &ns, "chat", &spec).await;
    let ready = wait_condition(&client, &ns, "chat", "Ready", "False", Some("InvalidSpec")).await;
    assert!(ready.message.contains("pingInterval"), "{}", ready.message);
    assert!(
        deployments.get_opt("chat").await.expect("get").is_none(),
        "still no child"
    );

    // Fixed: the children appear.
    spec.websocket.ping_interval = "20s".into();
    apply_router(&client, &ns, "chat", &spec).await;
    wait_present(&deployments, "chat").await;
    wait_condition(&client, &ns, "chat", "BrokerReady", "True", None).await;

    // A key Secret that spec.auth names must exist: without it no pod could start.
    spec.auth = Some(AuthSpec {
        hmac_secret_ref: Some(SecretFileRef::new("tokens", "secret")),
        anonymous_patterns: vec!["public.#".into()],
        ..AuthSpec::default()
    });
    apply_router(&client, &ns, "chat", &spec).await;
    let ready = wait_condition(&client, &ns, "chat", "Ready", "False", Some("InvalidSpec")).await;
    assert!(
        ready
            .message
            .contains(r#"Secret "tokens" (spec.auth.hmacSecretRef) does not exist"#),
        "{}",
        ready.message
    );

    // Once it exists (picked up by the retry), the pods mount it and get its path.
    put_secret(&client, &ns, "tokens", "secret", "first-secret").await;
    let mounted = |deployment: &Deployment| {
        let pod = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref());
        let volume = pod
            .and_then(|p| p.volumes.as_ref())
            .and_then(|v| v.iter().find(|v| v.name == "auth-hmac"))
            .and_then(|v| v.secret.clone());
        let env = pod
            .and_then(|p| p.containers[0].env.clone())
            .unwrap_or_default();
        let path = env
            .iter()
            .find(|e| e.name == "EVENTROUTER_AUTH_HMAC_SECRET_FILE")
            .and_then(|e| e.value.clone());
        (volume.and_then(|v| v.secret_name), path)
    };
    let deployment = wait_for(
        "the Deployment to mount the key Secret",
        CONVERGE,
        || async {
            let deployment = deployments.get("chat").await.map_err(|e| e.to_string())?;
            match mounted(&deployment) {
                (Some(_), Some(_)) => Ok(deployment),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(
        mounted(&deployment),
        (
            Some("tokens".to_string()),
            Some("/etc/eventrouter/auth/hmac/secret".to_string())
        )
    );

    // Rotating the key changes the Secret only: the pod template stays, no pod restarts.
    let generation = deployment.metadata.generation;
    let before = operator.reconciles();
    put_secret(&client, &ns, "tokens", "secret", "rotated-secret").await;
    operator.wait_reconciles(before, 1).await;
    let after = deployments.get("chat").await.expect("get");
    assert_eq!(
        after.metadata.generation, generation,
        "the template is unchanged"
    );
}
