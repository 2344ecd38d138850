//! What a container's process is started with, computed from the Pod alone (pure): its
//! environment (literal values, `$(VAR)` references, field, Secret and ConfigMap references,
//! `envFrom`), its arguments, and the two rewrites that let a Pod written for a container run
//! as a process on a shared host:
//!
//! - **Listen addresses** (only when pods share the host's network). A value that is a wildcard
//!   socket address (`0.0.0.0:8080`, `[::]:8080`, `:8080`) becomes the pod's own loopback
//!   address (`127.0.0.5:8080`), so every pod binds its ports on its own IP, as it would in its
//!   own network namespace.
//! - **Mount paths.** A value that is a volume's mount path, or a path below it, is pointed at
//!   the folder the kubelet wrote that volume to (`/etc/app/secret/url` becomes
//!   `<root>/<namespace>/<pod>/volumes/secret/url`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, EnvVar};

use crate::SpecError;

/// The facts about a Pod that `fieldRef` can select.
#[derive(Debug, Clone, Default)]
pub struct PodFacts {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub node_name: String,
    pub service_account: String,
    pub pod_ip: String,
    pub host_ip: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The Secrets and ConfigMaps of the Pod's namespace that the Pod refers to, fetched beforehand
/// (by name; a name absent here does not exist).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

impl Sources {
    fn secret_key(&self, name: &str, key: &str) -> Option<Option<String>> {
        self.secrets.get(name).map(|data| {
            data.get(key)
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
        })
    }

