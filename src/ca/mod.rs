//! Built-in certificate authority: the root (generated or plugged in), workload and xDS certificates, and per-proxy rotation.
//!
//! - [`authority`]: [`Authority`] holds the signing certificate and key, the
//!   chain up to the root and the trust bundle; it signs workload SVIDs, the
//!   sidecars' xDS client credentials and Ward's own xDS serving certificate.
//!   Also the read-back helpers ([`cert_info`], [`xds_client_identity`]).
//! - [`manager`]: [`CertManager`] keeps one certificate per connected proxy
//!   and rotates it at about half its life from a single task.
//! - [`store`]: atomic, permission-aware file writes for keys and certs.

use std::path::{Path, PathBuf};

pub mod authority;
pub mod manager;
pub mod rotation;
pub mod store;

pub use authority::{
    Authority, CertInfo, IssuedCert, RootKind, SecretPem, XDS_CLIENT_OU, cert_info, chains_to,
    der_to_pem, parse_spiffe_id, pem_to_der_certs, xds_client_identity,
};
pub use manager::{CertManager, CertStatus, RotationConfig, Signer, WorkloadCert};
pub use rotation::{AckSource, ProxyAck, RootRotation, RootRotator, RotationStatus};
pub use store::write_private_file;

/// Everything that can go wrong in the CA. Messages name the file, the
/// certificate or the proxy involved, so an operator can act on them.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read, written or renamed.
    #[error("{}: cannot {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A CA file exists but its content is unusable (corrupt PEM, not a CA,
    /// key does not match, chain does not verify, ...).
    #[error("{}: {reason}", path.display())]
    InvalidFile { path: PathBuf, reason: String },
    /// A certificate or PEM given in memory could not be parsed.
    #[error("invalid certificate: {0}")]
    InvalidCert(String),
    /// rcgen refused to build or sign a certificate.
    #[error("cannot sign {what}: {reason}")]
    Sign { what: String, reason: String },
    /// A peer certificate on the xDS port is not a valid Ward xDS client credential.
    #[error("xDS client certificate rejected: {0}")]
    XdsClient(String),
}

impl CaError {
    pub(crate) fn file(path: &Path, reason: impl Into<String>) -> Self {
        CaError::InvalidFile {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        CaError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    pub(crate) fn sign(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        CaError::Sign {
            what: what.into(),
            reason: e.to_string(),
        }
    }
}
