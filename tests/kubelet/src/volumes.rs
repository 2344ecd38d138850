//! A Pod's volumes as folders: `<pod dir>/volumes/<volume name>/`, holding a Secret's or a
//! ConfigMap's keys as files (all of them, or the `items` asked for) or nothing (emptyDir).
//! The container's mounts then map each mount path to its folder (or a `subPath` inside it),
//! and [`crate::env::Rewrites`] points the process's paths there.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, PodSpec};

use crate::env::Sources;
use crate::{Error, SpecError};

const DEFAULT_MODE: i32 = 0o644;

/// Names of the Secrets and ConfigMaps a Pod refers to (env, envFrom, volumes), to fetch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    pub secrets: BTreeSet<String>,
    pub config_maps: BTreeSet<String>,
}

pub fn references(spec: &PodSpec) -> References {
    let mut refs = References::default();
    for container in &spec.containers {
        for from in container.env_from.iter().flatten() {
            if let Some(r) = &from.secret_ref {
                refs.secrets.insert(r.name.clone());
            }
            if let Some(r) = &from.config_map_ref {
                refs.config_maps.insert(r.name.clone());
            }
        }
        for var in container.env.iter().flatten() {
            let Some(from) = &var.value_from else {
                continue;
            };
            if let Some(r) = &from.secret_key_ref {
                refs.secrets.insert(r.name.clone());
            }
            if let Some(r) = &from.config_map_key_ref {
                refs.config_maps.insert(r.name.clone());
            }
        }
    }
    for volume in spec.volumes.iter().flatten() {
        if let Some(secret) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            refs.secrets.insert(secret);
        }
        if let Some(config_map) = &volume.config_map {
            refs.config_maps.insert(config_map.name.clone());
        }
    }
    refs
}

/// Writes the Pod's volumes under `pod_dir` and returns the container's mounts as
/// (mount path, host folder or file).
pub fn write(
    spec: &PodSpec,
    container: &Container,
    sources: &Sources,
    pod_dir: &Path,
) -> Result<Vec<(String, PathBuf)>, Error> {
    let mut folders = BTreeMap::new();
    for volume in spec.volumes.iter().flatten() {
        let dir = pod_dir.join("volumes").join(&volume.name);
        create_dir(&dir)?;
        if let Some(secret) = &volume.secret {
            let name = secret.secret_name.clone().unwrap_or_default();
            match sources.secrets.get(&name) {
                Some(data) => write_keys(
                    &dir,
                    data.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                    secret.items.as_deref(),
                    secret.default_mode,
                    &name,
                )?,
                None if secret.optional == Some(true) => {}
                None => return Err(SpecError::MissingSecret(name).into()),
            }
        } else if let Some(config_map) = &volume.config_map {
            match sources.config_maps.get(&config_map.name) {
                Some(data) => write_keys(
                    &dir,
                    data.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
                    config_map.items.as_deref(),
                    config_map.default_mode,
                    &config_map.name,
                )?,
                None if config_map.optional == Some(true) => {}
                None => return Err(SpecError::MissingConfigMap(config_map.name.clone()).into()),
            }
        } else if volume.empty_dir.is_none() {
            return Err(SpecError::Unsupported(format!(
                "volume {}: only secret, configMap and emptyDir volumes are supported",
                volume.name
            ))
            .into());
        }
        folders.insert(volume.name.clone(), dir);
    }
    container
        .volume_mounts
        .iter()
        .flatten()
        .map(|mount| {
            let dir = folders
                .get(&mount.name)
                .ok_or_else(|| SpecError::UnknownVolume(mount.name.clone()))?;
            let host = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => dir.join(sub),
                _ => dir.clone(),
            };
            Ok((mount.mount_path.clone(), host))
        })
        .collect()
}

