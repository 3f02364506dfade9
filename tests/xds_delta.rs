//! Delta (incremental) ADS: a fake delta client against Ward, and real Envoy
//! sidecars bootstrapped with `api_type: DELTA_GRPC`.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;
use support::{DeltaAds, TD, Ward, delta_names, eventually, generated_ward};
use ward::ca::RotationConfig;
use ward::local::{LocalMesh, LocalMeshConfig, find_envoy};
use ward::meshgen::{self, MeshSpec};
use ward::model::ObjectKey;
use ward::translate::type_url as t;

const S: usize = 3;

async fn client(w: &Ward, j: usize) -> DeltaAds {
    DeltaAds::connect(
        w,
        Some(w.pod_credential(S, j)),
        &meshgen::pod_key(j).to_string(),
    )
    .await
    .expect("connects")
}

fn all_clusters() -> Vec<String> {
    (0..S).map(meshgen::cluster_name).collect()
}

/// Subscribe like Envoy (CDS and LDS wildcard, then EDS/SDS/RDS by name)
/// and ACK everything. Returns the names received per type.
async fn sync(ads: &mut DeltaAds) -> BTreeMap<&'static str, Vec<String>> {
    let mut got = BTreeMap::new();
    ads.subscribe(t::CLUSTER, &[], &[]).await;
    let cds = ads.recv().await;
    ads.ack(&cds).await;
    got.insert("cds", delta_names(&cds));
    let eds_names = all_clusters();
    let eds_names: Vec<&str> = eds_names.iter().map(String::as_str).collect();
    ads.subscribe(t::ENDPOINT, &eds_names, &[]).await;
    let eds = ads.recv().await;
    ads.ack(&eds).await;
    got.insert("eds", delta_names(&eds));
    ads.subscribe(t::LISTENER, &[], &[]).await;
    let lds = ads.recv().await;
    ads.ack(&lds).await;
    got.insert("lds", delta_names(&lds));
    ads.subscribe(t::SECRET, &["default", "ROOTCA"], &[]).await;
    let sds = ads.recv().await;
    ads.ack(&sds).await;
    got.insert("sds", delta_names(&sds));
    got
}

#[tokio::test]
async fn delta_serves_wildcard_and_named_types_with_per_resource_versions() {
    let w = generated_ward(S, 6).await;
    let mut ads = client(&w, 1).await;
    ads.subscribe(t::CLUSTER, &[], &[]).await;
    let cds = ads.recv().await;
    assert_eq!(cds.type_url, t::CLUSTER);
    assert!(!cds.nonce.is_empty() && !cds.system_version_info.is_empty());
    let mut expected = all_clusters();
    expected.push("inbound|8080|local".into());
    expected.sort();
    assert_eq!(delta_names(&cds), expected);
    for r in &cds.resources {
        let any = r.resource.as_ref().unwrap();
        assert_eq!(any.type_url, t::CLUSTER);
        assert_eq!(r.version.len(), 16, "per-resource content hash");
    }
    ads.ack(&cds).await;
    ads.subscribe(t::SECRET, &["default", "ROOTCA", "missing"], &[])
        .await;
    let sds = ads.recv().await;
    assert_eq!(delta_names(&sds), ["ROOTCA", "default"]);
}

#[tokio::test]
async fn an_endpoint_change_sends_one_small_resource_to_each_proxy_and_nothing_else() {
    let w = generated_ward(S, 6).await;
    let mut ads = client(&w, 1).await;
    sync(&mut ads).await;
    let generation = w.wait_streams_synced(1).await;
    let before = w.pushes(&meshgen::pod_key(1).to_string());

    meshgen::write_change(&w.config_dir, 7).unwrap();
    let eds = ads.recv().await;
    assert_eq!(eds.type_url, t::ENDPOINT);
    assert_eq!(delta_names(&eds), [meshgen::cluster_name(0)]);
    assert!(eds.removed_resources.is_empty());
    let bytes = eds.encoded_len();
    assert!(bytes < 2048, "delta EDS response is {bytes} bytes");
    ads.ack(&eds).await;

    w.wait_streams_synced(generation + 1).await;
    let after = w.pushes(&meshgen::pod_key(1).to_string());
    for ty in ["cds", "lds", "sds"] {
        assert_eq!(before[ty], after[ty], "{ty} was not pushed");
    }
    assert_eq!(after["eds"], before["eds"] + 1);
}

