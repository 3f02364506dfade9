//! The snapshot cache: what each proxy should have. Knows nothing of gRPC.
//!
//! One writer ([`MeshCache::run`]) turns each new [`Mesh`] into a
//! [`MeshSnapshot`] holding the resources every proxy shares (outbound
//! clusters, endpoints, routes), encoded once, as immutable [`Layer`]s.
//! Each stream's [`ProxyBuilder`] adds its proxy's own layers (listeners,
//! inbound cluster and route, secrets) and hands the protocol state machines
//! a [`ProxySnapshot`]: a few `Arc`s per type, never a copy of the shared
//! maps.
//!
//! Why layers and not one map per proxy: with 1,000 services a proxy's
//! configuration is ~4,000 resources. Cloning the shared maps into every
//! proxy costs ~300 KB per proxy and O(services) work per proxy per change;
//! layers cost a few pointers, and a [`Layer`] remembers what changed since
//! the layer it replaced, so a stream finds the delta of an endpoint change
//! in O(changed resources).
//!
//! Per-proxy translation is memoized by its inputs: the `epoch` (bumped only
//! when the services change) and the proxy's own workload. An endpoint change
//! therefore translates nothing per proxy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ca::WorkloadCert;
use crate::model::{Endpoint, Interception, Mesh, ObjectKey, Workload};
use crate::translate::{
    self, MeshResources, ProxyResources, Resource, ResourceMap, TranslateError, names, type_url,
};

static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(1);

/// Resources of one type that one proxy or many proxies get. Immutable;
/// shared by `Arc`.
pub struct Layer {
    /// Unique for the life of the process (0 = the empty layer), so a stream
    /// can tell "the layer I synced" from "its successor" without comparing
    /// contents.
    id: u64,
    resources: ResourceMap,
    /// Hash of every (name, version): equal content, equal version.
    version: u64,
    /// What changed relative to the layer this one replaced.
    changes: Option<LayerChanges>,
}

/// The difference between a layer and the one it replaced.
#[derive(Debug)]
struct LayerChanges {
    /// Id of the replaced layer.
    base: u64,
    /// Names added or whose version changed.
    upserted: Vec<String>,
    /// Names no longer present.
    removed: Vec<String>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("id", &self.id)
            .field("resources", &self.resources.len())
            .field("version", &self.version)
            .finish()
    }
}

static EMPTY_LAYER: LazyLock<Arc<Layer>> = LazyLock::new(|| {
    Arc::new(Layer {
        id: 0,
        resources: ResourceMap::new(),
        version: layer_version(&ResourceMap::new()),
        changes: None,
    })
});

static EMPTY_LAYERS: LazyLock<[Arc<Layer>; SLOTS]> =
    LazyLock::new(|| [Layer::empty(), Layer::empty(), Layer::empty()]);

fn layer_version(resources: &ResourceMap) -> u64 {
    // std's SipHash with fixed keys: deterministic within and across runs.
    let mut h = std::hash::DefaultHasher::new();
    for (name, r) in resources {
        name.hash(&mut h);
        r.version.hash(&mut h);
    }
    h.finish()
}

impl Layer {
    pub fn new(resources: ResourceMap) -> Layer {
        Layer {
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            version: layer_version(&resources),
            resources,
            changes: None,
        }
    }

    /// The shared empty layer.
    pub fn empty() -> Arc<Layer> {
        EMPTY_LAYER.clone()
    }

    /// A layer replacing `base`: unchanged resources keep `base`'s `Arc`s
    /// (memory is not doubled while both live), and the changes are
    /// recorded once here instead of being recomputed by every stream.
    pub fn replacing(mut resources: ResourceMap, base: &Layer) -> Layer {
        let mut upserted = Vec::new();
        for (name, r) in resources.iter_mut() {
            match base.resources.get(name) {
                Some(old) if old.version == r.version => *r = old.clone(),
                _ => upserted.push(name.clone()),
            }
        }
        let removed = base
            .resources
            .keys()
            .filter(|n| !resources.contains_key(*n))
            .cloned()
            .collect();
        let mut layer = Layer::new(resources);
        layer.changes = Some(LayerChanges {
            base: base.id,
            upserted,
            removed,
        });
        layer
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn resources(&self) -> &ResourceMap {
        &self.resources
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(name)
    }

    /// What a client that has `old` must be told to have `self`: changed or
    /// new resources, and removed names. O(changes) when `self` directly
    /// replaced `old`, O(resources) otherwise.
    pub fn changes_since<'a>(&'a self, old: &Layer) -> (Vec<&'a Arc<Resource>>, Vec<String>) {
        if self.id == old.id {
            return (Vec::new(), Vec::new());
        }
        if let Some(c) = &self.changes
            && c.base == old.id
        {
            let up = c
                .upserted
                .iter()
                .filter_map(|n| self.resources.get(n))
                .collect();
            return (up, c.removed.clone());
        }
        let up = self
            .resources
            .iter()
            .filter(|(n, r)| old.resources.get(*n).is_none_or(|o| o.version != r.version))
            .map(|(_, r)| r)
            .collect();
        let removed = old
            .resources
            .keys()
            .filter(|n| !self.resources.contains_key(*n))
            .cloned()
            .collect();
        (up, removed)
    }
}

