//! The sidecar credential endpoint (`POST /v1/credential`) and `ward
//! sidecar-init`, against the fake API server's TokenReview: a bound token
//! for audience `ward` gets exactly its pod's xDS credential, which then
//! opens an ADS stream; every other token is refused with a clear error.

#[path = "support/fake_kube.rs"]
mod fake_kube;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use fake_kube::FakeKube;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use ward::app::{self, KubeServe, Running, ServeConfig};
use ward::ca::{RotationConfig, cert_info, pem_to_der_certs};
use ward::credential::{self, CredentialError};
use ward::discovery::MeshNamespaces;
use ward::ha::API_CALLS;
use ward::local::eventually;
use ward::model::ObjectKey;

const TD: &str = "cluster.local";
const WAIT: Duration = Duration::from_secs(10);

fn mesh_objects(fake: &FakeKube) {
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "demo", "labels": {"ward.io/mesh": "enabled"}}}));
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "outside"}}));
    fake.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "server", "namespace": "demo"},
        "spec": {"selector": {"app": "server"}, "ports": [{"name": "http", "port": 9080, "targetPort": 8080}]}}));
    for (ns, name, sa, ip) in [
        ("demo", "server-0", "server", "10.0.0.1"),
        ("outside", "stray-0", "stray", "10.0.0.9"),
    ] {
        fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": "server"}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "x",
                "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}));
    }
}

async fn start_ward(fake: &FakeKube, tmp: &std::path::Path) -> (Running, SocketAddr) {
    let cfg = ServeConfig {
        config_dir: tmp.join("unused"),
        state_dir: tmp.join("state"),
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        trust_domain: TD.into(),
        insecure_xds: false,
        rotation: RotationConfig::default(),
        ca_files: None,
        xds_server_names: vec![],
        root_rotation_interval: None,
        push_debounce: std::time::Duration::ZERO,
        policy_step_timeout: Duration::from_secs(30),
    };
    let k = KubeServe {
        client: fake.client(),
        namespaces: MeshNamespaces::default(),
        ward_namespace: "ward-system".into(),
        ca_secret: "ward-ca".into(),
        identity: "ward-0".into(),
        lease_duration: Duration::from_millis(1500),
        renew_every: Duration::from_millis(200),
        resync: Duration::from_millis(500),
    };
    let running = app::start_kubernetes(cfg, k).await.expect("ward starts");
    let addr = running
        .serve_credentials(
            "127.0.0.1:0".parse().unwrap(),
            fake.client(),
            Duration::from_secs(3600),
        )
        .await
        .expect("credential endpoint starts");
    // The endpoint checks pods against discovery: wait until it has the pod.
    let pod = ObjectKey::new("demo", "server-0");
    eventually(WAIT, || {
        let has = running.mesh.borrow().workloads.contains_key(&pod);
        async move { has.then_some(()) }
    })
    .await
    .expect("discovery sees demo/server-0");
    (running, addr)
}

