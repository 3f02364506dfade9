//! The sidecar credential endpoint (Kubernetes mode) and its client,
//! `ward sidecar-init`.
//!
//! An unmodified Envoy in a pod needs an xDS client credential before it
//! can connect. The pod's init container presents a projected
//! service-account token (audience `ward`, bound to the pod) over TLS to
//! `POST /v1/credential`. Ward does not trust anything the pod says: a
//! TokenReview tells it, from the API server, which pod and service account
//! the token belongs to; Ward checks that pod is in the mesh with that
//! service account and returns the same credential `ward bootstrap` would
//! write for it (`Authority::issue_xds_client`), plus the xDS CA bundle.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::bootstrap::{self, BootstrapError};
use crate::ca::Authority;
use crate::model::{Mesh, ObjectKey};

/// The audience tokens must be issued for: a token for the API server (or
/// anything else) is refused, and a `ward` token is useless elsewhere.
pub const AUDIENCE: &str = "ward";
/// The endpoint's path.
pub const CREDENTIAL_PATH: &str = "/v1/credential";
/// TokenReview `user.extra` key naming the pod a bound token belongs to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response `sidecar-init` reads.
const MAX_RESPONSE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("TokenReview failed: {0}")]
    Review(#[source] kube::Error),
    #[error("token refused by the API server: {0}")]
    Unauthenticated(String),
    #[error("token is not for audience {AUDIENCE:?} (TokenReview audiences: {0:?})")]
    Audience(Vec<String>),
    #[error(
        "token user {0:?} is not a service account (expected system:serviceaccount:NAMESPACE:NAME)"
    )]
    NotServiceAccount(String),
    #[error(
        "token of {0} is not bound to a pod (no {POD_NAME_EXTRA} in the TokenReview); mount a projected service-account token"
    )]
    NoPod(String),
    #[error("pod {0} is not in the mesh (is its namespace meshed, and has it a pod IP?)")]
    NotInMesh(ObjectKey),
    #[error("pod {pod} runs as service account {pod_sa:?}, but the token is for {token_sa:?}")]
    ServiceAccount {
        pod: ObjectKey,
        pod_sa: String,
        token_sa: String,
    },
    #[error(transparent)]
    Issue(#[from] BootstrapError),
    #[error("--ward-url {0:?}: expected https://HOST:PORT")]
    Url(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCa { path: PathBuf },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("talking to Ward at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("Ward refused the credential request (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
}

impl CredentialError {
    /// HTTP status for a refusal the endpoint sends back.
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) | Self::Audience(_) => StatusCode::UNAUTHORIZED,
            Self::NotServiceAccount(_)
            | Self::NoPod(_)
            | Self::NotInMesh(_)
            | Self::ServiceAccount { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// `POST /v1/credential` body.
#[derive(Debug, Serialize, Deserialize)]
pub struct CredentialRequest {
    /// The projected service-account token (audience `ward`).
    pub token: String,
}

/// What Ward returns: everything `sidecar-init` needs to write the
/// bootstrap exactly like `ward bootstrap`.
#[derive(Serialize, Deserialize)]
pub struct CredentialResponse {
    /// `namespace/name` of the pod the token proved (from the TokenReview).
    pub pod: String,
    /// Envoy's `node.cluster` for the pod.
    pub cluster: String,
    /// The xDS client certificate (identifies the pod).
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// The xDS CA bundle (verifies Ward's xDS serving certificate).
    pub ca_pem: String,
}

/// Who a token belongs to, per the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIdentity {
    pub pod: ObjectKey,
    pub service_account: String,
}

/// Ask the API server who `token` is (TokenReview, audience `ward`).
pub async fn review(client: &kube::Client, token: &str) -> Result<TokenIdentity, CredentialError> {
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let req = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![AUDIENCE.to_string()]),
        },
        ..TokenReview::default()
    };
    let resp = api
        .create(&PostParams::default(), &req)
        .await
        .map_err(CredentialError::Review)?;
    let status = resp.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(CredentialError::Unauthenticated(
            status
                .error
                .unwrap_or_else(|| "not authenticated".to_string()),
        ));
    }
    // The API server answers with the audiences the token is valid for
    // among those asked; be explicit rather than rely on that alone.
    let audiences = status.audiences.unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(CredentialError::Audience(audiences));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, sa) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| CredentialError::NotServiceAccount(username.clone()))?;
    let pod = user
        .extra
        .as_ref()
        .and_then(|e| e.get(POD_NAME_EXTRA))
        .and_then(|v| v.first())
        .filter(|p| !p.is_empty())
        .ok_or_else(|| CredentialError::NoPod(username.clone()))?;
    Ok(TokenIdentity {
        pod: ObjectKey::new(namespace, pod),
        service_account: sa.to_string(),
    })
}

/// What the endpoint needs.
#[derive(Clone)]
pub struct CredentialService {
    /// TokenReviews go to this API server.
    pub client: kube::Client,
    /// Signs the credentials (the same CA `ward bootstrap` uses).
    pub xds_ca: Arc<Authority>,
    /// The mesh as discovery sees it: is the pod in it, with which account?
    pub mesh: watch::Receiver<Arc<Mesh>>,
    pub trust_domain: String,
    /// Lifetime of an issued credential.
    pub ttl: Duration,
}

