//! `ward demo`: a two-service mesh on loopback with real Envoy sidecars, and
//! plain-words checks of what mTLS is doing on the wire.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::ca::{Authority, RotationConfig, cert_info};
use crate::local::{LocalMesh, LocalMeshConfig, eventually, find_envoy};
use crate::model::{DEFAULT_TRUST_DOMAIN, ObjectKey, SpiffeId};
use crate::probe::{self, ClientCert, ProbeError, ServerCheck};
use crate::translate::names::MESH_ALPN;

/// The demo mesh, embedded so the binary works from any directory. Same
/// file as `examples/local-mesh/mesh.yaml` in the repository.
const DEMO_MESH: &str = include_str!("../examples/local-mesh/mesh.yaml");

const CLIENT_POD: (&str, &str) = ("demo", "client-0");
/// Where the client app listens (its pod's `ward.io/app-ip`, container port).
const CLIENT_APP: &str = "127.0.1.10:8080";
/// The client's own sidecar, outbound listener for `server` port 9080.
const CLIENT_OUTBOUND_TO_SERVER: &str = "http://127.0.0.10:9080/";
/// The server sidecar's inbound (mesh) port: pod IP, target port.
const SERVER_INBOUND: &str = "127.0.0.20:8080";

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Run the checks once and exit: 0 if all passed, 1 otherwise.
    #[arg(long)]
    pub once: bool,
    /// Envoy binary (default: $ENVOY_BIN, .tools/venv/bin/envoy, PATH).
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// Scratch directory (default: a fresh temporary directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub xds_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub admin_addr: SocketAddr,
    /// Workload certificate lifetime in the demo (short, to show rotation).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
}

/// One verified statement, printed as it is checked.
struct Checks {
    failed: usize,
}

impl Checks {
    fn report(&mut self, ok: bool, what: &str, detail: &str) {
        let mark = if ok { "PASS" } else { "FAIL" };
        if !ok {
            self.failed += 1;
        }
        println!("  [{mark}] {what}");
        if !detail.is_empty() {
            for line in detail.lines() {
                println!("         {line}");
            }
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let envoy = find_envoy(args.envoy.as_deref())?;
    let tmp;
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().context("creating a scratch directory")?;
            tmp.path().to_path_buf()
        }
    };
    let config_dir = work_dir.join("config");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(config_dir.join("mesh.yaml"), DEMO_MESH)?;

