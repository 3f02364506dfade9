//! Kubernetes discovery against a fake API server that speaks real
//! list/watch JSON: the model follows the cluster (adds, edits, deletions,
//! bookmarks, watch restarts, 410 Gone and relist), and the same objects
//! give the same mesh and byte-identical Envoy resources as directory mode.

#[path = "support/fake_kube.rs"]
mod fake_kube;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fake_kube::FakeKube;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use ward::discovery::{DirSource, DiscoveryStatus, KubeSource, MeshNamespaces};
use ward::model::{Mesh, ObjectKey};
use ward::translate::proxy_resources;

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(10);

fn key(s: &str) -> ObjectKey {
    s.parse().unwrap()
}

fn namespace(name: &str, meshed: bool) -> Value {
    let labels = if meshed {
        json!({"ward.io/mesh": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn service(ns: &str, name: &str, port: u16, target: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port, "targetPort": target}]}})
}

fn pod(ns: &str, name: &str, app: &str, ip: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {"serviceAccountName": app, "containers": [{"name": "app", "image": "x",
            "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

fn slice(ns: &str, name: &str, service: &str, ips: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>()})
}

struct Running {
    mesh: watch::Receiver<Arc<Mesh>>,
    status: watch::Receiver<Arc<DiscoveryStatus>>,
    objects: watch::Receiver<Arc<ward::discovery::ObjectSet>>,
    namespaces: watch::Receiver<Arc<std::collections::BTreeSet<String>>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ward::discovery::DiscoveryError>>,
}

fn start(fake: &FakeKube, sel: MeshNamespaces) -> Running {
    start_source(KubeSource::new(fake.client(), sel))
}

fn start_source(source: KubeSource) -> Running {
    let r = Running {
        mesh: source.mesh(),
        status: source.status(),
        objects: source.objects(),
        namespaces: source.namespaces(),
        shutdown: CancellationToken::new(),
        task: tokio::spawn(async { Ok(()) }),
    };
    let task = tokio::spawn(source.run(r.shutdown.clone()));
    Running { task, ..r }
}

impl Running {
    /// Wait until the published mesh satisfies `f`.
    async fn mesh_where(&self, what: &str, f: impl Fn(&Mesh) -> bool) -> Arc<Mesh> {
        let rx = self.mesh.clone();
        ward::local::eventually(WAIT, || {
            let m = rx.borrow().clone();
            let ok = f(&m);
            async move { ok.then_some(m) }
        })
        .await
        .unwrap_or_else(|| panic!("mesh never got to: {what}; last: {:#?}", self.mesh.borrow()))
    }

    async fn synced(&self) -> Arc<DiscoveryStatus> {
        let rx = self.status.clone();
        ward::local::eventually(WAIT, || {
            let s = rx.borrow().clone();
            async move { s.synced.then_some(s) }
        })
        .await
        .expect("kubernetes discovery never synced")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// The documents of a YAML file, as JSON.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_norway::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[tokio::test]
async fn same_objects_give_the_same_mesh_and_envoy_resources_as_directory_mode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/local-mesh");
    same_as_directory_mode(&dir, "demo").await;
}

/// Pods with redirected traffic and Services with cluster IPs, as the
/// Kubernetes demo has them: the virtual listeners match too.
#[tokio::test]
async fn redirected_pods_get_the_same_virtual_listeners_as_in_directory_mode() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("mesh.yaml"),
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 10.96.7.1
  clusterIPs: [10.96.7.1]
  selector: {app: cart}
  ports: [{name: http, port: 80, targetPort: http}, {name: grpc-admin, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: tcp, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata:
  name: cart-0
  namespace: shop
  labels: {app: cart}
  annotations: {ward.io/interception: redirect}
spec:
  serviceAccountName: cart
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}, {containerPort: 9000}]}]
status: {podIP: 10.244.0.7}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: shop
  labels: {app: db}
spec:
  serviceAccountName: db
  containers: [{name: app, image: x, ports: [{containerPort: 5432}]}]
status: {podIP: 10.244.0.8}
"#,
    )
    .unwrap();
    let mesh = same_as_directory_mode(tmp.path(), "shop").await;
    let cart = &mesh.workloads[&key("shop/cart-0")];
    assert_eq!(cart.interception, ward::model::Interception::Redirect);
    let listeners = proxy_resources(&mesh, TD, &cart.key).unwrap().by_type
        [ward::translate::type_url::LISTENER]
        .keys()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(listeners, ["virtual-inbound", "virtual-outbound"]);
    assert_eq!(
        mesh.services[&key("shop/cart")].cluster_ips,
        vec!["10.96.7.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(mesh.services[&key("shop/db")].cluster_ips.is_empty());
}

/// Load `dir` as directory mode does and through the fake API server
/// (namespace `ns` labelled into the mesh); the meshes and every proxy's
/// encoded resources must be identical. Returns the mesh.
async fn same_as_directory_mode(dir: &Path, ns: &str) -> Arc<Mesh> {
    let (dir_mesh, dir_objects, errors) = DirSource::load_once(dir).unwrap();
    assert!(errors.is_empty(), "{errors:?}");

    let fake = FakeKube::start().await;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        for mut doc in yaml_docs(&file) {
            if doc["kind"] == "Namespace" {
                doc["metadata"]["labels"]["ward.io/mesh"] = json!("enabled");
            }
            fake.apply(doc);
        }
    }
    // Something outside the mesh that must not show up.
    fake.apply(namespace("other", false));
    fake.apply(service("other", "stray", 80, 8080));
    fake.apply(pod("other", "stray-0", "stray", "10.9.9.9", true));

    let running = start(&fake, MeshNamespaces::default());
    let status = running.synced().await;
    assert!(status.errors.is_empty(), "{:?}", status.errors);
    assert_eq!(status.objects, dir_objects.counts());
    let kube_mesh = running.mesh.borrow().clone();
    assert_eq!(*kube_mesh, dir_mesh, "same objects, same model");
    assert_eq!(running.namespaces.borrow().iter().collect::<Vec<_>>(), [ns]);

    assert!(!dir_mesh.workloads.is_empty());
    for pod in dir_mesh.workloads.keys() {
        let from_dir = proxy_resources(&dir_mesh, TD, pod).unwrap();
        let from_kube = proxy_resources(&kube_mesh, TD, pod).unwrap();
        assert_eq!(
            from_dir.by_type.keys().collect::<Vec<_>>(),
            from_kube.by_type.keys().collect::<Vec<_>>()
        );
        for (ty, resources) in &from_dir.by_type {
            let other = &from_kube.by_type[ty];
            assert_eq!(
                resources.keys().collect::<Vec<_>>(),
                other.keys().collect::<Vec<_>>(),
                "{pod} {ty}"
            );
            for (name, r) in resources {
                assert_eq!(
                    r.any.value, other[name].any.value,
                    "{pod} {ty} {name}: bytes differ"
                );
                assert_eq!(r.version, other[name].version);
            }
        }
    }
    running.stop().await;
    kube_mesh
}

