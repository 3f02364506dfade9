//! Twenty-two real Envoy sidecars (delta xDS) on 127.0.7.x converge, and
//! converge again after an endpoint change. Fails (never skips) without
//! Envoy.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use support::{TD, eventually};
use ward::ca::RotationConfig;
use ward::local::{LocalMesh, LocalMeshConfig, find_envoy};

const SIDECARS: usize = 22;
const SERVICES: usize = 4;

fn pod(out: &mut String, name: &str, svc: usize, ip: &str, app_ip: &str) {
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: scale\n  \
         labels: {{app: svc-{svc}}}\n  annotations: {{ward.io/app-ip: {app_ip}}}\n\
         spec:\n  serviceAccountName: sa-{svc}\n  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]\n\
         status: {{podIP: {ip}}}\n"
    );
}

fn mesh(extra: bool) -> String {
    let mut out = String::new();
    for i in 0..SERVICES {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: scale}}\n\
             spec:\n  selector: {{app: svc-{i}}}\n  ports: [{{name: http, port: {}, targetPort: http}}]\n",
            9100 + i
        );
    }
    for j in 0..SIDECARS {
        pod(
            &mut out,
            &format!("pod-{j}"),
            j % SERVICES,
            &format!("127.0.7.{}", 10 + j),
            &format!("127.0.7.{}", 110 + j),
        );
    }
    if extra {
        // Not started as a sidecar: only an endpoint for everyone else.
        let mut body = String::new();
        pod(&mut body, "late-0", 0, "127.0.7.200", "127.0.7.201");
        out.push_str(&body);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_two_envoys_converge_after_an_endpoint_change() {
    let tmp = tempfile::tempdir().unwrap();
    let config_dir = tmp.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("mesh.yaml"), mesh(false)).unwrap();
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
        upstreams: BTreeMap::new(),
        delta: true,
        ca_files: None,
    };
    let started = Instant::now();
    let mut mesh_run = LocalMesh::start(config).await.expect("mesh starts");
    assert_eq!(mesh_run.sidecars.len(), SIDECARS);
    mesh_run
        .wait_converged(Duration::from_secs(90))
        .await
        .expect("every sidecar converges");
    let first = started.elapsed();
    assert_eq!(mesh_run.ward.registry.len(), SIDECARS);

    // The change: one more endpoint of svc-0, learned by every sidecar.
    let changed = Instant::now();
    let tmpfile = config_dir.join(".mesh.yaml.tmp");
    std::fs::write(&tmpfile, mesh(true)).unwrap();
    std::fs::rename(&tmpfile, config_dir.join("mesh.yaml")).unwrap();
    for (pod, sidecar) in &mesh_run.sidecars {
        let seen = eventually(Duration::from_secs(30), || async {
            let c = sidecar.admin_get("/clusters").await.ok()?;
            c.contains("outbound|scale|svc-0|9100::127.0.7.200:8080")
                .then_some(())
        })
        .await;
        assert!(seen.is_some(), "{pod} did not learn the new endpoint");
    }
    mesh_run
        .wait_converged(Duration::from_secs(30))
        .await
        .expect("every sidecar ACKed the change");
    eprintln!(
        "{SIDECARS} Envoy sidecars: initial convergence {:.1} s, endpoint change → all ACKed {:.2} s",
        first.as_secs_f64(),
        changed.elapsed().as_secs_f64()
    );
    mesh_run.stop().await;
}
