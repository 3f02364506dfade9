//! Kubernetes mode: Services, EndpointSlices, Pods, policy ConfigMaps and
//! Namespaces read from the API server with kube-runtime watchers and
//! reflectors, turned into the same [`ObjectSet`] as directory mode and
//! converted by the same [`build_mesh`].
//!
//! Each kind is one stream pipeline,
//! `watcher(api, cfg).default_backoff().modify(..).reflect(writer)`: the
//! watcher lists, then watches from the list's resourceVersion, re-watches
//! when a stream ends, and relists after `410 Gone`; the reflector keeps the
//! current objects in a store. This task only listens for "something
//! changed" and rebuilds from the stores, after a short quiet time so a
//! burst (a Deployment rollout, a relist) costs one rebuild.
//!
//! The source is synced once every watcher has delivered its initial list
//! (`InitDone`); until then the mesh stays empty and `/readyz` fails.
//!
//! Which namespaces are in the mesh: all ([`MeshNamespaces::All`]), or
//! those whose labels match a selector ([`MeshNamespaces::Selector`], e.g.
//! `ward.io/mesh=enabled`). Objects outside the mesh are dropped before
//! conversion. Namespaces are watched in both modes: the trust bundle is
//! published to each meshed namespace.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::Api;
use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::{WatchStreamExt, watcher};
use ::kube::{Client, Resource, ResourceExt};
use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::convert::build_mesh;
use super::objects::{KubeObject, ObjectSet};
use super::{DiscoveryError, DiscoveryStatus, POLICY_LABEL};
use crate::model::{Mesh, ObjectKey};

/// Quiet time after an event before rebuilding: events of one change (a
/// pod's status, its EndpointSlice) arrive within milliseconds of each
/// other.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// The label a namespace carries to join the mesh in selector mode (the
/// default selector is `ward.io/mesh=enabled`).
pub const MESH_NAMESPACE_LABEL: &str = "ward.io/mesh";

/// Which namespaces are in the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshNamespaces {
    /// Every namespace.
    All,
    /// Namespaces whose labels match this label selector.
    Selector(String),
}

impl Default for MeshNamespaces {
    fn default() -> Self {
        MeshNamespaces::Selector(format!("{MESH_NAMESPACE_LABEL}=enabled"))
    }
}

impl FromStr for MeshNamespaces {
    type Err = String;

    /// `all`, or a label selector (`ward.io/mesh=enabled`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("expected `all` or a label selector such as ward.io/mesh=enabled".into());
        }
        if s == "all" {
            return Ok(MeshNamespaces::All);
        }
        Ok(MeshNamespaces::Selector(s.to_string()))
    }
}

impl fmt::Display for MeshNamespaces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MeshNamespaces::All => f.write_str("all"),
            MeshNamespaces::Selector(s) => f.write_str(s),
        }
    }
}

/// The kinds watched, for sync tracking and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Watched {
    Services,
    EndpointSlices,
    Pods,
    ConfigMaps,
    Namespaces,
}

const ALL_WATCHED: usize = 5;

/// What a watcher event means to this task.
enum Signal {
    /// The initial list (or a relist) is complete.
    InitDone,
    /// The store may have changed.
    Changed,
}

/// Watches the cluster and publishes the mesh built from it. Same outputs
/// as [`super::DirSource`], so [`crate::app`] can use either.
pub struct KubeSource {
    /// The API client (in-cluster config, KUBECONFIG, or a test's fake).
    client: Client,
    /// Which namespaces are in the mesh.
    namespaces_sel: MeshNamespaces,
    /// Ward's own namespace: its policy ConfigMaps count even when the
    /// namespace is not in the mesh (the natural home of the mesh-wide
    /// policy, like Istio's root namespace).
    policy_namespace: Option<String>,
    /// The current mesh; replaced only when it changes.
    mesh: watch::Sender<Arc<Mesh>>,
    /// The current raw objects (policy ConfigMaps among them).
    objects: watch::Sender<Arc<ObjectSet>>,
    /// Sync state and current errors, for the admin API and Events.
    status: watch::Sender<Arc<DiscoveryStatus>>,
    /// The meshed namespaces, for the trust-bundle publisher.
    namespaces: watch::Sender<Arc<BTreeSet<String>>>,
}