/// Equal layers (by content) built by different streams become one `Arc`:
/// proxies with the same outbound address share their outbound listeners.
static LAYERS: LazyLock<Mutex<HashMap<u64, Weak<Layer>>>> = LazyLock::new(Default::default);

fn intern_layer(layer: Layer) -> Arc<Layer> {
    if layer.resources.is_empty() {
        return Layer::empty();
    }
    let mut map = match LAYERS.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if let Some(existing) = map.get(&layer.version).and_then(Weak::upgrade)
        && same_content(&existing.resources, &layer.resources)
    {
        return existing;
    }
    let arc = Arc::new(layer);
    map.insert(arc.version, Arc::downgrade(&arc));
    // Drop dead entries now and then so the table tracks live layers.
    if map.len() > 64 && map.len().is_power_of_two() {
        map.retain(|_, w| w.strong_count() > 0);
    }
    arc
}

fn same_content(a: &ResourceMap, b: &ResourceMap) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((na, ra), (nb, rb))| na == nb && ra.version == rb.version)
}

/// Subscribed name sets, interned: thousands of proxies subscribe to the
/// same EDS/RDS names, and one copy of a 1,000-name set is ~80 KB.
static NAME_SETS: LazyLock<Mutex<HashMap<u64, Weak<BTreeSet<String>>>>> =
    LazyLock::new(Default::default);

pub fn intern_names(names: BTreeSet<String>) -> Arc<BTreeSet<String>> {
    let mut h = std::hash::DefaultHasher::new();
    names.hash(&mut h);
    let key = h.finish();
    let mut map = match NAME_SETS.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if let Some(existing) = map.get(&key).and_then(Weak::upgrade)
        && *existing == names
    {
        return existing;
    }
    let arc = Arc::new(names);
    map.insert(key, Arc::downgrade(&arc));
    if map.len() > 64 && map.len().is_power_of_two() {
        map.retain(|_, w| w.strong_count() > 0);
    }
    arc
}

/// Which layer of a type a resource lives in.
pub const SLOTS: usize = 3;
/// Shared by every proxy of the mesh (outbound clusters, endpoints, routes).
pub const SHARED: usize = 0;
/// Built per proxy but typically equal across proxies (outbound listeners).
pub const COMMON: usize = 1;
/// Only this proxy's (inbound listener/cluster/route, secrets).
pub const OWN: usize = 2;

/// Everything one proxy may be served, as layers per type. Names are unique
/// across the layers of a type. Cloning is a handful of `Arc` clones.
#[derive(Clone, Debug, Default)]
pub struct ProxySnapshot {
    types: BTreeMap<&'static str, [Arc<Layer>; SLOTS]>,
}

impl ProxySnapshot {
    /// One layer per type (tests, benchmarks, and callers holding a flat
    /// [`ProxyResources`]).
    pub fn from_resources(r: &ProxyResources) -> ProxySnapshot {
        let mut out = ProxySnapshot::default();
        for (ty, map) in &r.by_type {
            out.types.insert(
                ty,
                [
                    Arc::new(Layer::new(map.clone())),
                    Layer::empty(),
                    Layer::empty(),
                ],
            );
        }
        out
    }

    /// The flat view (admin, tests).
    pub fn to_resources(&self) -> ProxyResources {
        let mut out = ProxyResources::default();
        for (ty, layers) in &self.types {
            let map = out.by_type.entry(ty).or_default();
            for l in layers {
                map.extend(l.resources.iter().map(|(n, r)| (n.clone(), r.clone())));
            }
        }
        out
    }

    /// Replace the shared layer of a type (tests and benchmarks that model
    /// what the cache does on a change).
    pub fn with_layer(mut self, ty: &'static str, layer: Arc<Layer>) -> Self {
        self.types
            .entry(ty)
            .or_insert_with(|| [Layer::empty(), Layer::empty(), Layer::empty()])[SHARED] = layer;
        self
    }

    pub fn layers(&self, ty: &str) -> Option<&[Arc<Layer>; SLOTS]> {
        self.types.get(ty)
    }

    /// The layers of a type; empty ones for a type the snapshot lacks.
    pub fn layers_or_empty(&self, ty: &str) -> &[Arc<Layer>; SLOTS] {
        self.types.get(ty).unwrap_or(&EMPTY_LAYERS)
    }

