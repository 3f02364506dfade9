//! The `ward` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use ward::app::{self, ServeConfig};
use ward::ca::RotationConfig;
use ward::discovery::DirSource;
use ward::model::{DEFAULT_TRUST_DOMAIN, ObjectKey};

/// mimalloc instead of glibc malloc for the `ward` binary: thousands of
/// streams connecting at once allocate and free large transient buffers
/// (initial responses, their encoding), and glibc kept that memory in its
/// arenas: 663 KB RSS per connected proxy at N=1,000, S=1,000 with glibc,
/// 320 KB with mimalloc (BENCHMARKS.md; at S=100 it costs ~10 %).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the `mi_option_e` enum of the bundled
/// mimalloc v3 (`mimalloc.h`; the sys crate names only older options).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Return freed pages to the OS at once instead of after 10 ms: after the
/// connect burst mimalloc otherwise kept more resident than glibc at
/// S=100 (166 vs 143 KB per proxy at N=1,000; 136 KB with this).
fn tune_allocator() {
    // SAFETY: sets a process-wide integer option; mimalloc reads options
    // atomically and allows setting them at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

#[derive(Parser)]
#[command(
    name = "ward",
    version,
    about = "Mutual TLS for every service in the mesh: an Envoy xDS control plane with a built-in CA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: xDS (ADS) for sidecars, the CA, and the admin API.
    Serve(Box<ServeArgs>),
    /// Write an Envoy sidecar bootstrap and its xDS credential for one pod.
    Bootstrap(BootstrapArgs),
    /// Init container: get this pod's xDS credential from Ward with its
    /// service-account token and write the bootstrap (Kubernetes).
    SidecarInit(SidecarInitArgs),
    /// Init container for pods annotated `ward.io/interception: redirect`:
    /// iptables rules that send the pod's TCP traffic through its sidecar
    /// (needs NET_ADMIN and NET_RAW, uid 0).
    RedirectInit(RedirectInitArgs),
    /// Bring up a local mesh on loopback with real Envoy sidecars and verify mTLS.
    Demo(ward::demo::DemoArgs),
    /// Show connected proxies and what they ACKed (from a running Ward's admin API).
    Status(StatusArgs),
    /// Certificate authority operations on a running Ward.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Explain an object's mTLS policy (`ward describe service NAMESPACE/NAME`).
    #[command(subcommand)]
    Describe(DescribeCommand),
    /// A small HTTP app used by the demo and tests (knows nothing of TLS).
    #[command(hide = true)]
    SampleApp(SampleAppArgs),
}

#[derive(Args, Clone)]
struct CommonArgs {
    /// Directory of Kubernetes-style YAML: Services, Pods, EndpointSlices, policy ConfigMaps
    /// (required unless `serve --kubernetes`).
    #[arg(long, env = "WARD_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Where Ward keeps its CA (created 0700; keys 0600).
    #[arg(long, env = "WARD_STATE_DIR", default_value = ".ward")]
    state_dir: PathBuf,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "WARD_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Plaintext xDS that trusts node.id (development only; serve and bootstrap must agree).
    #[arg(long)]
    insecure_xds: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// xDS (ADS, gRPC over mutual TLS) listen address.
    #[arg(long, env = "WARD_XDS_ADDR", default_value = "127.0.0.1:15010")]
    xds_addr: SocketAddr,
    /// Admin HTTP listen address (/healthz /readyz /metrics /debug/...).
    #[arg(long, env = "WARD_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
    admin_addr: SocketAddr,
    /// With --kubernetes: serve `ward sidecar-init` credentials (HTTPS,
    /// POST /v1/credential) on this address.
    #[arg(long, env = "WARD_CREDENTIAL_ADDR")]
    credential_addr: Option<SocketAddr>,
    /// Lifetime of the xDS credentials the credential endpoint issues.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    sidecar_credential_ttl: Duration,
    /// Lifetime of workload certificates (e.g. 1h, 10m, 30s).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Fraction of the lifetime after which a certificate is re-issued.
    #[arg(long, default_value_t = 0.5)]
    rotate_at: f64,
    /// Random spread of rotation time, as a fraction of the lifetime.
    #[arg(long, default_value_t = 0.05)]
    rotate_jitter: f64,
    /// Plugged-in CA certificate (a root, or an intermediate with --ca-chain); PEM.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert; PEM.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Certificates from the intermediate's issuer up to the root; PEM.
    #[arg(long, requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    /// Rotate the mesh root automatically (with no downtime) once it is this old, e.g. 90d.
    #[arg(long, value_parser = humantime::parse_duration)]
    root_rotation_interval: Option<Duration>,
    /// Extra DNS names for the xDS serving certificate (repeatable).
    #[arg(long = "xds-server-name")]
    xds_server_names: Vec<String>,
    /// mTLS policy rollout: how long one step waits for every affected proxy
    /// to ACK before proceeding anyway (with a warning).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    policy_step_timeout: Duration,
    /// Quiet time after a mesh change before pushing to sidecars; changes
    /// within it go out as one push. 0 (the default) pushes at once: the
    /// directory watcher already coalesces file events.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    debounce: Duration,
    /// Seconds to let streams finish on shutdown.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_deadline: Duration,
    #[command(flatten)]
    kube: KubeArgs,
}