impl KubeSource {
    /// Cheap: contacts nothing until [`KubeSource::run`].
    pub fn new(client: Client, namespaces: MeshNamespaces) -> KubeSource {
        let status = DiscoveryStatus {
            source: format!("kubernetes (namespaces: {namespaces})"),
            ..DiscoveryStatus::default()
        };
        KubeSource {
            client,
            namespaces_sel: namespaces,
            policy_namespace: None,
            mesh: watch::Sender::new(Arc::new(Mesh::default())),
            objects: watch::Sender::new(Arc::new(ObjectSet::default())),
            status: watch::Sender::new(Arc::new(status)),
            namespaces: watch::Sender::new(Arc::new(BTreeSet::new())),
        }
    }

    /// Also read policy ConfigMaps from `namespace` (Ward's own), whether
    /// or not it is in the mesh.
    pub fn with_policy_namespace(mut self, namespace: impl Into<String>) -> KubeSource {
        self.policy_namespace = Some(namespace.into());
        self
    }

    /// The current mesh. Empty until synced; changes only when the mesh does.
    pub fn mesh(&self) -> watch::Receiver<Arc<Mesh>> {
        self.mesh.subscribe()
    }

    /// The current raw objects (policy ConfigMaps among them).
    pub fn objects(&self) -> watch::Receiver<Arc<ObjectSet>> {
        self.objects.subscribe()
    }

    pub fn status(&self) -> watch::Receiver<Arc<DiscoveryStatus>> {
        self.status.subscribe()
    }

    /// The namespaces currently in the mesh.
    pub fn namespaces(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.namespaces.subscribe()
    }

    /// Watch until `shutdown`. API errors are retried with backoff (and
    /// logged); the last mesh stays in force meanwhile.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DiscoveryError> {
        let client = self.client.clone();
        let (services, services_w) = reflector::store::<Service>();
        let (slices, slices_w) = reflector::store::<EndpointSlice>();
        let (pods, pods_w) = reflector::store::<Pod>();
        let (config_maps, config_maps_w) = reflector::store::<ConfigMap>();
        let (namespaces, namespaces_w) = reflector::store::<Namespace>();
        let ns_config = match &self.namespaces_sel {
            MeshNamespaces::All => watcher::Config::default(),
            MeshNamespaces::Selector(s) => watcher::Config::default().labels(s),
        };
        let streams: Vec<BoxStream<'static, (Watched, Result<Signal, String>)>> = vec![
            pipeline(
                Watched::Services,
                Api::all(client.clone()),
                watcher::Config::default(),
                services_w,
            ),
            pipeline(
                Watched::EndpointSlices,
                Api::all(client.clone()),
                watcher::Config::default(),
                slices_w,
            ),
            pipeline(
                Watched::Pods,
                Api::all(client.clone()),
                watcher::Config::default(),
                pods_w,
            ),
            pipeline(
                Watched::ConfigMaps,
                Api::all(client.clone()),
                // Only policy ConfigMaps: unrelated ones never cost memory.
                watcher::Config::default().labels(POLICY_LABEL),
                config_maps_w,
            ),
            pipeline(
                Watched::Namespaces,
                Api::all(client.clone()),
                ns_config,
                namespaces_w,
            ),
        ];
        let stores = Stores {
            services,
            slices,
            pods,
            config_maps,
            namespaces,
        };
        let mut events = futures::stream::select_all(streams);
        let mut synced: BTreeSet<Watched> = BTreeSet::new();
        let mut published_once = false;
        // When set, a rebuild is due at this instant.
        let mut due: Option<Instant> = None;
        loop {
            let sleep = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                item = events.next() => match item {
                    None => return Err(DiscoveryError::Kube("every watch stream ended".into())),
                    Some((what, Ok(signal))) => {
                        if matches!(signal, Signal::InitDone) && synced.insert(what) {
                            debug!(?what, "initial list complete");
                        }
                        if due.is_none() {
                            due = Some(Instant::now() + DEBOUNCE);
                        }
                    }
                    Some((what, Err(e))) => {
                        // The watcher retries with backoff; 410 Gone lands
                        // here too and is followed by a relist.
                        warn!(?what, error = %e, "kubernetes watch error; retrying");
                    }
                },
                _ = sleep, if synced.len() == ALL_WATCHED => {
                    due = None;
                    let initial = !published_once;
                    published_once = true;
                    self.publish(&stores, initial);
                }
            }
        }
    }

    fn publish(&self, stores: &Stores, initial: bool) {
        let (objects, meshed) =
            stores.snapshot(&self.namespaces_sel, self.policy_namespace.as_deref());
        let (mesh, errors) = build_mesh(&objects);
        let counts = objects.counts();
        if initial {
            info!(
                services = mesh.services.len(),
                workloads = mesh.workloads.len(),
                namespaces = meshed.len(),
                errors = errors.len(),
                "kubernetes discovery synced"
            );
        }
        super::publish_if_changed(&self.namespaces, meshed, false);
        super::publish_if_changed(&self.objects, objects, false);
        let changed = super::publish_if_changed(&self.mesh, mesh, initial);
        self.status.send_modify(|status| {
            let status = Arc::make_mut(status);
            status.synced = true;
            status.reloads += 1;
            if changed {
                status.generation += 1;
            }
            status.errors = errors;
            status.objects = counts;
        });
    }
}