#[tokio::test]
async fn model_follows_the_cluster_through_watch_restarts_bookmarks_and_410() {
    let fake = FakeKube::start().await;
    fake.apply(namespace("demo", true));
    fake.apply(service("demo", "server", 9080, 8080));
    fake.apply(pod("demo", "server-0", "server", "10.0.0.1", true));
    // An unlabelled ConfigMap is not Ward's business; a labelled one is.
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "unrelated", "namespace": "demo"}, "data": {"a": "b"}}));

    let running = start(&fake, MeshNamespaces::default());
    let status = running.synced().await;
    assert_eq!(status.generation, 1);
    let server = key("demo/server");
    let ips = |m: &Mesh| -> Vec<(String, bool)> {
        m.endpoints(&key("demo/server"), 9080)
            .iter()
            .map(|e| (e.ip.to_string(), e.ready))
            .collect()
    };
    assert_eq!(
        ips(&running.mesh.borrow()),
        [("10.0.0.1".to_string(), true)]
    );
    assert_eq!(running.objects.borrow().config_maps.len(), 0);

    // Add a pod: a new workload and endpoint.
    fake.apply(pod("demo", "server-1", "server", "10.0.0.2", true));
    running
        .mesh_where("second endpoint", |m| ips(m).len() == 2)
        .await;

    // Modify: the pod turns unready.
    fake.apply(pod("demo", "server-1", "server", "10.0.0.2", false));
    running
        .mesh_where("server-1 unready", |m| {
            ips(m).contains(&("10.0.0.2".to_string(), false))
        })
        .await;

    // A policy ConfigMap appears in the objects.
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "mesh-policy", "namespace": "demo", "labels": {"ward.io/policy": "true"}},
        "data": {"scope": "mesh", "mode": "STRICT"}}));
    {
        let rx = running.objects.clone();
        ward::local::eventually(WAIT, || {
            let n = rx.borrow().config_maps.len();
            async move { (n == 1).then_some(()) }
        })
        .await
        .expect("policy ConfigMap picked up");
    }

    // A bookmark changes nothing.
    let generation = running.status.borrow().generation;
    fake.bookmark();
    // Then an EndpointSlice: from now on it, not the selector, gives the
    // endpoints (as kube-proxy does).
    fake.apply(slice("demo", "server-abc", "server", &["10.0.0.7"]));
    let m = running
        .mesh_where("endpoints from the slice", |m| {
            ips(m).iter().map(|(ip, _)| ip.as_str()).collect::<Vec<_>>() == ["10.0.0.7"]
        })
        .await;
    assert!(m.services.contains_key(&server));
    assert_eq!(running.status.borrow().generation, generation + 1);

    // Watch restart: streams end; changes made meanwhile are not lost.
    let watches = fake.watches_started();
    fake.close_watches();
    fake.apply(slice(
        "demo",
        "server-abc",
        "server",
        &["10.0.0.7", "10.0.0.8"],
    ));
    fake.delete("Pod", "demo", "server-1");
    running
        .mesh_where("after the watch restart", |m| {
            ips(m).len() == 2 && !m.workloads.contains_key(&key("demo/server-1"))
        })
        .await;
    assert!(
        fake.watches_started() >= watches + 5,
        "every watcher re-watched"
    );

    // 410 Gone: history is compacted and watches end, so resuming fails and
    // every watcher relists. A deletion made meanwhile must be seen.
    let lists = fake.count("list", "pods");
    fake.compact();
    fake.close_watches();
    fake.delete("EndpointSlice", "demo", "server-abc");
    fake.apply(service("demo", "client", 9081, 8080));
    running
        .mesh_where("after the relist", |m| {
            ips(m) == [("10.0.0.1".to_string(), true)]
                && m.services.contains_key(&key("demo/client"))
        })
        .await;
    // The pod watcher relists on its own schedule; the mesh may already be
    // right from the other watchers' relists.
    ward::local::eventually(WAIT, || {
        let relisted = fake.count("list", "pods") > lists;
        async move { relisted.then_some(()) }
    })
    .await
    .expect("410 made the pod watcher relist");

    // Deleting a Service removes it.
    fake.delete("Service", "demo", "client");
    running
        .mesh_where("client service gone", |m| {
            !m.services.contains_key(&key("demo/client"))
        })
        .await;

    // The namespace leaves the mesh: everything in it disappears.
    fake.apply(namespace("demo", false));
    running
        .mesh_where("namespace left the mesh", |m| {
            m.services.is_empty() && m.workloads.is_empty()
        })
        .await;
    assert!(running.namespaces.borrow().is_empty());
    // ... and comes back.
    fake.apply(namespace("demo", true));
    running
        .mesh_where("namespace back", |m| m.services.contains_key(&server))
        .await;

    // An invalid object is reported with its name and field, the rest stays.
    fake.apply(service("demo", "broken", 0, 8080));
    let rx = running.status.clone();
    let status = ward::local::eventually(WAIT, || {
        let s = rx.borrow().clone();
        async move { (!s.errors.is_empty()).then_some(s) }
    })
    .await
    .expect("error reported");
    assert_eq!(status.errors[0].object, "Service demo/broken");
    assert_eq!(status.errors[0].field, "spec.ports[0].port");
    assert!(running.mesh.borrow().services.contains_key(&server));
    running.stop().await;
}

