//! `ward-load`: load generator and benchmarks for Ward (see BENCHMARKS.md).
//!
//! - `run`: starts `ward serve` as a separate process on a generated mesh
//!   (S services, N pods; `ward::meshgen`), connects N simulated sidecars
//!   over ADS (SotW or delta, mTLS with per-pod credentials from the same
//!   CA, like `ward bootstrap`) that ACK every response like Envoy, then
//!   makes endpoint changes and measures convergence (change → last ACK),
//!   Ward's RSS per connected proxy, bytes per change per proxy and Ward's
//!   CPU-seconds per change (from /proc).
//! - `rotate`: `ward serve` as a separate process, N sidecars connected;
//!   `POST /certs/rotate` renews every certificate at once and the run
//!   measures until every sidecar ACKed its new SDS secret, counting CDS/LDS
//!   pushes (there must be none).
//! - `certs`: certificates issued per second on one core, beside the raw
//!   ECDSA P-256 sign and key generation rates of ring in the same run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use ward::ca::Authority;
use ward::meshgen::{self, MeshSpec};
use ward::model::SpiffeId;
use ward::translate::{names, type_url};

const TD: &str = "cluster.local";

#[derive(Parser)]
#[command(name = "ward-load", about = "Load generator and benchmarks for Ward")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convergence, memory, bytes and CPU per endpoint change (Ward in its own process).
    Run(RunArgs),
    /// Full certificate rotation of every connected proxy (`POST /certs/rotate`).
    Rotate(RunArgs),
    /// Certificate issuance rate on one core, beside ring's raw ECDSA P-256 rates.
    Certs(CertArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Sotw,
    Delta,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Simulated sidecars (N).
    #[arg(long, default_value_t = 100)]
    proxies: usize,
    /// Services in the generated mesh (S).
    #[arg(long, default_value_t = 100)]
    services: usize,
    #[arg(long, value_enum, default_value = "delta")]
    protocol: Protocol,
    /// Endpoint changes to measure.
    #[arg(long, default_value_t = 5)]
    changes: u32,
    /// Scratch directory (config, state, Ward's log); default a temp dir.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The `ward` binary; default the one next to this executable.
    #[arg(long)]
    ward_bin: Option<PathBuf>,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// `ward serve --debounce`.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    debounce: Duration,
    /// Plaintext xDS (`--insecure-xds`): no TLS handshakes or credentials.
    #[arg(long)]
    insecure_xds: bool,
    /// Give up on a phase after this long.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Quiet time after every sidecar synced, before measuring (time to
    /// attach a profiler: Ward's pid is printed when the sidecars synced).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    settle: Duration,
}

