//! The signing side of the CA: a root Ward generated and persisted, or a
//! root/intermediate plugged in by the user, plus everything that reads
//! certificates back (SANs, serial, expiry, the xDS client identity).
//!
//! Keys are ECDSA P-256 (fast to sign, small, accepted everywhere). Every
//! leaf gets a fresh key: a sidecar only ever holds its own key.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::CaError;
use super::store;
use crate::model::{ObjectKey, SpiffeId};

/// Subject OU that marks an xDS client (bootstrap) credential. A workload
/// SVID never carries it, so a stolen workload key cannot open an ADS stream.
pub const XDS_CLIENT_OU: &str = "ward-xds-client";
/// Certificates are backdated by this much so a peer whose clock is a little
/// behind does not reject a cert issued "in the future".
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Lifetime of a generated root.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Path of the generated root under the state directory.
pub const ROOT_CERT_FILE: &str = "ca/root.crt";
/// Path of the generated root key under the state directory.
pub const ROOT_KEY_FILE: &str = "ca/root.key";
/// Held (created exclusively) while a root is being generated.
const ROOT_LOCK_FILE: &str = ".generate.lock";
/// How long a start waits for another process generating the root.
const ROOT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A private key in PEM form. Never printed: `Debug` and `Display` show
/// `<redacted>`, so a key cannot leak through a log line or a debug dump.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretPem(String);

impl SecretPem {
    pub fn new(pem: String) -> Self {
        SecretPem(pem)
    }

    /// The PEM text, for the few places that must hand it over (SDS, a 0600 file).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What Ward needs to know about a certificate, read back from its DER.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// Lowercase hex, no leading zeros: matches Envoy's `/certs` output.
    pub serial: String,
    /// Start of validity (already backdated by [`CLOCK_SKEW`] for leaves).
    pub not_before: SystemTime,
    /// End of validity: drives rotation and expiry metrics.
    pub not_after: SystemTime,
    /// URI SANs: the SPIFFE ID of a workload.
    pub uri_sans: Vec<String>,
    /// DNS SANs (Ward's serving certificate).
    pub dns_sans: Vec<String>,
    /// IP SANs (Ward's serving certificate).
    pub ip_sans: Vec<IpAddr>,
    /// Subject DN in RFC 4514-ish form, for status pages.
    pub subject: String,
    /// Issuer DN, to show which CA signed a certificate.
    pub issuer: String,
    /// basicConstraints CA:true.
    pub is_ca: bool,
}

/// A freshly signed certificate and its private key.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The leaf followed by the intermediates up to (not including) the root:
    /// exactly what a TLS peer must present.
    pub cert_pem: String,
    /// The leaf's private key (PKCS#8 PEM).
    pub key_pem: SecretPem,
    /// The leaf, read back.
    pub info: CertInfo,
}

/// The certificate authority: signs every certificate Ward hands out.
pub struct Authority {
    /// SPIFFE trust domain every issued identity lives in.
    trust_domain: String,
    /// rcgen's view of the signing certificate (subject, key id) and its key.
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate (a root or an intermediate), read back.
    signing_cert: CertInfo,
    /// PEM of the certificates appended after each leaf: the signing cert
    /// and the intermediates above it when the signer is an intermediate,
    /// empty when the signer is the root.
    chain_pem: String,
    /// The trust anchors, read back (a Vec: a root rotation holds two).
    roots: Vec<CertInfo>,
    /// DER of the trust anchors, for TLS configuration.
    roots_der: Vec<Vec<u8>>,
    /// The roots as concatenated PEM: the SDS validation context.
    trust_bundle_pem: String,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately absent.
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("signing_cert", &self.signing_cert)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Load the root persisted under `<state_dir>/ca/`, or generate and
    /// persist a new one when neither file exists. A restart therefore
    /// reuses the same root. If only one of the two files exists, or a file
    /// is unusable, this fails rather than replace an existing key.
    pub fn load_or_generate(state_dir: &Path, trust_domain: &str) -> Result<Authority, CaError> {
        Self::load_or_generate_as(state_dir, trust_domain, RootKind::Mesh)
    }