/// One kind's watch pipeline, its events reduced to [`Signal`]s.
fn pipeline<K>(
    what: Watched,
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
) -> BoxStream<'static, (Watched, Result<Signal, String>)>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, config)
        .default_backoff()
        // managedFields are large and Ward never reads them.
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer)
        .map(move |event| {
            let signal = match event {
                Ok(watcher::Event::InitDone) => Ok(Signal::InitDone),
                Ok(_) => Ok(Signal::Changed),
                Err(e) => Err(e.to_string()),
            };
            (what, signal)
        })
        .boxed()
}

/// The reflectors' stores: the current state of each kind.
struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    config_maps: Store<ConfigMap>,
    namespaces: Store<Namespace>,
}

impl Stores {
    /// The objects of the meshed namespaces (plus the policy ConfigMaps of
    /// `policy_ns`), and the meshed namespaces.
    fn snapshot(
        &self,
        sel: &MeshNamespaces,
        policy_ns: Option<&str>,
    ) -> (ObjectSet, BTreeSet<String>) {
        let meshed: BTreeSet<String> = self
            .namespaces
            .state()
            .iter()
            .map(|ns| ns.name_any())
            .collect();
        let in_mesh = |ns: &str| match sel {
            MeshNamespaces::All => true,
            MeshNamespaces::Selector(_) => meshed.contains(ns),
        };
        let mut set = ObjectSet::default();
        let mut add = |meta_ns: Option<String>, name: String, obj: KubeObject| {
            let ns = meta_ns.unwrap_or_default();
            let policy_home = matches!(obj, KubeObject::ConfigMap(_)) && policy_ns == Some(&ns);
            if in_mesh(&ns) || policy_home {
                set.insert(ObjectKey::new(ns, name), obj);
            }
        };
        for o in self.services.state() {
            add(
                o.namespace(),
                o.name_any(),
                KubeObject::Service((*o).clone()),
            );
        }
        for o in self.slices.state() {
            add(
                o.namespace(),
                o.name_any(),
                KubeObject::EndpointSlice((*o).clone()),
            );
        }
        for o in self.pods.state() {
            add(o.namespace(), o.name_any(), KubeObject::Pod((*o).clone()));
        }
        for o in self.config_maps.state() {
            add(
                o.namespace(),
                o.name_any(),
                KubeObject::ConfigMap((*o).clone()),
            );
        }
        (set, meshed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_namespaces_flag() {
        assert_eq!("all".parse::<MeshNamespaces>(), Ok(MeshNamespaces::All));
        assert_eq!(
            "ward.io/mesh=enabled".parse::<MeshNamespaces>(),
            Ok(MeshNamespaces::Selector("ward.io/mesh=enabled".into()))
        );
        assert!("".parse::<MeshNamespaces>().is_err());
        assert_eq!(
            MeshNamespaces::default().to_string(),
            "ward.io/mesh=enabled"
        );
    }
}