impl CredentialService {
    /// Check `token` and issue its pod's credential.
    pub async fn issue(&self, token: &str) -> Result<CredentialResponse, CredentialError> {
        let who = review(&self.client, token).await?;
        let mesh = self.mesh.borrow().clone();
        let workload = mesh
            .workloads
            .get(&who.pod)
            .ok_or_else(|| CredentialError::NotInMesh(who.pod.clone()))?;
        if workload.service_account != who.service_account {
            return Err(CredentialError::ServiceAccount {
                pod: who.pod.clone(),
                pod_sa: workload.service_account.clone(),
                token_sa: who.service_account,
            });
        }
        let cred = bootstrap::issue_credential(
            &self.xds_ca,
            &mesh,
            &who.pod,
            &self.trust_domain,
            self.ttl,
        )?;
        tracing::info!(pod = %who.pod, "issued an xDS credential to sidecar-init");
        Ok(CredentialResponse {
            pod: who.pod.to_string(),
            cluster: bootstrap::node_cluster(&mesh, &who.pod),
            cert_pem: cred.cert_pem,
            key_pem: cred.key_pem,
            ca_pem: cred.ca_pem,
        })
    }
}

async fn handle(
    State(svc): State<CredentialService>,
    Json(req): Json<CredentialRequest>,
) -> Result<Json<CredentialResponse>, (StatusCode, String)> {
    svc.issue(&req.token).await.map(Json).map_err(|e| {
        tracing::warn!(error = %e, "credential request refused");
        (e.status(), e.to_string())
    })
}

/// rustls server config from a PEM certificate chain and key.
pub fn server_tls(cert_pem: &str, key_pem: &str) -> Result<TlsAcceptor, CredentialError> {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CredentialError::Tls(e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| CredentialError::Tls(e.to_string()))?
        .ok_or_else(|| CredentialError::Tls("no private key".into()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| CredentialError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| CredentialError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A TCP listener that hands axum TLS streams. Handshakes run one at a
/// time with a short deadline: callers are init containers, a few per
/// pod start.
struct TlsListener {
    tcp: TcpListener,
    tls: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "credential endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(stream)).await {
                Ok(Ok(tls)) => return (tls, peer),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "credential endpoint: TLS handshake failed")
                }
                Err(_) => tracing::debug!(%peer, "credential endpoint: TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Serve `POST /v1/credential` over TLS on `listener` until `shutdown`.
pub async fn serve(
    svc: CredentialService,
    listener: TcpListener,
    tls: TlsAcceptor,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route(CREDENTIAL_PATH, post(handle))
        .with_state(svc);
    axum::serve(TlsListener { tcp: listener, tls }, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Read a file, naming it on failure.
pub fn read_file(path: &Path) -> Result<String, CredentialError> {
    std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The client side of `ward sidecar-init`: present `token` to Ward at
/// `url` (`https://HOST:PORT`), verifying Ward against `ca_pem`.
pub async fn fetch(
    url: &str,
    ca_pem: &str,
    ca_path: &Path,
    token: &str,
) -> Result<CredentialResponse, CredentialError> {
    let bad_url = || CredentialError::Url(url.to_string());
    let hostport = url
        .strip_prefix("https://")
        .map(|r| r.trim_end_matches('/'))
        .filter(|r| !r.contains('/'))
        .ok_or_else(bad_url)?;
    let (host, port) = hostport.rsplit_once(':').ok_or_else(bad_url)?;
    let port: u16 = port.parse().map_err(|_| bad_url())?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let server_name =
        rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| bad_url())?;

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| CredentialError::Tls(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| CredentialError::Tls(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(CredentialError::NoCa {
            path: ca_path.to_path_buf(),
        });
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| CredentialError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connect_err = |message: String| CredentialError::Connect {
        url: url.to_string(),
        message,
    };
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| connect_err(format!("TLS: {e}")))?;

    // One HTTP/1.1 request with `Connection: close`: the response ends at EOF.
    let body = serde_json::to_string(&CredentialRequest {
        token: token.trim().to_string(),
    })
    .map_err(|e| connect_err(e.to_string()))?;
    let request = format!(
        "POST {CREDENTIAL_PATH} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let mut raw = Vec::new();
    let read = (&mut tls).take(MAX_RESPONSE).read_to_end(&mut raw).await;
    // A peer that closes without close_notify still sent a whole response.
    if let Err(e) = read
        && raw.is_empty()
    {
        return Err(connect_err(e.to_string()));
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| connect_err("malformed HTTP response".into()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| connect_err("malformed HTTP status line".into()))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err(connect_err("unexpected chunked response".into()));
    }
    if status != 200 {
        return Err(CredentialError::Refused {
            status,
            message: body.trim().to_string(),
        });
    }
    serde_json::from_str(body).map_err(|e| connect_err(format!("response body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_client_errors() {
        assert_eq!(
            CredentialError::Audience(vec![]).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            CredentialError::NotInMesh(ObjectKey::new("a", "b")).status(),
            StatusCode::FORBIDDEN
        );
    }
}