/// `ward serve --kubernetes`: discovery from the API server (in-cluster
/// config or KUBECONFIG), the CA in a Secret, leader election.
#[derive(Args)]
struct KubeArgs {
    /// Read Services, EndpointSlices, Pods and policy ConfigMaps from the Kubernetes API
    /// instead of --config-dir; keep the CA in a Secret; elect a leader with a Lease.
    #[arg(long, env = "WARD_KUBERNETES")]
    kubernetes: bool,
    /// Which namespaces are in the mesh: `all`, or a namespace label selector.
    #[arg(
        long,
        env = "WARD_MESH_NAMESPACES",
        default_value = "ward.io/mesh=enabled"
    )]
    mesh_namespaces: ward::discovery::MeshNamespaces,
    /// Ward's own namespace (the CA Secret and the leader Lease live there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ward-system")]
    ward_namespace: String,
    /// Name of the Secret holding the CA (ca.crt, ca.key[, chain.crt]); created if absent.
    #[arg(long, env = "WARD_CA_SECRET", default_value = ward::ha::CA_SECRET)]
    ca_secret: String,
    /// This replica's identity in the leader Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long the leader Lease lasts without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// How often the leader renews (and followers retry).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    lease_renew: Duration,
}

#[derive(Args)]
struct BootstrapArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The pod whose sidecar this is: NAMESPACE/NAME.
    #[arg(long)]
    pod: ObjectKey,
    /// Output directory for envoy.yaml and the credential.
    #[arg(long)]
    out: PathBuf,
    /// Where the sidecar reaches Ward's xDS port: HOST:PORT, or several
    /// comma-separated (one per replica; a failed ADS stream reconnects to
    /// another).
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds_addr: String,
    /// Envoy admin address (default: the pod IP, port 15000).
    #[arg(long)]
    envoy_admin: Option<SocketAddr>,
    /// Lifetime of the xDS client credential.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    credential_ttl: Duration,
    /// Use incremental (delta) xDS: `api_type: DELTA_GRPC` in the bootstrap.
    #[arg(long)]
    delta: bool,
}

#[derive(Args)]
struct SidecarInitArgs {
    /// Ward's credential endpoint.
    #[arg(
        long,
        env = "WARD_URL",
        default_value = "https://ward.ward-system.svc:15012"
    )]
    ward_url: String,
    /// The projected service-account token (audience `ward`).
    #[arg(long, default_value = "/var/run/secrets/ward/token")]
    token_file: PathBuf,
    /// CA bundle that verifies Ward (key `xds-ca.pem` of ConfigMap ward-trust-bundle).
    #[arg(long, default_value = "/var/run/ward-trust-bundle/xds-ca.pem")]
    ca_file: PathBuf,
    /// Output directory for envoy.yaml and the credential (an emptyDir).
    #[arg(long)]
    out: PathBuf,
    /// Where the sidecar reaches Ward's xDS port (HOST:PORT, or several comma-separated).
    #[arg(long, default_value = "ward.ward-system.svc:15010")]
    xds_addr: String,
    /// Envoy's admin listener.
    #[arg(long, default_value = "127.0.0.1:15000")]
    envoy_admin: SocketAddr,
    /// SPIFFE trust domain (Ward's xDS server identity is spiffe://TD/ward).
    #[arg(long, env = "WARD_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// This pod's name (downward API).
    #[arg(long, env = "POD_NAME")]
    pod_name: String,
    /// This pod's namespace (downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: String,
}

