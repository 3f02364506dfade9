//! The snapshot cache: what each proxy should have. Knows nothing of gRPC.
//!
//! One writer ([`MeshCache::run`]) turns each new [`Mesh`] into a
//! [`MeshSnapshot`] holding the resources every proxy shares (outbound
//! clusters, endpoints, routes) encoded once. Streams combine that with their
//! own proxy's listeners and certificates in [`proxy_snapshot`].

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ca::WorkloadCert;
use crate::model::{Mesh, ObjectKey};
use crate::translate::{self, MeshResources, ProxyResources, TranslateError, names, type_url};

/// A mesh and the resources built once for all proxies.
#[derive(Debug)]
pub struct MeshSnapshot {
    pub mesh: Arc<Mesh>,
    pub shared: MeshResources,
    /// Increments with every published mesh; lets tests and status tell
    /// snapshots apart.
    pub generation: u64,
}

/// The single writer of [`MeshSnapshot`]s.
pub struct MeshCache {
    trust_domain: String,
    meshes: watch::Receiver<Arc<Mesh>>,
    tx: watch::Sender<Arc<MeshSnapshot>>,
}

impl MeshCache {
    /// Builds the first snapshot right away so streams never wait for one.
    pub fn new(
        mut meshes: watch::Receiver<Arc<Mesh>>,
        trust_domain: impl Into<String>,
    ) -> (Self, watch::Receiver<Arc<MeshSnapshot>>) {
        let trust_domain = trust_domain.into();
        let mesh = meshes.borrow_and_update().clone();
        let first = Arc::new(MeshSnapshot {
            shared: translate::mesh_resources(&mesh, &trust_domain),
            mesh,
            generation: 1,
        });
        let (tx, rx) = watch::channel(first);
        (
            Self {
                trust_domain,
                meshes,
                tx,
            },
            rx,
        )
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = self.meshes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let mesh = self.meshes.borrow_and_update().clone();
            let generation = self.tx.borrow().generation + 1;
            let snapshot = MeshSnapshot {
                shared: translate::mesh_resources(&mesh, &self.trust_domain),
                mesh,
                generation,
            };
            tracing::debug!(generation, "mesh snapshot published");
            self.tx.send_replace(Arc::new(snapshot));
        }
    }
}

/// Everything one proxy may be served: the translation of the mesh for its
/// pod plus its own secrets, checked for dangling references.
///
/// A pod that is not (or no longer) in the mesh gets its secrets and empty
/// listener and cluster sets: SotW LDS/CDS are complete, so its old
/// listeners are removed.
pub fn proxy_snapshot(
    view: &MeshSnapshot,
    trust_domain: &str,
    pod: &ObjectKey,
    cert: &WorkloadCert,
) -> Result<ProxyResources, TranslateError> {
    let mut resources =
        match translate::proxy_resources_with(&view.mesh, &view.shared, trust_domain, pod) {
            Ok(out) => {
                for w in &out.warnings {
                    tracing::warn!(pod = %pod, "{w}");
                }
                out.resources
            }
            Err(TranslateError::UnknownProxy(_)) => {
                let mut r = ProxyResources::default();
                r.by_type.insert(type_url::LISTENER, Default::default());
                r.by_type.insert(type_url::CLUSTER, Default::default());
                r
            }
            Err(e) => return Err(e),
        };
    let secrets = translate::secrets(
        &cert.cert_pem,
        cert.key_pem.expose(),
        &cert.trust_bundle_pem,
    );
    let secret_map = resources.by_type.entry(type_url::SECRET).or_default();
    for s in secrets {
        secret_map.insert(s.name.clone(), Arc::new(s));
    }
    translate::check_consistency(&resources, &[names::WORKLOAD_CERT, names::TRUST_BUNDLE])?;
    Ok(resources)
}
