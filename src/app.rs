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
use crate::ca::{Authority, CertManager, RootRotation, RootRotator, RotationConfig};
use crate::discovery::{DirSource, KubeSource, MeshNamespaces};
use crate::ha::{LeaderConfig, LeaderElector, PolicyEvents, TrustBundlePublisher};
use crate::metrics::{Metrics, Sampled};
use crate::policy::{PolicyController, RolloutConfig};
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
    /// Rotate the mesh root automatically once it is this old.
    pub root_rotation_interval: Option<Duration>,
    /// mTLS policy rollout: how long one step waits for ACKs before it
    /// proceeds anyway.
    pub policy_step_timeout: Duration,
}

/// `ward serve --kubernetes` settings: discovery from the API server, the
/// CA in a Secret, leader election.
#[derive(Clone)]
pub struct KubeServe {
    /// The API client: in-cluster config or KUBECONFIG in production
    /// (`kube::Client::try_default`), a fake API server in tests.
    pub client: kube::Client,
    /// Which namespaces are in the mesh.
    pub namespaces: MeshNamespaces,
    /// Ward's own namespace: the CA Secret and the Lease live there.
    pub ward_namespace: String,
    /// Name of the CA Secret (`ward-ca`); ignored with `ca_files`.
    pub ca_secret: String,
    /// This replica's name (the pod name), as the Lease holder.
    pub identity: String,
    /// Lease duration (~15 s).
    pub lease_duration: Duration,
    /// Lease renew period (~5 s).
    pub renew_every: Duration,
    /// How often the leader re-checks every trust-bundle ConfigMap.
    pub resync: Duration,
}

impl std::fmt::Debug for KubeServe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeServe")
            .field("namespaces", &self.namespaces)
            .field("ward_namespace", &self.ward_namespace)
            .field("ca_secret", &self.ca_secret)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// A started Ward.
pub struct Running {
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shutdown: CancellationToken,
    /// The mesh CA: signs workload certificates (SDS).
    pub authority: Arc<Authority>,
    /// The xDS CA: signs Ward's xDS serving certificate and the sidecars'
    /// bootstrap credentials. Separate from the mesh CA so that rotating or
    /// replacing the mesh root never invalidates sidecar bootstraps.
    pub xds_ca: Arc<Authority>,
    pub registry: Arc<ProxyRegistry>,
    /// Start and follow mesh root rotations.
    pub rotation: RootRotation,
    /// Kubernetes mode: whether this replica leads (always `false` in
    /// directory mode, where there is nothing to lead).
    pub leader: tokio::sync::watch::Receiver<bool>,
    /// mTLS policy state (what `/debug/policy` shows).
    pub policy: tokio::sync::watch::Receiver<Arc<crate::policy::PolicyStatus>>,
    /// The mesh as discovery sees it (before policy rollout): the
    /// credential endpoint checks pods against it.
    pub mesh: tokio::sync::watch::Receiver<Arc<crate::model::Mesh>>,
    pub trust_domain: String,
    /// The xDS serving certificate and key (none with `--insecure-xds`);
    /// the credential endpoint serves TLS with it too.
    xds_server_cert: Option<(String, String)>,
    /// Live xDS stream tasks (leak tests, load benchmarks).
    pub stream_tasks: Arc<TaskCounter>,
    /// The certificate manager (rotation benchmarks, leak tests).
    pub certs: CertManager,
    tasks: TaskTracker,
}

impl Running {
    /// Stop every task; give streams `deadline` to finish.
    pub async fn stop(&self, deadline: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline of {deadline:?} passed; exiting anyway");
        }
    }

    /// Serve `POST /v1/credential` (`ward sidecar-init`) over TLS on
    /// `addr`, with the xDS serving certificate, checking tokens with
    /// TokenReviews against `client`. Returns the bound address.
    pub async fn serve_credentials(
        &self,
        addr: SocketAddr,
        client: kube::Client,
        ttl: Duration,
    ) -> anyhow::Result<SocketAddr> {
        let Some((cert, key)) = &self.xds_server_cert else {
            anyhow::bail!("--credential-addr needs TLS on xDS (not --insecure-xds)");
        };
        let tls = crate::credential::server_tls(cert, key)?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the credential port {addr}"))?;
        let bound = listener.local_addr()?;
        let svc = crate::credential::CredentialService {
            client,
            xds_ca: self.xds_ca.clone(),
            mesh: self.mesh.clone(),
            trust_domain: self.trust_domain.clone(),
            ttl,
        };
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            if let Err(e) = crate::credential::serve(svc, listener, tls, shutdown.clone()).await {
                tracing::error!("credential endpoint failed: {e}");
                shutdown.cancel();
            }
        });
        tracing::info!(%bound, "credential endpoint started");
        Ok(bound)
    }

    /// Wait until something cancels the shutdown token (Ctrl-C, a fatal task error).
    pub async fn wait(&self) {
        self.shutdown.cancelled().await;
    }
}

