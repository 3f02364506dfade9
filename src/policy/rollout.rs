//! The policy controller: the single writer of the mesh that translation
//! reads. It sits between discovery and the xDS cache, keeps the last good
//! version of every policy ConfigMap, and moves each service port from its
//! applied mTLS state to the one policy asks for in steps that never refuse
//! a request:
//!
//! - tightening (DISABLE → PERMISSIVE/STRICT): servers accept both
//!   (PERMISSIVE), clients switch to mTLS, then servers go STRICT;
//! - loosening (STRICT/PERMISSIVE → DISABLE): servers accept both, clients
//!   switch to plaintext, then servers go DISABLE;
//! - PERMISSIVE ↔ STRICT: servers only (clients already send mTLS).
//!
//! Each step is published as a new mesh; the next step starts once every
//! affected, connected proxy ACKed LDS/CDS/EDS built from a snapshot
//! generation at least the step's (see `xds::status`), or after a timeout
//! (one stuck proxy must not freeze policy forever). Proxies that are not
//! connected do not block: they get the state of the moment when they
//! connect. Ports seen for the first time start converged.
//!
//! Invariant kept by every step: when clients send mTLS, servers accept it
//! (STRICT or PERMISSIVE); when clients send plaintext, servers accept it
//! (PERMISSIVE or DISABLE).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::explain::{self, ServiceExplain};
use super::resolve::{self, Resolved};
use crate::discovery::{ConfigError, DiscoveryStatus};
use crate::model::{ClientTls, Mesh, MtlsMode, ObjectKey, Policy, PortPolicy, ServicePortKey};
use crate::xds::status::{ProxyStatus, unix_now};
use crate::xds::{MeshSnapshot, ProxyRegistry};

/// Rollout settings.
#[derive(Clone, Debug)]
pub struct RolloutConfig {
    /// After this long a step proceeds even if some proxies have not ACKed
    /// (with a warning naming them).
    pub step_timeout: Duration,
    /// How often ACK progress is checked.
    pub poll: Duration,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            step_timeout: Duration::from_secs(30),
            poll: Duration::from_millis(50),
        }
    }
}

/// What one step changes for one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// Servers go PERMISSIVE so that both kinds of client get in.
    ServersAcceptBoth,
    /// Clients switch what they send.
    Clients(ClientTls),
    /// Servers go to the target mode.
    Servers(MtlsMode),
}

impl StepKind {
    pub fn describe(self) -> String {
        match self {
            StepKind::ServersAcceptBoth => "servers accept mTLS and plaintext (PERMISSIVE)".into(),
            StepKind::Clients(ClientTls::Mtls) => "clients switch to mTLS".into(),
            StepKind::Clients(ClientTls::Plaintext) => "clients switch to plaintext".into(),
            StepKind::Servers(m) => format!("servers go {m}"),
        }
    }

    fn is_server(self) -> bool {
        !matches!(self, StepKind::Clients(_))
    }
}

/// The next safe state of a port on its way to `p.mode`, if it is not there.
pub fn next_state(p: &PortPolicy) -> Option<(PortPolicy, StepKind)> {
    let target_client = p.mode.client();
    if p.client != target_client {
        if p.server != MtlsMode::Permissive {
            let next = PortPolicy {
                server: MtlsMode::Permissive,
                ..*p
            };
            return Some((next, StepKind::ServersAcceptBoth));
        }
        let next = PortPolicy {
            client: target_client,
            ..*p
        };
        return Some((next, StepKind::Clients(target_client)));
    }
    if p.server != p.mode {
        let next = PortPolicy {
            server: p.mode,
            ..*p
        };
        return Some((next, StepKind::Servers(p.mode)));
    }
    None
}

/// A step in progress, for `/debug/policy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RolloutProgress {
    /// `demo/server:9080: clients switch to mTLS (target STRICT)`, one per port.
    pub ports: Vec<String>,
    /// Snapshot generation that carries the step.
    pub generation: u64,
    /// Affected connected proxies that ACKed it ...
    pub applied: usize,
    /// ... out of this many.
    pub of: usize,
    /// The proxies still pending.
    pub pending: Vec<String>,
    pub elapsed_ms: u64,
}