    pub fn get(&self, ty: &str, name: &str) -> Option<&Arc<Resource>> {
        self.types.get(ty)?.iter().find_map(|l| l.get(name))
    }

    /// Every resource of a type, sorted by name.
    pub fn all(&self, ty: &str) -> Vec<&Arc<Resource>> {
        let mut v: Vec<&Arc<Resource>> = self
            .types
            .get(ty)
            .into_iter()
            .flatten()
            .flat_map(|l| l.resources.values())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Number of resources of a type.
    pub fn len(&self, ty: &str) -> usize {
        self.types
            .get(ty)
            .map(|ls| ls.iter().map(|l| l.resources.len()).sum())
            .unwrap_or(0)
    }

    /// Hash of the layer versions of a type.
    pub fn version(&self, ty: &str) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        for l in self.types.get(ty).into_iter().flatten() {
            l.version.hash(&mut h);
        }
        h.finish()
    }
}

/// A mesh and the resources built once for all proxies.
#[derive(Debug)]
pub struct MeshSnapshot {
    pub mesh: Arc<Mesh>,
    pub shared: MeshResources,
    /// Increments with every published mesh; lets tests and status tell
    /// snapshots apart.
    pub generation: u64,
    /// Increments only when an input of per-proxy translation other than the
    /// proxy's own workload changes; streams reuse their translation while
    /// it stays equal.
    pub epoch: u64,
    /// The shared resources as layers, by type (clusters, endpoints, routes).
    pub layers: BTreeMap<&'static str, Arc<Layer>>,
    /// The shared resources' own references (clusters → endpoints, routes →
    /// clusters), checked once here rather than by every stream.
    pub consistency: Result<(), TranslateError>,
    /// Outbound listeners per outbound address, translated (and checked)
    /// once by the first stream that needs them and shared by every proxy
    /// with that address; carried over to the next snapshot while the
    /// epoch is unchanged. Without it each connecting proxy encoded its own
    /// copy of one listener per service port before interning dropped it.
    outbound: Arc<Mutex<HashMap<std::net::IpAddr, OutboundListeners>>>,
}

/// One outbound address's listeners, as [`MeshSnapshot::outbound_listeners`] built them.
type OutboundListeners = Result<(Arc<Layer>, Arc<Vec<String>>), TranslateError>;

impl MeshSnapshot {
    fn build(mesh: Arc<Mesh>, trust_domain: &str, previous: Option<&MeshSnapshot>) -> MeshSnapshot {
        let mut shared = translate::mesh_resources(&mesh, trust_domain);
        let mut layers = BTreeMap::new();
        for (ty, map) in [
            (type_url::CLUSTER, &shared.clusters),
            (type_url::ENDPOINT, &shared.endpoints),
            (type_url::ROUTE, &shared.routes),
        ] {
            let layer = match previous.and_then(|p| p.layers.get(ty)) {
                Some(old) => {
                    let l = Layer::replacing(map.clone(), old);
                    // Unchanged: keep the old `Arc` so streams skip this type in O(1).
                    if l.version == old.version {
                        old.clone()
                    } else {
                        Arc::new(l)
                    }
                }
                None => Arc::new(Layer::new(map.clone())),
            };
            layers.insert(ty, layer);
        }
        // Serve the reused `Arc`s everywhere so the replaced copies are freed.
        for (ty, map) in [
            (type_url::CLUSTER, &mut shared.clusters),
            (type_url::ENDPOINT, &mut shared.endpoints),
            (type_url::ROUTE, &mut shared.routes),
        ] {
            if let Some(l) = layers.get(ty) {
                *map = l.resources.clone();
            }
        }
        let epoch = match previous {
            Some(p) if same_translation_inputs(&p.mesh, &mesh) => p.epoch,
            Some(p) => p.epoch + 1,
            None => 1,
        };
        let mut flat = ProxyResources::default();
        for (ty, l) in &layers {
            flat.by_type.insert(ty, l.resources.clone());
        }
        let consistency =
            translate::check_consistency(&flat, &[names::WORKLOAD_CERT, names::TRUST_BUNDLE]);
        // Outbound listeners read only the services (names, ports and
        // protocols), an input of the epoch, so they stay valid while it does.
        let outbound = match previous {
            Some(p) if p.epoch == epoch => p.outbound.clone(),
            _ => Default::default(),
        };
        MeshSnapshot {
            generation: previous.map_or(1, |p| p.generation + 1),
            mesh,
            shared,
            epoch,
            layers,
            consistency,
            outbound,
        }
    }

