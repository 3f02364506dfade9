//! Wire checks an operator (or a test) runs against a sidecar: a plaintext
//! HTTP request, and an HTTP request over TLS with a chosen client
//! certificate. Used by `ward demo` and the end-to-end tests to observe on
//! the wire what a port accepts, independently of Envoy's own reporting.
//!
//! HTTP/1.1 is written by hand on purpose: the probe must not depend on any
//! client library's notion of TLS or name verification.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("{addr} closed the connection without an HTTP response ({reason})")]
    NoResponse { addr: SocketAddr, reason: String },
    #[error("{addr} timed out")]
    Timeout { addr: SocketAddr },
    #[error("client credential: {0}")]
    Credential(String),
}

/// An HTTP response, and for TLS the server's certificate chain (DER).
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub peer_chain: Vec<Vec<u8>>,
}

/// A client certificate to present.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// How to treat the server's certificate.
#[derive(Clone, Debug)]
pub enum ServerCheck {
    /// Accept anything: the probe is about what the server accepts.
    None,
    /// Require a chain to one of these roots (PEM); names are not checked,
    /// since mesh identities are URI SANs (checked by the caller).
    Roots(String),
}

/// GET `path` in plaintext.
pub async fn plaintext_get(addr: SocketAddr, path: &str, host: &str) -> Result<Reply, ProbeError> {
    let stream = connect(addr).await?;
    http_get(stream, addr, path, host, Vec::new()).await
}

/// GET `path` over TLS, offering `alpn`, presenting `client` if given.
pub async fn tls_get(
    addr: SocketAddr,
    path: &str,
    host: &str,
    client: Option<&ClientCert>,
    server: &ServerCheck,
    alpn: &[&str],
) -> Result<Reply, ProbeError> {
    let (tls, chain) = tls_connect(addr, host, client, server, alpn).await?;
    http_get(tls, addr, path, host, chain).await
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection and the server's certificate chain (DER).
async fn tls_connect(
    addr: SocketAddr,
    host: &str,
    client: Option<&ClientCert>,
    server: &ServerCheck,
    alpn: &[&str],
) -> Result<(TlsStream, Vec<Vec<u8>>), ProbeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match server {
        ServerCheck::None => None,
        ServerCheck::Roots(pem) => Some(certs_from_pem(pem)?),
    };
    let verifier = Arc::new(ProbeVerifier {
        roots,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProbeError::Credential(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        Some(c) => {
            let chain = certs_from_pem(&c.cert_pem)?;
            use rustls::pki_types::pem::PemObject;
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
                .map_err(|e| ProbeError::Credential(format!("private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ProbeError::Credential(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = connect(addr).await?;
    let name = ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from("mesh.invalid".to_string()))
        .map_err(|e| ProbeError::Credential(e.to_string()))?;
    let tls = tokio::time::timeout(TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| ProbeError::Timeout { addr })?
        .map_err(|e| ProbeError::Handshake {
            addr,
            reason: e.to_string(),
        })?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect())
        .unwrap_or_default();
    Ok((tls, chain))
}

/// Anything a keep-alive connection can run over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection, many HTTP/1.1 requests: shows that a connection opened
/// before a change (a certificate rotation, a policy switch) keeps working.
pub struct KeepAlive {
    stream: Box<dyn Io>,
    addr: SocketAddr,
    host: String,
    /// The server's certificate chain from the handshake (TLS only).
    pub peer_chain: Vec<Vec<u8>>,
    /// Bytes read past the last response.
    buf: Vec<u8>,
}

impl KeepAlive {
    pub async fn plaintext(addr: SocketAddr, host: &str) -> Result<Self, ProbeError> {
        let stream = connect(addr).await?;
        Ok(Self {
            stream: Box::new(stream),
            addr,
            host: host.into(),
            peer_chain: vec![],
            buf: vec![],
        })
    }

    pub async fn tls(
        addr: SocketAddr,
        host: &str,
        client: Option<&ClientCert>,
        server: &ServerCheck,
        alpn: &[&str],
    ) -> Result<Self, ProbeError> {
        let (tls, chain) = tls_connect(addr, host, client, server, alpn).await?;
        Ok(Self {
            stream: Box::new(tls),
            addr,
            host: host.into(),
            peer_chain: chain,
            buf: vec![],
        })
    }

    /// GET `path` on this connection; the response must carry a
    /// Content-Length (the sample app and Envoy send one).
    pub async fn get(&mut self, path: &str) -> Result<Reply, ProbeError> {
        let addr = self.addr;
        let no_response = |reason: String| ProbeError::NoResponse { addr, reason };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ward-probe\r\n\r\n",
            self.host
        );
        let io = async {
            self.stream
                .write_all(request.as_bytes())
                .await
                .map_err(|e| no_response(format!("write: {e}")))?;
            let mut chunk = [0u8; 4096];
            loop {
                if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .ok_or_else(|| no_response("response without Content-Length".into()))?;
                    if self.buf.len() >= end + 4 + len {
                        let body =
                            String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).to_string();
                        self.buf.drain(..end + 4 + len);
                        let status = head
                            .get(9..12)
                            .and_then(|c| c.parse::<u16>().ok())
                            .ok_or_else(|| no_response(format!("bad status line in {head:?}")))?;
                        return Ok(Reply {
                            status,
                            body,
                            peer_chain: self.peer_chain.clone(),
                        });
                    }
                }
                let n = self
                    .stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| no_response(e.to_string()))?;
                if n == 0 {
                    return Err(no_response("connection closed".into()));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(TIMEOUT, io)
            .await
            .map_err(|_| ProbeError::Timeout { addr })?
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, ProbeError> {
    tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| ProbeError::Timeout { addr })?
        .map_err(|source| ProbeError::Connect { addr, source })
}

async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
    path: &str,
    host: &str,
    peer_chain: Vec<Vec<u8>>,
) -> Result<Reply, ProbeError> {
    let no_response = |reason: String| ProbeError::NoResponse { addr, reason };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: ward-probe\r\n\r\n"
    );
    let io = async {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| no_response(format!("write: {e}")))?;
        let mut buf = Vec::new();
        // A server that refuses the client certificate (TLS 1.3) or the
        // protocol closes here: read errors are refusals, not probe bugs.
        match stream.read_to_end(&mut buf).await {
            Ok(_) => Ok(buf),
            Err(e) if !buf.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(buf),
            Err(e) => Err(no_response(e.to_string())),
        }
    };
    let buf = tokio::time::timeout(TIMEOUT, io)
        .await
        .map_err(|_| ProbeError::Timeout { addr })??;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| no_response(format!("{} bytes that are not HTTP", buf.len())))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(Reply {
        status,
        body,
        peer_chain,
    })
}

fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, ProbeError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProbeError::Credential(format!("certificate PEM: {e}")))
}

/// Verifies the chain (not the name: mesh identities are URI SANs).
#[derive(Debug)]
struct ProbeVerifier {
    roots: Option<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ProbeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| rustls::Error::General(format!("trust anchor: {e}")))?;
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate chain: {e}")))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
