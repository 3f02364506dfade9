//! mTLS modes end to end with real Envoy 1.40 sidecars on loopback
//! (127.0.4.x pods, 127.0.5.x apps). Fails (never skips) when Envoy is
//! missing: install it with `./dev` or set ENVOY_BIN.
//!
//! - `mode_matrix_two_ports_app_tls_and_bad_config_map`: for STRICT,
//!   PERMISSIVE and DISABLE, a mesh sidecar, a plaintext client and a client
//!   with a foreign CA's certificate, accepted or refused on the wire; a
//!   two-port service holding STRICT and DISABLE at once; an app's own TLS
//!   passing through a PERMISSIVE port; a bad ConfigMap leaving the policy
//!   and traffic untouched; `ward describe service`.
//! - `live_switch_under_load_fails_no_request`: DISABLE → PERMISSIVE →
//!   STRICT → PERMISSIVE → DISABLE under constant load.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{TD, eventually};
use ward::ca::RotationConfig;
use ward::local::{LocalMesh, LocalMeshConfig, find_envoy};
use ward::model::{ObjectKey, SpiffeId};
use ward::probe::{self, ClientCert, ServerCheck};
use ward::translate::names::MESH_ALPN;

/// A client pod, a server pod with a two-port service, and (optionally) a
/// pod whose app speaks its own TLS. `{c}` / `{s}` / `{t}` are the last
/// octets of the pods' addresses.
fn mesh_yaml(c: u8, s: u8, t: Option<u8>) -> String {
    let mut y = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: e2e}}
spec:
  selector: {{app: server}}
  ports:
  - {{name: http, port: 9080, targetPort: 8080}}
  - {{name: http-b, port: 9081, targetPort: 8081}}
---
apiVersion: v1
kind: Pod
metadata:
  name: server-0
  namespace: e2e
  labels: {{app: server}}
  annotations: {{ward.io/app-ip: 127.0.5.{s}}}
spec:
  serviceAccountName: server
  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}, {{name: http-b, containerPort: 8081}}]}}]
status: {{podIP: 127.0.4.{s}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: client-0
  namespace: e2e
  labels: {{app: client}}
  annotations: {{ward.io/app-ip: 127.0.5.{c}}}
spec:
  serviceAccountName: client
  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]
status: {{podIP: 127.0.4.{c}}}
"#
    );
    if let Some(t) = t {
        // No container ports: the test runs its own TLS app on 8443.
        y.push_str(&format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: tlsapp, namespace: e2e}}
spec:
  selector: {{app: tlsapp}}
  ports: [{{name: tls, port: 9443, targetPort: 8443}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: tlsapp-0
  namespace: e2e
  labels: {{app: tlsapp}}
  annotations: {{ward.io/app-ip: 127.0.5.{t}}}
spec:
  serviceAccountName: tlsapp
  containers: [{{name: app, image: x}}]
status: {{podIP: 127.0.4.{t}}}
"#
        ));
    }
    y
}

/// The policy ConfigMap under test: service e2e/server, per port.
fn policy_yaml(ports: &str, tlsapp: Option<&str>) -> String {
    let mut y = format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: server-mtls
  namespace: e2e
  labels: {{ward.io/policy: "true"}}
data:
  scope: service
  service: server
  ports: |
{}
"#,
        ports
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    if let Some(mode) = tlsapp {
        y.push_str(&format!(
            r#"---
apiVersion: v1
kind: ConfigMap
metadata:
  name: tlsapp-mtls
  namespace: e2e
  labels: {{ward.io/policy: "true"}}
data: {{scope: service, service: tlsapp, mode: {mode}}}
"#
        ));
    }
    y
}

fn write_atomic(path: &Path, body: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start_mesh(dir: &Path, yaml: &str, policy: &str, client: u8) -> LocalMesh {
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("mesh.yaml"), yaml).unwrap();
    std::fs::write(config_dir.join("policy.yaml"), policy).unwrap();
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
            format!("http://127.0.4.{client}:9080/"),
        )]),
        ca_files: None,
        delta: false,
    };
    let mut mesh = LocalMesh::start(config).await.expect("mesh starts");
    mesh.wait_converged(Duration::from_secs(60))
        .await
        .expect("sidecars converge");
    mesh
}

