//! Leader election with a `coordination.k8s.io/v1` Lease, the way
//! client-go's leaderelection does it:
//!
//! - the holder renews `spec.renewTime` every `renew_every`;
//! - every write is a PUT carrying the resourceVersion that was read, so of
//!   two replicas racing for the same Lease exactly one wins (the other gets
//!   `409 Conflict`);
//! - a follower takes over when the Lease record has not changed for
//!   `lease_duration` *as observed on its own clock* (so clock skew between
//!   nodes does not matter);
//! - a leader that cannot renew for `renew_deadline` steps down before a
//!   follower can take over, so two leaders never act at once;
//! - on shutdown the leader releases the Lease (empty holder) so another
//!   replica takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::is_status;

/// Lease timing and identity.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Lease name (`ward-leader`).
    pub name: String,
    /// Namespace of the Lease (Ward's own).
    pub namespace: String,
    /// This replica's identity (its pod name), written as `holderIdentity`.
    pub identity: String,
    /// How long a Lease record stays valid without renewal (~15 s).
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before stepping down; below
    /// `lease_duration` (~10 s).
    pub renew_deadline: Duration,
    /// How often the leader renews and followers retry (~5 s; client-go's
    /// retryPeriod is 2 s).
    pub renew_every: Duration,
    /// Release the Lease on shutdown (tests turn it off to simulate a crash).
    pub release_on_shutdown: bool,
}

impl LeaderConfig {
    pub fn new(namespace: &str, identity: &str) -> LeaderConfig {
        LeaderConfig {
            name: super::LEADER_LEASE.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(5),
            release_on_shutdown: true,
        }
    }
}

/// Competes for the Lease and publishes whether this replica leads.
pub struct LeaderElector {
    /// Leases in Ward's namespace.
    api: Api<Lease>,
    cfg: LeaderConfig,
    /// `true` while this replica holds the Lease.
    is_leader: watch::Sender<bool>,
}

/// What a follower saw of the Lease and when (its own clock).
struct Observed {
    /// `(holder, renewTime, resourceVersion)`: any change is a sign of life.
    record: (Option<String>, Option<String>, Option<String>),
    since: Instant,
}

impl LeaderElector {
    pub fn new(client: kube::Client, cfg: LeaderConfig) -> LeaderElector {
        LeaderElector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            is_leader: watch::Sender::new(false),
        }
    }

    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.is_leader.subscribe()
    }

    /// Compete until `shutdown`; never fails (API errors are retried).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut observed: Option<Observed> = None;
        let mut last_renew: Option<Instant> = None;
        loop {
            let leading = self.try_acquire_or_renew(&mut observed).await;
            match leading {
                Ok(true) => last_renew = Some(Instant::now()),
                Ok(false) => last_renew = None,
                Err(e) => {
                    warn!(lease = %self.cfg.name, error = %e, "lease update failed");
                    // Keep leading only while the renew deadline allows.
                    if last_renew.is_some_and(|t| t.elapsed() >= self.cfg.renew_deadline) {
                        last_renew = None;
                    }
                }
            }
            self.set_leader(last_renew.is_some());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.renew_every) => {}
            }
        }
        if *self.is_leader.borrow() && self.cfg.release_on_shutdown {
            self.release().await;
        }
        self.set_leader(false);
    }

    fn set_leader(&self, leading: bool) {
        self.is_leader.send_if_modified(|current| {
            if *current == leading {
                return false;
            }
            if leading {
                info!(identity = %self.cfg.identity, lease = %self.cfg.name, "became the leader");
            } else {
                info!(identity = %self.cfg.identity, lease = %self.cfg.name, "no longer the leader");
            }
            *current = leading;
            true
        });
    }

    fn now() -> MicroTime {
        MicroTime(Timestamp::now())
    }

    /// One round: `Ok(true)` when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(
        &self,
        observed: &mut Option<Observed>,
    ) -> Result<bool, kube::Error> {
        let me = &self.cfg.identity;
        let duration_secs = i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_status(&e, 409) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(me.as_str()) {
            spec.renew_time = Some(Self::now());
            spec.lease_duration_seconds = Some(duration_secs);
            return match self
                .api
                .replace(&self.cfg.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                // Someone wrote the Lease since we read it: it is theirs.
                Err(e) if is_status(&e, 409) => Ok(false),
                Err(e) => Err(e),
            };
        }

        // A follower: is the holder still alive?
        let record = (
            holder.clone(),
            spec.renew_time.as_ref().map(|t| t.0.to_string()),
            lease.metadata.resource_version.clone(),
        );
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let their_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.lease_duration);
        let since = match observed {
            Some(o) if o.record == record => o.since,
            _ => {
                *observed = Some(Observed {
                    record,
                    since: Instant::now(),
                });
                Instant::now()
            }
        };
        let expired = holder.is_none() || since.elapsed() >= their_duration;
        if !expired {
            return Ok(false);
        }
        debug!(previous = ?holder, "lease expired; taking over");
        spec.holder_identity = Some(me.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.acquire_time = Some(Self::now());
        spec.renew_time = Some(Self::now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                *observed = None;
                Ok(true)
            }
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Give the Lease up so another replica takes over without waiting for
    /// it to expire.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(Self::now());
        if let Err(e) = self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            warn!(error = %e, "could not release the lease; it will expire");
        }
    }
}