    /// Like [`Authority::load_or_generate`], for a root of the given kind
    /// (the kind only names a newly generated root).
    pub fn load_or_generate_as(
        state_dir: &Path,
        trust_domain: &str,
        kind: RootKind,
    ) -> Result<Authority, CaError> {
        validate_trust_domain(trust_domain)?;
        let cert_path = state_dir.join(ROOT_CERT_FILE);
        let key_path = state_dir.join(ROOT_KEY_FILE);
        if cert_path.exists() && key_path.exists() {
            return Self::load_or_generate_locked(state_dir, trust_domain, kind);
        }
        // Replicas sharing a state dir may start at the same instant: only
        // the holder of an exclusive lock file generates; the others wait
        // for it and load what it wrote, so there is one root.
        let dir = cert_path.parent().unwrap_or(state_dir);
        store::create_private_dir(dir)?;
        let lock = dir.join(ROOT_LOCK_FILE);
        let deadline = std::time::Instant::now() + ROOT_LOCK_WAIT;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(_) => {
                    let res = Self::load_or_generate_locked(state_dir, trust_domain, kind);
                    let _ = std::fs::remove_file(&lock);
                    return res;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if std::time::Instant::now() >= deadline {
                        return Err(CaError::file(
                            &lock,
                            "another Ward has been generating the root for too long; \
                             remove this file if no Ward is starting",
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(CaError::io(&lock, "create", e)),
            }
        }
    }

    /// [`Authority::load_or_generate_as`] once no other process generates.
    fn load_or_generate_locked(
        state_dir: &Path,
        trust_domain: &str,
        kind: RootKind,
    ) -> Result<Authority, CaError> {
        let cert_path = state_dir.join(ROOT_CERT_FILE);
        let key_path = state_dir.join(ROOT_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let mode = store::mode(&key_path)?;
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        path = %key_path.display(),
                        mode = format!("{mode:o}"),
                        "root key is readable by group or others; it should be 0600"
                    );
                }
                let auth = Authority::from_files(&cert_path, &key_path, None, trust_domain)?;
                let root = &auth.signing_cert;
                if !root.is_ca || auth.roots.len() != 1 || !auth.chain_pem.is_empty() {
                    return Err(CaError::file(&cert_path, "not a self-signed root"));
                }
                let expected = format!("spiffe://{trust_domain}");
                if let Some(uri) = root.uri_sans.iter().find(|u| u.starts_with("spiffe://"))
                    && *uri != expected
                {
                    return Err(CaError::file(
                        &cert_path,
                        format!(
                            "root was generated for {uri} but Ward runs with trust domain \
                             {trust_domain:?}; move {} away to generate a new root",
                            cert_path.parent().unwrap_or(state_dir).display()
                        ),
                    ));
                }
                Ok(auth)
            }
            (false, false) => {
                let (cert_pem, key_pem) = generate_root(trust_domain, kind)?;
                let dir = cert_path.parent().unwrap_or(state_dir);
                store::create_private_dir(dir)?;
                // Key first: if we crash before the cert is written, the next
                // start refuses (cert missing) instead of orphaning a cert.
                store::write_private_file(&key_path, key_pem.expose().as_bytes())?;
                store::write_public_file(&cert_path, cert_pem.as_bytes())?;
                tracing::info!(path = %cert_path.display(), "generated a new root CA");
                Authority::from_pem(
                    (&cert_path, &cert_pem),
                    (&key_path, key_pem.expose()),
                    None,
                    trust_domain,
                )
            }
            (true, false) => Err(CaError::file(
                &key_path,
                format!(
                    "missing while {} exists; restore the key or remove both files to \
                     generate a new root",
                    cert_path.display()
                ),
            )),
            (false, true) => Err(CaError::file(
                &cert_path,
                format!(
                    "missing while {} exists; refusing to generate a new root over an \
                     existing key (restore the certificate or remove both files)",
                    key_path.display()
                ),
            )),
        }
    }

    /// A new root that lives only in memory: for tests and throwaway demos.
    pub fn generate_in_memory(trust_domain: &str) -> Result<Authority, CaError> {
        validate_trust_domain(trust_domain)?;
        let (cert_pem, key_pem) = generate_root(trust_domain, RootKind::Mesh)?;
        let mem = PathBuf::from("<memory>");
        Authority::from_pem(
            (&mem, &cert_pem),
            (&mem, key_pem.expose()),
            None,
            trust_domain,
        )
    }

    /// A plugged-in CA: a user root, or an intermediate whose `chain` file
    /// holds the certificates above it up to and including the root (extra
    /// self-signed roots after it join the trust bundle). Extra certificates
    /// in the `cert` file are treated as the start of the chain.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        chain: Option<&Path>,
        trust_domain: &str,
    ) -> Result<Authority, CaError> {
        validate_trust_domain(trust_domain)?;
        let cert_text = store::read_text(cert)?;
        let key_text = store::read_text(key)?;
        let chain_text = match chain {
            Some(p) => Some((p, store::read_text(p)?)),
            None => None,
        };
        Authority::from_pem(
            (cert, &cert_text),
            (key, &key_text),
            chain_text.as_ref().map(|(p, t)| (*p, t.as_str())),
            trust_domain,
        )
    }

    /// Build from PEM texts; each comes with the path used in error messages.
    fn from_pem(
        cert: (&Path, &str),
        key: (&Path, &str),
        chain: Option<(&Path, &str)>,
        trust_domain: &str,
    ) -> Result<Authority, CaError> {
        let (cert_path, cert_text) = cert;
        let (key_path, key_text) = key;
        let now = SystemTime::now();

        let cert_ders =
            pem_to_der_certs(cert_text).map_err(|e| CaError::file(cert_path, e.to_string()))?;
        // Every certificate from the signer up, with the file it came from.
        // Extra certificates in the cert file start the chain.
        let mut certs: Vec<(Vec<u8>, &Path)> =
            cert_ders.into_iter().map(|d| (d, cert_path)).collect();
        if let Some((chain_path, chain_text)) = chain {
            let ders = pem_to_der_certs(chain_text)
                .map_err(|e| CaError::file(chain_path, e.to_string()))?;
            // A chain file that repeats the signing certificate is tolerated.
            certs.extend(
                ders.into_iter()
                    .filter(|d| *d != certs[0].0)
                    .map(|d| (d, chain_path))
                    .collect::<Vec<_>>(),
            );
        }
        let parsed = certs
            .iter()
            .enumerate()
            .map(|(i, (der, path))| {
                parse_cert(der).map_err(|e| {
                    if i == 0 {
                        CaError::file(path, e)
                    } else {
                        CaError::file(path, format!("certificate #{i} of the chain: {e}"))
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let signing = &parsed[0];
        check_ca(signing, now).map_err(|e| CaError::file(cert_path, e))?;
        let key_pair = parse_key(key_path, key_text)?;
        if key_pair.public_key_raw() != signing.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::file(
                key_path,
                format!(
                    "private key does not match the certificate in {}",
                    cert_path.display()
                ),
            ));
        }

        // Walk up: each certificate must be issued (name and signature) by the next.
        let mut root = 0;
        while !is_self_signed(&parsed[root]) {
            let current = &parsed[root];
            let Some(next) = parsed.get(root + 1) else {
                let path = chain.map(|(p, _)| p).unwrap_or(cert_path);
                return Err(CaError::file(
                    path,
                    format!(
                        "chain ends at {:?}, which is not self-signed; the chain must hold \
                         every intermediate and the root",
                        current.subject().to_string()
                    ),
                ));
            };
            let next_path = certs[root + 1].1;
            if current.issuer().as_raw() != next.subject().as_raw() {
                return Err(CaError::file(
                    next_path,
                    format!(
                        "certificate {:?} is not the issuer of {:?} (issuer {:?}); order the \
                         chain from the signer up to the root",
                        next.subject().to_string(),
                        current.subject().to_string(),
                        current.issuer().to_string()
                    ),
                ));
            }
            if current.verify_signature(Some(next.public_key())).is_err() {
                return Err(CaError::file(
                    certs[root].1,
                    format!(
                        "signature of {:?} does not verify with the key of {:?}",
                        current.subject().to_string(),
                        next.subject().to_string()
                    ),
                ));
            }
            check_ca(next, now).map_err(|e| CaError::file(next_path, e))?;
            root += 1;
        }
        // Anything after the root must be further roots (a rotation bundle).
        for (extra, (_, path)) in parsed.iter().zip(&certs).skip(root + 1) {
            if !is_self_signed(extra) || !extra.is_ca() {
                return Err(CaError::file(
                    path,
                    format!(
                        "certificate {:?} follows the root but is not a self-signed CA",
                        extra.subject().to_string()
                    ),
                ));
            }
        }
        let chain_pem: String = certs[..root].iter().map(|(d, _)| der_to_pem(d)).collect();
        let roots_der: Vec<Vec<u8>> = certs[root..].iter().map(|(d, _)| d.clone()).collect();
        let signing_der = &certs[0].0;

        let issuer = Issuer::from_ca_cert_der(&signing_der.clone().into(), key_pair)
            .map_err(|e| CaError::file(cert_path, format!("cannot use as an issuer: {e}")))?;
        let roots = roots_der
            .iter()
            .map(|d| cert_info(d))
            .collect::<Result<Vec<_>, _>>()?;
        let trust_bundle_pem = roots_der.iter().map(|d| der_to_pem(d)).collect();
        let auth = Authority {
            trust_domain: trust_domain.to_string(),
            issuer,
            signing_cert: cert_info(signing_der)?,
            chain_pem,
            roots,
            roots_der,
            trust_bundle_pem,
        };
        auth.self_check(cert_path, signing_der)?;
        Ok(auth)
    }

    /// Build from PEM texts held elsewhere than in files (a Kubernetes
    /// Secret): `origin` names where they came from in error messages (e.g.
    /// `Secret ward-system/ward-ca key ca.crt`). Same rules as
    /// [`Authority::from_files`].
    pub fn from_pem_text(
        origin: &str,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Option<&str>,
        trust_domain: &str,
    ) -> Result<Authority, CaError> {
        validate_trust_domain(trust_domain)?;
        let cert = PathBuf::from(format!("{origin} ca.crt"));
        let key = PathBuf::from(format!("{origin} ca.key"));
        let chain = PathBuf::from(format!("{origin} chain.crt"));
        Authority::from_pem(
            (&cert, cert_pem),
            (&key, key_pem),
            chain_pem.map(|c| (chain.as_path(), c)),
            trust_domain,
        )
    }

    /// A new self-signed root as PEM (certificate, key), for stores other
    /// than the state directory (a Kubernetes Secret). Load it with
    /// [`Authority::from_pem_text`].
    pub fn generate_root_pem(trust_domain: &str) -> Result<(String, SecretPem), CaError> {
        validate_trust_domain(trust_domain)?;
        generate_root(trust_domain, RootKind::Mesh)
    }

    /// Sign a probe leaf and check it chains to the signing certificate.
    /// rcgen rebuilds the issuer name from the parsed subject; a subject it
    /// cannot reproduce byte for byte (multi-valued RDNs, repeated
    /// attributes) would yield leaves no peer can chain, so refuse it now.
    fn self_check(&self, cert_path: &Path, signing_der: &[u8]) -> Result<(), CaError> {
        let probe = SpiffeId::new(&self.trust_domain, "ward-system", "probe");
        let issued = self.issue_workload(&probe, Duration::from_secs(60))?;
        let ders = pem_to_der_certs(&issued.cert_pem)?;
        let leaf = parse_cert(&ders[0]).map_err(CaError::InvalidCert)?;
        let signer = parse_cert(signing_der).map_err(CaError::InvalidCert)?;
        if leaf.issuer().as_raw() != signer.subject().as_raw()
            || leaf.verify_signature(Some(signer.public_key())).is_err()
        {
            return Err(CaError::file(
                cert_path,
                format!(
                    "subject {:?} cannot be reproduced when signing (multi-valued or repeated \
                     name attributes are not supported)",
                    signer.subject().to_string()
                ),
            ));
        }
        Ok(())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchors as concatenated PEM (the SDS `ROOTCA` secret).
    pub fn trust_bundle_pem(&self) -> String {
        self.trust_bundle_pem.clone()
    }

    /// The trust anchors, read back.
    pub fn roots(&self) -> &[CertInfo] {
        &self.roots
    }

    /// The trust anchors as DER (for a rustls root store).
    pub fn roots_der(&self) -> &[Vec<u8>] {
        &self.roots_der
    }

    /// The certificate that signs leaves (the root itself, or an intermediate).
    pub fn signing_cert(&self) -> &CertInfo {
        &self.signing_cert
    }

    /// A workload SVID: one URI SAN (the SPIFFE ID), server and client auth.
    pub fn issue_workload(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedCert, CaError> {
        let uri = san_uri(&id.uri())?;
        let params = self.leaf_params(
            ttl,
            DistinguishedName::new(),
            vec![uri],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        self.sign(&format!("workload certificate for {id}"), &params)
    }

    /// The bootstrap credential a sidecar presents on its ADS connection:
    /// client auth only, marked with OU [`XDS_CLIENT_OU`] and CN `ns/name`.
    pub fn issue_xds_client(
        &self,
        pod: &ObjectKey,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationalUnitName, XDS_CLIENT_OU);
        dn.push(DnType::CommonName, pod.to_string());
        let params = self.leaf_params(
            ttl,
            dn,
            vec![san_uri(&id.uri())?],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );
        self.sign(&format!("xDS client certificate for {pod}"), &params)
    }

    /// Ward's own xDS serving certificate.
    pub fn issue_xds_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        let mut sans = Vec::with_capacity(dns_names.len() + ips.len() + 1);
        for name in dns_names {
            let ia5 = name.clone().try_into().map_err(|e| {
                CaError::sign(format!("xDS server certificate DNS name {name:?}"), e)
            })?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        sans.push(san_uri(&format!("spiffe://{}/ward", self.trust_domain))?);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ward");
        dn.push(DnType::CommonName, "ward xds");
        let params = self.leaf_params(ttl, dn, sans, vec![ExtendedKeyUsagePurpose::ServerAuth]);
        self.sign("xDS server certificate", &params)
    }

    fn leaf_params(
        &self,
        ttl: Duration,
        dn: DistinguishedName,
        sans: Vec<SanType>,
        eku: Vec<ExtendedKeyUsagePurpose>,
    ) -> CertificateParams {
        let now = SystemTime::now();
        // A leaf never outlives its signer: peers would reject the chain.
        let not_after = (now + ttl).min(self.signing_cert.not_after);
        let mut p = CertificateParams::default();
        p.not_before = (now - CLOCK_SKEW).into();
        p.not_after = not_after.into();
        p.serial_number = Some(random_serial());
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = eku;
        p.use_authority_key_identifier_extension = true;
        p
    }

    fn sign(&self, what: &str, params: &CertificateParams) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::sign(what, e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::sign(what, e))?;
        let info = cert_info(cert.der())?;
        let mut cert_pem = der_to_pem(cert.der());
        cert_pem.push_str(&self.chain_pem);
        Ok(IssuedCert {
            cert_pem,
            key_pem: SecretPem::new(key.serialize_pem()),
            info,
        })
    }
}

/// What a generated root is for; only its name differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootKind {
    /// Signs workload certificates (the mesh trust bundle).
    Mesh,
    /// Signs Ward's xDS serving certificate and sidecar bootstrap credentials.
    Xds,
}

/// A new self-signed root: (certificate PEM, key PEM). Its common name
/// carries a random suffix so that two roots (old and new during a root
/// rotation, or the mesh and xDS roots) never share a subject name, which
/// would make chain building by issuer name ambiguous.
fn generate_root(trust_domain: &str, kind: RootKind) -> Result<(String, SecretPem), CaError> {
    let what = format!("root CA for trust domain {trust_domain}");
    let key = KeyPair::generate().map_err(|e| CaError::sign(&what, e))?;
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ward");
    let label = match kind {
        RootKind::Mesh => "root CA",
        RootKind::Xds => "xDS CA",
    };
    let suffix = hex::encode(rand::random::<[u8; 4]>());
    dn.push(
        DnType::CommonName,
        format!("Ward {label} {trust_domain} {suffix}"),
    );
    p.distinguished_name = dn;
    p.not_before = (now - CLOCK_SKEW).into();
    p.not_after = (now + ROOT_VALIDITY).into();
    p.serial_number = Some(random_serial());
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![san_uri(&format!("spiffe://{trust_domain}"))?];
    let cert = p.self_signed(&key).map_err(|e| CaError::sign(&what, e))?;
    Ok((der_to_pem(cert.der()), SecretPem::new(key.serialize_pem())))
}

/// SPIFFE trust domain names: lowercase letters, digits, `.`, `-`, `_`.
fn validate_trust_domain(td: &str) -> Result<(), CaError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(CaError::InvalidCert(format!(
            "trust domain {td:?} is not a valid SPIFFE trust domain (lowercase letters, digits, \
             '.', '-', '_')"
        )))
    }
}

