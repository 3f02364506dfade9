//! HA in Kubernetes against a fake API server: create-if-absent CA in a
//! Secret (one root whatever the race), Lease leader election (one leader,
//! takeover when it stops renewing), the trust bundle and policy Events
//! written by the leader only, and two whole Ward replicas serving from the
//! same cluster state. Every request the code makes must be on
//! `ward::ha::API_CALLS` (what the RBAC manifests grant).

#[path = "support/fake_kube.rs"]
mod fake_kube;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use fake_kube::FakeKube;
use k8s_openapi::api::core::v1::Secret;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use ward::app::{self, KubeServe, ServeConfig};
use ward::ca::{Authority, RotationConfig};
use ward::discovery::{ConfigError, DiscoveryStatus, MeshNamespaces};
use ward::ha::{
    API_CALLS, LeaderConfig, LeaderElector, PolicyEvents, TRUST_BUNDLE_CONFIGMAP, TRUST_BUNDLE_KEY,
    load_or_create_ca,
};
use ward::local::eventually;

const TD: &str = "cluster.local";
const NS: &str = "ward-system";
const WAIT: Duration = Duration::from_secs(10);

/// Every request seen by the fake is one Ward declares (and RBAC grants).
fn assert_calls_declared(fake: &FakeKube) {
    let declared: BTreeSet<(String, String)> = API_CALLS
        .iter()
        .map(|c| {
            let resource = if c.group.is_empty() {
                c.resource.to_string()
            } else {
                format!("{}.{}", c.resource, c.group)
            };
            (c.verb.to_string(), resource)
        })
        .collect();
    for call in fake.calls() {
        assert!(
            declared.contains(&call),
            "{call:?} is not in ward::ha::API_CALLS"
        );
    }
}

#[tokio::test]
async fn racing_replicas_create_exactly_one_root() {
    let fake = FakeKube::start().await;
    let api = kube::Api::<Secret>::namespaced(fake.client(), NS);
    let api2 = kube::Api::<Secret>::namespaced(fake.client(), NS);
    let (a, b) = tokio::join!(
        load_or_create_ca(&api, NS, "ward-ca", TD),
        load_or_create_ca(&api2, NS, "ward-ca", TD)
    );
    let (a, a_created) = a.unwrap();
    let (b, b_created) = b.unwrap();
    assert_eq!(a.roots_der(), b.roots_der(), "one root for both");
    assert_eq!(
        u8::from(a_created) + u8::from(b_created),
        1,
        "exactly one replica created the Secret"
    );
    let secret = fake.get("Secret", NS, "ward-ca").expect("secret stored");
    assert_eq!(secret["type"], "Opaque");
    assert!(secret["data"]["ca.crt"].is_string());
    assert!(secret["data"]["ca.key"].is_string());

    // A restart (or a third replica) reads the same root.
    let (c, created) = load_or_create_ca(&api, NS, "ward-ca", TD).await.unwrap();
    assert!(!created);
    assert_eq!(c.roots_der(), a.roots_der());

    // Many at once: still one root.
    let results = futures::future::join_all((0..5).map(|_| {
        let api = kube::Api::<Secret>::namespaced(fake.client(), "other");
        async move { load_or_create_ca(&api, "other", "ward-ca", TD).await }
    }))
    .await;
    let roots: BTreeSet<Vec<Vec<u8>>> = results
        .into_iter()
        .map(|r| r.unwrap().0.roots_der().to_vec())
        .collect();
    assert_eq!(roots.len(), 1);
    assert_calls_declared(&fake);
}