#[tokio::test]
async fn post_certs_rotate_reissues_every_workload_certificate_over_sds_only() {
    let w = generated_ward(S, 6).await;
    let mut ads = client(&w, 1).await;
    sync(&mut ads).await;
    w.wait_streams_synced(1).await;
    let pod = meshgen::pod_key(1).to_string();
    let before = w.pushes(&pod);

    let resp = reqwest::Client::new()
        .post(format!("{}/certs/rotate", w.admin()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["scheduled"], 1, "one connected proxy: {body}");

    let sds = ads.recv().await;
    assert_eq!(sds.type_url, t::SECRET);
    // Same root: only the workload certificate changed, not the bundle.
    assert_eq!(delta_names(&sds), ["default"]);
    ads.ack(&sds).await;
    // Pushes are counted when sent, so this one is counted already.
    let after = w.pushes(&pod);
    for ty in ["cds", "lds", "eds", "rds"] {
        assert_eq!(before.get(ty), after.get(ty), "{ty} was not pushed");
    }
    assert_eq!(after["sds"], before["sds"] + 1);
}

#[tokio::test]
async fn a_removed_service_is_named_in_removed_resources() {
    let w = generated_ward(S, 6).await;
    let mut ads = client(&w, 1).await;
    sync(&mut ads).await;
    let spec = MeshSpec {
        services: S - 1,
        pods: 6,
    };
    w.write(meshgen::MESH_FILE, &meshgen::mesh_yaml(&spec));
    let cds = ads.recv().await;
    assert_eq!(cds.type_url, t::CLUSTER);
    assert_eq!(cds.removed_resources, [meshgen::cluster_name(S - 1)]);
    ads.ack(&cds).await;
    // EDS: the gone cluster's endpoints are removed too (still subscribed).
    let eds = ads.recv().await;
    assert_eq!(eds.type_url, t::ENDPOINT);
    assert_eq!(eds.removed_resources, [meshgen::cluster_name(S - 1)]);
    ads.ack(&eds).await;
    let lds = ads.recv().await;
    assert_eq!(lds.type_url, t::LISTENER);
    assert_eq!(lds.removed_resources, [meshgen::cluster_name(S - 1)]);
}

#[tokio::test]
async fn a_reconnect_with_initial_resource_versions_gets_only_what_changed() {
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    let w = generated_ward(S, 6).await;
    let mut ads = client(&w, 1).await;
    ads.subscribe(t::CLUSTER, &[], &[]).await;
    let cds = ads.recv().await;
    ads.ack(&cds).await;
    let mut names = all_clusters();
    names.push("outbound|load|ghost|8080".into());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    ads.subscribe(t::ENDPOINT, &names, &[]).await;
    let eds = ads.recv().await;
    ads.ack(&eds).await;
    let versions = |r: &[envoy_types::pb::envoy::service::discovery::v3::Resource]| {
        r.iter()
            .map(|x| (x.name.clone(), x.version.clone()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let (cds_have, mut eds_have) = (versions(&cds.resources), versions(&eds.resources));
    // Another proxy stays connected so we can see when Ward took the change.
    let mut observer = client(&w, 2).await;
    observer.subscribe(t::CLUSTER, &[], &[]).await;
    observer.recv().await;
    drop(ads);
    eventually(Duration::from_secs(10), || async {
        (w.running.registry.len() == 1).then_some(())
    })
    .await
    .unwrap();
    let generation = w.wait_streams_synced(1).await;

    // While disconnected, one endpoint changes; the client also claims a
    // resource Ward never had.
    meshgen::write_change(&w.config_dir, 9).unwrap();
    w.wait_streams_synced(generation + 1).await;
    eds_have.insert("outbound|load|ghost|8080".into(), "x".into());

    let mut ads = client(&w, 1).await;
    ads.send(DeltaDiscoveryRequest {
        type_url: t::CLUSTER.into(),
        initial_resource_versions: cds_have,
        ..Default::default()
    })
    .await;
    let cds = ads.recv().await;
    assert!(cds.resources.is_empty(), "clusters are unchanged");
    ads.ack(&cds).await;
    ads.send(DeltaDiscoveryRequest {
        type_url: t::ENDPOINT.into(),
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        initial_resource_versions: eds_have,
        ..Default::default()
    })
    .await;
    let eds = ads.recv().await;
    assert_eq!(delta_names(&eds), [meshgen::cluster_name(0)]);
    assert_eq!(eds.removed_resources, ["outbound|load|ghost|8080"]);
}

/// Real Envoy on delta xDS, on 127.0.6.x.
const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: server, namespace: delta}
spec:
  selector: {app: server}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata:
  name: server-0
  namespace: delta
  labels: {app: server}
  annotations: {ward.io/app-ip: 127.0.6.120}
spec:
  serviceAccountName: server
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 127.0.6.20}
---
apiVersion: v1
kind: Pod
metadata:
  name: client-0
  namespace: delta
  labels: {app: client}
  annotations: {ward.io/app-ip: 127.0.6.110}
spec:
  serviceAccountName: client
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 127.0.6.10}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_envoy_on_delta_xds_converges_and_carries_mtls_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    let config_dir = tmp.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("mesh.yaml"), MESH).unwrap();
    let envoy = find_envoy(None)
        .expect("Envoy 1.40 is required for end-to-end tests: run ./dev, or set ENVOY_BIN");
    let config = LocalMeshConfig {
        work_dir: tmp.path().to_path_buf(),
        config_dir: config_dir.clone(),
        envoy,
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        trust_domain: TD.into(),
        rotation: RotationConfig::default(),
        upstreams: BTreeMap::from([(
            ObjectKey::new("delta", "client-0"),
            "http://127.0.6.10:9080/".to_string(),
        )]),
        delta: true,
        ca_files: None,
    };
    let mut mesh = LocalMesh::start(config).await.expect("mesh starts");
    mesh.wait_converged(Duration::from_secs(30))
        .await
        .expect("delta sidecars converge");
    let bootstrap = std::fs::read_to_string(
        tmp.path()
            .join("sidecars/delta.client-0")
            .join(ward::bootstrap::BOOTSTRAP_FILE),
    )
    .unwrap();
    assert!(bootstrap.contains("api_type: DELTA_GRPC"), "{bootstrap}");
    assert!(
        mesh.ward
            .registry
            .list()
            .iter()
            .all(|p| p.protocol == "delta"),
        "every sidecar is on a delta stream"
    );

    let body = eventually(Duration::from_secs(10), || async {
        let r = reqwest::get("http://127.0.6.110:8080/call").await.ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    })
    .await
    .expect("client → server through delta-configured sidecars");
    assert!(body.contains("hello from server-0"), "{body}");
    assert!(
        body.contains("caller spiffe://cluster.local/ns/delta/sa/client"),
        "{body}"
    );

    // An endpoint change reaches Envoy over delta: a second server pod.
    let extra = MESH.to_string()
        + r#"---
apiVersion: v1
kind: Pod
metadata:
  name: server-1
  namespace: delta
  labels: {app: server}
  annotations: {ward.io/app-ip: 127.0.6.121}
spec:
  serviceAccountName: server
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 127.0.6.21}
"#;
    let tmpfile = config_dir.join(".mesh.yaml.tmp");
    std::fs::write(&tmpfile, extra).unwrap();
    std::fs::rename(&tmpfile, config_dir.join("mesh.yaml")).unwrap();
    let client = &mesh.sidecars[&ObjectKey::new("delta", "client-0")];
    let clusters = eventually(Duration::from_secs(20), || async {
        let c = client.admin_get("/clusters").await.ok()?;
        c.contains("127.0.6.21:8080").then_some(c)
    })
    .await;
    assert!(
        clusters.is_some(),
        "Envoy learned the new endpoint over delta EDS"
    );
    mesh.stop().await;
}