    println!(
        "Ward demo: a client and a server service on loopback, each with a real Envoy sidecar."
    );
    println!("  Envoy: {}", envoy.display());
    println!("  work dir: {}", work_dir.display());
    let client = ObjectKey::new(CLIENT_POD.0, CLIENT_POD.1);
    let config = LocalMeshConfig {
        work_dir: work_dir.clone(),
        config_dir,
        envoy,
        xds_addr: args.xds_addr,
        admin_addr: args.admin_addr,
        trust_domain: DEFAULT_TRUST_DOMAIN.into(),
        rotation: RotationConfig {
            ttl: args.cert_ttl,
            ..RotationConfig::default()
        },
        upstreams: BTreeMap::from([(client, CLIENT_OUTBOUND_TO_SERVER.to_string())]),
        ca_files: None,
        delta: false,
    };
    let mut mesh = LocalMesh::start(config).await?;
    println!(
        "  Ward: xDS on {} (mutual TLS), admin on http://{}",
        mesh.ward.xds_addr, mesh.ward.admin_addr
    );
    let result = async {
        mesh.wait_converged(Duration::from_secs(30)).await?;
        println!(
            "  sidecars connected and configured: {}",
            mesh.sidecars
                .keys()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!();
        checks(&mesh, &work_dir).await
    }
    .await;
    let failed = match result {
        Ok(failed) => failed,
        Err(e) => {
            mesh.stop().await;
            return Err(e);
        }
    };
    if args.once {
        mesh.stop().await;
        if failed > 0 {
            bail!("{failed} check(s) failed");
        }
        println!("\nAll checks passed.");
        return Ok(());
    }
    println!("\nThe mesh keeps running. Try:");
    println!(
        "  curl http://{CLIENT_APP}/call          # client app → its sidecar → mTLS → server sidecar → server app"
    );
    println!("  curl http://{SERVER_INBOUND}/          # plaintext to the server sidecar: refused");
    println!(
        "  curl http://{}/debug/proxies    # what Ward serves and what Envoy ACKed",
        mesh.ward.admin_addr
    );
    println!(
        "  cargo run -- status --admin-addr {}",
        mesh.ward.admin_addr
    );
    println!("Press Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    mesh.stop().await;
    Ok(())
}

/// Run every check; returns how many failed.
async fn checks(mesh: &LocalMesh, work_dir: &std::path::Path) -> anyhow::Result<usize> {
    let mut c = Checks { failed: 0 };
    let td = &mesh.config.trust_domain;
    let client_id = SpiffeId::new(td, "demo", "client");
    let server_id = SpiffeId::new(td, "demo", "server");
    let server_addr: SocketAddr = SERVER_INBOUND.parse()?;

    // 1. A request from the client app, through both sidecars.
    let url = format!("http://{CLIENT_APP}/call");
    let reply = eventually(Duration::from_secs(10), || async {
        let r = reqwest::get(&url).await.ok()?;
        let status = r.status();
        let body = r.text().await.ok()?;
        (status.is_success()).then_some(body)
    })
    .await;
    match reply {
        Some(body) => {
            let saw_identity = body.contains(&client_id.uri());
            c.report(
                body.contains("hello from server-0") && saw_identity,
                "client app → client sidecar → mTLS → server sidecar → server app",
                &format!(
                    "the server app answered: {}\nthe server saw the caller's verified identity {} (from its sidecar)",
                    body.trim(),
                    if saw_identity { client_id.uri() } else { "NOT FOUND".into() }
                ),
            );
        }
        None => c.report(
            false,
            "client app → server app through the mesh",
            "no successful response within 10 s",
        ),
    }

    // 2. Plaintext to the server sidecar's mesh port is refused.
    let plain = probe::plaintext_get(server_addr, "/", "server").await;
    c.report(
        plain.is_err(),
        &format!("the server sidecar ({SERVER_INBOUND}) refuses plaintext"),
        &match &plain {
            Err(e) => format!("refused: {e}"),
            Ok(r) => format!("ACCEPTED with HTTP {}", r.status),
        },
    );

    // 3. A certificate from a foreign CA — even one claiming the client's
    // identity — is refused.
    let foreign_dir = work_dir.join("foreign-ca");
    let foreign = Authority::load_or_generate(&foreign_dir, td)?;
    let fake = foreign.issue_workload(&client_id, Duration::from_secs(3600))?;
    let fake = ClientCert {
        cert_pem: fake.cert_pem.clone(),
        key_pem: fake.key_pem.expose().to_string(),
    };
    let forged = probe::tls_get(
        server_addr,
        "/",
        "server",
        Some(&fake),
        &ServerCheck::None,
        &[MESH_ALPN],
    )
    .await;
    c.report(
        forged.is_err(),
        "the server sidecar refuses a client certificate from a foreign CA (claiming the client's SPIFFE ID)",
        &match &forged {
            Err(e) => format!("refused: {e}"),
            Ok(r) => format!("ACCEPTED with HTTP {}", r.status),
        },
    );

    // 4. No client certificate at all is refused too.
    let anonymous = probe::tls_get(
        server_addr,
        "/",
        "server",
        None,
        &ServerCheck::None,
        &[MESH_ALPN],
    )
    .await;
    c.report(
        matches!(
            anonymous,
            Err(ProbeError::Handshake { .. } | ProbeError::NoResponse { .. })
        ),
        "the server sidecar refuses TLS without a client certificate",
        &match &anonymous {
            Err(e) => format!("refused: {e}"),
            Ok(r) => format!("ACCEPTED with HTTP {}", r.status),
        },
    );

    // 5. The server presents Ward's certificate for its SPIFFE ID.
    let probe_id = SpiffeId::new(td, "demo", "ward-demo-probe");
    let own = mesh
        .ward
        .authority
        .issue_workload(&probe_id, Duration::from_secs(600))?;
    let own = ClientCert {
        cert_pem: own.cert_pem.clone(),
        key_pem: own.key_pem.expose().to_string(),
    };
    let roots = ServerCheck::Roots(mesh.ward.authority.trust_bundle_pem());
    match probe::tls_get(server_addr, "/", "server", Some(&own), &roots, &[MESH_ALPN]).await {
        Ok(reply) => {
            let leaf = reply.peer_chain.first().map(|d| cert_info(d));
            let detail = match &leaf {
                Some(Ok(info)) => format!(
                    "server certificate: {} serial {} expires {}; chain verified against Ward's root",
                    info.uri_sans.join(","),
                    info.serial,
                    humantime::format_rfc3339_seconds(info.not_after)
                ),
                _ => "no server certificate".into(),
            };
            let ok = matches!(&leaf, Some(Ok(info)) if info.uri_sans == [server_id.uri()])
                && reply.status == 200;
            c.report(
                ok,
                "with a mesh certificate, the server sidecar answers and proves its identity",
                &detail,
            );
        }
        Err(e) => c.report(
            false,
            "with a mesh certificate, the server sidecar answers",
            &e.to_string(),
        ),
    }

    // 6. What each Envoy holds, from its own admin API.
    for (pod, sidecar) in &mesh.sidecars {
        let detail = match sidecar.admin_get("/certs").await {
            Ok(body) => describe_envoy_certs(&body),
            Err(e) => Err(e.to_string()),
        };
        let expected = mesh.mesh.workloads[pod].spiffe_id(td).uri();
        match detail {
            Ok((ids, text)) => c.report(
                ids.contains(&expected),
                &format!("{pod}'s Envoy holds a Ward certificate for {expected}"),
                &text,
            ),
            Err(e) => c.report(false, &format!("{pod}'s Envoy certificates"), &e),
        }
    }
    Ok(c.failed)
}

/// From Envoy's `/certs` JSON: the SPIFFE ids of workload certs, and a
/// readable summary.
fn describe_envoy_certs(body: &str) -> Result<(Vec<String>, String), String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("/certs: {e}"))?;
    let mut ids = Vec::new();
    let mut lines = Vec::new();
    for entry in v["certificates"].as_array().into_iter().flatten() {
        for cert in entry["cert_chain"].as_array().into_iter().flatten() {
            let sans: Vec<String> = cert["subject_alt_names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["uri"].as_str().map(String::from))
                .collect();
            let expires = cert["expiration_time"].as_str().unwrap_or("?");
            let serial = cert["serial_number"].as_str().unwrap_or("?");
            // Envoy lists a certificate once per TLS context that uses it.
            if lines.iter().any(|l: &String| l.contains(serial)) {
                continue;
            }
            let role = if cert["path"]
                .as_str()
                .is_some_and(|p| p.ends_with(crate::bootstrap::CERT_FILE))
            {
                "xDS credential (bootstrap)"
            } else {
                ids.extend(sans.iter().cloned());
                "workload certificate (SDS)"
            };
            lines.push(format!(
                "{role}: {} serial {serial} expires {expires}",
                sans.join(",")
            ));
        }
    }
    Ok((ids, lines.join("\n")))
}
