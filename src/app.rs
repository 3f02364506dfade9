//! Wiring: builds every component, spawns every task, and stops them all
//! together with a deadline. The only place that spawns long-lived tasks.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::ca::{Authority, CertManager, RotationConfig};
use crate::discovery::DirSource;
use crate::metrics::{Metrics, Sampled};
use crate::xds::{self, MeshCache, ProxyRegistry, TaskCounter, XdsContext, XdsTls};

/// Lifetime of Ward's own xDS serving certificate.
const XDS_SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// `ward serve` settings.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Directory of Kubernetes-style YAML (Services, Pods, EndpointSlices, ConfigMaps).
    pub config_dir: PathBuf,
    /// Where the CA keeps its root (0700 directory, 0600 keys).
    pub state_dir: PathBuf,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub trust_domain: String,
    /// Plaintext xDS that trusts `node.id`; development only.
    pub insecure_xds: bool,
    pub rotation: RotationConfig,
    /// Plugged-in CA: certificate, key and optional chain files.
    pub ca_files: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
    /// Extra DNS names on the xDS serving certificate.
    pub xds_server_names: Vec<String>,
    /// Quiet time after a mesh change before pushing (`--debounce`); zero
    /// pushes every change at once.
    pub push_debounce: Duration,
}

/// A started Ward.
pub struct Running {
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub authority: Arc<Authority>,
    pub registry: Arc<ProxyRegistry>,
    /// Live xDS stream tasks (leak tests, load benchmarks).
    pub stream_tasks: Arc<TaskCounter>,
    /// The certificate manager (rotation benchmarks, leak tests).
    pub certs: CertManager,
    tasks: TaskTracker,
}

impl Running {
    /// Stop every task; give streams `deadline` to finish.
    pub async fn stop(self, deadline: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline of {deadline:?} passed; exiting anyway");
        }
    }

    /// Wait until something cancels the shutdown token (Ctrl-C, a fatal task error).
    pub async fn wait(&self) {
        self.shutdown.cancelled().await;
    }
}

pub fn load_authority(cfg: &ServeConfig) -> anyhow::Result<Authority> {
    match &cfg.ca_files {
        Some((cert, key, chain)) => {
            Authority::from_files(cert, key, chain.as_deref(), &cfg.trust_domain)
                .context("loading the plugged-in CA")
        }
        None => Authority::load_or_generate(&cfg.state_dir, &cfg.trust_domain)
            .context("loading the CA from --state-dir"),
    }
}

/// Build, bind and spawn everything; returns once listeners are bound.
pub async fn start(cfg: ServeConfig) -> anyhow::Result<Running> {
    let authority = Arc::new(load_authority(&cfg)?);
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(ProxyRegistry::new());

    let dir = DirSource::new(cfg.config_dir.clone());
    let meshes = dir.mesh();
    let discovery = dir.status();
    let certs = CertManager::new(authority.clone(), cfg.rotation.clone());
    {
        let c = certs.clone();
        metrics.register_sampled(Sampled::counter(
            "certs_issued",
            "Workload certificates issued",
            move || c.issued_total() as f64,
        ));
        let c = certs.clone();
        metrics.register_sampled(Sampled::counter(
            "cert_signing_failures",
            "Workload certificate signing failures",
            move || c.failures_total() as f64,
        ));
    }
    let (mesh_cache, snapshots) = MeshCache::new(meshes, cfg.trust_domain.clone());
    let mesh_cache = mesh_cache.with_debounce(cfg.push_debounce);
    let stream_tasks = Arc::new(TaskCounter::default());
    {
        let t = stream_tasks.clone();
        metrics.register_sampled(Sampled::gauge(
            "xds_stream_tasks",
            "Live xDS stream tasks (SotW and delta)",
            move || t.get() as f64,
        ));
        let c = certs.clone();
        metrics.register_sampled(Sampled::gauge(
            "cert_subscriptions",
            "Streams subscribed to a workload certificate",
            move || c.status().iter().map(|s| s.subscribers).sum::<usize>() as f64,
        ));
    }

    let xds_listener = TcpListener::bind(cfg.xds_addr)
        .await
        .with_context(|| format!("binding the xDS port {}", cfg.xds_addr))?;
    let admin_listener = TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("binding the admin port {}", cfg.admin_addr))?;
    let xds_addr = xds_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let tls = if cfg.insecure_xds {
        tracing::warn!(
            "--insecure-xds: the xDS port is plaintext and trusts node.id; development only"
        );
        None
    } else {
        let mut dns = vec!["localhost".to_string(), "ward".to_string()];
        dns.extend(cfg.xds_server_names.iter().cloned());
        let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
        if !xds_addr.ip().is_unspecified() && !ips.contains(&xds_addr.ip()) {
            ips.push(xds_addr.ip());
        }
        let cert = authority
            .issue_xds_server(&dns, &ips, XDS_SERVER_CERT_TTL)
            .context("issuing the xDS serving certificate")?;
        Some(XdsTls {
            cert_pem: cert.cert_pem.clone(),
            key_pem: cert.key_pem.expose().to_string(),
            client_ca_pem: authority.trust_bundle_pem(),
        })
    };

    let ctx = Arc::new(XdsContext {
        trust_domain: cfg.trust_domain.clone(),
        snapshots: snapshots.clone(),
        certs: certs.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        insecure: cfg.insecure_xds,
        shutdown: shutdown.clone(),
        stream_tasks: stream_tasks.clone(),
    });
    let admin_state = AdminState {
        registry: registry.clone(),
        metrics: metrics.clone(),
        certs: certs.clone(),
        discovery,
        snapshots,
    };

    // A task that fails brings the whole process down (through the token)
    // rather than leaving a half-working control plane.
    let fatal = |name: &'static str, shutdown: CancellationToken| {
        move |res: Result<(), String>| {
            if let Err(e) = res {
                tracing::error!("{name} failed: {e}");
                shutdown.cancel();
            }
        }
    };
    {
        let on_exit = fatal("directory discovery", shutdown.clone());
        let s = shutdown.clone();
        tasks.spawn(async move { on_exit(dir.run(s).await.map_err(|e| e.to_string())) });
    }
    tasks.spawn(mesh_cache.run(shutdown.clone()));
    tasks.spawn(certs.clone().run(shutdown.clone()));
    {
        let on_exit = fatal("xDS server", shutdown.clone());
        tasks.spawn(async move {
            on_exit(
                xds::serve(ctx, xds_listener, tls)
                    .await
                    .map_err(|e| e.to_string()),
            )
        });
    }
    {
        let on_exit = fatal("admin server", shutdown.clone());
        let s = shutdown.clone();
        tasks.spawn(async move {
            on_exit(
                admin::serve(admin_state, admin_listener, s)
                    .await
                    .map_err(|e| e.to_string()),
            )
        });
    }
    tracing::info!(%xds_addr, %admin_addr, trust_domain = %cfg.trust_domain, "ward started");
    Ok(Running {
        xds_addr,
        admin_addr,
        shutdown,
        authority,
        registry,
        stream_tasks,
        certs,
        tasks,
    })
}