#[tokio::test]
async fn plugged_in_ca_secret_is_used_and_bad_ones_are_named() {
    let fake = FakeKube::start().await;
    // A user-provided root in the Secret, before Ward starts.
    let (cert, key) = Authority::generate_root_pem(TD).unwrap();
    let b64 = |s: &str| {
        use std::io::Write;
        let mut out = Vec::new();
        Base64(&mut out).write_all(s.as_bytes()).unwrap();
        String::from_utf8(out).unwrap()
    };
    fake.apply(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "ward-ca", "namespace": NS},
        "data": {"ca.crt": b64(&cert), "ca.key": b64(key.expose())}}),
    );
    let api = kube::Api::<Secret>::namespaced(fake.client(), NS);
    let (auth, created) = load_or_create_ca(&api, NS, "ward-ca", TD).await.unwrap();
    assert!(!created);
    assert_eq!(auth.trust_bundle_pem().trim(), cert.trim());

    fake.apply(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "broken", "namespace": NS},
        "data": {"ca.crt": b64(&cert)}}),
    );
    let err = load_or_create_ca(&api, NS, "broken", TD).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "Secret ward-system/broken: key ca.key: is missing"
    );
    fake.apply(
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "garbage", "namespace": NS},
        "data": {"ca.crt": b64("not pem"), "ca.key": b64(key.expose())}}),
    );
    let err = load_or_create_ca(&api, NS, "garbage", TD)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("Secret ward-system/garbage: Secret ward-system/garbage ca.crt:"),
        "{err}"
    );
}

/// Minimal base64 writer for test fixtures (Secret data is base64).
struct Base64<'a>(&'a mut Vec<u8>);
impl std::io::Write for Base64<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for chunk in buf.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    self.0.push(T[((n >> (18 - 6 * i)) & 63) as usize]);
                } else {
                    self.0.push(b'=');
                }
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn fast_lease(identity: &str) -> LeaderConfig {
    let mut c = LeaderConfig::new(NS, identity);
    c.lease_duration = Duration::from_millis(1500);
    c.renew_deadline = Duration::from_millis(1000);
    c.renew_every = Duration::from_millis(200);
    c.release_on_shutdown = false;
    c
}

struct Candidate {
    leader: watch::Receiver<bool>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn candidate(fake: &FakeKube, cfg: LeaderConfig) -> Candidate {
    let e = LeaderElector::new(fake.client(), cfg);
    let leader = e.is_leader();
    let stop = CancellationToken::new();
    let task = tokio::spawn(e.run(stop.clone()));
    Candidate { leader, stop, task }
}

fn holder(fake: &FakeKube) -> Option<String> {
    fake.get("Lease", NS, "ward-leader")?["spec"]["holderIdentity"]
        .as_str()
        .map(String::from)
}

#[tokio::test]
async fn one_leader_and_takeover_when_it_stops_renewing() {
    let fake = FakeKube::start().await;
    let a = candidate(&fake, fast_lease("ward-a"));
    let b = candidate(&fake, fast_lease("ward-b"));

    let first = eventually(WAIT, || {
        let (la, lb) = (*a.leader.borrow(), *b.leader.borrow());
        assert!(!(la && lb), "two leaders at once");
        async move { (la || lb).then_some(if la { "ward-a" } else { "ward-b" }) }
    })
    .await
    .expect("a leader is elected");
    assert_eq!(holder(&fake).as_deref(), Some(first));

    // Over several renew periods: still exactly one leader, the same one,
    // and it keeps renewing.
    let renewals = fake.count("update", "leases.coordination.k8s.io");
    let _ = eventually(Duration::from_secs(1), || {
        let (la, lb) = (*a.leader.borrow(), *b.leader.borrow());
        assert!(la ^ lb, "exactly one leader (a={la}, b={lb})");
        async { None::<()> }
    })
    .await;
    assert_eq!(holder(&fake).as_deref(), Some(first));
    assert!(fake.count("update", "leases.coordination.k8s.io") > renewals);

    // The leader dies without releasing (a crash): the other takes over
    // once the Lease has not been renewed for its duration.
    let (dead, alive) = if first == "ward-a" { (a, b) } else { (b, a) };
    dead.task.abort();
    let _ = dead.task.await;
    let started = tokio::time::Instant::now();
    eventually(WAIT, || {
        let l = *alive.leader.borrow();
        async move { l.then_some(()) }
    })
    .await
    .expect("the survivor takes over");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "takeover must wait for the lease to expire, took {:?}",
        started.elapsed()
    );
    let lease = fake.get("Lease", NS, "ward-leader").unwrap();
    assert_ne!(lease["spec"]["holderIdentity"].as_str(), Some(first));
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    alive.stop.cancel();
    let _ = alive.task.await;
    assert_calls_declared(&fake);
}

