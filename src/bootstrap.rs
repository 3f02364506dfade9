//! `ward bootstrap`: the Envoy bootstrap for one pod's sidecar and the
//! credential its ADS connection authenticates with.
//!
//! The template lives in `envoy/bootstrap.yaml`; values are validated before
//! they are substituted, so no input can inject YAML.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ca::store::write_public_file;
use crate::ca::{Authority, CaError, write_private_file};
use crate::model::{Mesh, ObjectKey};
use crate::translate::names;

const TEMPLATE: &str = include_str!("../envoy/bootstrap.yaml");
const TLS_TEMPLATE: &str = include_str!("../envoy/xds-tls.yaml");

/// File names written into the output directory.
pub const BOOTSTRAP_FILE: &str = "envoy.yaml";

/// Port of Envoy's admin listener unless `--envoy-admin` says otherwise
/// (Istio's number; `ward redirect-init` leaves it unredirected).
pub const DEFAULT_ENVOY_ADMIN_PORT: u16 = 15000;
pub const CERT_FILE: &str = "xds-client.crt";
pub const KEY_FILE: &str = "xds-client.key";
pub const CA_FILE: &str = "xds-ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "pod {0} is not in the mesh configuration (is it in --config-dir, with status.podIP set?)"
    )]
    UnknownPod(ObjectKey),
    #[error("--xds-addr {0:?}: expected HOST:PORT, or several separated by commas")]
    XdsAddr(String),
    #[error("issuing the xDS credential for pod {pod}: {source}")]
    Credential {
        pod: ObjectKey,
        #[source]
        source: CaError,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] CaError),
}

/// What to render.
#[derive(Clone, Debug)]
pub struct BootstrapOptions {
    pub pod: ObjectKey,
    /// Where sidecars reach Ward's xDS port: `HOST:PORT`, or several
    /// separated by commas (one per replica) so a sidecar whose ADS stream
    /// fails reconnects to another replica.
    pub xds_addr: String,
    /// Envoy's admin listener; default `<pod IP>:15000`.
    pub envoy_admin: Option<SocketAddr>,
    pub trust_domain: String,
    /// Plaintext ADS (`--insecure-xds` on the server too). No credential.
    pub insecure: bool,
    /// Lifetime of the ADS client credential.
    pub credential_ttl: Duration,
    /// Incremental xDS (`api_type: DELTA_GRPC`) instead of state of the world.
    pub delta: bool,
}

/// Paths of what [`write`] produced.
#[derive(Clone, Debug)]
pub struct BootstrapFiles {
    pub bootstrap: PathBuf,
    pub envoy_admin: SocketAddr,
    pub credential: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// URI SAN on Ward's xDS serving certificate; sidecars require it.
pub fn xds_server_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/ward")
}

/// One `- endpoint:` entry of the `ward-xds` cluster (indentation as in
/// the template's `lb_endpoints`).
const ENDPOINT_TEMPLATE: &str = "        - endpoint:
            address:
              socket_address: { address: \"${XDS_HOST}\", port_value: ${XDS_PORT} }";

/// Parse `--xds-addr`: one or more `HOST:PORT`, comma-separated.
fn split_addrs(addrs: &str) -> Option<Vec<(String, u16)>> {
    addrs
        .split(',')
        .map(|a| split_host_port(a.trim()))
        .collect::<Option<Vec<_>>>()
        .filter(|v| !v.is_empty())
}

/// The `ward-xds` cluster type for these addresses: `STATIC` when all are
/// IPs; one DNS name keeps `LOGICAL_DNS` (one connection target, the
/// Service's address); several with a DNS name need `STRICT_DNS`, the only
/// DNS type that accepts more than one endpoint.
fn cluster_type(addrs: &[(String, u16)]) -> &'static str {
    if addrs.iter().all(|(h, _)| h.parse::<IpAddr>().is_ok()) {
        "STATIC"
    } else if addrs.len() == 1 {
        "LOGICAL_DNS"
    } else {
        "STRICT_DNS"
    }
}

fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    valid.then(|| (host.to_string(), port))
}

/// An xDS client credential as PEM: what `ward bootstrap` issues itself and
/// what `ward sidecar-init` receives from Ward's credential endpoint.
#[derive(Clone)]
pub struct XdsCredential {
    /// The client certificate (and chain) Envoy presents to Ward.
    pub cert_pem: String,
    /// Its private key; written 0600.
    pub key_pem: String,
    /// The xDS CA bundle Envoy checks Ward's serving certificate against.
    pub ca_pem: String,
}