fn san_uri(uri: &str) -> Result<SanType, CaError> {
    let ia5 = uri
        .to_string()
        .try_into()
        .map_err(|e| CaError::sign(format!("URI SAN {uri:?}"), e))?;
    Ok(SanType::URI(ia5))
}

/// 128 random bits, encoded as a positive INTEGER (rcgen adds the leading
/// zero byte when the top bit is set). Never zero.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    if bytes.iter().all(|b| *b == 0) {
        bytes[15] = 1;
    }
    SerialNumber::from_slice(&bytes)
}

fn parse_key(path: &Path, text: &str) -> Result<KeyPair, CaError> {
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Err(CaError::file(
            path,
            "encrypted private keys are not supported; decrypt it with \
             `openssl pkcs8 -in KEY -out KEY.pk8`",
        ));
    }
    for label in ["EC PRIVATE KEY", "RSA PRIVATE KEY"] {
        if text.contains(&format!("-----BEGIN {label}-----")) {
            return Err(CaError::file(
                path,
                format!(
                    "{label} (SEC1/PKCS#1) keys are not supported; convert to PKCS#8 with \
                     `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
                ),
            ));
        }
    }
    if !text.contains("-----BEGIN PRIVATE KEY-----") {
        return Err(CaError::file(path, "no PEM \"PRIVATE KEY\" block found"));
    }
    KeyPair::from_pem(text)
        .map_err(|e| CaError::file(path, format!("cannot parse the private key: {e}")))
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err("trailing bytes after the certificate".to_string()),
        Err(e) => Err(format!("cannot parse the certificate: {e}")),
    }
}

