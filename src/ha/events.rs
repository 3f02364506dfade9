//! Feedback on policy: a rejected policy ConfigMap gets a Kubernetes Event
//! (reason `InvalidPolicy`, type Warning) naming the error, so
//! `kubectl describe configmap` and `kubectl get events` show it.
//!
//! Errors are read from the discovery status (the policy module reports
//! them there as `ConfigMap namespace/name` errors). Only the leader
//! writes. Each (object, message) is reported once: the Event's name is a
//! hash of both, so a new leader re-reporting the same error gets
//! `409 AlreadyExists` instead of a duplicate.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{HaError, is_status};
use crate::discovery::{ConfigError, DiscoveryStatus};
use crate::model::ObjectKey;

pub const REASON_INVALID_POLICY: &str = "InvalidPolicy";

/// Turns policy ConfigMap errors into Events.
pub struct PolicyEvents {
    client: kube::Client,
    status: watch::Receiver<Arc<DiscoveryStatus>>,
    leader: watch::Receiver<bool>,
    /// This replica (its pod name), as `reportingInstance`.
    identity: String,
    /// `(object, message)` already reported (or found reported).
    reported: BTreeSet<(String, String)>,
}

/// The ConfigMap an error is about, if it is about one.
fn config_map(e: &ConfigError) -> Option<ObjectKey> {
    e.object.strip_prefix("ConfigMap ")?.parse().ok()
}

impl PolicyEvents {
    pub fn new(
        client: kube::Client,
        status: watch::Receiver<Arc<DiscoveryStatus>>,
        leader: watch::Receiver<bool>,
        identity: String,
    ) -> Self {
        PolicyEvents {
            client,
            status,
            leader,
            identity,
            reported: BTreeSet::new(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if *self.leader.borrow_and_update() {
                let status = self.status.borrow_and_update().clone();
                self.report(&status).await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.leader.changed() => if r.is_err() { return },
                r = self.status.changed() => if r.is_err() { return },
            }
        }
    }

    async fn report(&mut self, status: &DiscoveryStatus) {
        let current: BTreeSet<(String, String)> = status
            .errors
            .iter()
            .filter(|e| config_map(e).is_some())
            .map(|e| (e.object.clone(), e.to_string()))
            .collect();
        // Forget fixed errors, so the same mistake made again is reported.
        self.reported.retain(|r| current.contains(r));
        for e in &status.errors {
            let Some(cm) = config_map(e) else { continue };
            let id = (e.object.clone(), e.to_string());
            if self.reported.contains(&id) {
                continue;
            }
            match self.emit(&cm, e).await {
                Ok(()) => {
                    info!(configmap = %cm, "reported invalid policy as an Event");
                    self.reported.insert(id);
                }
                Err(err) => {
                    warn!(configmap = %cm, error = %err, "cannot create the Event; will retry on the next change")
                }
            }
        }
    }

    async fn emit(&self, cm: &ObjectKey, e: &ConfigError) -> Result<(), HaError> {
        let message = e.to_string();
        let hash = hex::encode(&Sha256::digest(format!("{}\n{message}", e.object))[..8]);
        let name = format!("{}.{hash}", cm.name);
        let now = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(cm.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("ConfigMap".into()),
                namespace: Some(cm.namespace.clone()),
                name: Some(cm.name.clone()),
                ..ObjectReference::default()
            },
            reason: Some(REASON_INVALID_POLICY.into()),
            // The API server caps messages at 1 KiB.
            message: Some(message.chars().take(1024).collect()),
            type_: Some("Warning".into()),
            count: Some(1),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            action: Some("Validate".into()),
            reporting_component: Some("ward".into()),
            reporting_instance: Some(self.identity.clone()),
            source: Some(EventSource {
                component: Some("ward".into()),
                host: None,
            }),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &cm.namespace);
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => Ok(()),
            Err(err) if is_status(&err, 409) => Ok(()),
            Err(source) => Err(HaError::Api {
                object: format!("Event {}/{name}", cm.namespace),
                source,
            }),
        }
    }
}