impl std::fmt::Debug for XdsCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("XdsCredential").finish_non_exhaustive()
    }
}

/// Write `envoy.yaml` (and, unless insecure, the credential) into `out`.
pub fn write(
    opts: &BootstrapOptions,
    mesh: &Mesh,
    xds_ca: Option<&Authority>,
    out: &Path,
) -> Result<BootstrapFiles, BootstrapError> {
    let workload = mesh
        .workloads
        .get(&opts.pod)
        .ok_or_else(|| BootstrapError::UnknownPod(opts.pod.clone()))?;
    let admin = opts
        .envoy_admin
        .unwrap_or_else(|| SocketAddr::new(workload.ip, DEFAULT_ENVOY_ADMIN_PORT));
    let credential = match (opts.insecure, xds_ca) {
        (false, Some(ca)) => Some(issue_credential(
            ca,
            mesh,
            &opts.pod,
            &opts.trust_domain,
            opts.credential_ttl,
        )?),
        _ => None,
    };
    let cluster = node_cluster(mesh, &opts.pod);
    write_with(opts, &cluster, admin, credential.as_ref(), out)
}

/// Envoy's `node.cluster` for a pod: the first Service selecting it, else
/// the pod name.
pub fn node_cluster(mesh: &Mesh, pod: &ObjectKey) -> String {
    mesh.workloads
        .get(pod)
        .and_then(|w| mesh.services_selecting(w).next())
        .map(|s| s.key.name.clone())
        .unwrap_or_else(|| pod.name.clone())
}

/// Issue the xDS client credential for `pod` (which must be in `mesh`).
pub fn issue_credential(
    ca: &Authority,
    mesh: &Mesh,
    pod: &ObjectKey,
    trust_domain: &str,
    ttl: Duration,
) -> Result<XdsCredential, BootstrapError> {
    let workload = mesh
        .workloads
        .get(pod)
        .ok_or_else(|| BootstrapError::UnknownPod(pod.clone()))?;
    let id = workload.spiffe_id(trust_domain);
    let cred = ca
        .issue_xds_client(pod, &id, ttl)
        .map_err(|source| BootstrapError::Credential {
            pod: pod.clone(),
            source,
        })?;
    Ok(XdsCredential {
        cert_pem: cred.cert_pem.clone(),
        key_pem: cred.key_pem.expose().to_string(),
        ca_pem: ca.trust_bundle_pem(),
    })
}