#[derive(Args)]
struct CertArgs {
    /// Certificates to issue.
    #[arg(long, default_value_t = 5000)]
    count: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Certs(a) => certs(a),
        Cmd::Run(a) => runtime()?.block_on(run(a)),
        Cmd::Rotate(a) => runtime()?.block_on(rotate(a)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

// ------------------------------------------------------------ certificates

fn certs(a: CertArgs) -> anyhow::Result<()> {
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let rng = SystemRandom::new();
    let n = a.count.max(100);

    let t = Instant::now();
    let mut pkcs8 = None;
    for _ in 0..n {
        pkcs8 = Some(
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
                .map_err(|_| anyhow::anyhow!("ring keygen"))?,
        );
    }
    let keygen_rate = n as f64 / t.elapsed().as_secs_f64();
    let pkcs8 = pkcs8.context("no key")?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|e| anyhow::anyhow!("ring key: {e}"))?;
    let msg = [7u8; 400]; // about a TBSCertificate
    let t = Instant::now();
    for _ in 0..n {
        key.sign(&rng, &msg)
            .map_err(|_| anyhow::anyhow!("ring sign"))?;
    }
    let sign_rate = n as f64 / t.elapsed().as_secs_f64();

    let ca = Authority::generate_in_memory(TD)?;
    let id = SpiffeId::new(TD, "load", "sa-0");
    let t = Instant::now();
    for _ in 0..n {
        ca.issue_workload(&id, Duration::from_secs(3600))?;
    }
    let issue_rate = n as f64 / t.elapsed().as_secs_f64();
    let floor = 1.0 / (1.0 / sign_rate + 1.0 / keygen_rate);
    println!("certificate issuance, one core, {n} each:");
    println!("  ring ECDSA P-256 sign      {sign_rate:>9.0} /s");
    println!("  ring ECDSA P-256 keygen    {keygen_rate:>9.0} /s");
    println!("  floor (keygen + sign)      {floor:>9.0} /s");
    println!(
        "  Ward issue_workload        {issue_rate:>9.0} certs/s/core  ({:.0}% of raw sign, {:.0}% of keygen+sign floor; target 10000)",
        100.0 * issue_rate / sign_rate,
        100.0 * issue_rate / floor
    );
    Ok(())
}

// ------------------------------------------------------------ simulated sidecars

/// What one simulated sidecar saw, written by its task.
#[derive(Default)]
struct ClientStats {
    /// Responses per type, in `type_url::ORDER` order.
    by_type: [AtomicU64; 5],
    /// Encoded bytes of all responses.
    bytes: AtomicU64,
    /// Nanoseconds since the run's base instant: last response received,
    /// and the ACK sent for it.
    last_recv_ns: AtomicU64,
    last_ack_ns: AtomicU64,
    /// Times the stream broke and was reconnected.
    failed: AtomicU64,
}

impl ClientStats {
    fn responses(&self) -> u64 {
        self.by_type.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn count(&self, ty: &str) -> u64 {
        type_url::ORDER
            .iter()
            .position(|t| *t == ty)
            .map(|i| self.by_type[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    fn record(&self, ty: &str, bytes: usize, recv: Instant, base: Instant) {
        if let Some(i) = type_url::ORDER.iter().position(|t| *t == ty) {
            self.by_type[i].fetch_add(1, Ordering::Relaxed);
        }
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_recv_ns
            .store((recv - base).as_nanos() as u64, Ordering::Relaxed);
        self.last_ack_ns
            .store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Names a sidecar of the generated mesh subscribes to, per type.
fn subscriptions(services: usize) -> Vec<(&'static str, Vec<String>)> {
    let clusters: Vec<String> = (0..services).map(meshgen::cluster_name).collect();
    let mut routes = clusters.clone();
    routes.push(names::inbound_route(meshgen::PORT));
    vec![
        (type_url::CLUSTER, vec![]),
        (type_url::ENDPOINT, clusters),
        (type_url::LISTENER, vec![]),
        (type_url::ROUTE, routes),
        (
            type_url::SECRET,
            vec![
                names::WORKLOAD_CERT.to_string(),
                names::TRUST_BUNDLE.to_string(),
            ],
        ),
    ]
}

#[derive(Clone)]
struct Target {
    addr: std::net::SocketAddr,
    ca_pem: Option<String>,
}

async fn connect(target: &Target, cred: Option<(String, String)>) -> anyhow::Result<Channel> {
    let ep = if let Some(ca) = &target.ca_pem {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some((c, k)) = cred {
            tls = tls.identity(Identity::from_pem(c, k));
        }
        Endpoint::from_shared(format!("https://{}", target.addr))?.tls_config(tls)?
    } else {
        Endpoint::from_shared(format!("http://{}", target.addr))?
    };
    Ok(ep
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await?)
}

/// One simulated sidecar: subscribes like Envoy, ACKs every response at
/// once, until the stream ends.
async fn sidecar(
    channel: Channel,
    node_id: String,
    protocol: Protocol,
    subs: Arc<Vec<(&'static str, Vec<String>)>>,
    stats: Arc<ClientStats>,
    base: Instant,
) -> anyhow::Result<()> {
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let node = Some(Node {
        id: node_id,
        ..Default::default()
    });
    match protocol {
        Protocol::Sotw => {
            let (tx, rx) = mpsc::channel(64);
            for (i, (ty, names)) in subs.iter().enumerate() {
                tx.send(DiscoveryRequest {
                    node: if i == 0 { node.clone() } else { None },
                    type_url: ty.to_string(),
                    resource_names: names.clone(),
                    ..Default::default()
                })
                .await?;
            }
            let mut inbound = client
                .stream_aggregated_resources(ReceiverStream::new(rx))
                .await?
                .into_inner();
            while let Some(resp) = inbound.message().await? {
                let recv = Instant::now();
                let names = subs
                    .iter()
                    .find(|(t, _)| *t == resp.type_url)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default();
                let bytes = resp.encoded_len();
                tx.send(DiscoveryRequest {
                    type_url: resp.type_url.clone(),
                    resource_names: names,
                    version_info: resp.version_info.clone(),
                    response_nonce: resp.nonce.clone(),
                    ..Default::default()
                })
                .await?;
                stats.record(&resp.type_url, bytes, recv, base);
            }
        }
        Protocol::Delta => {
            let (tx, rx) = mpsc::channel(64);
            for (i, (ty, names)) in subs.iter().enumerate() {
                tx.send(DeltaDiscoveryRequest {
                    node: if i == 0 { node.clone() } else { None },
                    type_url: ty.to_string(),
                    resource_names_subscribe: names.clone(),
                    ..Default::default()
                })
                .await?;
            }
            let mut inbound = client
                .delta_aggregated_resources(ReceiverStream::new(rx))
                .await?
                .into_inner();
            while let Some(resp) = inbound.message().await? {
                let recv = Instant::now();
                let bytes = resp.encoded_len();
                tx.send(DeltaDiscoveryRequest {
                    type_url: resp.type_url.clone(),
                    response_nonce: resp.nonce.clone(),
                    ..Default::default()
                })
                .await?;
                stats.record(&resp.type_url, bytes, recv, base);
            }
        }
    }
    Ok(())
}

/// N connected sidecars.
struct Fleet {
    stats: Vec<Arc<ClientStats>>,
    base: Instant,
    /// The sidecar tasks; dropping the fleet aborts them.
    _tasks: tokio::task::JoinSet<()>,
}

impl Fleet {
    async fn start(
        a: &RunArgs,
        target: &Target,
        creds: Vec<Option<(String, String)>>,
    ) -> anyhow::Result<Fleet> {
        let base = Instant::now();
        let subs = Arc::new(subscriptions(a.services));
        let stats: Vec<Arc<ClientStats>> = (0..a.proxies).map(|_| Default::default()).collect();
        let mut tasks = tokio::task::JoinSet::new();
        let gate = Arc::new(tokio::sync::Semaphore::new(a.connect_concurrency.max(1)));
        for (j, cred) in creds.into_iter().enumerate() {
            let stats = stats[j].clone();
            let subs = subs.clone();
            let protocol = a.protocol;
            let target = target.clone();
            let gate = gate.clone();
            tasks.spawn(async move {
                // Like Envoy: a broken stream is reconnected after a pause.
                loop {
                    let permit = gate.clone().acquire_owned().await;
                    let channel = connect(&target, cred.clone()).await;
                    drop(permit);
                    let res = match channel {
                        Ok(ch) => {
                            sidecar(
                                ch,
                                meshgen::pod_key(j).to_string(),
                                protocol,
                                subs.clone(),
                                stats.clone(),
                                base,
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    match res {
                        Ok(()) => return,
                        Err(e) => {
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("sidecar {j}: {e}; reconnecting");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            });
        }
        Ok(Fleet {
            stats,
            base,
            _tasks: tasks,
        })
    }

    /// Streams that broke and were reconnected, in total.
    fn reconnects(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.failed.load(Ordering::Relaxed))
            .sum()
    }

    /// Wait until `done(stats)` holds for every sidecar.
    async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(usize, &ClientStats) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self
                .stats
                .iter()
                .enumerate()
                .filter(|(j, s)| !done(*j, s))
                .count();
            if pending == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{pending} of {} sidecars not done {what} after {timeout:?}",
                    self.stats.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn snapshot(&self) -> Vec<(u64, u64, [u64; 5])> {
        self.stats
            .iter()
            .map(|s| {
                (
                    s.responses(),
                    s.bytes.load(Ordering::Relaxed),
                    std::array::from_fn(|i| s.by_type[i].load(Ordering::Relaxed)),
                )
            })
            .collect()
    }
}

fn creds_for(
    authority: Option<&Authority>,
    a: &RunArgs,
) -> anyhow::Result<Vec<Option<(String, String)>>> {
    let spec = MeshSpec {
        services: a.services,
        pods: a.proxies,
    };
    (0..a.proxies)
        .map(|j| {
            let Some(ca) = authority else {
                return Ok(None);
            };
            let pod = meshgen::pod_key(j);
            let id = SpiffeId::new(
                TD,
                meshgen::NAMESPACE,
                meshgen::service_account(meshgen::pod_service(&spec, j)),
            );
            let c = ca.issue_xds_client(&pod, &id, Duration::from_secs(24 * 3600))?;
            Ok(Some((c.cert_pem.clone(), c.key_pem.expose().to_string())))
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ------------------------------------------------------------ Ward process

struct WardProcess {
    child: tokio::process::Child,
    pid: u32,
    admin: std::net::SocketAddr,
}

fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// (RSS bytes, CPU seconds) of a process.
fn proc_usage(pid: u32) -> anyhow::Result<(u64, f64)> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: u64 = statm.split_whitespace().nth(1).context("statm")?.parse()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the
    // command name; clock ticks are 100/s on Linux.
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    Ok((pages * 4096, ticks as f64 / 100.0))
}

async fn start_ward(a: &RunArgs, work: &Path) -> anyhow::Result<(WardProcess, Target)> {
    let bin = match &a.ward_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("ward"),
    };
    let xds = free_port()?;
    let admin = free_port()?;
    let log = std::fs::File::create(work.join("ward.log"))?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("serve")
        .arg("--config-dir")
        .arg(work.join("config"))
        .arg("--state-dir")
        .arg(work.join("state"))
        .arg("--xds-addr")
        .arg(xds.to_string())
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--debounce")
        .arg(humantime::format_duration(a.debounce).to_string())
        .env("WARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    if a.insecure_xds {
        cmd.arg("--insecure-xds");
    }
    let child = cmd.spawn().with_context(|| {
        format!(
            "starting {} (build it: cargo build --release --bins)",
            bin.display()
        )
    })?;
    let pid = child.id().context("ward pid")?;
    let ready = format!("http://{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(&ready).await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "ward did not become ready; see {}",
                work.join("ward.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca_pem = if a.insecure_xds {
        None
    } else {
        Some(
            Authority::load_or_generate_as(
                &work.join("state").join("xds"),
                TD,
                ward::ca::RootKind::Xds,
            )?
            .trust_bundle_pem(),
        )
    };
    Ok((
        WardProcess { child, pid, admin },
        Target { addr: xds, ca_pem },
    ))
}

fn work_dir(a: &RunArgs) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match &a.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            Ok((d.clone(), None))
        }
        None => {
            let t = tempfile::tempdir()?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

// ------------------------------------------------------------ run

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let (work, _tmp) = work_dir(&a)?;
    let spec = MeshSpec {
        services: a.services,
        pods: a.proxies,
    };
    meshgen::write_dir(&work.join("config"), &spec)?;
    // The CA in the state dir, before Ward starts, so credentials chain to it.
    let authority = if a.insecure_xds {
        None
    } else {
        // The xDS CA signs sidecar credentials (the mesh root is separate).
        Some(Authority::load_or_generate_as(
            &work.join("state").join("xds"),
            TD,
            ward::ca::RootKind::Xds,
        )?)
    };
    let t = Instant::now();
    let creds = creds_for(authority.as_ref(), &a)?;
    let creds_time = t.elapsed();

    let (mut ward, target) = start_ward(&a, &work).await?;
    // Let startup allocations settle before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss0, _) = proc_usage(ward.pid)?;

    let t = Instant::now();
    let fleet = Fleet::start(&a, &target, creds).await?;
    fleet
        .wait("syncing", a.timeout, |_, s| {
            type_url::ORDER.iter().all(|ty| s.count(ty) >= 1)
        })
        .await?;
    let connect_time = t.elapsed();
    eprintln!("synced; ward pid {}", ward.pid);
    // Quiet: every stream ACKed everything; let Ward finish its bookkeeping.
    tokio::time::sleep(Duration::from_millis(500) + a.settle).await;
    let (rss1, _) = proc_usage(ward.pid)?;
    let rss_per_proxy = rss1.saturating_sub(rss0) as f64 / a.proxies as f64;

    let mut latencies = Vec::new();
    let mut fanouts = Vec::new();
    let mut bytes_per_proxy = Vec::new();
    let mut cpu_per_change = Vec::new();
    let mut pushes_per_proxy = Vec::new();
    for k in 1..=a.changes {
        let before = fleet.snapshot();
        let (_, cpu0) = proc_usage(ward.pid)?;
        let t0 = fleet.base.elapsed().as_nanos() as u64;
        meshgen::write_change(&work.join("config"), k)?;
        fleet
            .wait("converging after a change", a.timeout, |j, s| {
                s.responses() > before[j].0 && s.last_ack_ns.load(Ordering::Relaxed) > t0
            })
            .await?;
        // Any straggling second push (there should be none) lands here.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, cpu1) = proc_usage(ward.pid)?;
        let after = fleet.snapshot();
        let first_recv = fleet
            .stats
            .iter()
            .map(|s| s.last_recv_ns.load(Ordering::Relaxed))
            .min()
            .unwrap_or(t0);
        for s in &fleet.stats {
            let ack = s.last_ack_ns.load(Ordering::Relaxed);
            latencies.push((ack.saturating_sub(t0)) as f64 / 1e9);
            fanouts.push((ack.saturating_sub(first_recv)) as f64 / 1e9);
        }
        let bytes: u64 = after.iter().zip(&before).map(|(x, y)| x.1 - y.1).sum();
        let pushes: u64 = after.iter().zip(&before).map(|(x, y)| x.0 - y.0).sum();
        bytes_per_proxy.push(bytes as f64 / a.proxies as f64);
        pushes_per_proxy.push(pushes as f64 / a.proxies as f64);
        cpu_per_change.push(cpu1 - cpu0);
    }
    latencies.sort_by(f64::total_cmp);
    fanouts.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (rss_end, cpu_total) = proc_usage(ward.pid)?;
    println!(
        "ward-load run: N={} S={} protocol={:?} changes={} debounce={:?} tls={}",
        a.proxies, a.services, a.protocol, a.changes, a.debounce, !a.insecure_xds
    );
    println!(
        "  credentials issued in          {:.2} s",
        creds_time.as_secs_f64()
    );
    println!(
        "  connect + initial sync         {:.2} s",
        connect_time.as_secs_f64()
    );
    println!("  streams reconnected            {}", fleet.reconnects());
    println!(
        "  Ward RSS                       {:.1} MB idle, {:.1} MB with N connected, {:.1} MB at end",
        rss0 as f64 / 1e6,
        rss1 as f64 / 1e6,
        rss_end as f64 / 1e6
    );
    println!(
        "  RSS per connected proxy        {:.1} KB",
        rss_per_proxy / 1024.0
    );
    println!(
        "  change → last ACK              p50 {:.3} s  p99 {:.3} s  max {:.3} s",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    println!(
        "  first push → ACK (fan-out)     p50 {:.3} s  p99 {:.3} s  max {:.3} s",
        percentile(&fanouts, 0.5),
        percentile(&fanouts, 0.99),
        percentile(&fanouts, 1.0)
    );
    println!(
        "  responses per proxy per change {:.2}",
        mean(&pushes_per_proxy)
    );
    println!(
        "  bytes per proxy per change     {:.0} B",
        mean(&bytes_per_proxy)
    );
    println!(
        "  Ward CPU per change            {:.3} s (total CPU {:.1} s)",
        mean(&cpu_per_change),
        cpu_total
    );
    println!(
        "RESULT reconnects={} n={} s={} proto={:?} rss_kb_per_proxy={:.1} p50={:.3} p99={:.3} max={:.3} fanout_p99={:.3} bytes_per_proxy={:.0} cpu_per_change={:.3} connect_s={:.2}",
        fleet.reconnects(),
        a.proxies,
        a.services,
        a.protocol,
        rss_per_proxy / 1024.0,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
        percentile(&fanouts, 0.99),
        mean(&bytes_per_proxy),
        mean(&cpu_per_change),
        connect_time.as_secs_f64()
    );
    let _ = ward.admin;
    drop(fleet);
    ward.child.kill().await.ok();
    Ok(())
}

// ------------------------------------------------------------ rotate

/// `ward_certs_issued_total` from Ward's `/metrics`.
async fn issued_total(admin: std::net::SocketAddr) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("ward_certs_issued_total "))
        .context("ward_certs_issued_total in /metrics")?
        .trim()
        .parse::<f64>()
        .map(|v| v as u64)
        .context("ward_certs_issued_total")
}

async fn rotate(a: RunArgs) -> anyhow::Result<()> {
    let (work, _tmp) = work_dir(&a)?;
    let spec = MeshSpec {
        services: a.services,
        pods: a.proxies,
    };
    meshgen::write_dir(&work.join("config"), &spec)?;
    let authority = if a.insecure_xds {
        None
    } else {
        Some(Authority::load_or_generate_as(
            &work.join("state").join("xds"),
            TD,
            ward::ca::RootKind::Xds,
        )?)
    };
    let creds = creds_for(authority.as_ref(), &a)?;
    // Ward in its own process, so each process needs one descriptor per
    // sidecar, not two, and the rotation's CPU is Ward's alone.
    let (mut ward, target) = start_ward(&a, &work).await?;
    let fleet = Fleet::start(&a, &target, creds).await?;
    fleet
        .wait("syncing", a.timeout, |_, s| {
            type_url::ORDER.iter().all(|ty| s.count(ty) >= 1)
        })
        .await?;
    eprintln!("synced; ward pid {}", ward.pid);
    tokio::time::sleep(a.settle).await;
    let before = fleet.snapshot();
    let issued0 = issued_total(ward.admin).await?;
    let (_, cpu0) = proc_usage(ward.pid)?;
    let t0 = Instant::now();
    let t0_ns = fleet.base.elapsed().as_nanos() as u64;
    let resp = reqwest::Client::new()
        .post(format!("http://{}/certs/rotate", ward.admin))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("POST /certs/rotate: {}", resp.status());
    }
    let sds = type_url::ORDER
        .iter()
        .position(|t| *t == type_url::SECRET)
        .context("sds index")?;
    fleet
        .wait("rotating", a.timeout, |j, s| {
            s.by_type[sds].load(Ordering::Relaxed) > before[j].2[sds]
                && s.last_ack_ns.load(Ordering::Relaxed) > t0_ns
        })
        .await?;
    let all_acked = t0.elapsed();
    let (_, cpu1) = proc_usage(ward.pid)?;
    let signed_in = issued_total(ward.admin).await? - issued0;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = fleet.snapshot();
    let mut other = [0u64; 5];
    for (x, y) in after.iter().zip(&before) {
        for (o, (a, b)) in other.iter_mut().zip(x.2.iter().zip(&y.2)) {
            *o += a - b;
        }
    }
    println!(
        "ward-load rotate: N={} S={} protocol={:?}",
        a.proxies, a.services, a.protocol
    );
    println!(
        "  POST /certs/rotate → every SDS ACKed {:.3} s ({signed_in} certificates signed, Ward CPU {:.2} s)",
        all_acked.as_secs_f64(),
        cpu1 - cpu0
    );
    for (i, ty) in type_url::ORDER.iter().enumerate() {
        println!(
            "  {:<4} pushes during rotation      {}",
            type_url::short(ty),
            other[i]
        );
    }
    let cds = other[type_url::ORDER
        .iter()
        .position(|t| *t == type_url::CLUSTER)
        .context("cds")?];
    let lds = other[type_url::ORDER
        .iter()
        .position(|t| *t == type_url::LISTENER)
        .context("lds")?];
    println!(
        "RESULT rotate n={} seconds={:.3} signed={signed_in} ward_cpu={:.2} cds_pushes={cds} lds_pushes={lds}",
        a.proxies,
        all_acked.as_secs_f64(),
        cpu1 - cpu0
    );
    drop(fleet);
    ward.child.kill().await.ok();
    if cds + lds > 0 {
        bail!("rotation pushed CDS/LDS ({cds}/{lds})");
    }
    Ok(())
}
