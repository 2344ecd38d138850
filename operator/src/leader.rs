//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one reconciles.
//!
//! A candidate takes the Lease when it is free or expired, the leader renews it every
//! `retry_period`, and every write is a replace carrying the `resourceVersion` that was read, so
//! two candidates racing for an expired Lease cannot both win: the API server answers the loser
//! with 409 Conflict. Expiry is judged like client-go does, by how long *this* process has seen
//! the same record unchanged, so clock skew between nodes does not matter.
//!
//! Kept hand-written: `kube-leader-election` needs kube 4, and `kube-lease-manager` (kube 5)
//! judges expiry from the Lease's `renewTime` against the local wall clock, which a skewed node
//! clock breaks. The end-to-end tests run this against a real API server, including the takeover
//! after a leader crashes without releasing.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tracing::{debug, info};

/// Lease timings.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// Who this process is (written as `holderIdentity`); unique per replica.
    pub identity: String,
    /// How long a Lease stays valid without renewal; a crashed leader is replaced after this.
    pub duration: Duration,
    /// How often the leader renews and a candidate retries.
    pub retry_period: Duration,
    /// A leader that could not renew for this long stops reconciling (must be < `duration`).
    pub renew_deadline: Duration,
}

impl LeaseSettings {
    /// Settings with `retry = duration / 5` and `renew deadline = 2/3 duration`.
    pub fn new(name: &str, namespace: &str, identity: &str, duration: Duration) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            duration,
            retry_period: (duration / 5).max(Duration::from_millis(200)),
            renew_deadline: duration.mul_f64(2.0 / 3.0),
        }
    }
}

/// What identifies one version of the Lease's record: a holder that renews changes it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LeaseRecord {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    resource_version: Option<String>,
}

impl LeaseRecord {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// Acquires, renews and releases one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last record seen and when this process first saw it.
    observed: Option<(LeaseRecord, Instant)>,
}

fn lease_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

fn conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

impl LeaderElector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// One attempt to become (or stay) leader. `Ok(true)`: this process holds the Lease now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let me = self.settings.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(lease_seconds(self.settings.duration)),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    info!(lease = %self.settings.name, identity = %me, "created the Lease: now leader");
                    Ok(true)
                }
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };

        let spec = lease.spec.clone().unwrap_or_default();
        let record = LeaseRecord::of(&lease);
        let holder = record.holder.clone();
        let first_seen = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                self.observed = Some((record, Instant::now()));
                Instant::now()
            }
        };
        let lease_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.settings.duration, Duration::from_secs);
        let expired = first_seen.elapsed() > lease_duration;

        let mut next = spec.clone();
        match holder.as_deref() {
            Some(h) if h == me => {
                next.renew_time = Some(now);
            }
            Some(other) if !expired => {
                debug!(lease = %self.settings.name, holder = other, "the Lease is held by another replica");
                return Ok(false);
            }
            _ => {
                next.holder_identity = Some(me.clone());
                next.acquire_time = Some(now.clone());
                next.renew_time = Some(now);
                next.lease_transitions =
                    Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            }
        }
        next.lease_duration_seconds = Some(lease_seconds(self.settings.duration));
        let was_holder = holder.as_deref() == Some(me.as_str());
        lease.spec = Some(next);
        // `lease` still carries the resourceVersion we read: the replace is conditional on it.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if !was_holder {
                    info!(lease = %self.settings.name, identity = %me, previous = ?holder, "acquired the Lease: now leader");
                }
                Ok(true)
            }
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up (on shutdown) so another replica takes over at once, not after expiry.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        if self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
            .is_ok()
        {
            info!(lease = %self.settings.name, identity = %self.settings.identity, "released the Lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_lease(holder: &str, renewed: i64, version: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed).expect("valid"))),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn a_renewal_or_a_new_holder_is_a_new_record_and_an_empty_holder_is_none() {
        let record = LeaseRecord::of(&a_lease("one", 10, "5"));
        assert_eq!(record, LeaseRecord::of(&a_lease("one", 10, "5")));
        assert_ne!(record, LeaseRecord::of(&a_lease("one", 11, "6")));
        assert_ne!(record, LeaseRecord::of(&a_lease("two", 10, "5")));
        assert_eq!(LeaseRecord::of(&a_lease("", 10, "5")).holder, None);
    }

    #[test]
    fn timings_derive_from_the_duration() {
        let settings = LeaseSettings::new("l", "ns", "me", Duration::from_secs(15));
        assert_eq!(settings.retry_period, Duration::from_secs(3));
        assert_eq!(settings.renew_deadline, Duration::from_secs(10));
        assert_eq!(lease_seconds(Duration::from_millis(300)), 1);
    }
}
