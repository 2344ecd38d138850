//! Who may connect and how much each client may do: `spec.auth` and `spec.limits`.
//!
//! Every field is optional and maps to one event-service environment variable; an unset field
//! sets nothing, so the service's own default applies (the descriptions name it). Key material is
//! never put in the spec or in the environment: each `*Ref` names a Secret key that the pods mount
//! as a file, and the service re-reads the file when the kubelet updates it, so rotating a key
//! needs no restart.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::DURATION_PATTERN;

/// A non-negative decimal number of events per second with at most three decimals (`0.5`, `20`).
pub const RATE_PATTERN: &str = r"^[0-9]{1,7}([.][0-9]{1,3})?$";

/// An HTTP header name (RFC 9110 token characters).
pub const HEADER_NAME_PATTERN: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";

/// A key of a Secret in the EventRouter's namespace that the pods mount as a read-only file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretFileRef {
    /// Name of the Secret (in the EventRouter's namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret; its value becomes the file the event service reads.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

impl SecretFileRef {
    pub fn new(name: &str, key: &str) -> Self {
        Self {
            name: name.into(),
            key: key.into(),
        }
    }
}

/// Authentication of WebSocket clients (signed connection tokens, JWT) and of publishers.
///
/// Token authentication is on when at least one of `hmacSecretRef`, `publicKeysRef` and
/// `jwksRef` is set: a client then presents a token whose `subscribe` claim (see
/// `subscribeClaim`) lists the patterns it may subscribe to, and clients without a token may only
/// subscribe to `anonymousPatterns`. Without any of the three, every client may subscribe to
/// anything. The referenced Secrets are mounted as files and re-read when they change: rotate a
/// key by updating its Secret, no pod restarts. Only the main port is authenticated; the admin
/// port (metrics, probes) never is and must stay unreachable from outside the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.hmacSecretRef) || has(self.publicKeysRef) || has(self.jwksRef) || !(has(self.issuer) || has(self.audience) || has(self.leeway) || has(self.subscribeClaim) || has(self.maxTokenBytes) || (has(self.grantTemplates) && size(self.grantTemplates) > 0) || (has(self.anonymousPatterns) && size(self.anonymousPatterns) > 0))",
        "message": "issuer, audience, leeway, subscribeClaim, maxTokenBytes, grantTemplates and anonymousPatterns only apply to token authentication: set hmacSecretRef, publicKeysRef or jwksRef (without one every client may subscribe to anything)"
    },
    {
        "rule": "!has(self.reloadInterval) || has(self.hmacSecretRef) || has(self.publicKeysRef) || has(self.jwksRef) || has(self.publishKeysRef)",
        "message": "reloadInterval needs a key file: set hmacSecretRef, publicKeysRef, jwksRef or publishKeysRef"
    }
]))]
pub struct AuthSpec {
    /// Secret key holding the shared secret for HS256/HS384/HS512 tokens (the raw bytes of the
    /// secret). Mounted at `/etc/eventrouter/auth/hmac/secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret_ref: Option<SecretFileRef>,

    /// Secret key holding one or more PEM public keys: RSA (RS256/384/512, PS256/384/512),
    /// EC P-256 (ES256), EC P-384 (ES384) or Ed25519 (EdDSA). Mounted at
    /// `/etc/eventrouter/auth/public-keys/keys.pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_keys_ref: Option<SecretFileRef>,

    /// Secret key holding a JSON Web Key Set (JWKS); a token's key is chosen by its `kid`.
    /// Mounted at `/etc/eventrouter/auth/jwks/jwks.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_ref: Option<SecretFileRef>,

    /// Secret key holding the publish keys, a JSON list such as
    /// `[{"name":"billing","key":"<secret>","events":["order.#"]}]` (`events` optional: any
    /// event). When set, `POST /publish` needs `Authorization: Bearer <key>` and may publish only
    /// the key's events. Independent of token authentication. Mounted at
    /// `/etc/eventrouter/publish-keys/keys.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_keys_ref: Option<SecretFileRef>,

    /// Required `iss` claim of tokens. Unset: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub issuer: Option<String>,

    /// Required `aud` claim of tokens (a token listing several audiences must include it).
    /// Unset: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub audience: Option<String>,

    /// Clock skew allowed when checking `exp` and `nbf` (e.g. `30s`). Service default: `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub leeway: Option<String>,

    /// Name of the token claim that lists the patterns the client may subscribe to.
    /// Service default: `subscribe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^,\s]+$"))]
    pub subscribe_claim: Option<String>,