    /// The outbound listeners of every proxy whose outbound address is
    /// `ip` (see [`translate::split_translation`]), with the warnings of
    /// their translation; checked against the shared clusters and routes.
    fn outbound_listeners(&self, ip: std::net::IpAddr) -> OutboundListeners {
        // Held while translating: proxies connecting together wait for the
        // one translation instead of each running its own.
        let mut cache = match self.outbound.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(hit) = cache.get(&ip) {
            return hit.clone();
        }
        let (listeners, warnings) = translate::outbound_listeners(&self.mesh, ip);
        let mut check = ProxyResources::default();
        check
            .by_type
            .insert(type_url::CLUSTER, self.shared.clusters.clone());
        check
            .by_type
            .insert(type_url::ENDPOINT, self.shared.endpoints.clone());
        check
            .by_type
            .insert(type_url::ROUTE, self.shared.routes.clone());
        check.by_type.insert(type_url::LISTENER, listeners);
        let built =
            translate::check_consistency(&check, &[names::WORKLOAD_CERT, names::TRUST_BUNDLE]).map(
                |()| {
                    let listeners = check.by_type.remove(type_url::LISTENER).unwrap_or_default();
                    (intern_layer(Layer::new(listeners)), Arc::new(warnings))
                },
            );
        cache.insert(ip, built.clone());
        built
    }
}

/// Whether every proxy's translation can be reused from `old` to `new`
/// (given its own workload is unchanged). The destructuring is exhaustive on
/// purpose: a new field of [`Mesh`] does not compile until someone decides
/// here whether per-proxy translation reads it.
fn same_translation_inputs(old: &Mesh, new: &Mesh) -> bool {
    let Mesh {
        services,
        // Per-proxy translation reads its own workload (compared by the
        // stream), the services, and — for redirected sidecars — the
        // endpoints of headless services (whose pods' identities they
        // carry); other endpoints feed the shared layers only.
        workloads: _,
        endpoints: _,
        // Policies are resolved into `mtls`, which inbound listeners read.
        policies: _,
        mtls,
    } = new;
    *services == old.services
        && *mtls == old.mtls
        && (!has_redirected(new) || headless(old).eq(headless(new)))
}

/// Whether any sidecar's traffic is redirected; only those read endpoints.
fn has_redirected(mesh: &Mesh) -> bool {
    mesh.workloads
        .values()
        .any(|w| w.interception == Interception::Redirect)
}

/// Endpoints of headless services: redirected sidecars match their
/// addresses in the virtual outbound listener (`translate::redirect`).
fn headless(mesh: &Mesh) -> impl Iterator<Item = (&crate::model::ServicePortKey, &Vec<Endpoint>)> {
    mesh.endpoints.iter().filter(|((svc, _), _)| {
        mesh.services
            .get(svc)
            .is_some_and(|s| s.cluster_ips.is_empty())
    })
}

/// Two consecutive snapshots as [`MeshCache`] would publish them (benchmarks
/// and load tools that drive the cache without a watch channel).
pub fn bench_snapshots(
    first: Arc<Mesh>,
    second: Arc<Mesh>,
    trust_domain: &str,
) -> (MeshSnapshot, MeshSnapshot) {
    let a = MeshSnapshot::build(first, trust_domain, None);
    let b = MeshSnapshot::build(second, trust_domain, Some(&a));
    (a, b)
}

/// The single writer of [`MeshSnapshot`]s.
pub struct MeshCache {
    trust_domain: String,
    meshes: watch::Receiver<Arc<Mesh>>,
    tx: watch::Sender<Arc<MeshSnapshot>>,
    /// Quiet time after a mesh change before publishing; zero publishes each
    /// change at once.
    debounce: Duration,
}

impl MeshCache {
    /// Builds the first snapshot right away so streams never wait for one.
    pub fn new(
        mut meshes: watch::Receiver<Arc<Mesh>>,
        trust_domain: impl Into<String>,
    ) -> (Self, watch::Receiver<Arc<MeshSnapshot>>) {
        let trust_domain = trust_domain.into();
        let mesh = meshes.borrow_and_update().clone();
        let first = Arc::new(MeshSnapshot::build(mesh, &trust_domain, None));
        let (tx, rx) = watch::channel(first);
        (
            Self {
                trust_domain,
                meshes,
                tx,
                debounce: Duration::ZERO,
            },
            rx,
        )
    }

    /// Wait this long after a change for further changes before pushing
    /// (`ward serve --debounce`). Changes within the window are published
    /// as one snapshot.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
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
            if !self.debounce.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.debounce) => {}
                }
            }
            let mesh = self.meshes.borrow_and_update().clone();
            let previous = self.tx.borrow().clone();
            let snapshot = MeshSnapshot::build(mesh, &self.trust_domain, Some(&previous));
            tracing::debug!(
                generation = snapshot.generation,
                epoch = snapshot.epoch,
                "mesh snapshot published"
            );
            self.tx.send_replace(Arc::new(snapshot));
        }
    }
}