/// A usable CA certificate: CA:true, may sign certificates, currently valid.
fn check_ca(cert: &X509Certificate<'_>, now: SystemTime) -> Result<(), String> {
    let subject = cert.subject().to_string();
    let bc = cert
        .basic_constraints()
        .map_err(|e| format!("{subject:?}: invalid basicConstraints: {e}"))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err(format!(
            "{subject:?} is not a CA certificate (basicConstraints CA:true is missing)"
        ));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| format!("{subject:?}: invalid keyUsage: {e}"))?;
    if let Some(ku) = ku
        && !ku.value.key_cert_sign()
    {
        return Err(format!("{subject:?}: keyUsage does not allow keyCertSign"));
    }
    let nb = asn1_to_system(cert.validity().not_before.timestamp());
    let na = asn1_to_system(cert.validity().not_after.timestamp());
    if now >= na {
        return Err(format!("{subject:?} expired at {}", fmt_time(na)));
    }
    if now < nb {
        return Err(format!("{subject:?} is not valid before {}", fmt_time(nb)));
    }
    Ok(())
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.issuer().as_raw() == cert.subject().as_raw() && cert.verify_signature(None).is_ok()
}

fn asn1_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn fmt_time(t: SystemTime) -> String {
    let dt: time::OffsetDateTime = t.into();
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{dt}"))
}