/// A finished step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepRecord {
    pub ports: Vec<String>,
    pub generation: u64,
    pub applied: usize,
    pub of: usize,
    /// Proceeded after the step timeout with these proxies not ACKed.
    pub timed_out: bool,
    pub pending: Vec<String>,
    pub took_ms: u64,
    /// Seconds since the Unix epoch.
    pub finished_at: u64,
}

/// Everything `/debug/policy` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PolicyStatus {
    /// The policies in force (last good versions included).
    pub policies: Vec<Policy>,
    /// Every current policy problem, naming the ConfigMap and field.
    pub errors: Vec<ConfigError>,
    /// Per service (`namespace/name`): ports, modes, chains, rollout step.
    pub services: BTreeMap<String, ServiceExplain>,
    /// The step in progress, if any.
    pub rollout: Option<RolloutProgress>,
    /// The last finished steps, newest last.
    pub history: Vec<StepRecord>,
    pub step_timeout_ms: u64,
}

/// How many finished steps `/debug/policy` keeps.
const HISTORY: usize = 50;

/// The single writer of the published mesh (see the module docs).
pub struct PolicyController {
    input: watch::Receiver<Arc<Mesh>>,
    output: watch::Sender<Arc<Mesh>>,
    /// To learn which snapshot generation carries a published mesh; `None`
    /// until wired (steps then complete without waiting).
    snapshots: Option<watch::Receiver<Arc<MeshSnapshot>>>,
    registry: Arc<ProxyRegistry>,
    /// Parse errors of policy ConfigMaps are found by discovery.
    discovery: Option<watch::Receiver<Arc<DiscoveryStatus>>>,
    status: watch::Sender<Arc<PolicyStatus>>,
    config: RolloutConfig,
    /// The current input mesh.
    mesh: Arc<Mesh>,
    /// Last good policy per ConfigMap.
    in_force: BTreeMap<ObjectKey, Policy>,
    resolved: BTreeMap<ServicePortKey, Resolved>,
    /// Applied state per service port (`mode` = the target).
    applied: BTreeMap<ServicePortKey, PortPolicy>,
    /// Selection errors, to log each once.
    errors: Vec<ConfigError>,
    progress: Option<RolloutProgress>,
    steps: BTreeMap<ServicePortKey, String>,
    history: Vec<StepRecord>,
}

impl PolicyController {
    /// `input` is discovery's mesh; the returned receiver is the mesh to
    /// translate (feed it to `xds::MeshCache`).
    pub fn new(
        input: watch::Receiver<Arc<Mesh>>,
        registry: Arc<ProxyRegistry>,
        config: RolloutConfig,
    ) -> (Self, watch::Receiver<Arc<Mesh>>) {
        let mesh = input.borrow().clone();
        let (output, rx) = watch::channel(mesh.clone());
        let mut this = Self {
            input,
            output,
            snapshots: None,
            registry,
            discovery: None,
            status: watch::Sender::new(Arc::new(PolicyStatus::default())),
            config,
            mesh,
            in_force: BTreeMap::new(),
            resolved: BTreeMap::new(),
            applied: BTreeMap::new(),
            errors: Vec::new(),
            progress: None,
            steps: BTreeMap::new(),
            history: Vec::new(),
        };
        this.refresh();
        (this, rx)
    }

    /// Wire the cache's snapshots (created from the receiver `new` returned).
    pub fn with_snapshots(mut self, snapshots: watch::Receiver<Arc<MeshSnapshot>>) -> Self {
        self.snapshots = Some(snapshots);
        self
    }

    /// Include discovery's ConfigMap errors in the status.
    pub fn with_discovery(mut self, discovery: watch::Receiver<Arc<DiscoveryStatus>>) -> Self {
        self.discovery = Some(discovery);
        self.publish_status();
        self
    }