/// What a stream remembers of its proxy's last translation.
struct Memo {
    epoch: u64,
    workload: Option<Workload>,
    /// `[COMMON, OWN]` layers per type.
    own: BTreeMap<&'static str, [Arc<Layer>; 2]>,
}

/// Builds one proxy's [`ProxySnapshot`]s for one stream, reusing its last
/// translation while its inputs are unchanged.
pub struct ProxyBuilder {
    pod: ObjectKey,
    trust_domain: String,
    memo: Option<Memo>,
    /// The certificate the secrets layer was built from, and that layer.
    secrets: Option<(Arc<WorkloadCert>, Arc<Layer>)>,
    /// Translations run (tests show an endpoint change translates nothing).
    translations: u64,
}

/// Per-pod resources are named `inbound|…` ([`names::inbound_listener`] and
/// friends); everything else a proxy translates alone is the same for every
/// proxy with the same outbound address.
fn is_pod_specific(name: &str) -> bool {
    name.starts_with("inbound|") || name == names::VIRTUAL_INBOUND_LISTENER
}

impl ProxyBuilder {
    pub fn new(pod: ObjectKey, trust_domain: impl Into<String>) -> ProxyBuilder {
        ProxyBuilder {
            pod,
            trust_domain: trust_domain.into(),
            memo: None,
            secrets: None,
            translations: 0,
        }
    }

    /// Per-proxy translations run so far.
    pub fn translations(&self) -> u64 {
        self.translations
    }

    /// The proxy's resources under `view` with `cert`, checked for dangling
    /// references. On error the caller keeps serving its last snapshot.
    pub fn build(
        &mut self,
        view: &MeshSnapshot,
        cert: &Arc<WorkloadCert>,
    ) -> Result<ProxySnapshot, TranslateError> {
        view.consistency.clone()?;
        let workload = view.mesh.workloads.get(&self.pod);
        let fresh = self
            .memo
            .as_ref()
            .is_some_and(|m| m.epoch == view.epoch && m.workload.as_ref() == workload);
        if !fresh {
            self.translate(view)?;
        }
        let secrets = match &self.secrets {
            Some((c, layer)) if Arc::ptr_eq(c, cert) => layer.clone(),
            old => {
                let map: ResourceMap = translate::secrets(
                    &cert.cert_pem,
                    cert.key_pem.expose(),
                    &cert.trust_bundle_pem,
                )
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect();
                let layer = Arc::new(match old {
                    Some((_, base)) => Layer::replacing(map, base),
                    None => Layer::new(map),
                });
                self.secrets = Some((cert.clone(), layer.clone()));
                layer
            }
        };
        let Some(memo) = &self.memo else {
            return Ok(ProxySnapshot::default());
        };
        let known = memo.workload.is_some();
        let mut out = ProxySnapshot::default();
        out.types
            .insert(type_url::SECRET, [Layer::empty(), Layer::empty(), secrets]);
        for ty in [
            type_url::CLUSTER,
            type_url::ENDPOINT,
            type_url::LISTENER,
            type_url::ROUTE,
        ] {
            // A pod not in the mesh gets empty sets, not the mesh's clusters.
            let shared = match view.layers.get(ty) {
                Some(l) if known => l.clone(),
                _ => Layer::empty(),
            };
            let [common, own] = memo
                .own
                .get(ty)
                .cloned()
                .unwrap_or_else(|| [Layer::empty(), Layer::empty()]);
            out.types.insert(ty, [shared, common, own]);
        }
        Ok(out)
    }

    fn translate(&mut self, view: &MeshSnapshot) -> Result<(), TranslateError> {
        self.translations += 1;
        if let Some(own) = self.translate_split(view)? {
            self.memo = Some(Memo {
                epoch: view.epoch,
                workload: view.mesh.workloads.get(&self.pod).cloned(),
                own,
            });
            return Ok(());
        }
        self.translate_whole(view)
    }

