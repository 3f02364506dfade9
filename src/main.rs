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
    Serve(ServeArgs),
    /// Write an Envoy sidecar bootstrap and its xDS credential for one pod.
    Bootstrap(BootstrapArgs),
    /// Bring up a local mesh on loopback with real Envoy sidecars and verify mTLS.
    Demo(ward::demo::DemoArgs),
    /// Show connected proxies and what they ACKed (from a running Ward's admin API).
    Status(StatusArgs),
    /// A small HTTP app used by the demo and tests (knows nothing of TLS).
    #[command(hide = true)]
    SampleApp(SampleAppArgs),
}

#[derive(Args, Clone)]
struct CommonArgs {
    /// Directory of Kubernetes-style YAML: Services, Pods, EndpointSlices, policy ConfigMaps.
    #[arg(long, env = "WARD_CONFIG_DIR")]
    config_dir: PathBuf,
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
    /// Extra DNS names for the xDS serving certificate (repeatable).
    #[arg(long = "xds-server-name")]
    xds_server_names: Vec<String>,
    /// Quiet time after a mesh change before pushing to sidecars; changes
    /// within it go out as one push. 0 (the default) pushes at once: the
    /// directory watcher already coalesces file events.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    debounce: Duration,
    /// Seconds to let streams finish on shutdown.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_deadline: Duration,
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
    /// Where the sidecar reaches Ward's xDS port.
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
struct StatusArgs {
    /// Admin address of a running Ward.
    #[arg(long, env = "WARD_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
    admin_addr: SocketAddr,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
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

fn init_tracing() {
    let filter = EnvFilter::try_from_env("WARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => serve(a).await,
        Command::Bootstrap(a) => bootstrap(a),
        Command::Demo(a) => ward::demo::run(a).await,
        Command::Status(a) => status(a).await,
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
    let cfg = ServeConfig {
        config_dir: a.common.config_dir,
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
        push_debounce: a.debounce,
    };
    let running = app::start(cfg).await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = running.wait() => tracing::info!("shutting down"),
    }
    running.stop(a.shutdown_deadline).await;
    Ok(())
}

fn bootstrap(a: BootstrapArgs) -> anyhow::Result<()> {
    let (mesh, _, errors) = DirSource::load_once(&a.common.config_dir)
        .with_context(|| format!("reading --config-dir {}", a.common.config_dir.display()))?;
    for e in &errors {
        eprintln!("warning: {e}");
    }
    let authority = if a.common.insecure_xds {
        None
    } else {
        let cfg = ServeConfig {
            config_dir: a.common.config_dir.clone(),
            state_dir: a.common.state_dir.clone(),
            xds_addr: "127.0.0.1:0".parse()?,
            admin_addr: "127.0.0.1:0".parse()?,
            trust_domain: a.common.trust_domain.clone(),
            insecure_xds: false,
            rotation: RotationConfig::default(),
            ca_files: None,
            xds_server_names: vec![],
            push_debounce: Duration::ZERO,
        };
        Some(app::load_authority(&cfg)?)
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
    if let Some(list) = certs["certificates"].as_array() {
        println!(
            "{} certificate{}",
            list.len(),
            if list.len() == 1 { "" } else { "s" }
        );
        for c in list {
            println!("  {}", serde_json::to_string(c)?);
        }
    }
    Ok(())
}