#[tokio::test]
async fn graceful_stop_releases_the_lease_for_an_immediate_takeover() {
    let fake = FakeKube::start().await;
    let slow = |id: &str| LeaderConfig {
        lease_duration: Duration::from_secs(60),
        renew_deadline: Duration::from_secs(40),
        release_on_shutdown: true,
        ..fast_lease(id)
    };
    let x = candidate(&fake, slow("ward-x"));
    eventually(WAIT, || {
        let l = *x.leader.borrow();
        async move { l.then_some(()) }
    })
    .await
    .expect("x leads");
    let y = candidate(&fake, slow("ward-y"));
    x.stop.cancel();
    x.task.await.unwrap();
    assert!(!*x.leader.borrow());
    // Far sooner than the 60 s lease: the release made it free.
    eventually(WAIT, || {
        let l = *y.leader.borrow();
        async move { l.then_some(()) }
    })
    .await
    .expect("y takes over right after the release");
    assert_eq!(holder(&fake).as_deref(), Some("ward-y"));
    y.stop.cancel();
    y.task.await.unwrap();
    assert_calls_declared(&fake);
}

fn policy_error(ns: &str, name: &str, message: &str) -> ConfigError {
    ConfigError::new(format!("ConfigMap {ns}/{name}"), "data.policy", message)
}

#[tokio::test]
async fn invalid_policy_becomes_one_event_from_the_leader_only() {
    let fake = FakeKube::start().await;
    let mut status = DiscoveryStatus {
        synced: true,
        ..DiscoveryStatus::default()
    };
    status.errors = vec![
        policy_error(
            "demo",
            "bad",
            "mode \"STRICTEST\" is not one of STRICT, PERMISSIVE, DISABLE, DEFAULT",
        ),
        // Not about a ConfigMap: no Event.
        ConfigError::new("Service demo/x", "spec.ports[0].port", "must be 1-65535"),
    ];
    let (status_tx, status_rx) = watch::channel(Arc::new(status.clone()));
    let (leader_tx, leader_rx) = watch::channel(false);
    let events = PolicyEvents::new(fake.client(), status_rx, leader_rx, "ward-a".into());
    let stop = CancellationToken::new();
    let task = tokio::spawn(events.run(stop.clone()));

    // A follower writes nothing.
    status_tx.send_replace(Arc::new(status.clone()));
    tokio::task::yield_now().await;
    assert!(fake.list("Event").is_empty());

    leader_tx.send_replace(true);
    let events = eventually(WAIT, || {
        let l = fake.list("Event");
        async move { (!l.is_empty()).then_some(l) }
    })
    .await
    .expect("an Event for the invalid policy");
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e["reason"], "InvalidPolicy");
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["involvedObject"]["kind"], "ConfigMap");
    assert_eq!(e["involvedObject"]["name"], "bad");
    assert_eq!(e["metadata"]["namespace"], "demo");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("mode \"STRICTEST\" is not one of"),
        "{e}"
    );

    // The same error again (another reload): no duplicate. A new error: one more.
    status.reloads += 1;
    status_tx.send_replace(Arc::new(status.clone()));
    status
        .errors
        .push(policy_error("demo", "other", "unknown port 99"));
    status_tx.send_replace(Arc::new(status.clone()));
    eventually(WAIT, || {
        let n = fake.list("Event").len();
        async move { (n == 2).then_some(()) }
    })
    .await
    .expect("second Event");
    let creates = fake.count("create", "events");
    status.reloads += 1;
    status_tx.send_replace(Arc::new(status.clone()));
    // Wait until the task has seen the change (it creates nothing for it).
    leader_tx.send_replace(false);
    leader_tx.send_replace(true);
    eventually(WAIT, || {
        let n = fake.count("create", "events");
        // A new leader re-reporting the same error hits 409, never a
        // duplicate.
        async move { (n >= creates).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(fake.list("Event").len(), 2);

    stop.cancel();
    task.await.unwrap();
    assert_calls_declared(&fake);
}

fn mesh_objects(fake: &FakeKube) {
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "demo", "labels": {"ward.io/mesh": "enabled"}}}));
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "outside"}}));
    fake.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "server", "namespace": "demo"},
        "spec": {"selector": {"app": "server"}, "ports": [{"name": "http", "port": 9080, "targetPort": 8080}]}}));
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "server-0", "namespace": "demo", "labels": {"app": "server"}},
        "spec": {"serviceAccountName": "server", "containers": [{"name": "app", "image": "x"}]},
        "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}));
}

