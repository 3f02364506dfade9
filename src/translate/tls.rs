//! TLS building blocks shared by listeners (server side) and clusters
//! (client side): SDS references, SAN matchers and the transport sockets.
//!
//! Certificates never appear inline in listeners or clusters: both sides
//! reference the SDS secrets [`names::WORKLOAD_CERT`] and
//! [`names::TRUST_BUNDLE`] over ADS, so a certificate rotation is a single
//! SDS push with no LDS/CDS churn.

use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, TransportSocket, config_source,
    transport_socket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::BoolValue;

use super::names;

/// Canonical name of Envoy's TLS transport socket extension.
pub const TLS_TRANSPORT_SOCKET: &str = "envoy.transport_sockets.tls";

/// ALPN a mesh server accepts on an HTTP port. `ward-mtls` first so that a
/// Ward client (which offers only that) negotiates it; `h2` and `http/1.1`
/// let a non-Ward mTLS client with a mesh certificate negotiate its HTTP
/// version. A client offering none of them still connects: Envoy's server
/// answers "no ALPN" rather than failing the handshake.
const HTTP_SERVER_ALPN: [&str; 3] = [names::MESH_ALPN, "h2", "http/1.1"];

/// Where every dynamic resource comes from: the ADS stream the bootstrap
/// opened to Ward.
pub fn ads_config_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// Reference to an SDS secret served over ADS.
pub fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads_config_source()),
    }
}

fn uri_san(matcher: string_matcher::MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(matcher),
            ignore_case: false,
        }),
        ..Default::default()
    }
}

/// The mesh certificate plus the trust bundle, with the peer's URI SAN
/// checked against `sans` on top of the chain check.
fn mesh_common_context(sans: Vec<SubjectAltNameMatcher>, alpn: &[&str]) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(names::WORKLOAD_CERT)],
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: sans,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(names::TRUST_BUNDLE)),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    }
}

/// Server side of a mesh port: a client certificate is required, chained to
/// the trust bundle and carrying a SPIFFE id of this trust domain. Which
/// workload may call is authorization, not authentication, and is not
/// decided here.
pub fn downstream_mtls(trust_domain: &str, http: bool) -> DownstreamTlsContext {
    let alpn: &[&str] = if http {
        &HTTP_SERVER_ALPN
    } else {
        // An opaque TCP port must not announce HTTP versions it cannot speak.
        &[names::MESH_ALPN]
    };
    let san = uri_san(string_matcher::MatchPattern::Prefix(format!(
        "spiffe://{trust_domain}/"
    )));
    DownstreamTlsContext {
        common_tls_context: Some(mesh_common_context(vec![san], alpn)),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    }
}

/// Client side toward a mesh service: present our certificate, accept only a
/// server whose URI SAN is one of `spiffe_ids` (exact match, the caller
/// passes them sorted so the bytes are stable).
pub fn upstream_mtls(sni: String, spiffe_ids: &[String]) -> UpstreamTlsContext {
    let sans = spiffe_ids
        .iter()
        .map(|id| uri_san(string_matcher::MatchPattern::Exact(id.clone())))
        .collect();
    UpstreamTlsContext {
        common_tls_context: Some(mesh_common_context(sans, &[names::MESH_ALPN])),
        sni,
        ..Default::default()
    }
}

/// Client side toward a STRICT port whose server identities are not known
/// (no backend seen yet): still mTLS, accepting any identity of the
/// service's namespace rather than falling back to plaintext.
pub fn upstream_mtls_namespace(
    sni: String,
    trust_domain: &str,
    namespace: &str,
) -> UpstreamTlsContext {
    let san = uri_san(string_matcher::MatchPattern::Prefix(format!(
        "spiffe://{trust_domain}/ns/{namespace}/sa/"
    )));
    UpstreamTlsContext {
        common_tls_context: Some(mesh_common_context(vec![san], &[names::MESH_ALPN])),
        sni,
        ..Default::default()
    }
}

/// Wrap a TLS context as the `envoy.transport_sockets.tls` transport socket.
pub fn transport_socket<T: prost::Name + prost::Message>(ctx: T) -> TransportSocket {
    TransportSocket {
        name: TLS_TRANSPORT_SOCKET.to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(
            envoy_types::util::pack_any(ctx),
        )),
    }
}
