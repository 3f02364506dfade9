//! HA failover with real Envoy 1.40: two Ward replicas in-process sharing
//! one state directory and one config directory; sidecars bootstrapped with
//! both xDS addresses (`ward bootstrap --xds-addr A,B`). Stopping the
//! replica the sidecars are connected to fails no request, every proxy
//! reconnects to the other replica and ACKs, and later config changes still
//! reach the sidecars. Fails (never skips) when Envoy is missing.
//!
//! Loopback addresses: pod IPs 127.0.20.x, app IPs 127.0.21.x.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::{TD, eventually};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use ward::app::{self, Running, ServeConfig};
use ward::bootstrap::{self, BootstrapOptions};
use ward::ca::RotationConfig;
use ward::discovery::DirSource;
use ward::local::find_envoy;
use ward::model::ObjectKey;

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: server, namespace: ha}
spec:
  selector: {app: server}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata:
  name: server-0
  namespace: ha
  labels: {app: server}
  annotations: {ward.io/app-ip: 127.0.21.20}
spec:
  serviceAccountName: server
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 127.0.20.20}
---
apiVersion: v1
kind: Pod
metadata:
  name: client-0
  namespace: ha
  labels: {app: client}
  annotations: {ward.io/app-ip: 127.0.21.10}
spec:
  serviceAccountName: client
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 127.0.20.10}
"#;

/// Added after the failover: a second Service on the server pods.
const EXTRA: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: after-failover, namespace: ha}
spec:
  selector: {app: server}
  ports: [{name: http, port: 9081, targetPort: http}]
"#;

const CALL: &str = "http://127.0.21.10:8080/call";

fn serve_config(config_dir: &Path, state_dir: &Path) -> ServeConfig {
    ServeConfig {
        config_dir: config_dir.to_path_buf(),
        state_dir: state_dir.to_path_buf(),
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
    }
}

/// Pods this replica serves whose every subscribed type is ACKed at the
/// version last sent (and that have at least CDS, LDS and SDS).
fn synced_pods(ward: &Running) -> BTreeSet<String> {
    ward.registry
        .list()
        .into_iter()
        .filter(|p| {
            ["cds", "lds", "sds"]
                .iter()
                .all(|t| p.types.contains_key(t))
                && p.types
                    .values()
                    .all(|t| t.sent_version.is_some() && t.sent_version == t.acked_version)
        })
        .map(|p| p.pod)
        .collect()
}

