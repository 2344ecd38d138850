//! Who may use the main port: connection tokens, publish keys, allowed origins and per-address
//! limits, built once from the configuration, plus the task that re-reads the key files.

use std::{net::IpAddr, sync::Arc, time::Duration};

use http::HeaderMap;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Auth, AuthSettings, KeyFiles, publish::PublishKeys},
    client_limits::{self, IpLimitSettings, IpLimits},
    config::Config,
};

/// How often idle per-address entries are swept out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// The main port's access rules.
pub(crate) struct Access {
    /// Connection tokens; `None` when authentication is off.
    pub auth: Option<Arc<Auth>>,
    /// Publish keys; `None` when `POST /publish` is open.
    pub publish_keys: Option<PublishKeys>,
    /// Normalised allowed origins; empty allows any, `*` too.
    origins: Vec<String>,
    /// Per-address limits; `None` when both are off.
    pub ip_limits: Option<Arc<IpLimits>>,
    proxy_header: Option<String>,
}

fn normalise_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

impl Access {
    /// Builds the rules; loads the key files (an unreadable or invalid file is an error naming it).
    pub(crate) fn from_config(config: &Config) -> Result<Self, String> {
        let files = KeyFiles {
            hmac_secret: config.auth_hmac_secret_file.clone(),
            public_keys: config.auth_public_keys_file.clone(),
            jwks: config.auth_jwks_file.clone(),
        };
        let auth = if files.any() {
            let settings = AuthSettings {
                issuer: config.auth_issuer.clone().filter(|s| !s.is_empty()),
                audience: config.auth_audience.clone().filter(|s| !s.is_empty()),
                leeway: config.auth_leeway,
                subscribe_claim: config.auth_subscribe_claim.clone(),
                grant_templates: non_empty(&config.auth_grant_templates),
                anonymous: non_empty(&config.auth_anonymous_patterns),
                max_token_bytes: config.auth_max_token_bytes,
                max_pattern_length: config.max_pattern_length,
            };
            Some(Arc::new(Auth::new(settings, files)?))
        } else {
            if !non_empty(&config.auth_anonymous_patterns).is_empty()
                || !non_empty(&config.auth_grant_templates).is_empty()
            {
                return Err(
                    "--auth-anonymous-patterns and --auth-grant-templates need a key \
                            file (--auth-hmac-secret-file, --auth-public-keys-file or \
                            --auth-jwks-file); without one every client may subscribe to anything"
                        .into(),
                );
            }
            None
        };
        let publish_keys = match &config.publish_keys_file {
            Some(path) => Some(PublishKeys::load(
                path.clone(),
                config.max_event_name_length,
            )?),
            None => None,
        };
        let origins: Vec<String> = non_empty(&config.allowed_origins)
            .iter()
            .map(|o| normalise_origin(o))
            .collect();
        for o in &origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                return Err(format!(
                    "--allowed-origins: {o:?} is not an origin (scheme://host[:port]) or *"
                ));
            }
        }
        let limits = IpLimitSettings {
            max_connections: config.max_connections_per_ip,
            rate: config.connect_rate_per_ip,
            burst: config.connect_burst_per_ip,
        };
        Ok(Self {
            auth,
            publish_keys,
            origins,
            ip_limits: limits.enabled().then(|| IpLimits::new(limits)),
            proxy_header: config
                .trusted_proxy_header
                .clone()
                .filter(|h| !h.is_empty()),
        })
    }

    /// True when a browser page from `origin` may open a WebSocket. Requests without an `Origin`
    /// header are not from a browser page and pass (cross-site hijacking needs a browser).
    pub(crate) fn origin_allowed(&self, origin: Option<&[u8]>) -> bool {
        if self.origins.is_empty() {
            return true;
        }
        let Some(origin) = origin else {
            return true;
        };
        let Ok(origin) = std::str::from_utf8(origin) else {
            return false;
        };
        let origin = normalise_origin(origin);
        self.origins.iter().any(|o| o == "*" || *o == origin)
    }

    /// The client address the per-address limits count.
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        client_limits::client_ip(peer, headers, self.proxy_header.as_deref())
    }

    /// Re-reads the key files every `interval` and sweeps idle per-address entries, until `stop`.
    pub(crate) fn spawn_maintenance(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut reload = tokio::time::interval(interval.max(Duration::from_millis(100)));
            let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = reload.tick() => this.reload(),
                    _ = sweep.tick() => {
                        if let Some(l) = &this.ip_limits {
                            l.sweep();
                        }
                    }
                }
            }
        });
    }

    fn reload(&self) {
        if let Some(auth) = &self.auth {
            match auth.reload() {
                Ok(true) => tracing::info!("connection-token keys reloaded"),
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(%error, "connection-token keys not reloaded; the previous keys stay in use")
                }
            }
        }
        if let Some(keys) = &self.publish_keys {
            match keys.reload() {
                Ok(true) => tracing::info!("publish keys reloaded"),
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(%error, "publish keys not reloaded; the previous keys stay in use")
                }
            }
        }
    }
}

fn non_empty(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(origins: &[&str]) -> Access {
        let mut config = Config::for_tests();
        config.allowed_origins = origins.iter().map(|s| (*s).to_owned()).collect();
        Access::from_config(&config).expect("valid")
    }

    #[test]
    fn origins() {
        let any = access(&[]);
        assert!(any.origin_allowed(Some(b"https://evil.example")));
        let a = access(&["https://app.example.com/", "http://localhost:3000"]);
        assert!(a.origin_allowed(Some(b"https://app.example.com")));
        assert!(a.origin_allowed(Some(b"HTTPS://APP.example.com")));
        assert!(a.origin_allowed(Some(b"http://localhost:3000")));
        assert!(!a.origin_allowed(Some(b"https://evil.example")));
        assert!(!a.origin_allowed(Some(b"null")));
        assert!(a.origin_allowed(None), "non-browser clients send no Origin");
        let mut config = Config::for_tests();
        config.allowed_origins = vec!["app.example.com".into()];
        assert!(Access::from_config(&config).is_err_and(|e| e.contains("not an origin")));
    }

    #[test]
    fn anonymous_patterns_without_keys_are_refused() {
        let mut config = Config::for_tests();
        config.auth_anonymous_patterns = vec!["public.#".into()];
        assert!(Access::from_config(&config).is_err_and(|e| e.contains("need a key file")));
    }
}
