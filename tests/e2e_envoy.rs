//! End to end with real Envoy 1.40 sidecars on loopback. Fails (never
//! skips) when Envoy is missing: install it with `./dev` or set ENVOY_BIN.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use support::{TD, eventually};
use ward::ca::RotationConfig;
use ward::local::{LocalMesh, LocalMeshConfig, find_envoy};
use ward::model::{ObjectKey, SpiffeId};
use ward::probe::{self, ClientCert, ServerCheck};
use ward::translate::names::MESH_ALPN;

/// The demo topology on its own addresses (127.0.2.x), so this test can run
/// while others use theirs.
const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: server, namespace: e2e}
spec:
  selector: {app: server}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata:
  name: server-0
  namespace: e2e
  labels: {app: server}
  annotations: {ward.io/app-ip: 127.0.3.20}
spec:
  serviceAccountName: server
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 127.0.2.20}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: e2e}
spec:
  selector: {app: server}
  ports: [{name: tcp-echo, port: 9090, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client-0
  namespace: e2e
  labels: {app: client}
  annotations: {ward.io/app-ip: 127.0.3.10}
spec:
  serviceAccountName: client
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 127.0.2.10}
---
# The mesh default is PERMISSIVE; this test checks STRICT refusals.
apiVersion: v1
kind: ConfigMap
metadata:
  name: mesh-mtls
  namespace: e2e
  labels: {ward.io/policy: "true"}
data: {scope: mesh, mode: STRICT}
"#;

const SERVER_INBOUND: &str = "127.0.2.20:8080";

async fn start_mesh(dir: &std::path::Path) -> LocalMesh {
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("mesh.yaml"), MESH).unwrap();
    let envoy = find_envoy(None)
        .expect("Envoy 1.40 is required for end-to-end tests: run ./dev, or set ENVOY_BIN");
    let config = LocalMeshConfig {
        work_dir: dir.to_path_buf(),
        config_dir,
        envoy,
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        trust_domain: TD.into(),
        rotation: RotationConfig::default(),
        upstreams: BTreeMap::from([(
            ObjectKey::new("e2e", "client-0"),
            "http://127.0.2.10:9080/".to_string(),
        )]),
        ca_files: None,
        delta: false,
    };
    let mut mesh = LocalMesh::start(config).await.expect("mesh starts");
    mesh.wait_converged(Duration::from_secs(30))
        .await
        .expect("sidecars converge");
    mesh
}