#[tokio::test]
async fn all_namespaces_mode_and_readiness_before_sync() {
    let fake = FakeKube::start().await;
    fake.apply(namespace("a", false));
    fake.apply(namespace("b", false));
    fake.apply(service("a", "x", 80, 8080));
    fake.apply(service("b", "y", 80, 8080));
    let running = start(&fake, MeshNamespaces::All);
    running.synced().await;
    let m = running.mesh.borrow().clone();
    assert_eq!(
        m.services
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["a/x", "b/y"]
    );
    assert_eq!(
        running.namespaces.borrow().iter().collect::<Vec<_>>(),
        ["a", "b"]
    );
    // Ward only reads: list and watch, nothing else.
    for (verb, _) in fake.calls() {
        assert!(verb == "list" || verb == "watch", "{verb}");
    }
    running.stop().await;
}

/// The mesh-wide policy usually lives in Ward's own namespace, which is not
/// in the mesh: its policy ConfigMaps count anyway; those of other
/// namespaces outside the mesh do not.
#[tokio::test]
async fn policies_in_wards_own_namespace_count_outside_the_mesh() {
    let fake = FakeKube::start().await;
    fake.apply(namespace("demo", true));
    fake.apply(namespace("ward-system", false));
    fake.apply(namespace("other", false));
    fake.apply(service("demo", "server", 9080, 8080));
    fake.apply(pod("demo", "server-0", "server", "10.0.0.1", true));
    let policy = |ns: &str, name: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": {"ward.io/policy": "true"}},
            "data": {"scope": "mesh", "mode": "STRICT"}})
    };
    fake.apply(policy("ward-system", "mesh-mtls"));
    fake.apply(policy("other", "stray-mtls"));
    // Non-policy objects of Ward's namespace stay out.
    fake.apply(service("ward-system", "ward", 15010, 15010));

    let running = start_source(
        KubeSource::new(fake.client(), MeshNamespaces::default())
            .with_policy_namespace("ward-system"),
    );
    running.synced().await;
    let objects = running.objects.borrow().clone();
    assert_eq!(
        objects.config_maps.keys().cloned().collect::<Vec<_>>(),
        vec![key("ward-system/mesh-mtls")]
    );
    let mesh = running.mesh.borrow().clone();
    assert_eq!(
        mesh.services.keys().cloned().collect::<Vec<_>>(),
        vec![key("demo/server")]
    );
    assert_eq!(
        mesh.port_policy(&key("demo/server"), 9080).mode,
        ward::model::MtlsMode::Strict,
        "the mesh policy from ward-system applies"
    );
    running.stop().await;
}