/// The xDS CA lives in `<state-dir>/xds/` and is always Ward's own.
pub fn load_xds_ca(state_dir: &std::path::Path, trust_domain: &str) -> anyhow::Result<Authority> {
    Authority::load_or_generate_as(
        &state_dir.join("xds"),
        trust_domain,
        crate::ca::RootKind::Xds,
    )
    .context("loading the xDS CA from --state-dir")
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
    start_with(cfg, None).await
}

/// Like [`start`], with discovery from the Kubernetes API, the CA in a
/// Secret (unless `cfg.ca_files` plugs one in) and leader election;
/// `cfg.config_dir` and `cfg.state_dir` are unused.
pub async fn start_kubernetes(cfg: ServeConfig, kube: KubeServe) -> anyhow::Result<Running> {
    start_with(cfg, Some(kube)).await
}

/// The discovery source of either mode.
enum Source {
    Dir(DirSource),
    Kube(KubeSource),
}

async fn start_with(cfg: ServeConfig, kube: Option<KubeServe>) -> anyhow::Result<Running> {
    let authority = Arc::new(match (&kube, &cfg.ca_files) {
        (Some(k), None) => {
            let api = kube::Api::namespaced(k.client.clone(), &k.ward_namespace);
            crate::ha::load_or_create_ca(&api, &k.ward_namespace, &k.ca_secret, &cfg.trust_domain)
                .await
                .context("loading the CA from its Secret")?
                .0
        }
        _ => load_authority(&cfg)?,
    });
    // The xDS CA must be the same on every replica: sidecars trust it for
    // Ward's serving certificate and present credentials it signed.
    let xds_ca = Arc::new(match &kube {
        Some(k) => {
            let api = kube::Api::namespaced(k.client.clone(), &k.ward_namespace);
            let name = format!("{}-xds", k.ca_secret);
            crate::ha::load_or_create_ca(&api, &k.ward_namespace, &name, &cfg.trust_domain)
                .await
                .context("loading the xDS CA from its Secret")?
                .0
        }
        None => load_xds_ca(&cfg.state_dir, &cfg.trust_domain)?,
    });
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(ProxyRegistry::new());

    let (source, meshes, discovery) = match &kube {
        None => {
            let dir = DirSource::new(cfg.config_dir.clone());
            let (m, s) = (dir.mesh(), dir.status());
            (Source::Dir(dir), m, s)
        }
        Some(k) => {
            let src = KubeSource::new(k.client.clone(), k.namespaces.clone())
                .with_policy_namespace(k.ward_namespace.clone());
            let (m, s) = (src.mesh(), src.status());
            (Source::Kube(src), m, s)
        }
    };
    let discovered = meshes.clone();
    let certs = CertManager::new(authority.clone(), cfg.rotation.clone());
    certs
        .persist_to(cfg.state_dir.join("certs"))
        .context("preparing the certificate store in --state-dir")?;
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
        let c = certs.clone();
        metrics.register_sampled(Sampled::counter(
            "certs_reused",
            "Stored workload certificates reused after a restart instead of re-issued",
            move || c.reused_total() as f64,
        ));
        let c = certs.clone();
        metrics.register_sampled(Sampled::gauge(
            "cert_nearest_expiry_seconds",
            "Seconds until the soonest expiry of a connected proxy's certificate",
            move || {
                c.nearest_expiry()
                    .map(|t| match t.duration_since(std::time::SystemTime::now()) {
                        Ok(d) => d.as_secs_f64(),
                        Err(e) => -e.duration().as_secs_f64(),
                    })
                    .unwrap_or(0.0)
            },
        ));
        let r = registry.clone();
        metrics.register_sampled(Sampled::gauge(
            "proxies_cert_past_80_percent",
            "Connected proxies whose ACKed certificate is past 80% of its lifetime (no ACKed replacement)",
            move || {
                let now = crate::xds::status::unix_now();
                r.list().iter().filter(|p| p.cert.as_ref().is_some_and(|c| c.past(0.8, now))).count() as f64
            },
        ));
    }
    // Discovery → policy controller (applies mTLS modes in safe steps) →
    // the cache that translation reads.
    let (policy, meshes) = PolicyController::new(
        meshes,
        registry.clone(),
        RolloutConfig {
            step_timeout: cfg.policy_step_timeout,
            ..RolloutConfig::default()
        },
    );
    let (mesh_cache, snapshots) = MeshCache::new(meshes, cfg.trust_domain.clone());
    let (rotator, rotation) = RootRotator::new(
        authority.clone(),
        certs.clone(),
        registry.clone(),
        // Root rotation rewrites the root in --state-dir; a plugged-in CA
        // or one kept in a Kubernetes Secret is replaced by its owner.
        (cfg.ca_files.is_none() && kube.is_none()).then(|| cfg.state_dir.clone()),
    );
    let rotator = rotator.with_interval(cfg.root_rotation_interval);
    let policy = policy
        .with_snapshots(snapshots.clone())
        .with_discovery(discovery.clone());
    let policy_status = policy.status();
    {
        let p = policy_status.clone();
        metrics.register_sampled(Sampled::gauge(
            "policy_errors",
            "Current mTLS policy ConfigMap errors (each names the ConfigMap and field)",
            move || p.borrow().errors.len() as f64,
        ));
    }
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
        let cert = xds_ca
            .issue_xds_server(&dns, &ips, XDS_SERVER_CERT_TTL)
            .context("issuing the xDS serving certificate")?;
        Some(XdsTls {
            cert_pem: cert.cert_pem.clone(),
            key_pem: cert.key_pem.expose().to_string(),
            client_ca_pem: xds_ca.trust_bundle_pem(),
        })
    };

    let xds_server_cert = tls
        .as_ref()
        .map(|t| (t.cert_pem.clone(), t.key_pem.clone()));
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
        rotation: rotation.clone(),
        discovery,
        snapshots,
        policy: policy_status.clone(),
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
    let mut leader = tokio::sync::watch::Sender::new(false).subscribe();
    match source {
        Source::Dir(dir) => {
            let on_exit = fatal("directory discovery", shutdown.clone());
            let s = shutdown.clone();
            tasks.spawn(async move { on_exit(dir.run(s).await.map_err(|e| e.to_string())) });
        }
        Source::Kube(src) => {
            let Some(k) = &kube else {
                anyhow::bail!("kubernetes source without kubernetes settings");
            };
            let namespaces = src.namespaces();
            let status = src.status();
            let on_exit = fatal("kubernetes discovery", shutdown.clone());
            let s = shutdown.clone();
            tasks.spawn(async move { on_exit(src.run(s).await.map_err(|e| e.to_string())) });

            let mut lc = LeaderConfig::new(&k.ward_namespace, &k.identity);
            lc.lease_duration = k.lease_duration;
            lc.renew_every = k.renew_every;
            lc.renew_deadline = k.lease_duration * 2 / 3;
            let elector = LeaderElector::new(k.client.clone(), lc);
            leader = elector.is_leader();
            tasks.spawn(elector.run(shutdown.clone()));
            let publisher = TrustBundlePublisher::new(
                k.client.clone(),
                authority.trust_bundle_pem(),
                namespaces,
                leader.clone(),
                k.resync,
            )
            .with_xds_bundle(xds_ca.trust_bundle_pem());
            tasks.spawn(publisher.run(shutdown.clone()));
            let events =
                PolicyEvents::new(k.client.clone(), status, leader.clone(), k.identity.clone());
            tasks.spawn(events.run(shutdown.clone()));
        }
    }
    tasks.spawn(policy.run(shutdown.clone()));
    tasks.spawn(mesh_cache.run(shutdown.clone()));
    tasks.spawn(certs.clone().run(shutdown.clone()));
    tasks.spawn(rotator.run(shutdown.clone()));
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
        xds_ca,
        registry,
        rotation,
        leader,
        policy: policy_status,
        mesh: discovered,
        trust_domain: cfg.trust_domain.clone(),
        xds_server_cert,
        stream_tasks,
        certs,
        tasks,
    })
}