async fn policy_json(mesh: &LocalMesh) -> serde_json::Value {
    let url = format!("http://{}/debug/policy", mesh.ward.admin_addr);
    reqwest::get(&url).await.unwrap().json().await.unwrap()
}

/// Wait until `service:port` targets `mode` and the rollout toward it is done.
async fn wait_applied(mesh: &LocalMesh, service: &str, port: u16, mode: &str) {
    let done = eventually(Duration::from_secs(60), || async {
        let v = policy_json(mesh).await;
        let p = v["services"][service]["ports"]
            .as_array()?
            .iter()
            .find(|p| p["port"] == port)?
            .clone();
        let clients = if mode == "DISABLE" {
            "plaintext"
        } else {
            "mTLS"
        };
        (p["mode"] == mode
            && p["servers_accept"] == mode
            && p["clients_send"] == clients
            && p["rollout_step"].is_null()
            && v["rollout"].is_null())
        .then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "{service}:{port} did not reach {mode}: {:#}",
        policy_json(mesh).await
    );
}

fn cert(c: &ward::ca::IssuedCert) -> ClientCert {
    ClientCert {
        cert_pem: c.cert_pem.clone(),
        key_pem: c.key_pem.expose().to_string(),
    }
}

/// What a caller got: `Ok(body)` for an HTTP 200, `Err(why)` otherwise.
type Outcome = Result<String, String>;

fn outcome(r: Result<probe::Reply, probe::ProbeError>) -> Outcome {
    match r {
        Ok(r) if r.status == 200 => Ok(r.body),
        Ok(r) => Err(format!("HTTP {}: {}", r.status, r.body)),
        Err(e) => Err(e.to_string()),
    }
}

/// The client app's own call through its sidecar's outbound listener.
async fn mesh_call(client: u8, port: u16) -> Outcome {
    let url = format!("http://127.0.4.{client}:{port}/");
    match reqwest::get(&url).await {
        Ok(r) if r.status().is_success() => Ok(r.text().await.unwrap_or_default()),
        Ok(r) => Err(format!("HTTP {}", r.status())),
        Err(e) => Err(e.to_string()),
    }
}

struct Callers {
    client: u8,
    foreign: ClientCert,
}

impl Callers {
    /// (mesh sidecar, plaintext, foreign CA) against one server port.
    async fn all(&self, server: SocketAddr, service_port: u16) -> [Outcome; 3] {
        [
            mesh_call(self.client, service_port).await,
            outcome(probe::plaintext_get(server, "/", "server").await),
            outcome(
                probe::tls_get(
                    server,
                    "/",
                    "server",
                    Some(&self.foreign),
                    &ServerCheck::None,
                    &[MESH_ALPN],
                )
                .await,
            ),
        ]
    }
}

/// Accepted or refused as `mode` says; the mesh call carries the caller's
/// verified SPIFFE id unless the port is DISABLE.
fn check(mode: &str, port: u16, got: &[Outcome; 3]) {
    let [mesh, plain, foreign] = got;
    let body = mesh
        .as_ref()
        .unwrap_or_else(|e| panic!("{mode} port {port}: mesh sidecar refused: {e}"));
    if mode == "DISABLE" {
        assert!(
            body.contains("caller unknown (plaintext)"),
            "{mode}: {body}"
        );
    } else {
        assert!(
            body.contains("caller spiffe://cluster.local/ns/e2e/sa/client"),
            "{mode} port {port}: mesh call not over verified mTLS: {body}"
        );
    }
    match mode {
        "STRICT" => assert!(
            plain.is_err(),
            "{mode} port {port}: plaintext accepted: {plain:?}"
        ),
        _ => {
            let b = plain
                .as_ref()
                .unwrap_or_else(|e| panic!("{mode} port {port}: plaintext refused: {e}"));
            assert!(b.contains("caller unknown (plaintext)"), "{b}");
        }
    }
    assert!(
        foreign.is_err(),
        "{mode} port {port}: foreign CA accepted: {foreign:?}"
    );
}

/// A TLS "application" with its own (non-mesh) certificate: answers HTTP
/// over TLS with a fixed body. Shows PERMISSIVE passes app TLS through.
async fn start_tls_app(addr: SocketAddr) -> (tokio::task::JoinHandle<()>, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["tlsapp.example".to_string()]).unwrap();
    let c = params.self_signed(&key).unwrap();
    let der = c.der().to_vec();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![c.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let body = "hello from the app's own TLS\n";
                let _ = tls
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (task, der)
}

fn ward_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ward"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_matrix_two_ports_app_tls_and_bad_config_map() {
    let (c, s, t) = (10u8, 20u8, 30u8);
    let tmp = tempfile::tempdir().unwrap();
    let (tls_app, app_cert) = start_tls_app(format!("127.0.5.{t}:8443").parse().unwrap()).await;
    let mesh = start_mesh(
        tmp.path(),
        &mesh_yaml(c, s, Some(t)),
        &policy_yaml("9080: STRICT\n9081: DISABLE", Some("PERMISSIVE")),
        c,
    )
    .await;
    let policy_file = mesh.config.config_dir.join("policy.yaml");
    let port_a: SocketAddr = format!("127.0.4.{s}:8080").parse().unwrap();
    let port_b: SocketAddr = format!("127.0.4.{s}:8081").parse().unwrap();
    let foreign = ward::ca::Authority::load_or_generate(&tmp.path().join("foreign"), TD).unwrap();
    let callers = Callers {
        client: c,
        foreign: cert(
            &foreign
                .issue_workload(
                    &SpiffeId::new(TD, "e2e", "client"),
                    Duration::from_secs(600),
                )
                .unwrap(),
        ),
    };

    // One service, two ports, two modes at once.
    wait_applied(&mesh, "e2e/server", 9080, "STRICT").await;
    wait_applied(&mesh, "e2e/server", 9081, "DISABLE").await;
    check("STRICT", 9080, &callers.all(port_a, 9080).await);
    check("DISABLE", 9081, &callers.all(port_b, 9081).await);

    // The client app's own /call goes through its sidecar too.
    let body = reqwest::get(format!("http://127.0.5.{c}:8080/call"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("caller spiffe://cluster.local/ns/e2e/sa/client"),
        "{body}"
    );

    // PERMISSIVE: an application's own TLS (no ward-mtls ALPN) reaches the
    // app untouched: the client sees the app's certificate, not a mesh one.
    let tls_pod: SocketAddr = format!("127.0.4.{t}:8443").parse().unwrap();
    let own_tls = probe::tls_get(
        tls_pod,
        "/",
        "tlsapp.example",
        None,
        &ServerCheck::None,
        &["h2", "http/1.1"],
    )
    .await
    .expect("app TLS passes through a PERMISSIVE port");
    assert_eq!(own_tls.status, 200);
    assert!(own_tls.body.contains("app's own TLS"), "{}", own_tls.body);
    assert_eq!(
        own_tls.peer_chain[0], app_cert,
        "the app's certificate, untouched"
    );
    // ... and with ward-mtls and a mesh cert, the sidecar terminates mTLS.
    let good = cert(
        &mesh
            .ward
            .authority
            .issue_workload(&SpiffeId::new(TD, "e2e", "probe"), Duration::from_secs(600))
            .unwrap(),
    );
    let roots = ServerCheck::Roots(mesh.ward.authority.trust_bundle_pem());
    let mesh_tls = probe::tls_get(tls_pod, "/", "tlsapp", Some(&good), &roots, &[MESH_ALPN]).await;
    // The sidecar forwards plaintext to a TLS app: the handshake with the
    // sidecar succeeded (mesh cert verified), the app then refuses.
    assert!(
        !matches!(mesh_tls, Err(probe::ProbeError::Handshake { .. })),
        "mesh mTLS handshake with the PERMISSIVE sidecar failed: {mesh_tls:?}"
    );

    // The matrix: both ports through every mode.
    for mode in ["STRICT", "PERMISSIVE", "DISABLE"] {
        write_atomic(
            &policy_file,
            &policy_yaml(&format!("9080: {mode}\nhttp-b: {mode}"), Some("PERMISSIVE")),
        );
        wait_applied(&mesh, "e2e/server", 9080, mode).await;
        wait_applied(&mesh, "e2e/server", 9081, mode).await;
        check(mode, 9080, &callers.all(port_a, 9080).await);
        check(mode, 9081, &callers.all(port_b, 9081).await);
    }

    // Back to STRICT / DISABLE, then a bad edit: unknown port.
    write_atomic(
        &policy_file,
        &policy_yaml("9080: STRICT\n9081: DISABLE", Some("PERMISSIVE")),
    );
    wait_applied(&mesh, "e2e/server", 9080, "STRICT").await;
    wait_applied(&mesh, "e2e/server", 9081, "DISABLE").await;
    write_atomic(
        &policy_file,
        &policy_yaml("9080: DISABLE\n9999: DISABLE", Some("PERMISSIVE")),
    );
    let expected =
        "ConfigMap e2e/server-mtls: data.ports[\"9999\"]: service e2e/server has no port 9999";
    let v = eventually(Duration::from_secs(20), || async {
        let v = policy_json(&mesh).await;
        v["errors"]
            .as_array()?
            .iter()
            .any(|e| {
                format!(
                    "{}: {}: {}",
                    e["object"].as_str().unwrap_or(""),
                    e["field"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                )
                .starts_with(expected)
            })
            .then_some(v)
    })
    .await
    .unwrap_or_else(|| panic!("error not reported in /debug/policy"));
    let port = |v: &serde_json::Value, p: u16| {
        v["services"]["e2e/server"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["port"] == p)
            .unwrap()
            .clone()
    };
    assert_eq!(
        port(&v, 9080)["mode"],
        "STRICT",
        "the last good policy stays in force"
    );
    assert_eq!(port(&v, 9081)["mode"], "DISABLE");
    assert_eq!(port(&v, 9080)["chain"][3]["config_map"], "e2e/server-mtls");
    // Other policies unaffected.
    assert!(
        v["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["config_map"] == "e2e/tlsapp-mtls"),
        "{v:#}"
    );
    // In /debug/config and the metric too.
    let admin = format!("http://{}", mesh.ward.admin_addr);
    let config: serde_json::Value = reqwest::get(format!("{admin}/debug/config"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        config["policy_errors"]
            .to_string()
            .contains("has no port 9999"),
        "{config}"
    );
    let metrics = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("ward_policy_errors 1"), "{metrics}");
    // Traffic and the wire are as before.
    check("STRICT", 9080, &callers.all(port_a, 9080).await);
    check("DISABLE", 9081, &callers.all(port_b, 9081).await);

    // Broken YAML in a data value: the file's last good version stays.
    write_atomic(
        &policy_file,
        &policy_yaml("9080: [DISABLE", Some("PERMISSIVE")),
    );
    let found = eventually(Duration::from_secs(20), || async {
        let v = policy_json(&mesh).await;
        v["errors"]
            .as_array()?
            .iter()
            .any(|e| {
                e["object"] == "ConfigMap e2e/server-mtls"
                    && e["field"] == "data.ports"
                    && e["message"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("is not valid YAML")
            })
            .then_some(v)
    })
    .await
    .unwrap_or_else(|| panic!("YAML error not reported"));
    assert_eq!(port(&found, 9080)["mode"], "STRICT");
    check("STRICT", 9080, &callers.all(port_a, 9080).await);

    // Fixed: errors gone, the new policy applies.
    write_atomic(
        &policy_file,
        &policy_yaml("9080: PERMISSIVE\n9081: DISABLE", Some("PERMISSIVE")),
    );
    wait_applied(&mesh, "e2e/server", 9080, "PERMISSIVE").await;
    assert_eq!(policy_json(&mesh).await["errors"], serde_json::json!([]));

    // Connection counts per filter chain, from the server sidecar's stats.
    let v: serde_json::Value = reqwest::get(format!("{admin}/debug/policy?connections=1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conns = &port(&v, 9080)["connections"];
    assert!(conns["mtls"].as_u64().unwrap() > 0, "{conns}");
    assert!(conns["plaintext"].as_u64().unwrap() > 0, "{conns}");
    assert_eq!(conns["from"], serde_json::json!(["e2e/server-0"]));

    // `ward describe service`, live and offline.
    let out = std::process::Command::new(ward_bin())
        .args(["describe", "service", "e2e/server", "--admin-addr"])
        .arg(mesh.ward.admin_addr.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("port 9080 (name http, targetPort 8080): PERMISSIVE"),
        "{text}"
    );
    assert!(
        text.contains("port (ConfigMap e2e/server-mtls)")
            || text.contains("port PERMISSIVE (ConfigMap e2e/server-mtls)"),
        "{text}"
    );
    assert!(
        text.contains("port 9081 (name http-b, targetPort 8081): DISABLE"),
        "{text}"
    );
    assert!(text.contains("clients send:   plaintext"), "{text}");
    assert!(text.contains("connections:    mTLS "), "{text}");
    let out = std::process::Command::new(ward_bin())
        .args(["describe", "service", "e2e/server", "--config-dir"])
        .arg(&mesh.config.config_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("port 9080 (name http, targetPort 8080): PERMISSIVE"),
        "{text}"
    );
    assert!(text.contains("connections:    not available"), "{text}");

    tls_app.abort();
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_switch_under_load_fails_no_request() {
    let (c, s) = (110u8, 120u8);
    let tmp = tempfile::tempdir().unwrap();
    let mesh = start_mesh(
        tmp.path(),
        &mesh_yaml(c, s, None),
        &policy_yaml("9080: DISABLE", None),
        c,
    )
    .await;
    let policy_file = mesh.config.config_dir.join("policy.yaml");
    let inbound: SocketAddr = format!("127.0.4.{s}:8080").parse().unwrap();
    wait_applied(&mesh, "e2e/server", 9080, "DISABLE").await;

    // Constant load: the client app calls the server through both sidecars.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let started = Instant::now();
            let url = format!("http://127.0.5.{c}:8080/call");
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(240) {
                    break;
                }
                match http.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        failed.lock().unwrap().push(format!("{status}: {body}"));
                    }
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        })
    };
    let served = |n: u64| {
        let ok = ok.clone();
        async move {
            eventually(Duration::from_secs(30), || {
                let ok = ok.clone();
                async move { (ok.load(Ordering::Relaxed) >= n).then_some(()) }
            })
            .await
            .expect("load makes progress")
        }
    };
    served(20).await;

    let mut steps_seen = Vec::new();
    for mode in ["PERMISSIVE", "STRICT", "PERMISSIVE", "DISABLE"] {
        let before = ok.load(Ordering::Relaxed);
        let history_before = policy_json(&mesh).await["history"]
            .as_array()
            .map_or(0, Vec::len);
        write_atomic(&policy_file, &policy_yaml(&format!("9080: {mode}"), None));
        wait_applied(&mesh, "e2e/server", 9080, mode).await;
        // Verified on the wire right after the step: plaintext accepted or refused.
        let plain = probe::plaintext_get(inbound, "/", "server").await;
        match mode {
            "STRICT" => assert!(plain.is_err(), "STRICT: plaintext accepted: {plain:?}"),
            _ => assert_eq!(
                plain.map(|r| r.status).ok(),
                Some(200),
                "{mode}: plaintext refused"
            ),
        }
        let v = policy_json(&mesh).await;
        let steps: Vec<String> = v["history"].as_array().unwrap()[history_before..]
            .iter()
            .map(|h| {
                assert_eq!(h["timed_out"], false, "step timed out: {h}");
                assert_eq!(h["applied"], h["of"], "{h}");
                h["ports"][0].as_str().unwrap().to_string()
            })
            .collect();
        steps_seen.push((mode, steps));
        // Traffic keeps flowing in every state.
        served(before + 20).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let failed = failed.lock().unwrap().clone();
    let total = ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        total + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(total >= 100, "only {total} requests");
    eprintln!("live switch: {total} requests, none failed; steps: {steps_seen:?}");

    // The safe order, step by step.
    let step = |s: &str| format!("e2e/server:9080: {s}");
    assert_eq!(
        steps_seen,
        vec![
            (
                "PERMISSIVE",
                vec![
                    step("servers accept mTLS and plaintext (PERMISSIVE) (target PERMISSIVE)"),
                    step("clients switch to mTLS (target PERMISSIVE)"),
                ]
            ),
            ("STRICT", vec![step("servers go STRICT (target STRICT)")]),
            (
                "PERMISSIVE",
                vec![step("servers go PERMISSIVE (target PERMISSIVE)")]
            ),
            (
                "DISABLE",
                vec![
                    step("clients switch to plaintext (target DISABLE)"),
                    step("servers go DISABLE (target DISABLE)"),
                ]
            ),
        ]
    );
    mesh.stop().await;
}