/// Read a certificate back.
pub fn cert_info(cert_der: &[u8]) -> Result<CertInfo, CaError> {
    let cert = parse_cert(cert_der).map_err(CaError::InvalidCert)?;
    let mut info = CertInfo {
        serial: format!("{:x}", cert.serial),
        not_before: asn1_to_system(cert.validity().not_before.timestamp()),
        not_after: asn1_to_system(cert.validity().not_after.timestamp()),
        uri_sans: Vec::new(),
        dns_sans: Vec::new(),
        ip_sans: Vec::new(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        is_ca: cert.is_ca(),
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CaError::InvalidCert(format!("invalid subjectAltName: {e}")))?;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        match name {
            GeneralName::URI(u) => info.uri_sans.push((*u).to_string()),
            GeneralName::DNSName(d) => info.dns_sans.push((*d).to_string()),
            GeneralName::IPAddress(b) => {
                if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                    info.ip_sans.push(IpAddr::from(v4));
                } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                    info.ip_sans.push(IpAddr::from(v6));
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Parse `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn parse_spiffe_id(uri: &str) -> Option<SpiffeId> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (td, path) = rest.split_once('/')?;
    let mut parts = path.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
            if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
        {
            Some(SpiffeId::new(td, ns, sa))
        }
        _ => None,
    }
}

/// The pod and identity proven by a certificate presented on the xDS port.
/// The TLS layer has already verified the chain; this checks that it is an
/// xDS client credential (not a workload SVID) and that its parts agree.
pub fn xds_client_identity(
    cert_der: &[u8],
    trust_domain: &str,
) -> Result<(ObjectKey, SpiffeId), CaError> {
    let cert = parse_cert(cert_der).map_err(CaError::XdsClient)?;
    let subject = cert.subject();
    let has_ou = subject
        .iter_organizational_unit()
        .any(|a| a.as_str().is_ok_and(|s| s == XDS_CLIENT_OU));
    if !has_ou {
        return Err(CaError::XdsClient(format!(
            "subject {:?} lacks OU={XDS_CLIENT_OU} (a workload certificate cannot open an xDS stream)",
            subject.to_string()
        )));
    }
    let cns: Vec<&str> = subject
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .collect();
    let [cn] = cns[..] else {
        return Err(CaError::XdsClient(format!(
            "subject {:?} must have exactly one CN",
            subject.to_string()
        )));
    };
    let pod: ObjectKey = cn
        .parse()
        .map_err(|_| CaError::XdsClient(format!("CN {cn:?} is not NAMESPACE/NAME")))?;
    let info = cert_info(cert_der).map_err(|e| CaError::XdsClient(e.to_string()))?;
    if info.is_ca {
        return Err(CaError::XdsClient("certificate is a CA".into()));
    }
    let [uri] = &info.uri_sans[..] else {
        return Err(CaError::XdsClient(format!(
            "expected exactly one URI SAN, found {}",
            info.uri_sans.len()
        )));
    };
    let id = parse_spiffe_id(uri).ok_or_else(|| {
        CaError::XdsClient(format!("URI SAN {uri:?} is not a SPIFFE workload ID"))
    })?;
    if id.trust_domain != trust_domain {
        return Err(CaError::XdsClient(format!(
            "URI SAN {uri:?} is not in trust domain {trust_domain:?}"
        )));
    }
    if id.namespace != pod.namespace {
        return Err(CaError::XdsClient(format!(
            "URI SAN {uri:?} namespace differs from CN {cn:?}"
        )));
    }
    Ok((pod, id))
}

/// Every `CERTIFICATE` block of a PEM text, as DER. Fails when there is none.
/// Does the certificate chain in `chain_pem` (leaf first, then
/// intermediates) end in a certificate signed by one of the roots in
/// `bundle_pem`? Used to tell which root a live leaf depends on.
pub fn chains_to(chain_pem: &str, bundle_pem: &str) -> bool {
    let (Ok(chain), Ok(roots)) = (pem_to_der_certs(chain_pem), pem_to_der_certs(bundle_pem)) else {
        return false;
    };
    let parsed: Vec<_> = chain
        .iter()
        .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
        .collect();
    if parsed.len() != chain.len() || parsed.is_empty() {
        return false;
    }
    // Each link signed by the next, the top one by a root.
    let links_ok = parsed
        .windows(2)
        .all(|w| w[0].verify_signature(Some(w[1].public_key())).is_ok());
    let Some(top) = parsed.last() else {
        return false;
    };
    links_ok
        && roots.iter().any(|r| {
            X509Certificate::from_der(r)
                .map(|(_, root)| top.verify_signature(Some(root.public_key())).is_ok())
                .unwrap_or(false)
        })
}

pub fn pem_to_der_certs(pem: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let mut reader = pem.as_bytes();
    let ders = rustls_pemfile::certs(&mut reader)
        .map(|r| r.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::InvalidCert(format!("malformed PEM: {e}")))?;
    if ders.is_empty() {
        return Err(CaError::InvalidCert(
            "no PEM \"CERTIFICATE\" block found".into(),
        ));
    }
    Ok(ders)
}

/// PEM-encode one certificate (64-column base64, LF line endings).
pub fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64_encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Standard base64 with padding. Twelve lines here beat a dependency.
fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use std::fs;

    const TD: &str = "cluster.local";

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        parse_cert(der).unwrap()
    }

    fn mode_of(p: &Path) -> u32 {
        store::mode(p).unwrap()
    }

    /// Full path validation as a TLS peer (rustls-webpki) would do it.
    fn webpki_verify(
        chain_pem: &str,
        roots_pem: &str,
        usage: webpki::KeyUsage,
    ) -> Result<(), webpki::Error> {
        let chain: Vec<CertificateDer<'static>> = pem_to_der_certs(chain_pem)
            .unwrap()
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let roots: Vec<CertificateDer<'static>> = pem_to_der_certs(roots_pem)
            .unwrap()
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let anchors: Vec<_> = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
            .collect();
        let ee = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
        ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &anchors,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn replicas_starting_together_on_one_state_dir_share_one_root() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let starts: Vec<_> = (0..4)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    Authority::load_or_generate(&dir, "cluster.local").map(|a| a.trust_bundle_pem())
                })
            })
            .collect();
        let roots: std::collections::BTreeSet<String> = starts
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert_eq!(roots.len(), 1, "one root for every replica");
        assert!(!dir.join("ca").join(ROOT_LOCK_FILE).exists());
    }

    #[test]
    fn generated_root_is_persisted_privately_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::load_or_generate(dir.path(), TD).unwrap();
        let cert_path = dir.path().join(ROOT_CERT_FILE);
        let key_path = dir.path().join(ROOT_KEY_FILE);
        assert_eq!(mode_of(&key_path), 0o600);
        assert_eq!(mode_of(&cert_path), 0o644);
        assert_eq!(mode_of(&dir.path().join("ca")), 0o700);
        let cert_bytes = fs::read(&cert_path).unwrap();
        let key_bytes = fs::read(&key_path).unwrap();

        let root = &a.roots()[0];
        assert_eq!(a.roots().len(), 1);
        assert!(root.is_ca);
        assert_eq!(root.uri_sans, vec!["spiffe://cluster.local".to_string()]);
        assert!(
            root.subject
                .starts_with("O=Ward, CN=Ward root CA cluster.local "),
            "{}",
            root.subject
        );
        let life = root.not_after.duration_since(root.not_before).unwrap();
        assert!(
            life >= ROOT_VALIDITY && life <= ROOT_VALIDITY + CLOCK_SKEW + Duration::from_secs(2)
        );
        let der = pem_to_der_certs(&a.trust_bundle_pem()).unwrap();
        let x = parse(&der[0]);
        let ku = x.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        assert!(x.basic_constraints().unwrap().unwrap().value.ca);
        assert!(is_self_signed(&x));

        // A restart: same root, same bytes, nothing rewritten.
        let b = Authority::load_or_generate(dir.path(), TD).unwrap();
        assert_eq!(a.trust_bundle_pem(), b.trust_bundle_pem());
        assert_eq!(fs::read(&cert_path).unwrap(), cert_bytes);
        assert_eq!(fs::read(&key_path).unwrap(), key_bytes);
        assert_eq!(a.trust_bundle_pem().as_bytes(), &cert_bytes[..]);
        // And it still signs leaves that chain to the persisted root.
        let leaf = b
            .issue_workload(&SpiffeId::new(TD, "demo", "web"), Duration::from_secs(60))
            .unwrap();
        webpki_verify(
            &leaf.cert_pem,
            &a.trust_bundle_pem(),
            webpki::KeyUsage::server_auth(),
        )
        .unwrap();
    }

    #[test]
    fn corrupt_or_missing_root_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        Authority::load_or_generate(dir.path(), TD).unwrap();
        let key_path = dir.path().join(ROOT_KEY_FILE);
        let cert_path = dir.path().join(ROOT_CERT_FILE);
        let good_key = fs::read(&key_path).unwrap();
        let good_cert = fs::read(&cert_path).unwrap();

        fs::write(
            &key_path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = Authority::load_or_generate(dir.path(), TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca/root.key") && err.contains("cannot parse the private key"),
            "{err}"
        );

        fs::write(&key_path, "garbage").unwrap();
        let err = Authority::load_or_generate(dir.path(), TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca/root.key") && err.contains("no PEM"),
            "{err}"
        );

        // A valid key of another root: mismatch, never a silent regeneration.
        let other = generate_root(TD, RootKind::Mesh).unwrap().1;
        fs::write(&key_path, other.expose()).unwrap();
        let err = Authority::load_or_generate(dir.path(), TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca/root.key") && err.contains("does not match"),
            "{err}"
        );
        fs::write(&key_path, &good_key).unwrap();

        fs::write(
            &cert_path,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = Authority::load_or_generate(dir.path(), TD)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca/root.crt"), "{err}");

        // Certificate gone but key present: refuse, and do not touch the key.
        fs::remove_file(&cert_path).unwrap();
        let err = Authority::load_or_generate(dir.path(), TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca/root.crt") && err.contains("refusing"),
            "{err}"
        );
        assert_eq!(fs::read(&key_path).unwrap(), good_key);
        assert!(!cert_path.exists());

        // A root generated for another trust domain.
        fs::write(&cert_path, &good_cert).unwrap();
        let err = Authority::load_or_generate(dir.path(), "example.org")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ca/root.crt") && err.contains("example.org"),
            "{err}"
        );
        Authority::load_or_generate(dir.path(), TD).unwrap();
    }

    #[test]
    fn invalid_trust_domain_is_rejected() {
        let err = Authority::generate_in_memory("Bad Domain")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Bad Domain"), "{err}");
        assert!(Authority::generate_in_memory("").is_err());
    }

    #[test]
    fn workload_leaf_has_the_svid_shape() {
        let a = Authority::generate_in_memory(TD).unwrap();
        let id = SpiffeId::new(TD, "demo", "server");
        let ttl = Duration::from_secs(3600);
        let before = SystemTime::now();
        let issued = a.issue_workload(&id, ttl).unwrap();
        let after = SystemTime::now();

        // Root signer: the chain is the leaf alone.
        let ders = pem_to_der_certs(&issued.cert_pem).unwrap();
        assert_eq!(ders.len(), 1);
        let x = parse(&ders[0]);

        let san = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://cluster.local/ns/demo/sa/server")]
        );
        assert_eq!(issued.info.uri_sans, vec![id.uri()]);
        assert!(issued.info.dns_sans.is_empty() && issued.info.ip_sans.is_empty());
        // Empty subject, so the SAN must be critical (RFC 5280 4.2.1.6).
        assert_eq!(issued.info.subject, "");
        assert!(san.critical);

        let bc = x.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && !bc.value.ca);
        assert!(!issued.info.is_ca);
        let ku = x.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature() && ku.value.key_encipherment());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!eku.any && !eku.code_signing && eku.other.is_empty());

        // Validity: TTL honoured (second precision), backdated for skew.
        let nb = issued.info.not_before;
        let na = issued.info.not_after;
        let s = Duration::from_secs(1);
        assert!(
            na + s >= before + ttl && na <= after + ttl,
            "not_after {na:?}"
        );
        assert!(
            nb + s >= before - CLOCK_SKEW && nb <= after - CLOCK_SKEW,
            "not_before {nb:?}"
        );

        // Serial: positive, 128 random bits (16 or 17 bytes with a sign byte).
        let raw = x.raw_serial();
        assert!(
            raw.len() == 16 || (raw.len() == 17 && raw[0] == 0),
            "{raw:?}"
        );
        assert_eq!(issued.info.serial, format!("{:x}", x.serial));

        // Authority Key Identifier = the root's Subject Key Identifier.
        let root_der = &a.roots_der()[0];
        let root = parse(root_der);
        let ski = root
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.0.to_vec())
                }
                _ => None,
            })
            .unwrap();
        let aki = x
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(k) => {
                    k.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(aki, ski);

        // Signed by the root, and valid for both TLS roles.
        assert_eq!(x.issuer().as_raw(), root.subject().as_raw());
        x.verify_signature(Some(root.public_key())).unwrap();
        webpki_verify(
            &issued.cert_pem,
            &a.trust_bundle_pem(),
            webpki::KeyUsage::server_auth(),
        )
        .unwrap();
        webpki_verify(
            &issued.cert_pem,
            &a.trust_bundle_pem(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();

        // The key is the leaf's, and each issue gets its own key and serial.
        let key = KeyPair::from_pem(issued.key_pem.expose()).unwrap();
        assert_eq!(
            key.public_key_raw(),
            x.public_key().subject_public_key.data.as_ref()
        );
        let again = a.issue_workload(&id, ttl).unwrap();
        assert_ne!(again.key_pem, issued.key_pem);
        assert_ne!(again.info.serial, issued.info.serial);
    }

    #[test]
    fn leaf_never_outlives_its_signer() {
        let a = Authority::generate_in_memory(TD).unwrap();
        let issued = a
            .issue_workload(&SpiffeId::new(TD, "demo", "x"), ROOT_VALIDITY * 2)
            .unwrap();
        assert_eq!(issued.info.not_after, a.signing_cert().not_after);
    }

    #[test]
    fn pem_encoding_matches_rcgen() {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["a.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(der_to_pem(cert.der()), cert.pem());
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        let two = format!("{}{}", cert.pem(), cert.pem());
        assert_eq!(pem_to_der_certs(&two).unwrap().len(), 2);
        assert!(pem_to_der_certs("nothing here").is_err());
    }

    /// A user CA made with plain rcgen, as an operator would bring one.
    struct UserCa {
        cert_pem: String,
        key: KeyPair,
        params: CertificateParams,
    }

    fn user_ca(cn: &str, issuer: Option<&UserCa>) -> UserCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Acme");
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(86400 * 30)).into();
        let cert = match issuer {
            None => params.self_signed(&key).unwrap(),
            Some(i) => {
                let iss = Issuer::from_params(&i.params, &i.key);
                params.signed_by(&key, &iss).unwrap()
            }
        };
        UserCa {
            cert_pem: cert.pem(),
            key,
            params,
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn plugged_in_intermediate_chains_to_the_user_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = user_ca("Acme Root", None);
        let int = user_ca("Acme Mesh Intermediate", Some(&root));
        let cert = write(dir.path(), "int.crt", &int.cert_pem);
        let key = write(dir.path(), "int.key", &int.key.serialize_pem());
        let chain = write(dir.path(), "chain.pem", &root.cert_pem);

        let a = Authority::from_files(&cert, &key, Some(&chain), TD).unwrap();
        assert_eq!(a.trust_bundle_pem(), root.cert_pem);
        assert_eq!(a.roots().len(), 1);
        assert_eq!(a.roots()[0].subject, "O=Acme, CN=Acme Root");
        assert_eq!(
            a.signing_cert().subject,
            "O=Acme, CN=Acme Mesh Intermediate"
        );

        let issued = a
            .issue_workload(&SpiffeId::new(TD, "demo", "web"), Duration::from_secs(600))
            .unwrap();
        let ders = pem_to_der_certs(&issued.cert_pem).unwrap();
        assert_eq!(ders.len(), 2, "leaf + intermediate, no root");
        assert_eq!(ders[1], pem_to_der_certs(&int.cert_pem).unwrap()[0]);
        let leaf = parse(&ders[0]);
        let int_x = parse(&ders[1]);
        leaf.verify_signature(Some(int_x.public_key())).unwrap();
        assert_eq!(issued.info.issuer, "O=Acme, CN=Acme Mesh Intermediate");
        webpki_verify(
            &issued.cert_pem,
            &a.trust_bundle_pem(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();

        // Same thing with the root bundled in the cert file, and a chain file
        // repeating the intermediate: tolerated.
        let bundled = write(
            dir.path(),
            "bundle.crt",
            &format!("{}{}", int.cert_pem, root.cert_pem),
        );
        let a2 = Authority::from_files(&bundled, &key, None, TD).unwrap();
        assert_eq!(a2.trust_bundle_pem(), root.cert_pem);
        let chain2 = write(
            dir.path(),
            "chain2.pem",
            &format!("{}{}", int.cert_pem, root.cert_pem),
        );
        let a3 = Authority::from_files(&cert, &key, Some(&chain2), TD).unwrap();
        assert_eq!(a3.trust_bundle_pem(), root.cert_pem);

        // A second root after the first joins the trust bundle (root rotation).
        let next_root = user_ca("Acme Root 2", None);
        let chain3 = write(
            dir.path(),
            "chain3.pem",
            &format!("{}{}", root.cert_pem, next_root.cert_pem),
        );
        let a4 = Authority::from_files(&cert, &key, Some(&chain3), TD).unwrap();
        assert_eq!(a4.roots().len(), 2);
        assert_eq!(
            a4.trust_bundle_pem(),
            format!("{}{}", root.cert_pem, next_root.cert_pem)
        );
    }

    #[test]
    fn plugged_in_user_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = user_ca("Acme Root", None);
        let cert = write(dir.path(), "root.crt", &root.cert_pem);
        let key = write(dir.path(), "root.key", &root.key.serialize_pem());
        let a = Authority::from_files(&cert, &key, None, TD).unwrap();
        assert_eq!(a.trust_bundle_pem(), root.cert_pem);
        let issued = a
            .issue_workload(&SpiffeId::new(TD, "demo", "web"), Duration::from_secs(600))
            .unwrap();
        assert_eq!(pem_to_der_certs(&issued.cert_pem).unwrap().len(), 1);
        webpki_verify(
            &issued.cert_pem,
            &root.cert_pem,
            webpki::KeyUsage::server_auth(),
        )
        .unwrap();
    }

    #[test]
    fn invalid_plug_in_inputs_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = user_ca("Acme Root", None);
        let int = user_ca("Acme Int", Some(&root));
        let root_key = write(dir.path(), "root.key", &root.key.serialize_pem());
        let root_crt = write(dir.path(), "root.crt", &root.cert_pem);
        let int_crt = write(dir.path(), "int.crt", &int.cert_pem);
        let int_key = write(dir.path(), "int.key", &int.key.serialize_pem());

        // Not a CA: a workload leaf and its key.
        let a = Authority::from_files(&root_crt, &root_key, None, TD).unwrap();
        let leaf = a
            .issue_workload(&SpiffeId::new(TD, "demo", "web"), Duration::from_secs(600))
            .unwrap();
        let leaf_crt = write(dir.path(), "leaf.crt", &leaf.cert_pem);
        let leaf_key = write(dir.path(), "leaf.key", leaf.key_pem.expose());
        let err = Authority::from_files(&leaf_crt, &leaf_key, None, TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("leaf.crt") && err.contains("not a CA"),
            "{err}"
        );

        // Key of another CA.
        let err = Authority::from_files(&int_crt, &root_key, Some(&root_crt), TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("root.key") && err.contains("does not match") && err.contains("int.crt"),
            "{err}"
        );

        // Intermediate without its chain.
        let err = Authority::from_files(&int_crt, &int_key, None, TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("int.crt") && err.contains("not self-signed"),
            "{err}"
        );

        // Chain holding an unrelated root.
        let other = user_ca("Other Root", None);
        let bad_chain = write(dir.path(), "bad-chain.pem", &other.cert_pem);
        let err = Authority::from_files(&int_crt, &int_key, Some(&bad_chain), TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad-chain.pem") && err.contains("not the issuer"),
            "{err}"
        );

        // Chain whose root has the right name but another key.
        let mut impostor = user_ca("Acme Root", None);
        impostor.params.distinguished_name = root.params.distinguished_name.clone();
        let impostor_cert = impostor.params.self_signed(&impostor.key).unwrap();
        let fake_chain = write(dir.path(), "fake-chain.pem", &impostor_cert.pem());
        let err = Authority::from_files(&int_crt, &int_key, Some(&fake_chain), TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("int.crt") && err.contains("does not verify"),
            "{err}"
        );

        // SEC1 key: clear advice instead of a parse error.
        let sec1 = write(
            dir.path(),
            "sec1.key",
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
        );
        let err = Authority::from_files(&root_crt, &sec1, None, TD)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sec1.key") && err.contains("PKCS#8"), "{err}");

        // Missing file.
        let err = Authority::from_files(&dir.path().join("nope.crt"), &root_key, None, TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope.crt") && err.contains("cannot read"),
            "{err}"
        );

        // Not PEM at all.
        let junk = write(dir.path(), "junk.crt", "hello");
        let err = Authority::from_files(&junk, &root_key, None, TD)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("junk.crt") && err.contains("CERTIFICATE"),
            "{err}"
        );
    }

    #[test]
    fn xds_client_identity_accepts_only_client_credentials() {
        let a = Authority::generate_in_memory(TD).unwrap();
        let pod = ObjectKey::new("demo", "client-0");
        let id = SpiffeId::new(TD, "demo", "client");
        let cred = a
            .issue_xds_client(&pod, &id, Duration::from_secs(86400))
            .unwrap();
        let der = pem_to_der_certs(&cred.cert_pem).unwrap().remove(0);
        assert_eq!(
            xds_client_identity(&der, TD).unwrap(),
            (pod.clone(), id.clone())
        );

        let x = parse(&der);
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(cred.info.subject, "OU=ward-xds-client, CN=demo/client-0");
        webpki_verify(
            &cred.cert_pem,
            &a.trust_bundle_pem(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
        assert!(
            webpki_verify(
                &cred.cert_pem,
                &a.trust_bundle_pem(),
                webpki::KeyUsage::server_auth()
            )
            .is_err()
        );

        // A workload SVID cannot open an xDS stream.
        let svid = a.issue_workload(&id, Duration::from_secs(600)).unwrap();
        let der = pem_to_der_certs(&svid.cert_pem).unwrap().remove(0);
        let err = xds_client_identity(&der, TD).unwrap_err().to_string();
        assert!(err.contains("ward-xds-client"), "{err}");

        // The SPIFFE namespace must be the pod's namespace.
        let other_ns = SpiffeId::new(TD, "other", "client");
        let cred = a
            .issue_xds_client(&pod, &other_ns, Duration::from_secs(600))
            .unwrap();
        let der = pem_to_der_certs(&cred.cert_pem).unwrap().remove(0);
        let err = xds_client_identity(&der, TD).unwrap_err().to_string();
        assert!(err.contains("namespace"), "{err}");

        // Another trust domain.
        let foreign = SpiffeId::new("example.org", "demo", "client");
        let cred = a
            .issue_xds_client(&pod, &foreign, Duration::from_secs(600))
            .unwrap();
        let der = pem_to_der_certs(&cred.cert_pem).unwrap().remove(0);
        let err = xds_client_identity(&der, TD).unwrap_err().to_string();
        assert!(err.contains("trust domain"), "{err}");

        assert!(xds_client_identity(b"not a cert", TD).is_err());
    }

    #[test]
    fn xds_server_cert_has_dns_ip_and_ward_uri() {
        let a = Authority::generate_in_memory(TD).unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let issued = a
            .issue_xds_server(
                &["ward.ward-system.svc".to_string()],
                &[ip],
                Duration::from_secs(3600),
            )
            .unwrap();
        assert_eq!(
            issued.info.dns_sans,
            vec!["ward.ward-system.svc".to_string()]
        );
        assert_eq!(issued.info.ip_sans, vec![ip]);
        assert_eq!(
            issued.info.uri_sans,
            vec!["spiffe://cluster.local/ward".to_string()]
        );
        let der = pem_to_der_certs(&issued.cert_pem).unwrap().remove(0);
        let x = parse(&der);
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        webpki_verify(
            &issued.cert_pem,
            &a.trust_bundle_pem(),
            webpki::KeyUsage::server_auth(),
        )
        .unwrap();
        let err = a
            .issue_xds_server(&["bad name ü".to_string()], &[], Duration::from_secs(60))
            .unwrap_err();
        assert!(err.to_string().contains("bad name"), "{err}");
    }

    #[test]
    fn keys_never_appear_in_debug_output() {
        let a = Authority::generate_in_memory(TD).unwrap();
        let issued = a
            .issue_workload(&SpiffeId::new(TD, "demo", "web"), Duration::from_secs(60))
            .unwrap();
        assert!(issued.key_pem.expose().contains("PRIVATE KEY"));
        assert_eq!(format!("{:?}", issued.key_pem), "<redacted>");
        assert_eq!(format!("{}", issued.key_pem), "<redacted>");
        assert!(!format!("{issued:?}").contains("PRIVATE"));
        assert!(!format!("{issued:#?}").contains("PRIVATE"));
        let dbg = format!("{a:?}");
        assert!(
            !dbg.contains("PRIVATE") && dbg.contains("cluster.local"),
            "{dbg}"
        );
    }

    #[test]
    fn spiffe_id_parsing() {
        assert_eq!(
            parse_spiffe_id("spiffe://cluster.local/ns/demo/sa/web"),
            Some(SpiffeId::new("cluster.local", "demo", "web"))
        );
        assert_eq!(parse_spiffe_id("spiffe://cluster.local/ward"), None);
        assert_eq!(
            parse_spiffe_id("spiffe://cluster.local/ns/demo/sa/web/x"),
            None
        );
        assert_eq!(
            parse_spiffe_id("https://cluster.local/ns/demo/sa/web"),
            None
        );
        assert_eq!(parse_spiffe_id("spiffe:///ns/demo/sa/web"), None);
    }

    /// A rough feel for signing throughput (no assertion on time: shared CI).
    #[test]
    fn sign_1000_workload_certs() {
        let a = Authority::generate_in_memory(TD).unwrap();
        let id = SpiffeId::new(TD, "demo", "web");
        let start = std::time::Instant::now();
        let mut serials = std::collections::HashSet::new();
        for _ in 0..1000 {
            let c = a.issue_workload(&id, Duration::from_secs(3600)).unwrap();
            serials.insert(c.info.serial);
        }
        let elapsed = start.elapsed();
        assert_eq!(serials.len(), 1000);
        println!(
            "signed 1000 workload certs in {elapsed:?} ({:.0}/s, one thread, {} build)",
            1000.0 / elapsed.as_secs_f64(),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
    }
}