fn connected_pods(ward: &Running) -> BTreeSet<String> {
    ward.registry.list().into_iter().map(|p| p.pod).collect()
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

async fn start_envoy(envoy: &Path, bootstrap: &Path, log: &Path) -> Child {
    Command::new(envoy)
        .arg("-c")
        .arg(bootstrap)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "info",
        ])
        .arg("--log-path")
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("Envoy starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_fail_over_to_another_replica_without_failed_requests() {
    let envoy = find_envoy(None)
        .expect("Envoy 1.40 is required for end-to-end tests: run ./dev, or set ENVOY_BIN");
    let tmp = tempfile::tempdir().unwrap();
    let config_dir = tmp.path().join("config");
    let state_dir = tmp.path().join("state");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("mesh.yaml"), MESH).unwrap();

    // Two replicas on one state dir and one config dir, started at the same
    // time: one generates the mesh root and the xDS CA, the other waits for
    // it and loads them.
    let start_a = tokio::spawn(app::start(serve_config(&config_dir, &state_dir)));
    let start_b = tokio::spawn(app::start(serve_config(&config_dir, &state_dir)));
    let a = start_a.await.unwrap().unwrap();
    let b = start_b.await.unwrap().unwrap();
    assert_eq!(
        a.xds_ca.trust_bundle_pem(),
        b.xds_ca.trust_bundle_pem(),
        "replicas share the xDS CA"
    );
    assert_eq!(
        a.authority.trust_bundle_pem(),
        b.authority.trust_bundle_pem(),
        "replicas share the mesh root"
    );
    let mut replicas = [Some(a), Some(b)];
    let addrs = replicas
        .iter()
        .flatten()
        .map(|r| r.xds_addr.to_string())
        .collect::<Vec<_>>()
        .join(",");

    // Sample apps and sidecars, bootstrapped with both replicas' addresses.
    let (mesh, _, errors) = DirSource::load_once(&config_dir).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let apps = CancellationToken::new();
    let mut sidecars: Vec<(ObjectKey, std::net::SocketAddr, PathBuf, Child)> = Vec::new();
    for w in mesh.workloads.values() {
        let upstream = (w.key.name == "client-0").then(|| "http://127.0.20.10:9080/".to_string());
        for port in &w.ports {
            let listener = ward::sample_app::bind(std::net::SocketAddr::new(w.app_ip, port.port))
                .await
                .unwrap();
            tokio::spawn(ward::sample_app::serve(
                listener,
                w.key.name.clone(),
                upstream.clone(),
                apps.clone(),
            ));
        }
        let out = tmp.path().join("sidecars").join(&w.key.name);
        let opts = BootstrapOptions {
            pod: w.key.clone(),
            xds_addr: addrs.clone(),
            envoy_admin: None,
            trust_domain: TD.into(),
            insecure: false,
            credential_ttl: Duration::from_secs(3600),
            delta: false,
        };
        let xds_ca = &replicas[0].as_ref().unwrap().xds_ca;
        let files = bootstrap::write(&opts, &mesh, Some(xds_ca), &out).unwrap();
        let body = std::fs::read_to_string(&files.bootstrap).unwrap();
        assert_eq!(body.matches("- endpoint:").count(), 2, "{body}");
        let log = out.join("envoy.log");
        let child = start_envoy(&envoy, &files.bootstrap, &log).await;
        sidecars.push((w.key.clone(), files.envoy_admin, log, child));
    }
    let pods: BTreeSet<String> = sidecars.iter().map(|s| s.0.to_string()).collect();

    // Every sidecar is connected to exactly one replica, in sync.
    let converged = eventually(Duration::from_secs(30), || async {
        let synced: Vec<BTreeSet<String>> = replicas.iter().flatten().map(synced_pods).collect();
        let all: BTreeSet<String> = synced.iter().flatten().cloned().collect();
        (all == pods).then_some(synced)
    })
    .await;
    let Some(synced) = converged else {
        let logs: Vec<String> = sidecars.iter().map(|s| log_tail(&s.2)).collect();
        panic!(
            "sidecars did not converge; Envoy logs:\n{}",
            logs.join("\n---\n")
        );
    };

    // Constant load through the mesh (bounded in count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let ok_count = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let load = {
        let (stop, ok_count) = (stop.clone(), ok_count.clone());
        tokio::spawn(async move {
            let mut failed = Vec::new();
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            while !stop.load(Ordering::Relaxed)
                && ok_count.load(Ordering::Relaxed) + (failed.len() as u32) < 20_000
            {
                match client.get(CALL).send().await {
                    Ok(r) if r.status().is_success() => {
                        ok_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failed.push(format!(
                        "{}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failed
        })
    };
    let at_least = |n: u32| {
        let ok_count = ok_count.clone();
        async move {
            eventually(Duration::from_secs(20), || async {
                (ok_count.load(Ordering::Relaxed) >= n).then_some(())
            })
            .await
            .unwrap_or_else(|| panic!("fewer than {n} requests succeeded"));
        }
    };
    at_least(20).await;

    // Stop the replica most sidecars are connected to.
    let victim = if synced[0].len() >= synced[1].len() {
        0
    } else {
        1
    };
    let survivor = 1 - victim;
    let moved = synced[victim].clone();
    assert!(!moved.is_empty());
    let stopped = replicas[victim].take().unwrap();
    stopped.stop(Duration::from_secs(2)).await;
    let survivor = replicas[survivor].as_ref().unwrap();

    // Every proxy reconnects to the survivor and ACKs what it sent.
    let failed_over = eventually(Duration::from_secs(30), || async {
        (synced_pods(survivor) == pods && connected_pods(survivor) == pods).then_some(())
    })
    .await;
    if failed_over.is_none() {
        let logs: Vec<String> = sidecars.iter().map(|s| log_tail(&s.2)).collect();
        panic!(
            "sidecars did not reconnect to the other replica (it lists {:?}, in sync: {:?}); Envoy logs:\n{}",
            connected_pods(survivor),
            synced_pods(survivor),
            logs.join("\n---\n")
        );
    }
    let after_failover = ok_count.load(Ordering::Relaxed);
    at_least(after_failover + 20).await;

    // A config change made afterwards reaches the sidecars through the
    // survivor: the client sidecar gets the new Service's cluster.
    std::fs::write(config_dir.join("extra.yaml"), EXTRA).unwrap();
    let client_admin = sidecars
        .iter()
        .find(|s| s.0.name == "client-0")
        .map(|s| s.1)
        .unwrap();
    let seen = eventually(Duration::from_secs(20), || async {
        let body = reqwest::get(format!("http://{client_admin}/clusters"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        body.contains("after-failover").then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "the config change did not reach the client sidecar"
    );
    eventually(Duration::from_secs(20), || async {
        (synced_pods(survivor) == pods).then_some(())
    })
    .await
    .expect("every proxy ACKs the change on the surviving replica");

    stop.store(true, Ordering::Relaxed);
    let failed = load.await.unwrap();
    let ok = ok_count.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the failover, e.g. {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok >= 40, "only {ok} requests ran");
    for (pod, _, log, child) in &mut sidecars {
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "Envoy of {pod} exited:\n{}",
            log_tail(log)
        );
    }

    apps.cancel();
    for (_, _, _, child) in &mut sidecars {
        let _ = child.kill().await;
    }
    survivor.stop(Duration::from_secs(2)).await;
}
