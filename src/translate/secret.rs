//! SDS secrets: a proxy's own certificate and the mesh trust bundle.

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};

use super::{Resource, names};

fn inline(pem: &str) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineString(pem.to_string())),
        ..Default::default()
    }
}

/// The two secrets every sidecar references: [`names::WORKLOAD_CERT`]
/// (its certificate chain and private key) and [`names::TRUST_BUNDLE`] (the
/// roots it verifies peers against). Inline PEM: the sidecar never reads
/// key material from disk.
pub fn secrets(cert_chain_pem: &str, key_pem: &str, trust_bundle_pem: &str) -> [Resource; 2] {
    let cert = Secret {
        name: names::WORKLOAD_CERT.to_string(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(cert_chain_pem)),
            private_key: Some(inline(key_pem)),
            ..Default::default()
        })),
    };
    let bundle = Secret {
        name: names::TRUST_BUNDLE.to_string(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: Some(inline(trust_bundle_pem)),
                ..Default::default()
            },
        )),
    };
    [
        Resource::new(names::WORKLOAD_CERT, cert),
        Resource::new(names::TRUST_BUNDLE, bundle),
    ]
}