fn write_keys<'a>(
    dir: &Path,
    data: impl Iterator<Item = (&'a str, &'a [u8])>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    source: &str,
) -> Result<(), Error> {
    let data: BTreeMap<&str, &[u8]> = data.collect();
    let files: Vec<(&str, &str, Option<i32>)> = match items {
        Some(items) => items
            .iter()
            .map(|item| (item.key.as_str(), item.path.as_str(), item.mode))
            .collect(),
        None => data.keys().map(|key| (*key, *key, None)).collect(),
    };
    for (key, relative, mode) in files {
        let bytes = data.get(key).ok_or_else(|| SpecError::MissingKey {
            name: source.to_owned(),
            key: key.to_owned(),
        })?;
        if relative.split('/').any(|part| part == "..") || relative.starts_with('/') {
            return Err(SpecError::Unsupported(format!("volume item path {relative}")).into());
        }
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            create_dir(parent)?;
        }
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        std::fs::write(&path, bytes).map_err(io)?;
        let mode = mode.or(default_mode).unwrap_or(DEFAULT_MODE);
        let mode = u32::try_from(mode & 0o777).unwrap_or(0o644);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ConfigMapVolumeSource, EmptyDirVolumeSource, SecretVolumeSource, Volume, VolumeMount,
    };

    use super::*;

    fn spec() -> PodSpec {
        PodSpec {
            volumes: Some(vec![
                Volume {
                    name: "amqp".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some("amqp-secret".into()),
                        ..SecretVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                Volume {
                    name: "conf".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: "settings".into(),
                        items: Some(vec![KeyToPath {
                            key: "app.yaml".into(),
                            path: "nested/app.yaml".into(),
                            mode: None,
                        }]),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        }
    }

    fn mount(name: &str, path: &str, sub_path: Option<&str>) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            sub_path: sub_path.map(Into::into),
            ..VolumeMount::default()
        }
    }

    #[test]
    fn references_cover_env_and_volumes() {
        let refs = references(&spec());
        assert_eq!(refs.secrets, ["amqp-secret".to_owned()].into());
        assert_eq!(refs.config_maps, ["settings".to_owned()].into());
    }

    #[test]
    fn volumes_are_written_and_mounts_map_to_their_folders() {
        let dir = std::env::temp_dir().join(format!("test-kubelet-volumes-{}", std::process::id()));
        let sources = Sources {
            secrets: [(
                "amqp-secret".to_owned(),
                [("url".to_owned(), b"amqp://x".to_vec())].into(),
            )]
            .into(),
            config_maps: [(
                "settings".to_owned(),
                [
                    ("app.yaml".to_owned(), "a: 1".to_owned()),
                    ("other".to_owned(), "not asked for".to_owned()),
                ]
                .into(),
            )]
            .into(),
        };
        let container = Container {
            volume_mounts: Some(vec![
                mount("amqp", "/etc/amqp", None),
                mount("conf", "/etc/app.yaml", Some("nested/app.yaml")),
                mount("tmp", "/tmp", None),
            ]),
            ..Container::default()
        };
        let mounts = write(&spec(), &container, &sources, &dir).expect("volumes written");
        assert_eq!(
            mounts,
            [
                ("/etc/amqp".to_owned(), dir.join("volumes/amqp")),
                (
                    "/etc/app.yaml".to_owned(),
                    dir.join("volumes/conf/nested/app.yaml")
                ),
                ("/tmp".to_owned(), dir.join("volumes/tmp")),
            ]
        );
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).expect("file written");
        assert_eq!(read("volumes/amqp/url"), "amqp://x");
        assert_eq!(read("volumes/conf/nested/app.yaml"), "a: 1");
        assert!(!dir.join("volumes/conf/other").exists());
        assert!(dir.join("volumes/tmp").is_dir());

        let missing = Sources::default();
        assert!(matches!(
            write(&spec(), &container, &missing, &dir),
            Err(Error::Spec(SpecError::MissingSecret(_)))
        ));
        let unknown = Container {
            volume_mounts: Some(vec![mount("nope", "/x", None)]),
            ..Container::default()
        };
        assert!(matches!(
            write(&spec(), &unknown, &sources, &dir),
            Err(Error::Spec(SpecError::UnknownVolume(_)))
        ));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