async fn replica(fake: &FakeKube, identity: &str, tmp: &std::path::Path) -> app::Running {
    let cfg = ServeConfig {
        config_dir: tmp.join("unused"),
        state_dir: tmp.join(identity),
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        trust_domain: TD.into(),
        insecure_xds: false,
        rotation: RotationConfig::default(),
        ca_files: None,
        xds_server_names: vec![],
        root_rotation_interval: None,
        push_debounce: std::time::Duration::ZERO,
        policy_step_timeout: std::time::Duration::from_secs(30),
    };
    let k = KubeServe {
        client: fake.client(),
        namespaces: MeshNamespaces::default(),
        ward_namespace: NS.into(),
        ca_secret: "ward-ca".into(),
        identity: identity.into(),
        lease_duration: Duration::from_millis(1500),
        renew_every: Duration::from_millis(200),
        resync: Duration::from_millis(500),
    };
    app::start_kubernetes(cfg, k).await.expect("ward starts")
}

async fn ready(admin: std::net::SocketAddr) -> bool {
    reqwest::get(format!("http://{admin}/readyz"))
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test]
async fn two_ward_replicas_share_one_root_and_one_leader_publishes() {
    let fake = FakeKube::start().await;
    mesh_objects(&fake);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = tokio::join!(
        replica(&fake, "ward-a", tmp.path()),
        replica(&fake, "ward-b", tmp.path())
    );
    assert_eq!(
        a.authority.roots_der(),
        b.authority.roots_der(),
        "one root for both replicas"
    );
    assert_ne!(a.xds_addr, b.xds_addr);
    for r in [&a, &b] {
        let admin = r.admin_addr;
        eventually(WAIT, || {
            ready(admin).then(|ok| async move { ok.then_some(()) })
        })
        .await
        .expect("every replica becomes ready (serves xDS from the cluster state)");
    }
    eventually(WAIT, || {
        let (la, lb) = (*a.leader.borrow(), *b.leader.borrow());
        assert!(!(la && lb), "two leaders at once");
        async move { (la || lb).then_some(()) }
    })
    .await
    .expect("one leader");

    // The leader publishes the trust bundle to the meshed namespace only.
    let cm = eventually(WAIT, || {
        let cm = fake.get("ConfigMap", "demo", TRUST_BUNDLE_CONFIGMAP);
        async move { cm }
    })
    .await
    .expect("trust bundle published");
    assert_eq!(
        cm["data"][TRUST_BUNDLE_KEY].as_str().unwrap(),
        a.authority.trust_bundle_pem()
    );
    assert!(
        fake.get("ConfigMap", "outside", TRUST_BUNDLE_CONFIGMAP)
            .is_none()
    );

    // Someone edits it: the leader repairs it on the next resync.
    let mut edited = cm.clone();
    edited["data"][TRUST_BUNDLE_KEY] = json!("tampered");
    fake.apply(edited);
    eventually(WAIT, || {
        let cm = fake.get("ConfigMap", "demo", TRUST_BUNDLE_CONFIGMAP);
        let ok = cm.is_some_and(|c| c["data"][TRUST_BUNDLE_KEY] != "tampered");
        async move { ok.then_some(()) }
    })
    .await
    .expect("trust bundle repaired");

    // A namespace joins the mesh: it gets the bundle too.
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "outside", "labels": {"ward.io/mesh": "enabled"}}}));
    eventually(WAIT, || {
        let cm = fake.get("ConfigMap", "outside", TRUST_BUNDLE_CONFIGMAP);
        async move { cm.map(|_| ()) }
    })
    .await
    .expect("bundle in the new meshed namespace");

    // The leader stops (gracefully): the other replica leads and keeps
    // serving.
    let (leader, other) = if *a.leader.borrow() { (a, b) } else { (b, a) };
    leader.stop(Duration::from_secs(5)).await;
    eventually(WAIT, || {
        let l = *other.leader.borrow();
        async move { l.then_some(()) }
    })
    .await
    .expect("the other replica takes over");
    assert!(ready(other.admin_addr).await);
    other.stop(Duration::from_secs(5)).await;
    assert_calls_declared(&fake);
}

use futures::FutureExt as _;