    fn config_map_key(&self, name: &str, key: &str) -> Option<Option<String>> {
        self.config_maps
            .get(name)
            .map(|data| data.get(key).cloned())
    }
}

/// The container's environment in Kubernetes' order: `envFrom` first, then `env`, a later
/// definition replacing an earlier one of the same name.
pub fn resolve_env(
    container: &Container,
    facts: &PodFacts,
    sources: &Sources,
) -> Result<Vec<(String, String)>, SpecError> {
    let mut env: Vec<(String, String)> = Vec::new();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(reference) = &from.config_map_ref {
            match sources.config_maps.get(&reference.name) {
                Some(data) => {
                    for (key, value) in data {
                        set(&mut env, format!("{prefix}{key}"), value.clone());
                    }
                }
                None if reference.optional == Some(true) => {}
                None => return Err(SpecError::MissingConfigMap(reference.name.clone())),
            }
        }
        if let Some(reference) = &from.secret_ref {
            match sources.secrets.get(&reference.name) {
                Some(data) => {
                    for (key, value) in data {
                        let value = String::from_utf8_lossy(value).into_owned();
                        set(&mut env, format!("{prefix}{key}"), value);
                    }
                }
                None if reference.optional == Some(true) => {}
                None => return Err(SpecError::MissingSecret(reference.name.clone())),
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = env_var_value(var, &env, facts, sources)? {
            set(&mut env, var.name.clone(), value);
        }
    }
    Ok(env)
}

fn set(env: &mut Vec<(String, String)>, name: String, value: String) {
    match env.iter_mut().find(|(existing, _)| *existing == name) {
        Some(slot) => slot.1 = value,
        None => env.push((name, value)),
    }
}

/// The value of one `env` entry; `None` when an optional reference is missing (the variable is
/// then not set at all, as the kubelet does).
fn env_var_value(
    var: &EnvVar,
    earlier: &[(String, String)],
    facts: &PodFacts,
    sources: &Sources,
) -> Result<Option<String>, SpecError> {
    let Some(from) = &var.value_from else {
        return Ok(Some(expand(
            var.value.as_deref().unwrap_or_default(),
            earlier,
        )));
    };
    if let Some(field) = &from.field_ref {
        return field_value(&field.field_path, facts).map(Some);
    }
    if let Some(key) = &from.secret_key_ref {
        return match sources.secret_key(&key.name, &key.key) {
            Some(Some(value)) => Ok(Some(value)),
            _ if key.optional == Some(true) => Ok(None),
            None => Err(SpecError::MissingSecret(key.name.clone())),
            Some(None) => Err(SpecError::MissingKey {
                name: key.name.clone(),
                key: key.key.clone(),
            }),
        };
    }
    if let Some(key) = &from.config_map_key_ref {
        return match sources.config_map_key(&key.name, &key.key) {
            Some(Some(value)) => Ok(Some(value)),
            _ if key.optional == Some(true) => Ok(None),
            None => Err(SpecError::MissingConfigMap(key.name.clone())),
            Some(None) => Err(SpecError::MissingKey {
                name: key.name.clone(),
                key: key.key.clone(),
            }),
        };
    }
    Err(SpecError::Unsupported(format!(
        "env var {}: only value, fieldRef, secretKeyRef and configMapKeyRef are supported",
        var.name
    )))
}

/// The downward API's `fieldRef` paths.
fn field_value(path: &str, facts: &PodFacts) -> Result<String, SpecError> {
    let selected = |map: &BTreeMap<String, String>, rest: &str| {
        rest.strip_prefix("['")
            .and_then(|r| r.strip_suffix("']"))
            .map(|key| map.get(key).cloned().unwrap_or_default())
    };
    let value = match path {
        "metadata.name" => Some(facts.name.clone()),
        "metadata.namespace" => Some(facts.namespace.clone()),
        "metadata.uid" => Some(facts.uid.clone()),
        "spec.nodeName" => Some(facts.node_name.clone()),
        "spec.serviceAccountName" => Some(facts.service_account.clone()),
        "status.podIP" | "status.podIPs" => Some(facts.pod_ip.clone()),
        "status.hostIP" | "status.hostIPs" => Some(facts.host_ip.clone()),
        _ => path
            .strip_prefix("metadata.labels")
            .and_then(|rest| selected(&facts.labels, rest))
            .or_else(|| {
                path.strip_prefix("metadata.annotations")
                    .and_then(|rest| selected(&facts.annotations, rest))
            }),
    };
    value.ok_or_else(|| SpecError::Unsupported(format!("fieldRef {path}")))
}

/// Kubernetes' `$(VAR)` expansion: a reference to a defined variable is replaced, `$$` is a
/// literal `$`, anything else is left as written.
pub fn expand(text: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(reference) = tail
            .strip_prefix("$(")
            .and_then(|r| r.find(')').map(|end| &r[..end]))
            && let Some((_, value)) = vars.iter().find(|(name, _)| name == reference)
        {
            out.push_str(value);
            rest = &tail[reference.len() + 3..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The process's arguments: `command` (whose first word names the image's program, which the
/// image map replaces) without its first word, then `args`, each `$(VAR)`-expanded.
pub fn arguments(container: &Container, env: &[(String, String)]) -> Vec<String> {
    container
        .command
        .iter()
        .flatten()
        .skip(1)
        .chain(container.args.iter().flatten())
        .map(|arg| expand(arg, env))
        .collect()
}

/// The rewrites that move a Pod's listen addresses onto its IP and its mount paths onto the
/// kubelet's folders.
#[derive(Debug, Clone)]
pub struct Rewrites {
    /// Where wildcard listen addresses move to; `None` leaves them alone (a pod in a network
    /// namespace of its own).
    listen_ip: Option<Ipv4Addr>,
    /// (mount path, host folder), longest mount path first so nested mounts win.
    mounts: Vec<(String, PathBuf)>,
}

impl Rewrites {
    pub fn new(
        listen_ip: Option<Ipv4Addr>,
        mounts: impl IntoIterator<Item = (String, PathBuf)>,
    ) -> Self {
        let mut mounts: Vec<(String, PathBuf)> = mounts
            .into_iter()
            .map(|(path, host)| (path.trim_end_matches('/').to_owned(), host))
            .filter(|(path, _)| !path.is_empty())
            .collect();
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        Self { listen_ip, mounts }
    }

    pub fn apply(&self, value: &str) -> String {
        if let Some(ip) = self.listen_ip
            && let Some(port) = wildcard_port(value)
        {
            return format!("{ip}:{port}");
        }
        for (mount, host) in &self.mounts {
            if value == mount {
                return host.display().to_string();
            }
            if let Some(below) = value.strip_prefix(mount.as_str())
                && let Some(relative) = below.strip_prefix('/')
            {
                return host.join(relative).display().to_string();
            }
        }
        value.to_owned()
    }

    pub fn host_path(&self, mount_path: &str) -> Option<&Path> {
        let mount_path = mount_path.trim_end_matches('/');
        self.mounts
            .iter()
            .find(|(path, _)| path == mount_path)
            .map(|(_, host)| host.as_path())
    }
}

/// The port of a wildcard socket address (`0.0.0.0:P`, `[::]:P`, `:P`).
fn wildcard_port(value: &str) -> Option<u16> {
    let (host, port) = value.rsplit_once(':')?;
    if !matches!(host, "0.0.0.0" | "[::]" | "") {
        return None;
    }
    port.parse().ok()
}

/// Which local program plays which image, from `IMAGE=PATH` entries.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    entries: Vec<(String, PathBuf)>,
}

impl ImageMap {
    pub fn new(entries: impl IntoIterator<Item = (String, PathBuf)>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }

    /// Parses one `IMAGE=PATH` entry.
    pub fn parse_entry(text: &str) -> Result<(String, PathBuf), SpecError> {
        match text.split_once('=') {
            Some((image, path)) if !image.is_empty() && !path.is_empty() => {
                Ok((image.to_owned(), PathBuf::from(path)))
            }
            _ => Err(SpecError::ImageMapEntry(text.to_owned())),
        }
    }

    /// The program for `image`: an entry naming the image exactly (tag included) wins over an
    /// entry naming the repository alone, which stands for every tag and digest.
    pub fn program(&self, image: &str) -> Option<&Path> {
        let exact = self.entries.iter().find(|(name, _)| name == image);
        let repository = image_repository(image);
        exact
            .or_else(|| self.entries.iter().find(|(name, _)| name == repository))
            .map(|(_, path)| path.as_path())
    }
}

/// `registry:5000/team/app:1.2@sha256:...` without its tag and digest.
fn image_repository(image: &str) -> &str {
    let image = image.split_once('@').map_or(image, |(name, _)| name);
    let last_slash = image.rfind('/').map_or(0, |at| at + 1);
    match image[last_slash..].rfind(':') {
        Some(colon) => &image[..last_slash + colon],
        None => image,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVarSource, ObjectFieldSelector,
        SecretKeySelector,
    };

    use super::*;

    fn literal(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            ..EnvVar::default()
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value_from: Some(source),
            ..EnvVar::default()
        }
    }

    fn field(path: &str) -> EnvVarSource {
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }
    }

    fn facts() -> PodFacts {
        PodFacts {
            name: "web-7d9f-abcde".into(),
            namespace: "shop".into(),
            uid: "u-1".into(),
            node_name: "node-a".into(),
            pod_ip: "127.0.0.7".into(),
            host_ip: "127.0.0.1".into(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            ..PodFacts::default()
        }
    }

    fn sources() -> Sources {
        Sources {
            secrets: [(
                "amqp".to_owned(),
                [("url".to_owned(), b"amqp://u:p@127.0.0.1:5672/%2f".to_vec())].into(),
            )]
            .into(),
            config_maps: [(
                "settings".to_owned(),
                [
                    ("LEVEL".to_owned(), "debug".to_owned()),
                    ("MODE".to_owned(), "fast".to_owned()),
                ]
                .into(),
            )]
            .into(),
        }
    }

    #[test]
    fn literals_fields_secrets_and_config_maps_resolve_in_order() {
        let container = Container {
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "settings".into(),
                    optional: None,
                }),
                prefix: Some("CFG_".into()),
                ..EnvFromSource::default()
            }]),
            env: Some(vec![
                literal("LISTEN", "0.0.0.0:8080"),
                from("POD_NAME", field("metadata.name")),
                from("POD_IP", field("status.podIP")),
                from("APP", field("metadata.labels['app']")),
                from(
                    "AMQP_URL",
                    EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "amqp".into(),
                            key: "url".into(),
                            optional: None,
                        }),
                        ..EnvVarSource::default()
                    },
                ),
                from(
                    "NOT_THERE",
                    EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "absent".into(),
                            key: "k".into(),
                            optional: Some(true),
                        }),
                        ..EnvVarSource::default()
                    },
                ),
                literal("GREETING", "$(POD_NAME) in $(NAMESPACE) costs $$5"),
                literal("CFG_MODE", "slow"),
            ]),
            ..Container::default()
        };
        let env = resolve_env(&container, &facts(), &sources()).expect("resolves");
        let names: Vec<_> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "CFG_LEVEL",
                "CFG_MODE",
                "LISTEN",
                "POD_NAME",
                "POD_IP",
                "APP",
                "AMQP_URL",
                "GREETING"
            ]
        );
        let map: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(map["CFG_LEVEL"], "debug");
        assert_eq!(map["CFG_MODE"], "slow", "env overrides envFrom");
        assert_eq!(map["POD_NAME"], "web-7d9f-abcde");
        assert_eq!(map["POD_IP"], "127.0.0.7");
        assert_eq!(map["APP"], "web");
        assert_eq!(map["AMQP_URL"], "amqp://u:p@127.0.0.1:5672/%2f");
        assert_eq!(map["GREETING"], "web-7d9f-abcde in $(NAMESPACE) costs $5");
    }

    #[test]
    fn missing_required_references_are_errors() {
        let secret = |name: &str, key: &str| Container {
            env: Some(vec![from(
                "X",
                EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: name.into(),
                        key: key.into(),
                        optional: None,
                    }),
                    ..EnvVarSource::default()
                },
            )]),
            ..Container::default()
        };
        assert!(matches!(
            resolve_env(&secret("nope", "url"), &facts(), &sources()),
            Err(SpecError::MissingSecret(name)) if name == "nope"
        ));
        assert!(matches!(
            resolve_env(&secret("amqp", "nope"), &facts(), &sources()),
            Err(SpecError::MissingKey { .. })
        ));
        let unsupported = Container {
            env: Some(vec![from("X", field("status.phase"))]),
            ..Container::default()
        };
        assert!(matches!(
            resolve_env(&unsupported, &facts(), &sources()),
            Err(SpecError::Unsupported(_))
        ));
    }

    #[test]
    fn arguments_drop_the_program_and_expand_variables() {
        let container = Container {
            command: Some(vec!["/app/server".into(), "--mode=$(MODE)".into()]),
            args: Some(vec!["--name".into(), "$(UNSET)".into()]),
            ..Container::default()
        };
        let env = vec![("MODE".to_owned(), "fast".to_owned())];
        assert_eq!(
            arguments(&container, &env),
            ["--mode=fast", "--name", "$(UNSET)"]
        );
    }

    #[test]
    fn wildcard_listen_addresses_move_to_the_pod_ip_and_mount_paths_to_host_folders() {
        let rewrites = Rewrites::new(
            Some(Ipv4Addr::new(127, 0, 0, 9)),
            [
                (
                    "/etc/app".to_owned(),
                    PathBuf::from("/run/pods/p/volumes/config"),
                ),
                (
                    "/etc/app/secret/".to_owned(),
                    PathBuf::from("/run/pods/p/volumes/secret"),
                ),
            ],
        );
        assert_eq!(rewrites.apply("0.0.0.0:8080"), "127.0.0.9:8080");
        assert_eq!(rewrites.apply("[::]:9090"), "127.0.0.9:9090");
        assert_eq!(rewrites.apply(":7000"), "127.0.0.9:7000");
        assert_eq!(rewrites.apply("127.0.0.1:5672"), "127.0.0.1:5672");
        assert_eq!(rewrites.apply("0.0.0.0:http"), "0.0.0.0:http");
        assert_eq!(
            rewrites.apply("/etc/app/secret/url"),
            "/run/pods/p/volumes/secret/url",
            "the nested mount wins"
        );
        assert_eq!(rewrites.apply("/etc/app"), "/run/pods/p/volumes/config");
        assert_eq!(
            rewrites.apply("/etc/app/a.yaml"),
            "/run/pods/p/volumes/config/a.yaml"
        );
        assert_eq!(rewrites.apply("/etc/application"), "/etc/application");
        assert_eq!(
            rewrites.host_path("/etc/app/secret"),
            Some(Path::new("/run/pods/p/volumes/secret"))
        );
    }

    #[test]
    fn in_a_namespace_of_its_own_a_pod_keeps_its_wildcard_addresses() {
        let mounts = [("/etc/app".to_owned(), PathBuf::from("/run/pods/p/app"))];
        let rewrites = Rewrites::new(None, mounts);
        assert_eq!(rewrites.apply("0.0.0.0:8080"), "0.0.0.0:8080");
        assert_eq!(rewrites.apply("[::]:9090"), "[::]:9090");
        assert_eq!(rewrites.apply("/etc/app/url"), "/run/pods/p/app/url");
    }

    #[test]
    fn images_map_by_exact_name_then_by_repository() {
        let map = ImageMap::new([
            ImageMap::parse_entry("eventrouter/event-service=/bin/es").expect("entry"),
            ImageMap::parse_entry("eventrouter/event-service:old=/bin/es-old").expect("entry"),
            ImageMap::parse_entry("registry:5000/team/app=/bin/app").expect("entry"),
        ]);
        assert_eq!(
            map.program("eventrouter/event-service:0.1.0"),
            Some(Path::new("/bin/es"))
        );
        assert_eq!(
            map.program("eventrouter/event-service:old"),
            Some(Path::new("/bin/es-old"))
        );
        assert_eq!(
            map.program("eventrouter/event-service@sha256:abc"),
            Some(Path::new("/bin/es"))
        );
        assert_eq!(
            map.program("registry:5000/team/app:2"),
            Some(Path::new("/bin/app"))
        );
        assert_eq!(map.program("registry:5000/team/other:2"), None);
        assert!(ImageMap::parse_entry("no-equals").is_err());
        assert!(ImageMap::parse_entry("=/bin/x").is_err());
    }
}
