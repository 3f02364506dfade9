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
pub const CERT_FILE: &str = "xds-client.crt";
pub const KEY_FILE: &str = "xds-client.key";
pub const CA_FILE: &str = "xds-ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(
        "pod {0} is not in the mesh configuration (is it in --config-dir, with status.podIP set?)"
    )]
    UnknownPod(ObjectKey),
    #[error("--xds-addr {0:?}: expected HOST:PORT")]
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
    /// Where sidecars reach Ward's xDS port (`HOST:PORT`).
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

/// Write `envoy.yaml` (and, unless insecure, the credential) into `out`.
pub fn write(
    opts: &BootstrapOptions,
    mesh: &Mesh,
    authority: Option<&Authority>,
    out: &Path,
) -> Result<BootstrapFiles, BootstrapError> {
    let workload = mesh
        .workloads
        .get(&opts.pod)
        .ok_or_else(|| BootstrapError::UnknownPod(opts.pod.clone()))?;
    let (xds_host, xds_port) = split_host_port(&opts.xds_addr)
        .ok_or_else(|| BootstrapError::XdsAddr(opts.xds_addr.clone()))?;
    let admin = opts
        .envoy_admin
        .unwrap_or_else(|| SocketAddr::new(workload.ip, 15000));
    let cluster = mesh
        .services_selecting(workload)
        .next()
        .map(|s| s.key.name.clone())
        .unwrap_or_else(|| opts.pod.name.clone());
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

    let (transport, credential) = match (opts.insecure, authority) {
        (false, Some(ca)) => {
            let id = workload.spiffe_id(&opts.trust_domain);
            let cred = ca
                .issue_xds_client(&opts.pod, &id, opts.credential_ttl)
                .map_err(|source| BootstrapError::Credential {
                    pod: opts.pod.clone(),
                    source,
                })?;
            let cert = write_file(CERT_FILE, &cred.cert_pem, false)?;
            let key = write_file(KEY_FILE, cred.key_pem.expose(), true)?;
            let ca_file = write_file(CA_FILE, &ca.trust_bundle_pem(), false)?;
            let tls = TLS_TEMPLATE
                .replace("${CERT_FILE}", &cert.display().to_string())
                .replace("${KEY_FILE}", &key.display().to_string())
                .replace("${CA_FILE}", &ca_file.display().to_string())
                .replace("${XDS_SERVER_ID}", &xds_server_id(&opts.trust_domain));
            (tls, Some((cert, key, ca_file)))
        }
        _ => (String::new(), None),
    };
    let cluster_type = if xds_host.parse::<IpAddr>().is_ok() {
        "STATIC"
    } else {
        "LOGICAL_DNS"
    };
    let body = TEMPLATE
        .replace("${NODE_ID}", &names::node_id(&opts.pod))
        .replace("${NODE_CLUSTER}", &cluster)
        .replace(
            "${API_TYPE}",
            if opts.delta { "DELTA_GRPC" } else { "GRPC" },
        )
        .replace("${ADMIN_IP}", &admin.ip().to_string())
        .replace("${ADMIN_PORT}", &admin.port().to_string())
        .replace("${XDS_CLUSTER_TYPE}", cluster_type)
        .replace("${XDS_HOST}", &xds_host)
        .replace("${XDS_PORT}", &xds_port.to_string())
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
}
