//! Certificate lifecycle with real Envoy: rotation over SDS without dropped
//! connections, restart without re-issue, and a plugged-in intermediate CA
//! checked by an independent client (openssl).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{TD, eventually};
use ward::ca::RotationConfig;
use ward::local::{LocalMesh, LocalMeshConfig, find_envoy};
use ward::model::{ObjectKey, SpiffeId};
use ward::probe::{ClientCert, KeepAlive, ServerCheck};
use ward::translate::names::MESH_ALPN;

/// Server pod `base.20`, client pod `base.10`, apps on `base+1`.
fn mesh_yaml(ns: &str, pods: &str, apps: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {ns}}}
spec:
  selector: {{app: server}}
  ports: [{{name: http, port: 9080, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: server-0
  namespace: {ns}
  labels: {{app: server}}
  annotations: {{ward.io/app-ip: {apps}.20}}
spec:
  serviceAccountName: server
  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]
status: {{podIP: {pods}.20}}
---
apiVersion: v1
kind: Pod
metadata:
  name: client-0
  namespace: {ns}
  labels: {{app: client}}
  annotations: {{ward.io/app-ip: {apps}.10}}
spec:
  serviceAccountName: client
  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]
status: {{podIP: {pods}.10}}
"#
    )
}

fn config(
    dir: &Path,
    ns: &str,
    pods: &str,
    apps: &str,
    rotation: RotationConfig,
) -> LocalMeshConfig {
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("mesh.yaml"), mesh_yaml(ns, pods, apps)).unwrap();
    LocalMeshConfig {
        work_dir: dir.to_path_buf(),
        config_dir,
        envoy: find_envoy(None).expect("Envoy 1.40 is required: run ./dev, or set ENVOY_BIN"),
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        trust_domain: TD.into(),
        rotation,
        upstreams: BTreeMap::from([(
            ObjectKey::new(ns, "client-0"),
            format!("http://{pods}.10:9080/"),
        )]),
        ca_files: None,
        delta: false,
    }
}

fn probe_cert(mesh: &LocalMesh, ns: &str) -> ClientCert {
    let c = mesh
        .ward
        .authority
        .issue_workload(&SpiffeId::new(TD, ns, "probe"), Duration::from_secs(3600))
        .unwrap();
    ClientCert {
        cert_pem: c.cert_pem.clone(),
        key_pem: c.key_pem.expose().to_string(),
    }
}