/// Write `envoy.yaml` for `opts.pod` with a credential obtained elsewhere
/// (`None`: plaintext ADS), Envoy's `node.cluster` and admin address given.
pub fn write_with(
    opts: &BootstrapOptions,
    cluster: &str,
    admin: SocketAddr,
    credential: Option<&XdsCredential>,
    out: &Path,
) -> Result<BootstrapFiles, BootstrapError> {
    let xds_addrs = split_addrs(&opts.xds_addr)
        .ok_or_else(|| BootstrapError::XdsAddr(opts.xds_addr.clone()))?;
    std::fs::create_dir_all(out).map_err(|source| BootstrapError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let out = std::fs::canonicalize(out).map_err(|source| BootstrapError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let write_file = |name: &str, body: &str, private: bool| -> Result<PathBuf, BootstrapError> {
        let path = out.join(name);
        if private {
            write_private_file(&path, body.as_bytes())?;
        } else {
            write_public_file(&path, body.as_bytes())?;
        }
        Ok(path)
    };

    let (transport, credential) = match credential.filter(|_| !opts.insecure) {
        Some(cred) => {
            let cert = write_file(CERT_FILE, &cred.cert_pem, false)?;
            let key = write_file(KEY_FILE, &cred.key_pem, true)?;
            let ca_file = write_file(CA_FILE, &cred.ca_pem, false)?;
            let tls = TLS_TEMPLATE
                .replace("${CERT_FILE}", &cert.display().to_string())
                .replace("${KEY_FILE}", &key.display().to_string())
                .replace("${CA_FILE}", &ca_file.display().to_string())
                .replace("${XDS_SERVER_ID}", &xds_server_id(&opts.trust_domain));
            (tls, Some((cert, key, ca_file)))
        }
        None => (String::new(), None),
    };
    let endpoints = xds_addrs
        .iter()
        .map(|(host, port)| {
            ENDPOINT_TEMPLATE
                .replace("${XDS_HOST}", host)
                .replace("${XDS_PORT}", &port.to_string())
        })
        .collect::<Vec<_>>()
        .join("\n");
    let body = TEMPLATE
        .replace("${NODE_ID}", &names::node_id(&opts.pod))
        .replace("${NODE_CLUSTER}", cluster)
        .replace(
            "${API_TYPE}",
            if opts.delta { "DELTA_GRPC" } else { "GRPC" },
        )
        .replace("${ADMIN_IP}", &admin.ip().to_string())
        .replace("${ADMIN_PORT}", &admin.port().to_string())
        .replace("${XDS_CLUSTER_TYPE}", cluster_type(&xds_addrs))
        .replace("${XDS_ENDPOINTS}", &endpoints)
        .replace("${XDS_TRANSPORT_SOCKET}", transport.trim_end());
    let bootstrap = write_file(BOOTSTRAP_FILE, &body, false)?;
    Ok(BootstrapFiles {
        bootstrap,
        envoy_admin: admin,
        credential,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing_rejects_injection() {
        assert_eq!(
            split_host_port("127.0.0.1:15010"),
            Some(("127.0.0.1".into(), 15010))
        );
        assert_eq!(
            split_host_port("ward.ward-system.svc:15010"),
            Some(("ward.ward-system.svc".into(), 15010))
        );
        assert_eq!(split_host_port("[::1]:15010"), Some(("::1".into(), 15010)));
        assert_eq!(split_host_port("evil\"\n:1"), None);
        assert_eq!(split_host_port("host"), None);
        assert_eq!(split_host_port("host:99999"), None);
    }

    const POD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: server, namespace: demo}
spec:
  selector: {app: server}
  ports: [{name: http, port: 9080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: server-0, namespace: demo, labels: {app: server}}
spec:
  serviceAccountName: server
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 127.0.0.20}
"#;

    /// Render a bootstrap for `demo/server-0`; the output directory is
    /// replaced by `<OUT>` so the result is stable.
    fn render(xds_addr: &str, insecure: bool) -> Result<String, BootstrapError> {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(config.join("mesh.yaml"), POD).unwrap();
        let (mesh, _, errors) = crate::discovery::DirSource::load_once(&config).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let ca = Authority::generate_in_memory("cluster.local").unwrap();
        let opts = BootstrapOptions {
            pod: ObjectKey::new("demo", "server-0"),
            xds_addr: xds_addr.to_string(),
            envoy_admin: None,
            trust_domain: "cluster.local".into(),
            insecure,
            credential_ttl: Duration::from_secs(3600),
            delta: false,
        };
        let out = tmp.path().join("out");
        let files = write(&opts, &mesh, Some(&ca), &out)?;
        let body = std::fs::read_to_string(&files.bootstrap).unwrap();
        let out = std::fs::canonicalize(&out).unwrap();
        Ok(body.replace(&out.display().to_string(), "<OUT>"))
    }

    #[test]
    fn several_addresses_give_one_endpoint_each() {
        let body = render("127.0.0.1:15010, 127.0.0.2:15011", false).unwrap();
        assert!(body.contains("type: STATIC"), "{body}");
        let a = r#"socket_address: { address: "127.0.0.1", port_value: 15010 }"#;
        let b = r#"socket_address: { address: "127.0.0.2", port_value: 15011 }"#;
        assert!(body.contains(a) && body.contains(b), "{body}");
        assert_eq!(body.matches("- endpoint:").count(), 2, "{body}");
        let yaml: serde_norway::Value = serde_norway::from_str(&body).unwrap();
        let eps = &yaml["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"];
        assert_eq!(eps.as_sequence().map(|s| s.len()), Some(2), "{body}");

        let body = render("ward-0.ward:15010,ward-1.ward:15010", true).unwrap();
        assert!(body.contains("type: STRICT_DNS"), "{body}");
        assert_eq!(body.matches("- endpoint:").count(), 2, "{body}");

        for bad in ["", "127.0.0.1:15010,", "127.0.0.1:15010,host", "a:1,b\":2"] {
            let err = render(bad, false).unwrap_err().to_string();
            assert!(err.contains("--xds-addr"), "{bad:?}: {err}");
        }
    }

    // The single-address bootstraps are pinned: sidecars bootstrapped before
    // several addresses were supported must not see a different file.
    #[test]
    fn single_address_bootstrap_is_unchanged() {
        insta::assert_snapshot!("single_ip", render("127.0.0.1:15010", false).unwrap());
        insta::assert_snapshot!(
            "single_dns",
            render("ward.ward-system.svc:15010", false).unwrap()
        );
        insta::assert_snapshot!("single_insecure", render("127.0.0.1:15010", true).unwrap());
    }
}