    /// The common path: the pod's own inbound resources plus the outbound
    /// listeners shared by every proxy with its outbound address
    /// ([`MeshSnapshot::outbound_listeners`]). `None` when the split does
    /// not apply (an inbound listener collides with an outbound one, or the
    /// inbound part alone does not check out): [`Self::translate_whole`]
    /// then gives the exact per-proxy answer.
    #[allow(clippy::type_complexity)]
    fn translate_split(
        &self,
        view: &MeshSnapshot,
    ) -> Result<Option<BTreeMap<&'static str, [Arc<Layer>; 2]>>, TranslateError> {
        let split = match translate::split_translation(&view.mesh, &self.trust_domain, &self.pod) {
            Ok(Some(split)) => split,
            Ok(None) | Err(_) => return Ok(None),
        };
        // Inbound resources only reference each other and the secrets.
        if translate::check_consistency(
            &split.inbound,
            &[names::WORKLOAD_CERT, names::TRUST_BUNDLE],
        )
        .is_err()
        {
            return Ok(None);
        }
        let (outbound, outbound_warnings) = view.outbound_listeners(split.outbound_ip)?;
        for w in split.warnings.iter().chain(outbound_warnings.iter()) {
            tracing::warn!(pod = %self.pod, "{w}");
        }
        let mut own = BTreeMap::new();
        for ty in [
            type_url::CLUSTER,
            type_url::ENDPOINT,
            type_url::LISTENER,
            type_url::ROUTE,
        ] {
            let old = self.memo.as_ref().and_then(|m| m.own.get(ty));
            let common = if ty == type_url::LISTENER {
                outbound.clone()
            } else {
                Layer::empty()
            };
            // Equal content: keep the old `Arc` so the stream sees no change.
            let common = match old {
                Some([c, _]) if c.version == common.version => c.clone(),
                _ => common,
            };
            let pod = split.inbound.get(ty).cloned().unwrap_or_default();
            let pod = match old {
                Some([_, p]) if p.version == layer_version(&pod) => p.clone(),
                Some([_, p]) => Arc::new(Layer::replacing(pod, p)),
                None => Arc::new(Layer::new(pod)),
            };
            own.insert(ty, [common, pod]);
        }
        Ok(Some(own))
    }

    /// Translate the proxy on its own (any mesh, including address
    /// collisions between its inbound and outbound listeners).
    fn translate_whole(&mut self, view: &MeshSnapshot) -> Result<(), TranslateError> {
        let workload = view.mesh.workloads.get(&self.pod).cloned();
        let resources = match translate::proxy_resources_with(
            &view.mesh,
            &view.shared,
            &self.trust_domain,
            &self.pod,
        ) {
            Ok(out) => {
                for w in &out.warnings {
                    tracing::warn!(pod = %self.pod, "{w}");
                }
                translate::check_consistency(
                    &out.resources,
                    &[names::WORKLOAD_CERT, names::TRUST_BUNDLE],
                )?;
                out.resources
            }
            Err(TranslateError::UnknownProxy(_)) => ProxyResources::default(),
            Err(e) => return Err(e),
        };
        let mut own = BTreeMap::new();
        for (ty, map) in resources.by_type {
            let shared = view.layers.get(ty);
            let mut common = ResourceMap::new();
            let mut pod = ResourceMap::new();
            for (name, r) in map {
                if shared.is_some_and(|l| l.resources.contains_key(&name)) {
                    continue;
                }
                if is_pod_specific(&name) {
                    pod.insert(name, r);
                } else {
                    common.insert(name, r);
                }
            }
            let old = self.memo.as_ref().and_then(|m| m.own.get(ty));
            let common = match old {
                Some([c, _]) => intern_layer(Layer::replacing(common, c)),
                None => intern_layer(Layer::new(common)),
            };
            let pod = match old {
                Some([_, p]) if p.version == layer_version(&pod) => p.clone(),
                Some([_, p]) => Arc::new(Layer::replacing(pod, p)),
                None => Arc::new(Layer::new(pod)),
            };
            own.insert(ty, [common, pod]);
        }
        self.memo = Some(Memo {
            epoch: view.epoch,
            workload,
            own,
        });
        Ok(())
    }
}