/// Serial numbers in an Envoy's `/certs`: `field` is `cert_chain` (the
/// certificates it serves) or `ca_cert` (its trust bundle); files written by
/// `ward bootstrap` (the xDS credential and CA) are left out.
async fn envoy_cert_serials(mesh: &LocalMesh, pod: &ObjectKey, field: &str) -> BTreeSet<String> {
    let body = mesh.sidecars[pod].admin_get("/certs").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut out = BTreeSet::new();
    for entry in v["certificates"].as_array().into_iter().flatten() {
        for c in entry[field].as_array().into_iter().flatten() {
            let from_bootstrap = c["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("xds-client.crt") || p.ends_with("xds-ca.crt"));
            if !from_bootstrap && let Some(s) = c["serial_number"].as_str() {
                out.insert(norm(s));
            }
        }
    }
    out
}

async fn envoy_serials(mesh: &LocalMesh, pod: &ObjectKey) -> BTreeSet<String> {
    envoy_cert_serials(mesh, pod, "cert_chain").await
}

async fn stat(mesh: &LocalMesh, pod: &ObjectKey, name: &str) -> u64 {
    let body = mesh.sidecars[pod]
        .admin_get(&format!("/stats?filter=^{name}$"))
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn leaf_serial(chain: &[Vec<u8>]) -> String {
    norm(&ward::ca::cert_info(&chain[0]).unwrap().serial)
}

/// Envoy prints serials with leading zero nibbles; compare without them.
fn norm(serial: &str) -> String {
    serial.trim_start_matches('0').to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_over_sds_keeps_connections_and_pushes_only_secrets() {
    let tmp = tempfile::tempdir().unwrap();
    let rotation = RotationConfig {
        ttl: Duration::from_secs(8),
        rotate_at: 0.5,
        jitter: 0.05,
        ..RotationConfig::default()
    };
    let mut mesh = LocalMesh::start(config(tmp.path(), "rot", "127.0.9", "127.0.10", rotation))
        .await
        .unwrap();
    mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    let server_pod = ObjectKey::new("rot", "server-0");
    let client_pod = ObjectKey::new("rot", "client-0");
    let server: SocketAddr = "127.0.9.20:8080".parse().unwrap();

    // Connections opened before the first rotation: TLS straight to the
    // server sidecar, and plaintext through the client sidecar (whose
    // upstream mTLS connection is pooled).
    let probe = probe_cert(&mesh, "rot");
    let roots = ServerCheck::Roots(mesh.ward.authority.trust_bundle_pem());
    let mut direct = KeepAlive::tls(server, "server", Some(&probe), &roots, &[MESH_ALPN])
        .await
        .unwrap();
    let first_serial = leaf_serial(&direct.peer_chain);
    let mut via_mesh = KeepAlive::plaintext("127.0.9.10:9080".parse().unwrap(), "server")
        .await
        .unwrap();
    assert_eq!(direct.get("/").await.unwrap().status, 200);
    assert_eq!(via_mesh.get("/").await.unwrap().status, 200);

    let lds_before = stat(&mesh, &server_pod, "listener_manager.lds.update_success").await;
    let cds_before = stat(&mesh, &server_pod, "cluster_manager.cds.update_success").await;
    let client_lds_before = stat(&mesh, &client_pod, "listener_manager.lds.update_success").await;

    // Watch Envoy's own /certs until three rotations have happened, using
    // both old connections all along.
    let mut seen = envoy_serials(&mesh, &server_pod).await;
    assert!(seen.contains(&first_serial));
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut requests = 0;
    while seen.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "only {} serials seen: {seen:?}",
            seen.len()
        );
        let r = direct
            .get("/")
            .await
            .expect("old TLS connection keeps working");
        assert_eq!(r.status, 200);
        let r = via_mesh
            .get("/")
            .await
            .expect("old mesh connection keeps working");
        assert_eq!(r.status, 200, "{}", r.body);
        requests += 2;
        seen.extend(envoy_serials(&mesh, &server_pod).await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(requests > 10);

    // A new handshake presents the newest certificate: the one Ward holds now.
    let newest = eventually(Duration::from_secs(5), || async {
        let fresh = KeepAlive::tls(server, "server", Some(&probe), &roots, &[MESH_ALPN])
            .await
            .ok()?;
        let serial = leaf_serial(&fresh.peer_chain);
        let current = envoy_serials(&mesh, &server_pod).await;
        (current.len() == 1 && current.contains(&serial)).then_some(serial)
    })
    .await
    .expect("a new handshake presents the newest certificate");
    assert_ne!(newest, first_serial);
    let info = ward::ca::cert_info(
        &KeepAlive::tls(server, "server", Some(&probe), &roots, &[MESH_ALPN])
            .await
            .unwrap()
            .peer_chain[0],
    )
    .unwrap();
    assert_eq!(info.uri_sans, ["spiffe://cluster.local/ns/rot/sa/server"]);
    assert!(
        info.not_after > std::time::SystemTime::now(),
        "fresh notAfter"
    );

    // Rotation pushed secrets only: no listener or cluster update in Envoy.
    assert_eq!(
        stat(&mesh, &server_pod, "listener_manager.lds.update_success").await,
        lds_before
    );
    assert_eq!(
        stat(&mesh, &server_pod, "cluster_manager.cds.update_success").await,
        cds_before
    );
    assert_eq!(
        stat(&mesh, &client_pod, "listener_manager.lds.update_success").await,
        client_lds_before
    );
    assert!(stat(&mesh, &server_pod, "sds.default.update_success").await >= 4);

    // Ward's view agrees: every proxy ACKed its current certificate.
    let certs: serde_json::Value =
        reqwest::get(format!("http://{}/debug/certs", mesh.ward.admin_addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let text = certs.to_string();
    assert!(
        !text.contains("PRIVATE KEY"),
        "keys never appear in /debug/certs"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_traffic_flowing_and_reuses_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        "restart",
        "127.0.9",
        "127.0.10",
        RotationConfig::default(),
    );
    // Use other addresses than the rotation test: it may run at the same time.
    let yaml = mesh_yaml("restart", "127.0.11", "127.0.12");
    std::fs::write(cfg.config_dir.join("mesh.yaml"), yaml).unwrap();
    let mut cfg = cfg;
    cfg.upstreams = BTreeMap::from([(
        ObjectKey::new("restart", "client-0"),
        "http://127.0.11.10:9080/".into(),
    )]);
    // A fixed xDS port, so sidecars find Ward again after the restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.xds_addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut mesh = LocalMesh::start(cfg).await.unwrap();
    mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    let root_before = mesh.ward.authority.trust_bundle_pem();
    let issued_before: serde_json::Value =
        reqwest::get(format!("http://{}/debug/certs", mesh.ward.admin_addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let serials_before: BTreeSet<String> = issued_before["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["serial"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(serials_before.len(), 2);

    let call = || async {
        let r = reqwest::get("http://127.0.12.10:8080/call").await.ok()?;
        r.status().is_success().then_some(())
    };
    assert!(call().await.is_some());

    // Stop Ward; the sidecars keep serving on their current certificates.
    let admin = mesh.ward.admin_addr;
    mesh.restart_ward(async || {
        assert!(
            reqwest::get(format!("http://{admin}/healthz"))
                .await
                .is_err(),
            "Ward is down"
        );
        for _ in 0..5 {
            assert!(
                call().await.is_some(),
                "traffic continues while Ward is down"
            );
        }
    })
    .await
    .unwrap();

    // Ward returns with the same root; every proxy reconnects and ACKs, and
    // no certificate was re-issued.
    assert_eq!(
        mesh.ward.authority.trust_bundle_pem(),
        root_before,
        "same root after restart"
    );
    mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    let after: serde_json::Value =
        reqwest::get(format!("http://{}/debug/certs", mesh.ward.admin_addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(after["issued"], 0, "no certificate re-issued: {after}");
    assert_eq!(after["reused_from_store"], 2, "{after}");
    let serials_after: BTreeSet<String> = after["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["serial"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(serials_after, serials_before);
    let proxies = mesh.ward.registry.list();
    assert_eq!(proxies.len(), 2);
    assert!(call().await.is_some());
    mesh.stop().await;
}

/// A user root and intermediate made by openssl (an independent tool).
fn openssl_intermediate(
    dir: &Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "[root]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n\
         [int]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "root.key",
    ]);
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "root.key",
        "-subj",
        "/O=Example Corp/CN=Example Root CA",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "root.crt",
    ]);
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "int.key",
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        "int.key",
        "-subj",
        "/O=Example Corp/CN=Example Mesh Intermediate",
        "-config",
        "/dev/null",
        "-out",
        "int.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "int.csr",
        "-CA",
        "root.crt",
        "-CAkey",
        "root.key",
        "-CAcreateserial",
        "-days",
        "20",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "int",
        "-out",
        "int.crt",
    ]);
    (
        dir.join("int.crt"),
        dir.join("int.key"),
        dir.join("root.crt"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugged_in_intermediate_chain_verifies_with_openssl() {
    let tmp = tempfile::tempdir().unwrap();
    let (int_crt, int_key, root_crt) = openssl_intermediate(tmp.path());
    let mut cfg = config(
        tmp.path(),
        "plug",
        "127.0.13",
        "127.0.14",
        RotationConfig::default(),
    );
    cfg.ca_files = Some((int_crt, int_key, Some(root_crt.clone())));
    let mut mesh = LocalMesh::start(cfg).await.unwrap();
    mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    let r = eventually(Duration::from_secs(10), || async {
        let r = reqwest::get("http://127.0.14.10:8080/call").await.ok()?;
        r.status().is_success().then_some(r.text().await.ok()?)
    })
    .await
    .expect("traffic flows with the plugged-in CA");
    assert!(
        r.contains("caller spiffe://cluster.local/ns/plug/sa/client"),
        "{r}"
    );

    // openssl: leaf → intermediate → user root, verified against the user root only.
    let probe = probe_cert(&mesh, "plug");
    std::fs::write(tmp.path().join("probe.crt"), &probe.cert_pem).unwrap();
    std::fs::write(tmp.path().join("probe.key"), &probe.key_pem).unwrap();
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            "127.0.13.20:8080",
            "-verify_return_error",
            "-showcerts",
            "-alpn",
            MESH_ALPN,
        ])
        .args([
            "-CAfile",
            root_crt.to_str().unwrap(),
            "-cert",
            "probe.crt",
            "-key",
            "probe.key",
        ])
        .current_dir(tmp.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(
        text.contains("CN=Example Mesh Intermediate")
            || text.contains("CN = Example Mesh Intermediate"),
        "{text}"
    );
    let chain_len = text.matches("-----BEGIN CERTIFICATE-----").count();
    assert_eq!(chain_len, 2, "leaf + intermediate presented:\n{text}");
    // The trust bundle Envoy uses is the user root.
    assert!(
        mesh.ward.authority.trust_bundle_pem().contains(
            std::fs::read_to_string(&root_crt)
                .unwrap()
                .lines()
                .nth(1)
                .unwrap()
        )
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_under_load_fails_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let mut mesh = LocalMesh::start(config(
        tmp.path(),
        "rootrot",
        "127.0.15",
        "127.0.16",
        RotationConfig::default(),
    ))
    .await
    .unwrap();
    mesh.wait_converged(Duration::from_secs(30)).await.unwrap();
    let old_root = norm(&mesh.ward.authority.signing_cert().serial);
    let admin = mesh.ward.admin_addr;

    // Constant load through the mesh (bounded in count and time).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let client = reqwest::Client::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && ok + (failed.len() as u32) < 20_000
            {
                match client.get("http://127.0.16.10:8080/call").send().await {
                    Ok(r) if r.status().is_success() => ok += 1,
                    Ok(r) => failed.push(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed)
        })
    };

    let resp = reqwest::Client::new()
        .post(format!("http://{admin}/ca/rotate"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let done = eventually(Duration::from_secs(60), || async {
        let v: serde_json::Value = reqwest::get(format!("http://{admin}/debug/certs"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let phase = v["root_rotation"]["phase"].as_str()?.to_string();
        assert_ne!(phase, "failed", "{v}");
        (phase == "done").then_some(v)
    })
    .await
    .expect("root rotation completes");
    let new_root = done["root_rotation"]["new_root"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_root, old_root);

    // Keep the load going a little after the switch, then stop it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed requests, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 20, "only {ok} requests ran during the rotation");

    // ROOTCA holds only the new root in every Envoy, and every leaf chains to it.
    for pod in mesh.sidecars.keys() {
        let cas = envoy_cert_serials(&mesh, pod, "ca_cert").await;
        assert_eq!(
            cas,
            BTreeSet::from([new_root.clone()]),
            "{pod}'s trust bundle"
        );
    }
    let certs: serde_json::Value = reqwest::get(format!("http://{admin}/debug/certs"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bundle = certs["trust_bundle"].as_array().unwrap();
    assert_eq!(bundle.len(), 1);
    assert_eq!(norm(bundle[0]["serial"].as_str().unwrap()), new_root);
    for c in certs["certificates"].as_array().unwrap() {
        assert_eq!(
            c["issuer"], bundle[0]["subject"],
            "leaf issued by the new root: {c}"
        );
        for e in c["envoy"].as_array().unwrap() {
            assert_eq!(
                e["acked_current"], true,
                "Envoy serves the current leaf: {c}"
            );
        }
    }
    // New handshakes through the mesh work on the new root.
    let r = reqwest::get("http://127.0.16.10:8080/call").await.unwrap();
    assert!(r.status().is_success());
    // The new root is what a restart will load.
    let on_disk = std::fs::read_to_string(tmp.path().join("state/ca/root.crt")).unwrap();
    let der = ward::ca::pem_to_der_certs(&on_disk).unwrap();
    assert_eq!(
        norm(&ward::ca::cert_info(&der[0]).unwrap().serial),
        new_root
    );
    mesh.stop().await;
}