/// Open an ADS stream with this credential and get an answer to a CDS
/// request: proves Ward's xDS port accepts it.
async fn ads_with(running: &Running, cert: &str, key: &str, node: &str) -> Result<(), String> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(running.xds_ca.trust_bundle_pem()))
        .domain_name("localhost")
        .identity(Identity::from_pem(cert, key));
    let channel = Channel::from_shared(format!("https://{}", running.xds_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: node.into(),
            ..Default::default()
        }),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let resp = tokio::time::timeout(WAIT, stream.message())
        .await
        .map_err(|_| "no CDS response".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("stream closed")?;
    if resp.type_url.ends_with("Cluster") {
        Ok(())
    } else {
        Err(format!("unexpected response {}", resp.type_url))
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_token_gets_exactly_its_credential() {
    let fake = FakeKube::start().await;
    mesh_objects(&fake);
    let tmp = tempfile::tempdir().unwrap();
    let (running, addr) = start_ward(&fake, tmp.path()).await;
    let ca_file = tmp.path().join("xds-ca.pem");
    std::fs::write(&ca_file, running.xds_ca.trust_bundle_pem()).unwrap();
    let ca = running.xds_ca.trust_bundle_pem();
    let url = format!("https://localhost:{}", addr.port());

    fake.add_token(
        "good",
        &["ward"],
        "system:serviceaccount:demo:server",
        Some("server-0"),
    );
    let resp = credential::fetch(&url, &ca, &ca_file, "good")
        .await
        .expect("a bound token for audience ward gets a credential");
    assert_eq!(resp.pod, "demo/server-0");
    assert_eq!(resp.cluster, "server");
    assert_eq!(resp.ca_pem, ca);
    let der = pem_to_der_certs(&resp.cert_pem).unwrap();
    let info = cert_info(&der[0]).unwrap();
    assert!(
        info.subject.contains("CN=demo/server-0"),
        "the credential names the pod: {}",
        info.subject
    );
    assert!(
        info.uri_sans
            .contains(&"spiffe://cluster.local/ns/demo/sa/server".to_string()),
        "and its identity: {:?}",
        info.uri_sans
    );
    assert!(!info.is_ca);

    // The issued credential opens an ADS stream on the xDS port.
    ads_with(&running, &resp.cert_pem, &resp.key_pem, "demo/server-0")
        .await
        .expect("the credential works on the xDS port");

    // Refusals, each with a clear reason.
    fake.add_token(
        "apiserver",
        &["https://kubernetes.default.svc"],
        "system:serviceaccount:demo:server",
        Some("server-0"),
    );
    fake.add_token(
        "stray",
        &["ward"],
        "system:serviceaccount:outside:stray",
        Some("stray-0"),
    );
    fake.add_token(
        "ghost",
        &["ward"],
        "system:serviceaccount:demo:server",
        Some("ghost-0"),
    );
    fake.add_token(
        "wrong-sa",
        &["ward"],
        "system:serviceaccount:demo:client",
        Some("server-0"),
    );
    fake.add_token(
        "unbound",
        &["ward"],
        "system:serviceaccount:demo:server",
        None,
    );
    fake.add_token("user", &["ward"], "alice", Some("server-0"));
    let cases = [
        ("apiserver", 401, "invalid for the target audiences"),
        ("not-a-token", 401, "invalid bearer token"),
        ("stray", 403, "pod outside/stray-0 is not in the mesh"),
        ("ghost", 403, "pod demo/ghost-0 is not in the mesh"),
        (
            "wrong-sa",
            403,
            "pod demo/server-0 runs as service account \"server\", but the token is for \"client\"",
        ),
        ("unbound", 403, "not bound to a pod"),
        ("user", 403, "is not a service account"),
    ];
    for (token, code, reason) in cases {
        match credential::fetch(&url, &ca, &ca_file, token).await {
            Err(CredentialError::Refused { status, message }) => {
                assert_eq!(status, code, "{token}: {message}");
                assert!(message.contains(reason), "{token}: {message}");
            }
            Err(e) => panic!("{token}: unexpected error {e}"),
            Ok(r) => panic!("{token}: got a credential for {}", r.pod),
        }
    }

    // A client that does not trust the xDS CA refuses to talk to Ward.
    let other = ward::ca::Authority::generate_in_memory(TD).unwrap();
    let err = credential::fetch(&url, &other.trust_bundle_pem(), &ca_file, "good")
        .await
        .err()
        .expect("an untrusted server is refused");
    assert!(err.to_string().contains("TLS"), "{err}");

    assert!(fake.count("create", "tokenreviews.authentication.k8s.io") >= 8);
    assert_calls_declared(&fake);
    running.stop(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_init_writes_the_bootstrap_like_ward_bootstrap() {
    let fake = FakeKube::start().await;
    mesh_objects(&fake);
    let tmp = tempfile::tempdir().unwrap();
    let (running, addr) = start_ward(&fake, tmp.path()).await;
    fake.add_token(
        "good",
        &["ward"],
        "system:serviceaccount:demo:server",
        Some("server-0"),
    );
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "good\n").unwrap();
    let ca_file = tmp.path().join("xds-ca.pem");
    std::fs::write(&ca_file, running.xds_ca.trust_bundle_pem()).unwrap();
    let out = tmp.path().join("envoy");

    let sidecar_init = |pod: &'static str, out: std::path::PathBuf| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_ward"))
            .arg("sidecar-init")
            .arg(format!("--ward-url=https://localhost:{}", addr.port()))
            .arg("--token-file")
            .arg(&token_file)
            .arg("--ca-file")
            .arg(&ca_file)
            .arg("--out")
            .arg(out)
            .arg(format!("--xds-addr={}", running.xds_addr))
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", "demo")
            .output()
    };
    let output = sidecar_init("server-0", out.clone()).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let body = std::fs::read_to_string(out.join("envoy.yaml")).unwrap();
    assert!(body.contains(r#"id: "demo/server-0""#), "{body}");
    assert!(body.contains(r#"cluster: "server""#), "{body}");
    assert!(
        body.contains(r#"socket_address: { address: "127.0.0.1", port_value: 15000 }"#),
        "admin on 127.0.0.1:15000: {body}"
    );
    assert!(
        body.contains(&format!("port_value: {}", running.xds_addr.port())),
        "{body}"
    );
    let mode = std::fs::metadata(out.join("xds-client.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let cert = std::fs::read_to_string(out.join("xds-client.crt")).unwrap();
    let key = std::fs::read_to_string(out.join("xds-client.key")).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("xds-ca.crt")).unwrap(),
        running.xds_ca.trust_bundle_pem()
    );
    ads_with(&running, &cert, &key, "demo/server-0")
        .await
        .expect("the written credential works on the xDS port");

    // A pod whose downward-API name does not match the token is refused.
    let output = sidecar_init("client-0", tmp.path().join("other"))
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("credential for pod demo/server-0 but this is demo/client-0"),
        "{stderr}"
    );
    running.stop(Duration::from_secs(2)).await;
}