/// Everything one proxy may be served as one flat map: the translation of
/// the mesh for its pod plus its own secrets, checked for dangling
/// references. (Admin and tests; streams use [`ProxyBuilder`].)
pub fn proxy_snapshot(
    view: &MeshSnapshot,
    trust_domain: &str,
    pod: &ObjectKey,
    cert: &Arc<WorkloadCert>,
) -> Result<ProxyResources, TranslateError> {
    ProxyBuilder::new(pod.clone(), trust_domain)
        .build(view, cert)
        .map(|s| s.to_resources())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(name: &str, body: &str) -> Arc<Resource> {
        use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
        Arc::new(Resource::new(
            name,
            ClusterLoadAssignment {
                cluster_name: format!("{name}{body}"),
                ..Default::default()
            },
        ))
    }

    fn map(items: &[(&str, &str)]) -> ResourceMap {
        items
            .iter()
            .map(|(n, b)| (n.to_string(), res(n, b)))
            .collect()
    }

    #[test]
    fn a_replacing_layer_records_its_changes_and_reuses_unchanged_arcs() {
        let a = Layer::new(map(&[("x", "1"), ("y", "1"), ("z", "1")]));
        let b = Layer::replacing(map(&[("x", "1"), ("y", "2"), ("w", "1")]), &a);
        assert!(Arc::ptr_eq(&a.resources["x"], &b.resources["x"]));
        let (up, removed) = b.changes_since(&a);
        let up: Vec<&str> = up.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(up, ["w", "y"]);
        assert_eq!(removed, ["z"]);
        // The same answer without the recorded changes (unrelated base).
        let c = Layer::new(map(&[("x", "1"), ("y", "2"), ("w", "1")]));
        let (up, removed) = c.changes_since(&a);
        assert_eq!(up.len(), 2);
        assert_eq!(removed, ["z"]);
        assert!(c.changes_since(&c).0.is_empty());
    }

    fn load(dir: &std::path::Path) -> Arc<Mesh> {
        let (mesh, _, errors) = crate::discovery::DirSource::load_once(dir).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        Arc::new(mesh)
    }

    fn cert() -> Arc<WorkloadCert> {
        let ca = crate::ca::Authority::generate_in_memory("cluster.local").unwrap();
        let id = crate::model::SpiffeId::new("cluster.local", "load", "sa-1");
        let c = ca.issue_workload(&id, Duration::from_secs(3600)).unwrap();
        Arc::new(WorkloadCert {
            cert_pem: c.cert_pem,
            key_pem: c.key_pem,
            trust_bundle_pem: ca.trust_bundle_pem(),
            info: c.info,
        })
    }

    fn expected(mesh: &Mesh, pod: &ObjectKey, cert: &WorkloadCert) -> ProxyResources {
        let mut r = translate::proxy_resources(mesh, "cluster.local", pod).unwrap();
        let secrets = r.by_type.entry(type_url::SECRET).or_default();
        for s in translate::secrets(
            &cert.cert_pem,
            cert.key_pem.expose(),
            &cert.trust_bundle_pem,
        ) {
            secrets.insert(s.name.clone(), Arc::new(s));
        }
        r
    }

    #[test]
    fn memoized_layers_equal_a_fresh_translation_and_endpoint_changes_translate_nothing() {
        use crate::meshgen::{self, MeshSpec};
        let tmp = tempfile::tempdir().unwrap();
        let spec = MeshSpec {
            services: 4,
            pods: 12,
        };
        meshgen::write_dir(tmp.path(), &spec).unwrap();
        let pod = meshgen::pod_key(1);
        let cert = cert();
        let s1 = MeshSnapshot::build(load(tmp.path()), "cluster.local", None);
        assert!(s1.consistency.is_ok());
        let mut b = ProxyBuilder::new(pod.clone(), "cluster.local");
        let p1 = b.build(&s1, &cert).unwrap();
        assert_eq!(p1.to_resources(), expected(&s1.mesh, &pod, &cert));

        // An endpoint change: same epoch, no translation, only EDS differs.
        meshgen::write_change(tmp.path(), 1).unwrap();
        let s2 = MeshSnapshot::build(load(tmp.path()), "cluster.local", Some(&s1));
        assert_eq!(s2.epoch, s1.epoch);
        let p2 = b.build(&s2, &cert).unwrap();
        assert_eq!(b.translations(), 1);
        assert_eq!(p2.to_resources(), expected(&s2.mesh, &pod, &cert));
        for ty in [
            type_url::CLUSTER,
            type_url::LISTENER,
            type_url::ROUTE,
            type_url::SECRET,
        ] {
            let (a, b) = (p1.layers(ty).unwrap(), p2.layers(ty).unwrap());
            assert!(
                a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y)),
                "{ty} unchanged"
            );
        }
        let eds = &p2.layers(type_url::ENDPOINT).unwrap()[SHARED];
        let (up, removed) = eds.changes_since(&p1.layers(type_url::ENDPOINT).unwrap()[SHARED]);
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].name, meshgen::cluster_name(0));
        assert!(removed.is_empty());

        // A new service: new epoch, translated again, still equal.
        let spec = MeshSpec {
            services: 5,
            pods: 12,
        };
        meshgen::write_dir(tmp.path(), &spec).unwrap();
        let s3 = MeshSnapshot::build(load(tmp.path()), "cluster.local", Some(&s2));
        assert_eq!(s3.epoch, s2.epoch + 1);
        let p3 = b.build(&s3, &cert).unwrap();
        assert_eq!(b.translations(), 2);
        assert_eq!(p3.to_resources(), expected(&s3.mesh, &pod, &cert));

        // Two proxies of the mesh share their outbound listeners.
        let mut other = ProxyBuilder::new(meshgen::pod_key(2), "cluster.local");
        let p4 = other.build(&s3, &cert).unwrap();
        let (l3, l4) = (
            p3.layers(type_url::LISTENER).unwrap(),
            p4.layers(type_url::LISTENER).unwrap(),
        );
        assert!(Arc::ptr_eq(&l3[COMMON], &l4[COMMON]));
        assert!(!Arc::ptr_eq(&l3[OWN], &l4[OWN]));

        // A pod outside the mesh gets empty listener and cluster sets.
        let mut gone = ProxyBuilder::new(ObjectKey::new("load", "nope"), "cluster.local");
        let p5 = gone.build(&s3, &cert).unwrap();
        assert_eq!(p5.len(type_url::CLUSTER), 0);
        assert_eq!(p5.len(type_url::LISTENER), 0);
        assert_eq!(p5.len(type_url::SECRET), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn debounce_coalesces_changes_and_zero_publishes_each() {
        use crate::model::Service;
        let mesh_with = |n: usize| {
            let mut m = Mesh::default();
            for i in 0..n {
                let key = ObjectKey::new("d", format!("s{i}"));
                m.services.insert(
                    key.clone(),
                    Service {
                        key,
                        ports: vec![],
                        selector: Default::default(),
                        cluster_ips: Vec::new(),
                    },
                );
            }
            Arc::new(m)
        };
        for (debounce, expected) in [(Duration::from_millis(50), 2), (Duration::ZERO, 4)] {
            let (tx, rx) = watch::channel(mesh_with(0));
            let (cache, mut snaps) = MeshCache::new(rx, "cluster.local");
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(cache.with_debounce(debounce).run(shutdown.clone()));
            let mut published = 1;
            for n in 1..=3 {
                tx.send_replace(mesh_with(n));
                // Let the cache run; with zero debounce each change goes out.
                tokio::time::sleep(Duration::from_millis(1)).await;
                if snaps.has_changed().unwrap() {
                    snaps.borrow_and_update();
                    published += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if snaps.has_changed().unwrap() {
                published += 1;
            }
            assert_eq!(published, expected, "debounce {debounce:?}");
            assert_eq!(snaps.borrow().mesh.services.len(), 3);
            shutdown.cancel();
            task.await.unwrap();
        }
    }

    #[test]
    fn equal_layers_and_name_sets_are_interned() {
        let a = intern_layer(Layer::new(map(&[("p", "1"), ("q", "1")])));
        let b = intern_layer(Layer::new(map(&[("p", "1"), ("q", "1")])));
        assert!(Arc::ptr_eq(&a, &b));
        let c = intern_layer(Layer::new(map(&[("p", "1"), ("q", "2")])));
        assert!(!Arc::ptr_eq(&a, &c));
        let n1 = intern_names(["a".to_string(), "b".to_string()].into());
        let n2 = intern_names(["a".to_string(), "b".to_string()].into());
        assert!(Arc::ptr_eq(&n1, &n2));
    }

    #[test]
    fn headless_endpoints_are_an_input_only_with_redirected_sidecars() {
        use crate::model::{Endpoint, Interception, Service, Workload};
        let mesh = |headless_ip: &str, vip_ep: &str, redirect: bool| {
            let mut m = Mesh::default();
            for (name, vip) in [
                ("headless", vec![]),
                ("vip", vec!["10.96.0.1".parse().unwrap()]),
            ] {
                let key = ObjectKey::new("d", name);
                m.services.insert(
                    key.clone(),
                    Service {
                        key,
                        ports: vec![],
                        selector: Default::default(),
                        cluster_ips: vip,
                    },
                );
            }
            let ep = |ip: &str| Endpoint {
                ip: ip.parse().unwrap(),
                port: 80,
                ready: true,
                workload: None,
                service_account: None,
            };
            m.endpoints
                .insert((ObjectKey::new("d", "headless"), 80), vec![ep(headless_ip)]);
            m.endpoints
                .insert((ObjectKey::new("d", "vip"), 80), vec![ep(vip_ep)]);
            let key = ObjectKey::new("d", "p");
            m.workloads.insert(
                key.clone(),
                Workload {
                    key,
                    labels: Default::default(),
                    service_account: "default".into(),
                    ip: "10.0.0.9".parse().unwrap(),
                    ready: true,
                    ports: vec![],
                    app_ip: "10.0.0.9".parse().unwrap(),
                    outbound_ip: "10.0.0.9".parse().unwrap(),
                    interception: if redirect {
                        Interception::Redirect
                    } else {
                        Interception::Explicit
                    },
                },
            );
            m
        };
        let base = mesh("10.0.0.1", "10.0.0.5", true);
        // A ClusterIP service's endpoints never are.
        assert!(same_translation_inputs(
            &base,
            &mesh("10.0.0.1", "10.0.0.6", true)
        ));
        // A headless service's are, for redirected sidecars ...
        assert!(!same_translation_inputs(
            &base,
            &mesh("10.0.0.2", "10.0.0.5", true)
        ));
        // ... and only then.
        assert!(same_translation_inputs(
            &mesh("10.0.0.1", "10.0.0.5", false),
            &mesh("10.0.0.2", "10.0.0.5", false)
        ));
    }
}