#[derive(Args)]
struct StatusArgs {
    /// Admin address of a running Ward.
    #[arg(long, env = "WARD_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
    admin_addr: SocketAddr,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Rotate the mesh root with no downtime: distribute a bundle with both
    /// roots, re-issue every leaf from the new root, then retire the old one.
    Rotate {
        /// Admin address of the running Ward.
        #[arg(long, env = "WARD_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
        admin_addr: SocketAddr,
        /// Follow progress until the rotation is done (or failed).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
enum DescribeCommand {
    /// Per port: effective mTLS mode, the policy chain behind it, what
    /// clients send, the rollout step, and connection counts when available.
    Service(DescribeServiceArgs),
}

#[derive(Args)]
struct DescribeServiceArgs {
    /// The service: NAMESPACE/NAME.
    service: ObjectKey,
    /// Read policies offline from this directory (the one `ward serve` reads).
    #[arg(long, env = "WARD_CONFIG_DIR", required_unless_present = "admin_addr")]
    config_dir: Option<PathBuf>,
    /// Ask a running Ward instead (its /debug/policy: live rollout state),
    /// and the server sidecars' Envoy admin for connection counts.
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
    /// Port of the sidecars' Envoy admin on the pod IP.
    #[arg(long, default_value_t = ward::policy::explain::DEFAULT_ENVOY_ADMIN_PORT)]
    envoy_admin_port: u16,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RedirectInitArgs {
    /// The sidecar's uid: its own connections are not redirected.
    #[arg(long, default_value_t = ward::redirect_init::ENVOY_UID)]
    proxy_uid: u32,
    /// The sidecar's gid, exempt as well.
    #[arg(long, default_value_t = ward::redirect_init::ENVOY_UID)]
    proxy_gid: u32,
    /// Incoming ports not redirected (comma-separated; Envoy's admin port by default).
    #[arg(long, default_value = "15000", value_parser = ward::redirect_init::parse_ports)]
    exclude_inbound_ports: std::vec::Vec<u16>,
    /// Outgoing destination ports not redirected (comma-separated).
    #[arg(long, default_value = "", value_parser = ward::redirect_init::parse_ports)]
    exclude_outbound_ports: std::vec::Vec<u16>,
    /// Outgoing destinations not redirected (comma-separated IPv4 CIDRs).
    #[arg(long, default_value = "", value_parser = ward::redirect_init::parse_cidrs)]
    exclude_outbound_cidrs: std::vec::Vec<ipnet::Ipv4Net>,
    /// iptables command (`iptables`, `iptables-legacy`, `iptables-nft`);
    /// `<command>-restore` must exist beside it.
    #[arg(long, default_value = "iptables")]
    iptables: String,
    /// Print the rules instead of applying them.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct SampleAppArgs {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    name: String,
    /// URL to call on GET /call.
    #[arg(long)]
    upstream: Option<String>,
}

fn redirect_init(a: RedirectInitArgs) -> anyhow::Result<()> {
    let rules = ward::redirect_init::RedirectRules {
        proxy_uid: a.proxy_uid,
        proxy_gid: a.proxy_gid,
        exclude_inbound_ports: a.exclude_inbound_ports,
        exclude_outbound_ports: a.exclude_outbound_ports,
        exclude_outbound_cidrs: a.exclude_outbound_cidrs,
    };
    if a.dry_run {
        print!("{}", rules.restore_input(&ward::redirect_init::JUMPS));
        return Ok(());
    }
    let applied = rules.apply(&a.iptables)?;
    tracing::info!(rules = %applied, "traffic redirection installed");
    Ok(())
}

fn init_tracing() {
    let filter = EnvFilter::try_from_env("WARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tune_allocator();
    init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => serve(*a).await,
        Command::Bootstrap(a) => bootstrap(a),
        Command::SidecarInit(a) => sidecar_init(a).await,
        Command::RedirectInit(a) => redirect_init(a),
        Command::Demo(a) => ward::demo::run(a).await,
        Command::Status(a) => status(a).await,
        Command::Ca {
            command: CaCommand::Rotate { admin_addr, wait },
        } => ca_rotate(admin_addr, wait).await,
        Command::Describe(DescribeCommand::Service(a)) => describe_service(a).await,
        Command::SampleApp(a) => {
            let listener = ward::sample_app::bind(a.listen).await?;
            let token = tokio_util::sync::CancellationToken::new();
            let t = token.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                t.cancel();
            });
            ward::sample_app::serve(listener, a.name, a.upstream, token).await?;
            Ok(())
        }
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&a.rotate_at) || a.rotate_at == 0.0 {
        bail!(
            "--rotate-at {}: must be between 0 and 1 (exclusive)",
            a.rotate_at
        );
    }
    if !(0.0..0.5).contains(&a.rotate_jitter) {
        bail!(
            "--rotate-jitter {}: must be between 0 and 0.5",
            a.rotate_jitter
        );
    }
    if a.kube.lease_renew >= a.kube.lease_duration {
        bail!(
            "--lease-renew {:?}: must be shorter than --lease-duration {:?}",
            a.kube.lease_renew,
            a.kube.lease_duration
        );
    }
    let config_dir = match (&a.common.config_dir, a.kube.kubernetes) {
        (Some(d), _) => d.clone(),
        (None, true) => PathBuf::new(),
        (None, false) => bail!("--config-dir is required (or --kubernetes)"),
    };
    let cfg = ServeConfig {
        config_dir,
        state_dir: a.common.state_dir,
        xds_addr: a.xds_addr,
        admin_addr: a.admin_addr,
        trust_domain: a.common.trust_domain,
        insecure_xds: a.common.insecure_xds,
        rotation: RotationConfig {
            ttl: a.cert_ttl,
            rotate_at: a.rotate_at,
            jitter: a.rotate_jitter,
            ..RotationConfig::default()
        },
        ca_files: a.ca_cert.zip(a.ca_key).map(|(c, k)| (c, k, a.ca_chain)),
        xds_server_names: a.xds_server_names,
        root_rotation_interval: a.root_rotation_interval,
        policy_step_timeout: a.policy_step_timeout,
        push_debounce: a.debounce,
    };
    let running = if a.kube.kubernetes {
        let client = kube::Client::try_default()
            .await
            .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
        let identity = match a.kube.identity {
            Some(i) => i,
            None => {
                std::env::var("HOSTNAME").unwrap_or_else(|_| format!("ward-{}", std::process::id()))
            }
        };
        let k = app::KubeServe {
            client,
            namespaces: a.kube.mesh_namespaces,
            ward_namespace: a.kube.ward_namespace,
            ca_secret: a.kube.ca_secret,
            identity,
            lease_duration: a.kube.lease_duration,
            renew_every: a.kube.lease_renew,
            resync: Duration::from_secs(60),
        };
        let running = app::start_kubernetes(cfg, k.clone()).await?;
        if let Some(addr) = a.credential_addr {
            running
                .serve_credentials(addr, k.client, a.sidecar_credential_ttl)
                .await?;
        }
        running
    } else {
        if a.credential_addr.is_some() {
            bail!("--credential-addr needs --kubernetes (it checks tokens with TokenReviews)");
        }
        app::start(cfg).await?
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = running.wait() => tracing::info!("shutting down"),
    }
    running.stop(a.shutdown_deadline).await;
    Ok(())
}

fn bootstrap(a: BootstrapArgs) -> anyhow::Result<()> {
    let Some(config_dir) = a.common.config_dir.clone() else {
        bail!("--config-dir is required");
    };
    let (mesh, _, errors) = DirSource::load_once(&config_dir)
        .with_context(|| format!("reading --config-dir {}", config_dir.display()))?;
    for e in &errors {
        eprintln!("warning: {e}");
    }
    let authority = if a.common.insecure_xds {
        None
    } else {
        Some(app::load_xds_ca(
            &a.common.state_dir,
            &a.common.trust_domain,
        )?)
    };
    let opts = ward::bootstrap::BootstrapOptions {
        pod: a.pod,
        xds_addr: a.xds_addr,
        envoy_admin: a.envoy_admin,
        trust_domain: a.common.trust_domain,
        insecure: a.common.insecure_xds,
        credential_ttl: a.credential_ttl,
        delta: a.delta,
    };
    let files = ward::bootstrap::write(&opts, &mesh, authority.as_ref(), &a.out)?;
    println!("wrote {}", files.bootstrap.display());
    if let Some((cert, key, ca)) = &files.credential {
        println!(
            "wrote {} {} (0600) {}",
            cert.display(),
            key.display(),
            ca.display()
        );
    }
    println!(
        "run: envoy -c {} --concurrency 1",
        files.bootstrap.display()
    );
    Ok(())
}

async fn sidecar_init(a: SidecarInitArgs) -> anyhow::Result<()> {
    let pod = ObjectKey::new(&a.pod_namespace, &a.pod_name);
    let token = ward::credential::read_file(&a.token_file)?;
    let ca = ward::credential::read_file(&a.ca_file)?;
    let resp = ward::credential::fetch(&a.ward_url, &ca, &a.ca_file, &token).await?;
    if resp.pod != pod.to_string() {
        bail!(
            "Ward issued a credential for pod {} but this is {pod} (POD_NAMESPACE/POD_NAME)",
            resp.pod
        );
    }
    let opts = ward::bootstrap::BootstrapOptions {
        pod,
        xds_addr: a.xds_addr,
        envoy_admin: Some(a.envoy_admin),
        trust_domain: a.trust_domain,
        insecure: false,
        credential_ttl: Duration::ZERO,
        delta: false,
    };
    let cred = ward::bootstrap::XdsCredential {
        cert_pem: resp.cert_pem,
        key_pem: resp.key_pem,
        ca_pem: resp.ca_pem,
    };
    let files =
        ward::bootstrap::write_with(&opts, &resp.cluster, a.envoy_admin, Some(&cred), &a.out)?;
    println!("wrote {}", files.bootstrap.display());
    Ok(())
}

async fn ca_rotate(admin_addr: SocketAddr, wait: bool) -> anyhow::Result<()> {
    let base = format!("http://{admin_addr}");
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{base}/ca/rotate"))
        .send()
        .await
        .with_context(|| format!("is Ward running with --admin-addr {admin_addr}?"))?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("root rotation refused: {}", text.trim());
    }
    println!("{}", text.trim());
    if !wait {
        return Ok(());
    }
    let mut last = String::new();
    loop {
        let certs: serde_json::Value = client
            .get(format!("{base}/debug/certs"))
            .send()
            .await?
            .json()
            .await?;
        let r = &certs["root_rotation"];
        let line = format!(
            "{}: {} ({} of {} proxies)",
            r["phase"].as_str().unwrap_or("?"),
            r["message"].as_str().unwrap_or(""),
            r["acked"],
            r["total"]
        );
        if line != last {
            println!("{line}");
            last = line;
        }
        match r["phase"].as_str() {
            Some("done") => return Ok(()),
            Some("failed") => bail!("root rotation failed"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let base = format!("http://{}", a.admin_addr);
    let client = reqwest::Client::new();
    let proxies: serde_json::Value = client
        .get(format!("{base}/debug/proxies"))
        .send()
        .await
        .with_context(|| format!("is Ward running with --admin-addr {}?", a.admin_addr))?
        .json()
        .await?;
    let certs: serde_json::Value = client
        .get(format!("{base}/debug/certs"))
        .send()
        .await?
        .json()
        .await?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"proxies": proxies["proxies"], "certificates": certs["certificates"]})
            )?
        );
        return Ok(());
    }
    let list = proxies["proxies"].as_array().cloned().unwrap_or_default();
    println!(
        "{} connected prox{}",
        list.len(),
        if list.len() == 1 { "y" } else { "ies" }
    );
    for p in &list {
        println!(
            "  {}  {}  peer {}",
            p["pod"].as_str().unwrap_or("?"),
            p["identity"].as_str().unwrap_or("?"),
            p["peer"].as_str().unwrap_or("?")
        );
        if let Some(types) = p["types"].as_object() {
            for (ty, t) in types {
                let acked = t["acked_version"].as_str().unwrap_or("-");
                let sent = t["sent_version"].as_str().unwrap_or("-");
                let state = if acked == sent { "in sync" } else { "pending" };
                print!("    {ty}: acked {acked} ({state})");
                if let Some(n) = t["last_nack"].as_object() {
                    print!(
                        "; last NACK of {}: {}",
                        n["version"].as_str().unwrap_or("?"),
                        n["message"].as_str().unwrap_or("?")
                    );
                }
                println!();
            }
        }
    }
    let r = &certs["root_rotation"];
    if r["phase"].as_str().is_some_and(|p| p != "idle") {
        println!(
            "root rotation: {} — {} ({} of {} proxies)",
            r["phase"].as_str().unwrap_or("?"),
            r["message"].as_str().unwrap_or(""),
            r["acked"],
            r["total"]
        );
    }
    if let Some(list) = certs["certificates"].as_array() {
        println!(
            "{} certificate{} (issuing root: {})",
            list.len(),
            if list.len() == 1 { "" } else { "s" },
            certs["trust_bundle"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["subject"].as_str())
                .collect::<Vec<_>>()
                .join(" + ")
        );
        for c in list {
            let envoy = c["envoy"].as_array().cloned().unwrap_or_default();
            let acked = if envoy.is_empty() {
                "not connected".to_string()
            } else if envoy.iter().all(|e| e["acked_current"] == true) {
                "Envoy ACKed it".to_string()
            } else if envoy.iter().any(|e| e["past_80_percent"] == true) {
                "WARNING: Envoy serves an older certificate past 80% of its life".to_string()
            } else {
                "Envoy has not ACKed it yet".to_string()
            };
            let not_after = c["not_after"]["secs_since_epoch"]
                .as_u64()
                .map(|s| {
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(s),
                    )
                    .to_string()
                })
                .unwrap_or_else(|| "?".into());
            println!(
                "  {}  {}  serial {}  notAfter {}  issuer {}  rotations {}  — {}",
                c["proxy"].as_str().unwrap_or("?"),
                c["spiffe_id"].as_str().unwrap_or("?"),
                c["serial"].as_str().unwrap_or("?"),
                not_after,
                c["issuer"].as_str().unwrap_or("?"),
                c["rotations"],
                acked
            );
            if let Some(e) = c["last_error"].as_str() {
                println!("    last signing error: {e}");
            }
        }
    }
    Ok(())
}

async fn describe_service(a: DescribeServiceArgs) -> anyhow::Result<()> {
    use ward::policy::explain;
    let mut e = match (&a.admin_addr, &a.config_dir) {
        (Some(admin), _) => explain::fetch(&admin.to_string(), &a.service).await?,
        (None, Some(dir)) => {
            let (mesh, _, errors) = DirSource::load_once(dir)
                .with_context(|| format!("reading --config-dir {}", dir.display()))?;
            let selection = ward::policy::resolve::select(&mesh, &Default::default());
            for e in errors
                .iter()
                .filter(|e| e.object.starts_with("ConfigMap "))
                .chain(&selection.errors)
            {
                eprintln!("policy error: {e}");
            }
            let resolved = ward::policy::resolve::resolve(&mesh, &selection.in_force);
            explain::explain_service(&mesh, &resolved, &Default::default(), &a.service)?
        }
        (None, None) => bail!("give --config-dir or --admin-addr"),
    };
    if a.admin_addr.is_some() {
        explain::gather_counts(&mut e, a.envoy_admin_port).await;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", explain::render(&e));
    }
    Ok(())
}
