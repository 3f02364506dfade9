//! The trust bundle, published as ConfigMap `ward-trust-bundle` (key
//! `root-cert.pem`) in every meshed namespace, by the leader only.
//!
//! Pods mount it to verify Ward itself (the sidecar init container) and
//! anything else that wants to trust mesh certificates. Reconciled when the
//! set of meshed namespaces changes, when this replica becomes leader, and
//! every `resync` to repair edits and deletions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{HaError, is_status};

pub const TRUST_BUNDLE_CONFIGMAP: &str = "ward-trust-bundle";
pub const TRUST_BUNDLE_KEY: &str = "root-cert.pem";
/// Key of the xDS CA bundle in the same ConfigMap: `ward sidecar-init`
/// verifies Ward's credential endpoint with it.
pub const TRUST_BUNDLE_XDS_KEY: &str = "xds-ca.pem";

/// Keeps `ward-trust-bundle` current in every meshed namespace.
pub struct TrustBundlePublisher {
    client: kube::Client,
    /// The roots as PEM (`Authority::trust_bundle_pem`).
    bundle: String,
    /// The meshed namespaces, from discovery.
    namespaces: watch::Receiver<Arc<BTreeSet<String>>>,
    /// Only the leader writes.
    leader: watch::Receiver<bool>,
    /// Periodic full reconcile.
    resync: Duration,
    /// The xDS CA bundle, published under [`TRUST_BUNDLE_XDS_KEY`] when set.
    xds_bundle: Option<String>,
}

impl TrustBundlePublisher {
    pub fn new(
        client: kube::Client,
        bundle: String,
        namespaces: watch::Receiver<Arc<BTreeSet<String>>>,
        leader: watch::Receiver<bool>,
        resync: Duration,
    ) -> Self {
        TrustBundlePublisher {
            client,
            bundle,
            namespaces,
            leader,
            resync,
            xds_bundle: None,
        }
    }

    /// Also publish the xDS CA bundle (for `ward sidecar-init`).
    pub fn with_xds_bundle(mut self, pem: String) -> Self {
        self.xds_bundle = Some(pem);
        self
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if *self.leader.borrow_and_update() {
                let namespaces = self.namespaces.borrow_and_update().clone();
                for ns in namespaces.iter() {
                    match self.reconcile(ns).await {
                        Ok(true) => info!(namespace = %ns, "published the trust bundle"),
                        Ok(false) => {}
                        Err(e) => {
                            warn!(namespace = %ns, error = %e, "cannot publish the trust bundle; will retry")
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.leader.changed() => if r.is_err() { return },
                r = self.namespaces.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(self.resync) => {}
            }
        }
    }

    /// Make the ConfigMap in `ns` hold the bundle; `Ok(true)` if it wrote.
    pub async fn reconcile(&self, ns: &str) -> Result<bool, HaError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let object = format!("ConfigMap {ns}/{TRUST_BUNDLE_CONFIGMAP}");
        let api_err = |source| HaError::Api {
            object: object.clone(),
            source,
        };
        let mut data = BTreeMap::from([(TRUST_BUNDLE_KEY.to_string(), self.bundle.clone())]);
        if let Some(xds) = &self.xds_bundle {
            data.insert(TRUST_BUNDLE_XDS_KEY.to_string(), xds.clone());
        }
        match api.get_opt(TRUST_BUNDLE_CONFIGMAP).await.map_err(api_err)? {
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(TRUST_BUNDLE_CONFIGMAP.into()),
                        namespace: Some(ns.into()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            "ward".to_string(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(data),
                    ..ConfigMap::default()
                };
                match api.create(&PostParams::default(), &cm).await {
                    Ok(_) => Ok(true),
                    // Created meanwhile (a previous leader); next round checks it.
                    Err(e) if is_status(&e, 409) => Ok(false),
                    Err(e) => Err(api_err(e)),
                }
            }
            Some(cm) if cm.data.as_ref() == Some(&data) => Ok(false),
            Some(mut cm) => {
                cm.data = Some(data);
                // Carries the resourceVersion read: a concurrent edit makes
                // this a 409, retried on the next round.
                api.replace(TRUST_BUNDLE_CONFIGMAP, &PostParams::default(), &cm)
                    .await
                    .map_err(api_err)?;
                Ok(true)
            }
        }
    }
}