    /// Patterns every authenticated client may subscribe to, on top of its token's claim, in
    /// RabbitMQ topic syntax (words separated by `.`; `*` is one word and `#` any number, only as
    /// whole words). `{sub}` is replaced by the token's subject, e.g. `user.{sub}.#`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 255)))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": concat!("self.all(p, p.matches('", pattern_regex!(), "'))"),
            "message": "each template is words separated by '.', where '*' and '#' are whole words (e.g. 'user.{sub}.#'); no ',' or whitespace"
        }
    ]))]
    pub grant_templates: Vec<String>,

    /// Patterns clients without a token may subscribe to (e.g. `public.#`), in the same syntax
    /// as `grantTemplates` but without `{sub}`. Empty (the default): a token is required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 255)))]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": concat!("self.all(p, p.matches('", pattern_regex!(), "'))"),
            "message": "each pattern is words separated by '.', where '*' and '#' are whole words (e.g. 'public.#'); no ',' or whitespace"
        },
        {
            "rule": "self.all(p, !p.contains('{sub}'))",
            "message": "anonymous clients have no subject: '{sub}' is only allowed in grantTemplates"
        }
    ]))]
    pub anonymous_patterns: Vec<String>,

    /// Browser origins allowed to open a WebSocket, as `scheme://host[:port]` (e.g.
    /// `https://app.example.com`; no path, no trailing slash). Checked against the `Origin`
    /// header, so it guards against other web sites using a visitor's browser; it is no
    /// authentication (non-browser clients send any origin they like). Empty (the default): any
    /// origin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 512)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "!self.exists(o, o == '*')",
            "message": "'*' is not an origin: leave allowedOrigins empty to allow any origin"
        },
        {
            "rule": "self.all(o, o == '*' || o.matches('^[a-z][a-z0-9+.-]*://([a-z0-9-]+([.][a-z0-9-]+)*|\\\\[[0-9a-f:.]+\\\\])(:[0-9]{1,5})?$'))",
            "message": "each origin is scheme://host[:port] in lowercase, without path or trailing slash (e.g. https://app.example.com)"
        }
    ]))]
    pub allowed_origins: Vec<String>,

    /// Largest token accepted, in bytes. Service default: `8192`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 1_048_576))]
    pub max_token_bytes: Option<u32>,

    /// How often the pods check the key files for changes (e.g. `30s`). Service default: `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub reload_interval: Option<String>,
}

/// The Secret keys `spec.auth` can reference, each mounted as one file of the pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyFile {
    HmacSecret,
    PublicKeys,
    Jwks,
    PublishKeys,
}

impl KeyFile {
    pub const ALL: [Self; 4] = [
        Self::HmacSecret,
        Self::PublicKeys,
        Self::Jwks,
        Self::PublishKeys,
    ];

    /// The field's path in the spec, for messages.
    pub fn field_path(self) -> &'static str {
        match self {
            Self::HmacSecret => "spec.auth.hmacSecretRef",
            Self::PublicKeys => "spec.auth.publicKeysRef",
            Self::Jwks => "spec.auth.jwksRef",
            Self::PublishKeys => "spec.auth.publishKeysRef",
        }
    }
}

impl AuthSpec {
    /// Token authentication is on: at least one verification key is configured.
    pub fn tokens_enabled(&self) -> bool {
        self.hmac_secret_ref.is_some() || self.public_keys_ref.is_some() || self.jwks_ref.is_some()
    }

    /// The reference of `file`, when set.
    pub fn key_file_ref(&self, file: KeyFile) -> Option<&SecretFileRef> {
        match file {
            KeyFile::HmacSecret => self.hmac_secret_ref.as_ref(),
            KeyFile::PublicKeys => self.public_keys_ref.as_ref(),
            KeyFile::Jwks => self.jwks_ref.as_ref(),
            KeyFile::PublishKeys => self.publish_keys_ref.as_ref(),
        }
    }

    /// Every key file the spec references, in `KeyFile::ALL` order.
    pub fn key_files(&self) -> impl Iterator<Item = (KeyFile, &SecretFileRef)> {
        KeyFile::ALL
            .into_iter()
            .filter_map(|file| self.key_file_ref(file).map(|r| (file, r)))
    }
}

impl super::EventRouterSpec {
    /// Every key file `spec.auth` references (none without `spec.auth`).
    pub fn key_files(&self) -> impl Iterator<Item = (KeyFile, &SecretFileRef)> {
        self.auth.iter().flat_map(AuthSpec::key_files)
    }
}

/// Per-client limits, enforced by every pod on its own (a client spread over several pods gets
/// each pod's allowance). Rates are decimal strings (quote them in YAML, e.g. `"0.5"`), so the
/// value you write is exactly the value stored and passed on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.connectBurstPerIP) || (has(self.connectRatePerIP) && !self.connectRatePerIP.matches('^0*([.]0*)?$'))",
        "message": "connectBurstPerIP only applies with a connectRatePerIP above 0"
    },
    {
        "rule": "!has(self.frameBurst) || !has(self.frameRate) || !self.frameRate.matches('^0*([.]0*)?$')",
        "message": "frameBurst has no effect with frameRate 0 (no limit)"
    }
]))]
pub struct LimitsSpec {
    /// Most open connections from one client IP address per pod; further upgrades are refused.
    /// `0` (the service default): no limit.
    #[serde(
        default,
        rename = "maxConnectionsPerIP",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_connections_per_ip: Option<u32>,

    /// New connections per second from one client IP address per pod, as a decimal string
    /// (e.g. `"5"` or `"0.5"`); short bursts up to `connectBurstPerIP` are allowed. `"0"` (the
    /// service default): no limit.
    #[serde(
        default,
        rename = "connectRatePerIP",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = RATE_PATTERN))]
    pub connect_rate_per_ip: Option<String>,

    /// New connections one client IP address may open at once above `connectRatePerIP`.
    /// Service default: `20`.
    #[serde(
        default,
        rename = "connectBurstPerIP",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub connect_burst_per_ip: Option<u32>,

    /// Request header holding the client address, set by a trusted proxy or load balancer in
    /// front of the pods (e.g. `X-Forwarded-For`). Unset: the TCP peer address. Set it only when
    /// every connection passes through such a proxy and the proxy sets the header itself:
    /// otherwise clients choose their own address and escape the per-IP limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = HEADER_NAME_PATTERN))]
    pub trusted_proxy_header: Option<String>,

    /// Frames per second one connection may send (subscribe, unsubscribe, pings...), as a
    /// decimal string (e.g. `"50"`); short bursts up to `frameBurst` are allowed. `"0"`: no
    /// limit. Service default: `"50"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = RATE_PATTERN))]
    pub frame_rate: Option<String>,

    /// Frames one connection may send at once above `frameRate`. Service default: `100`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub frame_burst: Option<u32>,
}