fn probe_cert(mesh: &LocalMesh, ns: &str, sa: &str) -> ClientCert {
    let c = mesh
        .ward
        .authority
        .issue_workload(&SpiffeId::new(TD, ns, sa), Duration::from_secs(600))
        .unwrap();
    ClientCert {
        cert_pem: c.cert_pem.clone(),
        key_pem: c.key_pem.expose().to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_mesh_with_real_envoy() {
    let tmp = tempfile::tempdir().unwrap();
    let mesh = start_mesh(tmp.path()).await;
    let server: SocketAddr = SERVER_INBOUND.parse().unwrap();

    // A request from the client app, through both sidecars, over mTLS: the
    // server app sees the client's verified SPIFFE id.
    let body = eventually(Duration::from_secs(10), || async {
        let r = reqwest::get("http://127.0.3.10:8080/call").await.ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    })
    .await
    .expect("client → server through the mesh");
    assert!(body.contains("hello from server-0"), "{body}");
    assert!(
        body.contains("caller spiffe://cluster.local/ns/e2e/sa/client"),
        "{body}"
    );

    // Plaintext to the inbound port is refused.
    let plain = probe::plaintext_get(server, "/", "server").await;
    assert!(plain.is_err(), "plaintext accepted: {plain:?}");

    // A client certificate from another CA (claiming the client's id) is refused.
    let foreign = ward::ca::Authority::load_or_generate(&tmp.path().join("foreign"), TD).unwrap();
    let fake = foreign
        .issue_workload(
            &SpiffeId::new(TD, "e2e", "client"),
            Duration::from_secs(600),
        )
        .unwrap();
    let fake = ClientCert {
        cert_pem: fake.cert_pem.clone(),
        key_pem: fake.key_pem.expose().to_string(),
    };
    let forged = probe::tls_get(
        server,
        "/",
        "server",
        Some(&fake),
        &ServerCheck::None,
        &[MESH_ALPN],
    )
    .await;
    assert!(forged.is_err(), "foreign CA accepted: {forged:?}");

    // No client certificate: refused.
    let anon = probe::tls_get(
        server,
        "/",
        "server",
        None,
        &ServerCheck::None,
        &[MESH_ALPN],
    )
    .await;
    assert!(anon.is_err(), "anonymous TLS accepted: {anon:?}");

    // A mesh certificate works, and the server proves the right identity.
    let good = probe_cert(&mesh, "e2e", "probe");
    let roots = ServerCheck::Roots(mesh.ward.authority.trust_bundle_pem());
    let reply = probe::tls_get(server, "/", "server", Some(&good), &roots, &[MESH_ALPN])
        .await
        .expect("mesh client accepted");
    assert_eq!(reply.status, 200);
    let leaf = ward::ca::cert_info(&reply.peer_chain[0]).unwrap();
    assert_eq!(leaf.uri_sans, ["spiffe://cluster.local/ns/e2e/sa/server"]);

    check_with_openssl(&mesh, tmp.path(), &good);
    check_envoy_admin(&mesh).await;
    mesh.stop().await;
}

/// An independent TLS client: openssl verifies the chain to Ward's root and
/// shows the server's SPIFFE id.
fn check_with_openssl(mesh: &LocalMesh, dir: &std::path::Path, client: &ClientCert) {
    let root = dir.join("root.pem");
    let cert = dir.join("probe.pem");
    let key = dir.join("probe.key");
    std::fs::write(&root, mesh.ward.authority.trust_bundle_pem()).unwrap();
    std::fs::write(&cert, &client.cert_pem).unwrap();
    std::fs::write(&key, &client.key_pem).unwrap();
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            SERVER_INBOUND,
            "-verify_return_error",
            "-showcerts",
            "-alpn",
            MESH_ALPN,
        ])
        .arg("-CAfile")
        .arg(&root)
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "openssl s_client:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem_start = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("server certificate shown");
    let pem_end = text[pem_start..].find("-----END CERTIFICATE-----").unwrap() + pem_start + 25;
    let leaf = dir.join("server-leaf.pem");
    std::fs::write(&leaf, &text[pem_start..pem_end]).unwrap();
    let x509 = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-issuer", "-in"])
        .arg(&leaf)
        .output()
        .unwrap();
    let x509 = String::from_utf8_lossy(&x509.stdout);
    assert!(
        x509.contains("URI:spiffe://cluster.local/ns/e2e/sa/server"),
        "{x509}"
    );
    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// Envoy's own view: every resource active, nothing warming, nothing rejected.
async fn check_envoy_admin(mesh: &LocalMesh) {
    for (pod, sidecar) in &mesh.sidecars {
        let dump: serde_json::Value =
            serde_json::from_str(&sidecar.admin_get("/config_dump?include_eds").await.unwrap())
                .unwrap();
        let configs = dump["configs"].as_array().unwrap();
        let by_type = |suffix: &str| {
            configs
                .iter()
                .find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(suffix)))
                .cloned()
                .unwrap_or_default()
        };
        let listeners = by_type("ListenersConfigDump");
        let active = listeners["dynamic_listeners"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!active.is_empty(), "{pod}: listeners");
        for l in &active {
            assert!(
                l["active_state"].is_object(),
                "{pod}: listener not active: {l}"
            );
            assert!(l["warming_state"].is_null(), "{pod}: listener warming: {l}");
            assert!(l["error_state"].is_null(), "{pod}: listener error: {l}");
        }
        let clusters = by_type("ClustersConfigDump");
        assert!(
            clusters["dynamic_warming_clusters"]
                .as_array()
                .is_none_or(|a| a.is_empty()),
            "{pod}: warming clusters: {}",
            clusters["dynamic_warming_clusters"]
        );
        assert!(
            !clusters["dynamic_active_clusters"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        let secrets = by_type("SecretsConfigDump");
        let names: Vec<&str> = secrets["dynamic_active_secrets"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert!(
            names.contains(&"default") && names.contains(&"ROOTCA"),
            "{pod}: secrets {names:?}"
        );
        assert!(
            secrets["dynamic_warming_secrets"]
                .as_array()
                .is_none_or(|a| a.is_empty()),
            "{pod}: warming secrets"
        );
        // Keys never appear in Envoy's dump either (Envoy redacts them).
        assert!(
            !dump.to_string().contains("BEGIN PRIVATE KEY"),
            "{pod}: key in config dump"
        );

        let stats = sidecar
            .admin_get("/stats?filter=update_rejected")
            .await
            .unwrap();
        for line in stats.lines() {
            assert!(line.ends_with(": 0"), "{pod}: rejected update: {line}");
        }
    }
}