    /// For `/debug/policy`, `ward_policy_errors` and tests.
    pub fn status(&self) -> watch::Receiver<Arc<PolicyStatus>> {
        self.status.subscribe()
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            self.refresh();
            match self.next_step() {
                None => {
                    let input = &mut self.input;
                    let discovery = self.discovery.as_mut();
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        changed = input.changed() => if changed.is_err() { return },
                        Some(Ok(())) = async {
                            match discovery {
                                Some(d) => Some(d.changed().await),
                                None => None,
                            }
                        } => {}
                    }
                    if let Some(d) = self.discovery.as_mut() {
                        d.borrow_and_update();
                    }
                }
                Some(step) => {
                    if !self.run_step(step, &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    /// Read the input mesh: choose policies, resolve, adopt new ports,
    /// publish with the applied state unchanged.
    fn refresh(&mut self) {
        self.mesh = self.input.borrow_and_update().clone();
        let sel = resolve::select(&self.mesh, &self.in_force);
        for e in &sel.errors {
            if !self.errors.contains(e) {
                tracing::warn!("policy: {e}");
            }
        }
        self.errors = sel.errors;
        self.in_force = sel.in_force;
        self.resolved = resolve::resolve(&self.mesh, &self.in_force);
        let mut applied = BTreeMap::new();
        for (k, r) in &self.resolved {
            let p = match self.applied.get(k) {
                Some(old) => PortPolicy {
                    mode: r.mode,
                    ..*old
                },
                // Nobody has config for a port seen for the first time.
                None => PortPolicy::converged(r.mode),
            };
            if let Some(old) = self.applied.get(k)
                && old.mode != p.mode
            {
                tracing::info!(
                    service = %k.0, port = k.1,
                    "policy: mode {} -> {}; rolling out (servers accept {}, clients send {:?})",
                    old.mode, p.mode, p.server, p.client
                );
            }
            applied.insert(k.clone(), p);
        }
        self.applied = applied;
        self.publish();
        self.publish_status();
    }

    /// The published mesh: the input with the applied mTLS state.
    fn publish(&mut self) {
        // Outside a rollout the applied state is discovery's: publish the
        // input `Arc` itself. Copying and comparing the whole mesh (every
        // workload) on each endpoint change was a serial O(pods) cost on
        // the way to every push. Discovery publishes only changed meshes,
        // so a new input `Arc` is a change.
        if self.mesh.mtls == self.applied {
            let mesh = self.mesh.clone();
            self.output.send_if_modified(|current| {
                if Arc::ptr_eq(current, &mesh) {
                    return false;
                }
                *current = mesh;
                true
            });
            return;
        }
        let mut mesh = (*self.mesh).clone();
        mesh.mtls = self.applied.clone();
        self.output.send_if_modified(|current| {
            if **current == mesh {
                return false;
            }
            *current = Arc::new(mesh);
            true
        });
    }

    fn publish_status(&mut self) {
        let mut errors: Vec<ConfigError> = self
            .discovery
            .as_ref()
            .map(|d| {
                d.borrow()
                    .errors
                    .iter()
                    .filter(|e| e.object.starts_with("ConfigMap "))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        errors.extend(self.errors.iter().cloned());
        let published = self.output.borrow().clone();
        let services = explain::explain_services(&published, &self.resolved, &self.steps);
        let status = PolicyStatus {
            policies: self.in_force.values().cloned().collect(),
            errors,
            services,
            rollout: self.progress.clone(),
            history: self.history.clone(),
            step_timeout_ms: self.config.step_timeout.as_millis() as u64,
        };
        self.status.send_if_modified(|current| {
            if **current == status {
                return false;
            }
            *current = Arc::new(status);
            true
        });
    }

    fn next_step(&self) -> Option<BTreeMap<ServicePortKey, (PortPolicy, StepKind)>> {
        let step: BTreeMap<_, _> = self
            .applied
            .iter()
            .filter_map(|(k, p)| next_state(p).map(|n| (k.clone(), n)))
            .collect();
        (!step.is_empty()).then_some(step)
    }

    /// Apply one step, wait for its ACKs (or the timeout). `false` on shutdown.
    async fn run_step(
        &mut self,
        step: BTreeMap<ServicePortKey, (PortPolicy, StepKind)>,
        shutdown: &CancellationToken,
    ) -> bool {
        let started = Instant::now();
        let labels: Vec<String> = step
            .iter()
            .map(|((svc, port), (next, kind))| {
                format!("{svc}:{port}: {} (target {})", kind.describe(), next.mode)
            })
            .collect();
        // Proxies that must ACK: the service's server sidecars for a server
        // step; every proxy (all have every outbound cluster) for a client step.
        let mut servers: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut all = false;
        for ((svc, _), (_, kind)) in &step {
            if kind.is_server() {
                if let Some(s) = self.mesh.services.get(svc) {
                    servers.extend(
                        self.mesh
                            .workloads
                            .values()
                            .filter(|w| s.selects(w))
                            .map(|w| w.key.clone()),
                    );
                }
            } else {
                all = true;
            }
        }
        for (k, (next, kind)) in &step {
            self.applied.insert(k.clone(), *next);
            self.steps.insert(k.clone(), kind.describe());
        }
        tracing::info!(steps = ?labels, "policy rollout step");
        self.publish();
        let Some(generation) = self.wait_generation(shutdown).await else {
            return false;
        };
        loop {
            let (applied, of, pending) = self.count(generation, all, &servers);
            self.progress = Some(RolloutProgress {
                ports: labels.clone(),
                generation,
                applied,
                of,
                pending: pending.clone(),
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
            self.publish_status();
            let timed_out = started.elapsed() >= self.config.step_timeout;
            if applied == of || timed_out {
                if timed_out && applied < of {
                    tracing::warn!(
                        steps = ?labels, pending = ?pending,
                        "policy rollout step timed out after {:?}: applied to {applied} of {of} proxies; proceeding",
                        self.config.step_timeout
                    );
                } else {
                    tracing::info!(steps = ?labels, "policy rollout step applied to {applied} of {of} proxies");
                }
                self.history.push(StepRecord {
                    ports: labels,
                    generation,
                    applied,
                    of,
                    timed_out: applied < of,
                    pending,
                    took_ms: started.elapsed().as_millis() as u64,
                    finished_at: unix_now(),
                });
                if self.history.len() > HISTORY {
                    self.history.remove(0);
                }
                self.progress = None;
                for k in step.keys() {
                    self.steps.remove(k);
                }
                self.publish_status();
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                changed = self.input.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    // New input mid-step: the step's state stays applied
                    // (refresh keeps server/client), targets may move.
                    self.refresh();
                }
                _ = tokio::time::sleep(self.config.poll) => {}
            }
        }
    }

    /// The generation of the first snapshot that carries what was just
    /// published (or any later one: later ones carry it too).
    async fn wait_generation(&mut self, shutdown: &CancellationToken) -> Option<u64> {
        let Some(snapshots) = self.snapshots.as_mut() else {
            return Some(0);
        };
        let deadline = Instant::now() + self.config.step_timeout;
        loop {
            {
                let snap = snapshots.borrow_and_update();
                let published = self.output.borrow();
                if Arc::ptr_eq(&snap.mesh, &published) {
                    return Some(snap.generation);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                changed = snapshots.changed() => if changed.is_err() { return None },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!("policy rollout: the xDS cache did not pick up the step; proceeding");
                    return Some(u64::MAX);
                }
            }
        }
    }

    /// (ACKed, affected, pending pods) among connected proxies.
    fn count(
        &self,
        generation: u64,
        all: bool,
        servers: &BTreeSet<ObjectKey>,
    ) -> (usize, usize, Vec<String>) {
        let mut applied = 0;
        let mut of = 0;
        let mut pending = Vec::new();
        for p in self.registry.list() {
            let affected = all
                || p.pod
                    .parse::<ObjectKey>()
                    .is_ok_and(|pod| servers.contains(&pod));
            if !affected {
                continue;
            }
            of += 1;
            if acked(&p, generation) {
                applied += 1;
            } else {
                pending.push(p.pod.clone());
            }
        }
        (applied, of, pending)
    }
}

/// Has the proxy ACKed listeners, clusters and endpoints of `generation`
/// or later? Types it was never sent do not count: it gets the current
/// state when it asks.
fn acked(p: &ProxyStatus, generation: u64) -> bool {
    ["lds", "cds", "eds"].iter().all(|t| match p.types.get(t) {
        None => true,
        Some(s) => s.sent_version.is_none() || s.acked_generation.is_some_and(|g| g >= generation),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use MtlsMode::*;

    fn walk(from: MtlsMode, to: MtlsMode) -> Vec<StepKind> {
        let mut p = PortPolicy {
            mode: to,
            ..PortPolicy::converged(from)
        };
        let mut steps = Vec::new();
        while let Some((next, kind)) = next_state(&p) {
            // The invariant: clients are always accepted.
            match next.client {
                ClientTls::Mtls => assert!(matches!(next.server, Strict | Permissive), "{next:?}"),
                ClientTls::Plaintext => {
                    assert!(matches!(next.server, Permissive | Disable), "{next:?}")
                }
            }
            steps.push(kind);
            p = next;
            assert!(steps.len() <= 3, "{from} -> {to} does not converge");
        }
        assert!(p.is_converged());
        steps
    }

    use crate::model::{Protocol, Service, ServicePort, TargetPort, Workload};
    use crate::xds::MeshCache;
    use crate::xds::status::TypeStatus;

    /// demo/server (one port, 80) backed by demo/server-0, and a policy.
    fn mesh(mode: Option<MtlsMode>) -> Mesh {
        let mut m = Mesh::default();
        let key = ObjectKey::new("demo", "server");
        m.services.insert(
            key.clone(),
            Service {
                key: key.clone(),
                ports: vec![ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: TargetPort::Number(8080),
                    protocol: Protocol::Http,
                }],
                selector: [("app".to_string(), "server".to_string())].into(),
                cluster_ips: Vec::new(),
            },
        );
        let w = Workload {
            key: ObjectKey::new("demo", "server-0"),
            labels: [("app".to_string(), "server".to_string())].into(),
            service_account: "server".into(),
            ip: "127.0.4.250".parse().unwrap(),
            ready: true,
            ports: vec![],
            app_ip: "127.0.5.250".parse().unwrap(),
            outbound_ip: "127.0.4.250".parse().unwrap(),
            interception: crate::model::Interception::Explicit,
        };
        m.workloads.insert(w.key.clone(), w);
        if let Some(mode) = mode {
            let cm = ObjectKey::new("demo", "p");
            m.policies.insert(
                cm.clone(),
                Policy {
                    config_map: cm,
                    scope: crate::model::PolicyScope::Service(key),
                    mode,
                    ports: BTreeMap::new(),
                },
            );
        }
        m
    }

    fn proxy(registry: &ProxyRegistry, pod: &str) -> u64 {
        let stream = registry.next_stream_id();
        let t = TypeStatus {
            sent_version: Some("v".into()),
            acked_version: Some("v".into()),
            sent_generation: Some(1),
            acked_generation: Some(1),
            ..TypeStatus::default()
        };
        registry.insert(ProxyStatus {
            stream,
            pod: pod.into(),
            identity: String::new(),
            authenticated: true,
            peer: String::new(),
            connected_at: 0,
            types: [("lds", t.clone()), ("cds", t)].into(),
            cert: None,
            protocol: "ads",
            generation: 0,
        });
        stream
    }

    async fn setup(
        registry: Arc<ProxyRegistry>,
    ) -> (
        watch::Sender<Arc<Mesh>>,
        watch::Receiver<Arc<PolicyStatus>>,
        watch::Receiver<Arc<MeshSnapshot>>,
        CancellationToken,
    ) {
        let (tx, rx) = watch::channel(Arc::new(mesh(None)));
        let config = RolloutConfig {
            step_timeout: Duration::from_secs(5),
            poll: Duration::from_millis(50),
        };
        let (ctl, out) = PolicyController::new(rx, registry, config);
        let (cache, snapshots) = MeshCache::new(out, "cluster.local");
        let ctl = ctl.with_snapshots(snapshots.clone());
        let status = ctl.status();
        let shutdown = CancellationToken::new();
        tokio::spawn(cache.run(shutdown.clone()));
        tokio::spawn(ctl.run(shutdown.clone()));
        (tx, status, snapshots, shutdown)
    }

    async fn wait_history(
        status: &mut watch::Receiver<Arc<PolicyStatus>>,
        n: usize,
    ) -> Vec<StepRecord> {
        loop {
            let h = status.borrow_and_update().history.clone();
            if h.len() >= n {
                return h;
            }
            status.changed().await.unwrap();
        }
    }

    /// A proxy that never ACKs cannot freeze policy: the step proceeds
    /// after the timeout, naming it.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_proxy_delays_a_step_until_the_timeout() {
        let registry = Arc::new(ProxyRegistry::new());
        proxy(&registry, "demo/server-0");
        let (tx, mut status, _snapshots, shutdown) = setup(registry).await;
        let t0 = tokio::time::Instant::now();
        tx.send_replace(Arc::new(mesh(Some(Strict))));
        let h = wait_history(&mut status, 1).await;
        assert!(t0.elapsed() >= Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(h[0].timed_out);
        assert_eq!((h[0].applied, h[0].of), (0, 1));
        assert_eq!(h[0].pending, vec!["demo/server-0"]);
        assert_eq!(
            h[0].ports,
            vec!["demo/server:80: servers go STRICT (target STRICT)"]
        );
        let s = status.borrow().clone();
        assert_eq!(s.services["demo/server"].ports[0].servers_accept, Strict);
        assert!(s.rollout.is_none());
        shutdown.cancel();
    }

    /// A proxy that ACKs the step's generation completes it at once; a
    /// proxy of another service is not waited for.
    #[tokio::test(start_paused = true)]
    async fn a_step_completes_when_the_affected_proxies_ack() {
        let registry = Arc::new(ProxyRegistry::new());
        let stream = proxy(&registry, "demo/server-0");
        let other = proxy(&registry, "other/unrelated-0");
        let (tx, mut status, mut snapshots, shutdown) = setup(registry.clone()).await;
        // The fake sidecar ACKs every snapshot it is "sent".
        let acker = {
            let registry = registry.clone();
            tokio::spawn(async move {
                loop {
                    let g = snapshots.borrow_and_update().generation;
                    for ty in ["lds", "cds"] {
                        registry.update(stream, ty, |t| t.acked_generation = Some(g));
                        registry.update(other, ty, |t| t.acked_generation = Some(g));
                    }
                    if snapshots.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        let t0 = tokio::time::Instant::now();
        tx.send_replace(Arc::new(mesh(Some(Disable))));
        let h = wait_history(&mut status, 2).await;
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "{:?} {h:#?}",
            t0.elapsed()
        );
        assert!(h.iter().all(|r| !r.timed_out && r.applied == r.of), "{h:?}");
        assert_eq!(h[1].of, 1, "only the server's own sidecar is waited for");
        // PERMISSIVE -> DISABLE: clients first (every proxy), then servers.
        assert_eq!(
            h[0].ports,
            vec!["demo/server:80: clients switch to plaintext (target DISABLE)"]
        );
        assert_eq!(h[0].of, 2);
        assert_eq!(
            h[1].ports,
            vec!["demo/server:80: servers go DISABLE (target DISABLE)"]
        );
        acker.abort();
        shutdown.cancel();
    }

    #[test]
    fn safe_orders() {
        use StepKind::*;
        assert_eq!(
            walk(Disable, Strict),
            vec![ServersAcceptBoth, Clients(ClientTls::Mtls), Servers(Strict)]
        );
        assert_eq!(
            walk(Strict, Disable),
            vec![
                ServersAcceptBoth,
                Clients(ClientTls::Plaintext),
                Servers(Disable)
            ]
        );
        assert_eq!(walk(Permissive, Strict), vec![Servers(Strict)]);
        assert_eq!(walk(Strict, Permissive), vec![Servers(Permissive)]);
        assert_eq!(
            walk(Disable, Permissive),
            vec![ServersAcceptBoth, Clients(ClientTls::Mtls)]
        );
        assert_eq!(
            walk(Permissive, Disable),
            vec![Clients(ClientTls::Plaintext), Servers(Disable)]
        );
        for a in [Strict, Permissive, Disable] {
            assert_eq!(walk(a, a), vec![]);
        }
    }
}
