//! Golden and behavioural tests of the translation.

use std::collections::BTreeMap;

use prost::Message;
use prost_reflect::prost_types::field_descriptor_proto::{Label, Type};
use prost_reflect::prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto};
use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, SerializeOptions, Value};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::transport_socket;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    UpstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};

use super::*;
use crate::model::{
    ContainerPort, Endpoint, Mesh, ObjectKey, Protocol, Service, ServicePort, TargetPort, Workload,
};

const TD: &str = "cluster.local";

// ---------------------------------------------------------------- test mesh

fn pod(name: &str, sa: &str, ip: &str, app_ip: &str, ports: &[(&str, u16)]) -> Workload {
    let app = name.rsplit_once('-').map_or(name, |(a, _)| a);
    Workload {
        key: ObjectKey::new("demo", name),
        labels: [("app".to_string(), app.to_string())].into(),
        service_account: sa.into(),
        ip: ip.parse().unwrap(),
        ready: true,
        ports: ports
            .iter()
            .map(|(n, p)| ContainerPort {
                name: Some(n.to_string()),
                port: *p,
            })
            .collect(),
        app_ip: app_ip.parse().unwrap(),
        outbound_ip: ip.parse().unwrap(),
        interception: Default::default(),
    }
}

fn service(name: &str, port: u16, port_name: &str, target: TargetPort, selector: bool) -> Service {
    Service {
        key: ObjectKey::new("demo", name),
        ports: vec![ServicePort {
            name: port_name.into(),
            port,
            target_port: target,
            protocol: Protocol::detect(None, Some(port_name)),
        }],
        selector: if selector {
            [("app".to_string(), name.to_string())].into()
        } else {
            BTreeMap::new()
        },
        cluster_ips: Vec::new(),
    }
}

fn ep(ip: &str, port: u16, ready: bool, pod: Option<(&str, &str)>) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port,
        ready,
        workload: pod.map(|(p, _)| ObjectKey::new("demo", p)),
        service_account: pod.map(|(_, sa)| sa.to_string()),
    }
}

/// namespace demo: a client; an HTTP service `server` (80 → named target
/// port `http` = 8080); a TCP service `db` with one unready backend; a
/// service `external` backed by addresses without sidecars.
fn test_mesh() -> Mesh {
    let mut mesh = Mesh::default();
    for w in [
        pod("client-0", "client", "127.0.0.10", "127.0.1.10", &[]),
        pod(
            "server-0",
            "server",
            "127.0.0.20",
            "127.0.1.20",
            &[("http", 8080)],
        ),
        pod(
            "db-0",
            "db",
            "127.0.0.30",
            "127.0.1.30",
            &[("postgres", 5432)],
        ),
    ] {
        mesh.workloads.insert(w.key.clone(), w);
    }
    for s in [
        service("server", 80, "http", TargetPort::Name("http".into()), true),
        service("db", 5432, "postgres", TargetPort::Number(5432), true),
        service("external", 9000, "tcp", TargetPort::Number(9000), false),
    ] {
        mesh.services.insert(s.key.clone(), s);
    }
    let key = |n: &str, p: u16| (ObjectKey::new("demo", n), p);
    mesh.endpoints.insert(
        key("server", 80),
        vec![ep("127.0.0.20", 8080, true, Some(("server-0", "server")))],
    );
    mesh.endpoints.insert(
        key("db", 5432),
        vec![
            ep("127.0.0.30", 5432, true, Some(("db-0", "db"))),
            ep("127.0.0.31", 5432, false, Some(("db-1", "db"))),
        ],
    );
    mesh.endpoints.insert(
        key("external", 9000),
        vec![ep("127.0.0.40", 9000, true, None)],
    );
    mesh
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("demo", name)
}

fn translate(mesh: &Mesh, pod: &str) -> ProxyTranslation {
    let shared = mesh_resources(mesh, TD);
    proxy_resources_with(mesh, &shared, TD, &key(pod)).unwrap()
}

fn get<T: Message + Default>(res: &ProxyResources, url: &str, name: &str) -> T {
    let r = res
        .get(url)
        .and_then(|m| m.get(name))
        .unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(r.any.type_url, url);
    T::decode(r.any.value.as_slice()).unwrap()
}

// ------------------------------------------------------------- rendering

fn field(
    name: &str,
    number: i32,
    ty: Type,
    type_name: Option<&str>,
    repeated: bool,
) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(if repeated {
            Label::Repeated
        } else {
            Label::Optional
        } as i32),
        r#type: Some(ty as i32),
        type_name: type_name.map(Into::into),
        ..Default::default()
    }
}

fn msg(
    name: &str,
    fields: Vec<FieldDescriptorProto>,
    nested: Vec<DescriptorProto>,
) -> DescriptorProto {
    DescriptorProto {
        name: Some(name.into()),
        field: fields,
        nested_type: nested,
        ..Default::default()
    }
}

fn file(
    name: &str,
    package: &str,
    deps: &[&str],
    messages: Vec<DescriptorProto>,
) -> FileDescriptorProto {
    FileDescriptorProto {
        name: Some(name.into()),
        package: Some(package.into()),
        dependency: deps.iter().map(|d| d.to_string()).collect(),
        message_type: messages,
        syntax: Some("proto3".into()),
        ..Default::default()
    }
}

/// The xds-api descriptor set predates some files Ward uses (tls.proto,
/// tcp_proxy.proto, http_protocol_options.proto). Declare the messages
/// (with the field numbers of the real protos, for the fields Ward sets) so
/// they render; [`assert_no_unknown_fields`] catches any field missing here.
fn pool() -> DescriptorPool {
    use Type::{Message as M, String as S};
    let mut pool = DescriptorPool::decode(xds_api::FILE_DESCRIPTOR_SET).unwrap();
    let tls = "envoy.extensions.transport_sockets.tls.v3";
    let t = |n: &str| format!(".{tls}.{n}");
    let files = vec![
        file(
            "envoy/extensions/transport_sockets/tls/v3/tls.proto",
            tls,
            &[
                "envoy/extensions/transport_sockets/tls/v3/common.proto",
                "envoy/extensions/transport_sockets/tls/v3/secret.proto",
                "google/protobuf/wrappers.proto",
            ],
            vec![
                msg(
                    "CommonTlsContext",
                    vec![
                        field("tls_certificates", 2, M, Some(&t("TlsCertificate")), true),
                        field(
                            "validation_context",
                            3,
                            M,
                            Some(&t("CertificateValidationContext")),
                            false,
                        ),
                        field("alpn_protocols", 4, S, None, true),
                        field(
                            "tls_certificate_sds_secret_configs",
                            6,
                            M,
                            Some(&t("SdsSecretConfig")),
                            true,
                        ),
                        field(
                            "validation_context_sds_secret_config",
                            7,
                            M,
                            Some(&t("SdsSecretConfig")),
                            false,
                        ),
                        field(
                            "combined_validation_context",
                            8,
                            M,
                            Some(&t("CommonTlsContext.CombinedCertificateValidationContext")),
                            false,
                        ),
                    ],
                    vec![msg(
                        "CombinedCertificateValidationContext",
                        vec![
                            field(
                                "default_validation_context",
                                1,
                                M,
                                Some(&t("CertificateValidationContext")),
                                false,
                            ),
                            field(
                                "validation_context_sds_secret_config",
                                2,
                                M,
                                Some(&t("SdsSecretConfig")),
                                false,
                            ),
                        ],
                        vec![],
                    )],
                ),
                msg(
                    "UpstreamTlsContext",
                    vec![
                        field(
                            "common_tls_context",
                            1,
                            M,
                            Some(&t("CommonTlsContext")),
                            false,
                        ),
                        field("sni", 2, S, None, false),
                    ],
                    vec![],
                ),
                msg(
                    "DownstreamTlsContext",
                    vec![
                        field(
                            "common_tls_context",
                            1,
                            M,
                            Some(&t("CommonTlsContext")),
                            false,
                        ),
                        field(
                            "require_client_certificate",
                            2,
                            M,
                            Some(".google.protobuf.BoolValue"),
                            false,
                        ),
                    ],
                    vec![],
                ),
            ],
        ),
        file(
            "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
            "envoy.extensions.filters.listener.tls_inspector.v3",
            &[],
            vec![msg("TlsInspector", vec![], vec![])],
        ),
        file(
            "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
            "envoy.extensions.filters.network.tcp_proxy.v3",
            &[],
            vec![msg(
                "TcpProxy",
                vec![
                    field("stat_prefix", 1, S, None, false),
                    field("cluster", 2, S, None, false),
                ],
                vec![],
            )],
        ),
        file(
            "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
            "envoy.extensions.upstreams.http.v3",
            &["envoy/config/core/v3/protocol.proto"],
            vec![msg(
                "HttpProtocolOptions",
                vec![field(
                    "use_downstream_protocol_config",
                    4,
                    M,
                    Some(
                        ".envoy.extensions.upstreams.http.v3.HttpProtocolOptions.UseDownstreamHttpConfig",
                    ),
                    false,
                )],
                vec![msg(
                    "UseDownstreamHttpConfig",
                    vec![
                        field(
                            "http_protocol_options",
                            1,
                            M,
                            Some(".envoy.config.core.v3.Http1ProtocolOptions"),
                            false,
                        ),
                        field(
                            "http2_protocol_options",
                            2,
                            M,
                            Some(".envoy.config.core.v3.Http2ProtocolOptions"),
                            false,
                        ),
                    ],
                    vec![],
                )],
            )],
        ),
        // Redirected pods' listeners; Ward sets no field of it.
        file(
            "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
            "envoy.extensions.filters.listener.original_dst.v3",
            &[],
            vec![msg("OriginalDst", vec![], vec![])],
        ),
    ];
    for f in files {
        if pool.get_file_by_name(f.name()).is_none() {
            pool.add_file_descriptor_proto(f).unwrap();
        }
    }
    pool
}

fn decode_any(pool: &DescriptorPool, type_url: &str, value: &[u8]) -> DynamicMessage {
    let name = type_url.rsplit('/').next().unwrap();
    let desc = pool
        .get_message_by_name(name)
        .unwrap_or_else(|| panic!("{name} not in the descriptor pool"));
    DynamicMessage::decode(desc, value).unwrap()
}

/// Fails when a message (or a nested Any) carries a field the pool does not
/// declare: the golden file would silently omit it.
fn assert_no_unknown_fields(pool: &DescriptorPool, m: &DynamicMessage, path: &str) {
    assert_eq!(
        m.unknown_fields().count(),
        0,
        "unknown fields in {path}: {m:?}"
    );
    if m.descriptor().full_name() == "google.protobuf.Any" {
        let url = m.get_field_by_name("type_url").unwrap();
        let value = m.get_field_by_name("value").unwrap();
        let inner = decode_any(pool, url.as_str().unwrap(), value.as_bytes().unwrap());
        assert_no_unknown_fields(pool, &inner, &format!("{path}<{}>", url.as_str().unwrap()));
        return;
    }
    for (f, v) in m.fields() {
        let p = format!("{path}.{}", f.name());
        match v {
            Value::Message(n) => assert_no_unknown_fields(pool, n, &p),
            Value::List(items) => {
                for i in items {
                    if let Value::Message(n) = i {
                        assert_no_unknown_fields(pool, n, &p);
                    }
                }
            }
            Value::Map(entries) => {
                for e in entries.values() {
                    if let Value::Message(n) = e {
                        assert_no_unknown_fields(pool, n, &p);
                    }
                }
            }
            _ => {}
        }
    }
}

fn to_json(pool: &DescriptorPool, r: &Resource) -> serde_json::Value {
    let m = decode_any(pool, &r.any.type_url, &r.any.value);
    assert_no_unknown_fields(pool, &m, &r.name);
    assert_eq!(
        m.get_field_by_name("name")
            .or_else(|| m.get_field_by_name("cluster_name"))
            .unwrap()
            .as_str(),
        Some(r.name.as_str()),
        "resource key and inner name differ"
    );
    let opts = SerializeOptions::new().use_proto_field_name(true);
    m.serialize_with_options(serde_json::value::Serializer, &opts)
        .unwrap()
}

/// `{ "cds": [...], "eds": [...], "lds": [...], "rds": [...] }`, each list in
/// resource-name order, as Envoy's JSON/YAML config spells it.
fn render(res: &ProxyResources) -> serde_json::Value {
    let pool = pool();
    let mut out = serde_json::Map::new();
    for (url, map) in &res.by_type {
        let items = map.values().map(|r| to_json(&pool, r)).collect();
        out.insert(
            type_url::short(url).to_string(),
            serde_json::Value::Array(items),
        );
    }
    serde_json::Value::Object(out)
}

// ---------------------------------------------------------------- goldens

#[test]
fn golden_server() {
    let t = translate(&test_mesh(), "server-0");
    assert_eq!(t.warnings, Vec::<String>::new());
    insta::assert_json_snapshot!("server", render(&t.resources));
}

#[test]
fn golden_client() {
    let t = translate(&test_mesh(), "client-0");
    assert_eq!(t.warnings, Vec::<String>::new());
    insta::assert_json_snapshot!("client", render(&t.resources));
}

/// TCP inbound (tcp_proxy, mesh ALPN only) and a skipped outbound listener.
#[test]
fn golden_db() {
    let t = translate(&test_mesh(), "db-0");
    insta::assert_json_snapshot!(
        "db",
        serde_json::json!({ "warnings": t.warnings, "resources": render(&t.resources) })
    );
}

#[test]
fn unresolvable_target_port_is_a_warning() {
    let mut mesh = test_mesh();
    let mut s = service(
        "server-admin",
        81,
        "http-admin",
        TargetPort::Name("admin".into()),
        false,
    );
    s.selector = [("app".to_string(), "server".to_string())].into();
    mesh.services.insert(s.key.clone(), s);
    let t = translate(&mesh, "server-0");
    assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
    assert!(
        t.warnings[0].contains("demo/server-admin port 81"),
        "{}",
        t.warnings[0]
    );
    let listeners = t.resources.get(type_url::LISTENER).unwrap();
    let inbound: Vec<&String> = listeners
        .keys()
        .filter(|k| k.starts_with("inbound"))
        .collect();
    assert_eq!(inbound, vec!["inbound|8080"]);
}

#[test]
fn golden_secrets() {
    let [cert, bundle] = secrets(
        "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n",
        "-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n",
        "-----BEGIN CERTIFICATE-----\nROOT\n-----END CERTIFICATE-----\n",
    );
    assert_eq!(cert.name, names::WORKLOAD_CERT);
    assert_eq!(bundle.name, names::TRUST_BUNDLE);
    let pool = pool();
    let json = serde_json::json!({ "sds": [to_json(&pool, &cert), to_json(&pool, &bundle)] });
    insta::assert_json_snapshot!("secrets", json);
}

// ------------------------------------------------------------- behaviour

fn upstream_tls(c: &Cluster) -> Option<UpstreamTlsContext> {
    let ts = c.transport_socket.as_ref()?;
    assert_eq!(ts.name, "envoy.transport_sockets.tls");
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        panic!("transport socket without typed_config");
    };
    Some(UpstreamTlsContext::decode(any.value.as_slice()).unwrap())
}

fn pattern(m: StringMatcher) -> String {
    match m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => format!("exact:{s}"),
        Some(string_matcher::MatchPattern::Prefix(s)) => format!("prefix:{s}"),
        other => panic!("unexpected matcher {other:?}"),
    }
}

#[test]
fn san_matchers_are_the_destination_spiffe_ids() {
    let mut mesh = test_mesh();
    // A second backend running as another service account.
    mesh.endpoints
        .get_mut(&(key("server"), 80))
        .unwrap()
        .push(ep("127.0.0.21", 8080, true, Some(("server-1", "api"))));
    let res = translate(&mesh, "client-0").resources;
    let c: Cluster = get(&res, type_url::CLUSTER, "outbound|demo|server|80");
    let tls = upstream_tls(&c).expect("server has sidecars: mTLS");
    assert_eq!(tls.sni, "server.demo.svc.cluster.local");
    let common = tls.common_tls_context.unwrap();
    assert_eq!(common.alpn_protocols, vec![names::MESH_ALPN]);
    assert_eq!(
        common.tls_certificate_sds_secret_configs[0].name,
        names::WORKLOAD_CERT
    );
    let Some(common_tls_context::ValidationContextType::CombinedValidationContext(v)) =
        common.validation_context_type
    else {
        panic!("expected a combined validation context");
    };
    assert_eq!(
        v.validation_context_sds_secret_config.unwrap().name,
        names::TRUST_BUNDLE
    );
    let sans: Vec<String> = v
        .default_validation_context
        .unwrap()
        .match_typed_subject_alt_names
        .into_iter()
        .map(|m| {
            assert_eq!(m.san_type, 3, "URI SAN");
            pattern(m.matcher.unwrap())
        })
        .collect();
    assert_eq!(
        sans,
        vec![
            "exact:spiffe://cluster.local/ns/demo/sa/api",
            "exact:spiffe://cluster.local/ns/demo/sa/server",
        ]
    );
}

#[test]
fn outbound_to_a_service_without_sidecars_is_plaintext() {
    let res = translate(&test_mesh(), "client-0").resources;
    let c: Cluster = get(&res, type_url::CLUSTER, "outbound|demo|external|9000");
    assert!(upstream_tls(&c).is_none());
    let c: Cluster = get(&res, type_url::CLUSTER, "outbound|demo|db|5432");
    assert!(upstream_tls(&c).is_some());
}

#[test]
fn unready_endpoints_are_unhealthy() {
    let res = translate(&test_mesh(), "client-0").resources;
    let cla: ClusterLoadAssignment = get(&res, type_url::ENDPOINT, "outbound|demo|db|5432");
    let health: Vec<(String, i32)> = cla.endpoints[0]
        .lb_endpoints
        .iter()
        .map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("endpoint without address");
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                panic!("not a socket address");
            };
            assert_eq!(
                sa.port_specifier,
                Some(socket_address::PortSpecifier::PortValue(5432))
            );
            (sa.address.clone(), e.health_status)
        })
        .collect();
    assert_eq!(
        health,
        vec![("127.0.0.30".to_string(), 1), ("127.0.0.31".to_string(), 2)],
        "HEALTHY = 1, UNHEALTHY = 2"
    );
}

#[test]
fn outbound_listener_colliding_with_inbound_is_skipped_with_a_warning() {
    // db-0's outbound IP is its pod IP, so outbound db:5432 would take the
    // address of its own inbound listener.
    let t = translate(&test_mesh(), "db-0");
    let listeners = t.resources.get(type_url::LISTENER).unwrap();
    assert!(listeners.contains_key("inbound|5432"));
    assert!(!listeners.contains_key("outbound|demo|db|5432"));
    assert!(listeners.contains_key("outbound|demo|server|80"));
    // The cluster stays: calling yourself through another address is legal.
    assert!(
        t.resources
            .get(type_url::CLUSTER)
            .unwrap()
            .contains_key("outbound|demo|db|5432")
    );
    assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
    assert!(
        t.warnings[0].contains("outbound|demo|db|5432"),
        "{}",
        t.warnings[0]
    );
    assert!(t.warnings[0].contains("inbound|5432"), "{}", t.warnings[0]);
}

#[test]
fn two_services_on_the_same_port_first_in_key_order_wins() {
    let mut mesh = test_mesh();
    let s = service("analytics", 5432, "pg", TargetPort::Number(5432), false);
    mesh.services.insert(s.key.clone(), s);
    let t = translate(&mesh, "client-0");
    let listeners = t.resources.get(type_url::LISTENER).unwrap();
    assert!(listeners.contains_key("outbound|demo|analytics|5432"));
    assert!(!listeners.contains_key("outbound|demo|db|5432"));
    assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
    assert!(
        t.warnings[0].contains("outbound|demo|db|5432 skipped"),
        "{}",
        t.warnings[0]
    );
    assert!(
        t.warnings[0].contains("outbound|demo|analytics|5432"),
        "{}",
        t.warnings[0]
    );
}

#[test]
fn consistency_holds_for_every_proxy() {
    let mesh = test_mesh();
    for pod in mesh.workloads.keys() {
        let res = proxy_resources(&mesh, TD, pod).unwrap();
        check_consistency(&res, &[names::WORKLOAD_CERT, names::TRUST_BUNDLE]).unwrap();
    }
}

#[test]
fn consistency_names_the_dangling_references() {
    let mut res = proxy_resources(&test_mesh(), TD, &key("server-0")).unwrap();
    res.by_type
        .get_mut(type_url::ENDPOINT)
        .unwrap()
        .remove("outbound|demo|db|5432");
    res.by_type
        .get_mut(type_url::ROUTE)
        .unwrap()
        .remove("inbound|8080");
    let err = check_consistency(&res, &[names::WORKLOAD_CERT]).unwrap_err();
    let TranslateError::Dangling(refs) = &err else {
        panic!("unexpected error {err}");
    };
    let found: Vec<(&str, RefKind, &str)> = refs
        .iter()
        .map(|r| (r.from.as_str(), r.kind, r.name.as_str()))
        .collect();
    assert!(found.contains(&(
        "cluster outbound|demo|db|5432",
        RefKind::Endpoints,
        "outbound|demo|db|5432"
    )));
    assert!(found.contains(&("listener inbound|8080", RefKind::Route, "inbound|8080")));
    assert!(found.contains(&("listener inbound|8080", RefKind::Secret, "ROOTCA")));
    assert!(found.contains(&("cluster outbound|demo|server|80", RefKind::Secret, "ROOTCA")));
    assert!(!found.iter().any(|f| f.2 == names::WORKLOAD_CERT));
    let msg = err.to_string();
    assert!(
        msg.contains("outbound|demo|db|5432") && msg.contains("inbound|8080"),
        "{msg}"
    );
}

#[test]
fn consistency_catches_a_missing_cluster() {
    let mut res = proxy_resources(&test_mesh(), TD, &key("server-0")).unwrap();
    res.by_type
        .get_mut(type_url::CLUSTER)
        .unwrap()
        .remove("inbound|8080|local");
    let err = check_consistency(&res, &[names::WORKLOAD_CERT, names::TRUST_BUNDLE]).unwrap_err();
    assert!(
        err.to_string()
            .contains("route inbound|8080 references Cluster \"inbound|8080|local\""),
        "{err}"
    );
}

#[test]
fn output_is_byte_identical_across_runs() {
    let encode = |res: &ProxyResources| -> Vec<(String, Vec<u8>)> {
        res.by_type
            .values()
            .flat_map(|m| m.values())
            .map(|r| (r.name.clone(), r.any.value.clone()))
            .collect()
    };
    for pod in ["client-0", "server-0", "db-0"] {
        let a = proxy_resources(&test_mesh(), TD, &key(pod)).unwrap();
        let b = proxy_resources(&test_mesh(), TD, &key(pod)).unwrap();
        assert_eq!(encode(&a), encode(&b));
        assert_eq!(a, b);
    }
}

#[test]
fn shared_resources_are_shared() {
    let mesh = test_mesh();
    let shared = mesh_resources(&mesh, TD);
    let a = proxy_resources_with(&mesh, &shared, TD, &key("client-0")).unwrap();
    let b = proxy_resources_with(&mesh, &shared, TD, &key("server-0")).unwrap();
    let name = "outbound|demo|server|80";
    for url in [type_url::CLUSTER, type_url::ENDPOINT, type_url::ROUTE] {
        let ra = &a.resources.get(url).unwrap()[name];
        let rb = &b.resources.get(url).unwrap()[name];
        assert!(std::sync::Arc::ptr_eq(ra, rb), "{url} not shared");
    }
    let err = proxy_resources_with(&mesh, &shared, "other.domain", &key("client-0")).unwrap_err();
    assert!(matches!(err, TranslateError::TrustDomainMismatch { .. }));
}

#[test]
fn unknown_proxy_is_an_error() {
    let err = proxy_resources(&test_mesh(), TD, &key("ghost")).unwrap_err();
    assert_eq!(err, TranslateError::UnknownProxy(key("ghost")));
    assert!(err.to_string().contains("demo/ghost"));
}

#[test]
fn inbound_protocol_is_http_if_any_service_port_is_http() {
    let mut mesh = test_mesh();
    // A TCP service selecting the server on the same target port.
    let mut s = service("server-tcp", 7000, "tcp", TargetPort::Number(8080), false);
    s.selector = [("app".to_string(), "server".to_string())].into();
    mesh.services.insert(s.key.clone(), s);
    let t = translate(&mesh, "server-0");
    let listeners = t.resources.get(type_url::LISTENER).unwrap();
    let inbound: Vec<&String> = listeners
        .keys()
        .filter(|k| k.starts_with("inbound"))
        .collect();
    assert_eq!(inbound, vec!["inbound|8080"]);
    assert!(
        t.resources
            .get(type_url::ROUTE)
            .unwrap()
            .contains_key("inbound|8080")
    );
}

// ------------------------------------------------------------- mTLS modes

use crate::model::{ClientTls, MtlsMode, PortPolicy};

fn with_policy(mut mesh: Mesh, svc: &str, port: u16, p: PortPolicy) -> Mesh {
    mesh.mtls.insert((key(svc), port), p);
    mesh
}

fn resource_json(res: &ProxyResources, url: &str, name: &str) -> serde_json::Value {
    let r = res.get(url).and_then(|m| m.get(name)).unwrap();
    to_json(&pool(), r)
}

/// The inbound listener of the server in each mode: filter chains by
/// transport protocol and ALPN, one stat prefix per chain.
#[test]
fn golden_inbound_listener_per_mode() {
    let mut out = serde_json::Map::new();
    for mode in [MtlsMode::Strict, MtlsMode::Permissive, MtlsMode::Disable] {
        let mesh = with_policy(test_mesh(), "server", 80, PortPolicy::converged(mode));
        let t = translate(&mesh, "server-0");
        out.insert(
            mode.to_string(),
            resource_json(&t.resources, type_url::LISTENER, "inbound|8080"),
        );
    }
    insta::assert_json_snapshot!("inbound_modes", serde_json::Value::Object(out));
}

/// The client's cluster toward a STRICT, PERMISSIVE and DISABLE port, a
/// destination outside the mesh, and a STRICT port without known backends.
#[test]
fn golden_client_cluster_per_mode() {
    let mut out = serde_json::Map::new();
    for mode in [MtlsMode::Strict, MtlsMode::Permissive, MtlsMode::Disable] {
        let mesh = with_policy(test_mesh(), "server", 80, PortPolicy::converged(mode));
        let t = translate(&mesh, "client-0");
        out.insert(
            mode.to_string(),
            resource_json(&t.resources, type_url::CLUSTER, "outbound|demo|server|80"),
        );
    }
    let t = translate(&test_mesh(), "client-0");
    out.insert(
        "outside-mesh (PERMISSIVE, no sidecars)".into(),
        resource_json(
            &t.resources,
            type_url::CLUSTER,
            "outbound|demo|external|9000",
        ),
    );
    let mesh = with_policy(
        test_mesh(),
        "external",
        9000,
        PortPolicy::converged(MtlsMode::Strict),
    );
    let t = translate(&mesh, "client-0");
    out.insert(
        "STRICT without sidecars (fail closed)".into(),
        resource_json(
            &t.resources,
            type_url::CLUSTER,
            "outbound|demo|external|9000",
        ),
    );
    insta::assert_json_snapshot!("client_clusters", serde_json::Value::Object(out));
}

#[test]
fn clients_follow_the_applied_state_and_never_send_plaintext_to_strict_servers() {
    let cluster = |p: PortPolicy| {
        let mesh = with_policy(test_mesh(), "server", 80, p);
        let res = translate(&mesh, "client-0").resources;
        upstream_tls(&get::<Cluster>(
            &res,
            type_url::CLUSTER,
            "outbound|demo|server|80",
        ))
        .is_some()
    };
    // Mid-rollout DISABLE -> STRICT: servers accept both, clients not yet switched.
    assert!(!cluster(PortPolicy {
        mode: MtlsMode::Strict,
        server: MtlsMode::Permissive,
        client: ClientTls::Plaintext,
    }));
    // An inconsistent state with STRICT servers: still mTLS (fail closed).
    assert!(cluster(PortPolicy {
        mode: MtlsMode::Disable,
        server: MtlsMode::Strict,
        client: ClientTls::Plaintext,
    }));
    assert!(cluster(PortPolicy::converged(MtlsMode::Permissive)));
    assert!(!cluster(PortPolicy::converged(MtlsMode::Disable)));
}

#[test]
fn two_modes_on_one_target_port_take_the_stricter_with_a_warning() {
    let mut mesh = test_mesh();
    let mut s = service("server-tcp", 7000, "tcp", TargetPort::Number(8080), false);
    s.selector = [("app".to_string(), "server".to_string())].into();
    mesh.services.insert(s.key.clone(), s);
    let mesh = with_policy(mesh, "server", 80, PortPolicy::converged(MtlsMode::Disable));
    let mesh = with_policy(
        mesh,
        "server-tcp",
        7000,
        PortPolicy::converged(MtlsMode::Strict),
    );
    let t = translate(&mesh, "server-0");
    assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
    assert!(
        t.warnings[0].contains("the stricter applies"),
        "{}",
        t.warnings[0]
    );
    let l = resource_json(&t.resources, type_url::LISTENER, "inbound|8080");
    let names: Vec<&str> = l["filter_chains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mtls", "mtls-other-alpn"]);
}

#[test]
fn split_translation_equals_the_whole_one_or_declines_on_collisions() {
    let mut mesh = test_mesh();
    // Two services on one port: the outbound part has a collision of its own.
    let s = service("analytics", 5432, "pg", TargetPort::Number(5432), false);
    mesh.services.insert(s.key.clone(), s);
    let shared = mesh_resources(&mesh, TD);
    let mut split_pods = Vec::new();
    for pod in ["client-0", "server-0", "db-0"] {
        let whole = proxy_resources_with(&mesh, &shared, TD, &key(pod)).unwrap();
        let Some(split) = split_translation(&mesh, TD, &key(pod)).unwrap() else {
            continue;
        };
        split_pods.push(pod);
        let (outbound, outbound_warnings) = outbound_listeners(&mesh, split.outbound_ip);
        let mut combined = ProxyResources::default();
        let shared_maps = [
            (type_url::CLUSTER, &shared.clusters),
            (type_url::ENDPOINT, &shared.endpoints),
            (type_url::ROUTE, &shared.routes),
        ];
        for (ty, map) in shared_maps {
            combined.by_type.insert(ty, map.clone());
        }
        combined
            .by_type
            .insert(type_url::LISTENER, outbound.clone());
        for (ty, map) in &split.inbound.by_type {
            combined
                .by_type
                .entry(ty)
                .or_default()
                .extend(map.iter().map(|(n, r)| (n.clone(), r.clone())));
        }
        assert_eq!(combined, whole.resources, "{pod}");
        assert_eq!(
            split.warnings.len() + outbound_warnings.len(),
            whole.warnings.len(),
            "{pod}: {:?}",
            whole.warnings
        );
    }
    // db-0 binds 5432 where its outbound listener would: no split.
    assert_eq!(split_pods, ["client-0", "server-0"]);
}

// ------------------------------------------------------ redirected traffic

/// The test mesh with cluster IPs, `server-0` and `client-0` redirected.
fn redirect_mesh() -> Mesh {
    let mut mesh = test_mesh();
    for (svc, ip) in [("server", "10.96.0.20"), ("db", "10.96.0.30")] {
        mesh.services.get_mut(&key(svc)).unwrap().cluster_ips = vec![ip.parse().unwrap()];
    }
    for p in ["server-0", "client-0"] {
        let w = mesh.workloads.get_mut(&key(p)).unwrap();
        w.interception = crate::model::Interception::Redirect;
        w.app_ip = w.ip;
    }
    mesh
}

fn listener_names(res: &ProxyResources) -> Vec<String> {
    res.get(type_url::LISTENER)
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn golden_redirect_server() {
    let t = translate(&redirect_mesh(), "server-0");
    assert_eq!(t.warnings, Vec::<String>::new());
    let mut out = serde_json::Map::new();
    for name in [
        names::VIRTUAL_INBOUND_LISTENER,
        names::VIRTUAL_OUTBOUND_LISTENER,
    ] {
        out.insert(
            name.into(),
            resource_json(&t.resources, type_url::LISTENER, name),
        );
    }
    for name in [
        names::PASSTHROUGH_CLUSTER,
        names::INBOUND_PASSTHROUGH_CLUSTER,
        names::BLACKHOLE_CLUSTER,
        "inbound|8080|local",
        "outbound-direct|demo|external|9000",
    ] {
        out.insert(
            name.into(),
            resource_json(&t.resources, type_url::CLUSTER, name),
        );
    }
    insta::assert_json_snapshot!("redirect_server", serde_json::Value::Object(out));
}

#[test]
fn redirected_pods_get_only_the_two_virtual_listeners() {
    let mesh = redirect_mesh();
    let server = translate(&mesh, "server-0").resources;
    assert_eq!(
        listener_names(&server),
        vec![
            "virtual-inbound".to_string(),
            "virtual-outbound".to_string()
        ]
    );
    // The shared outbound clusters, endpoints and routes are those of any
    // other proxy: redirection changes listeners and adds three clusters.
    let explicit = translate(&mesh, "db-0").resources;
    assert_eq!(
        server.get(type_url::ENDPOINT),
        explicit.get(type_url::ENDPOINT)
    );
    let clusters = |r: &ProxyResources| -> Vec<String> {
        r.get(type_url::CLUSTER).unwrap().keys().cloned().collect()
    };
    let mut expected = clusters(&explicit);
    expected.retain(|c| !c.starts_with("inbound|"));
    expected.extend(
        [
            "BlackHoleCluster",
            "InboundPassthroughCluster",
            "PassthroughCluster",
            "inbound|8080|local",
            // `external` has no cluster IP: its pods are called directly.
            "outbound-direct|demo|external|9000",
        ]
        .map(String::from),
    );
    expected.sort();
    assert_eq!(clusters(&server), expected);
    // The explicit-mode pod in the same mesh is unchanged by its
    // neighbours' redirection.
    assert!(listener_names(&explicit).contains(&"inbound|5432".to_string()));
    assert!(translate(&mesh, "client-0").warnings.is_empty());
    // Their virtual listeners are translated whole, never split.
    assert_eq!(split_translation(&mesh, TD, &key("server-0")), Ok(None));
    for pod in ["server-0", "client-0", "db-0"] {
        let t = translate(&mesh, pod);
        check_consistency(&t.resources, &[names::WORKLOAD_CERT, names::TRUST_BUNDLE])
            .unwrap_or_else(|e| panic!("{pod}: {e}"));
    }
}

#[test]
fn virtual_outbound_matches_cluster_ips_headless_pods_and_skips_duplicates() {
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    let mut mesh = redirect_mesh();
    // `external` has no cluster IP (headless): its pods are matched.
    // A second service claiming server's cluster IP and port.
    let mut dup = service("copy", 80, "http", TargetPort::Number(80), false);
    dup.cluster_ips = vec!["10.96.0.20".parse().unwrap(), "10.96.0.21".parse().unwrap()];
    mesh.services.insert(dup.key.clone(), dup);
    let t = translate(&mesh, "client-0");
    let l: Listener = get(&t.resources, type_url::LISTENER, "virtual-outbound");
    let chains: Vec<(String, Vec<String>, u32)> = l
        .filter_chains
        .iter()
        .map(|c| {
            let m = c.filter_chain_match.clone().unwrap();
            (
                c.name.clone(),
                m.prefix_ranges
                    .iter()
                    .map(|r| format!("{}/{}", r.address_prefix, r.prefix_len.unwrap().value))
                    .collect(),
                m.destination_port.unwrap().value,
            )
        })
        .collect();
    assert_eq!(
        chains,
        vec![
            // "copy" sorts first and takes both of its IPs ...
            (
                "outbound|demo|copy|80".to_string(),
                vec!["10.96.0.20/32".to_string(), "10.96.0.21/32".to_string()],
                80
            ),
            (
                "outbound|demo|db|5432".to_string(),
                vec!["10.96.0.30/32".to_string()],
                5432
            ),
            // ... so "server" has none left on port 80 and gets no chain.
            // `external` is headless: its endpoint addresses, target port.
            (
                "outbound-direct|demo|external|9000|9000".to_string(),
                vec!["127.0.0.40/32".to_string()],
                9000
            ),
            ("blackhole|15001".to_string(), vec![], 15001),
        ]
    );
    assert_eq!(
        t.warnings,
        vec![
            "pod demo/client-0: service demo/server port 80: a cluster IP is also another \
             service's; calls to it go to the first service by name"
                .to_string()
        ]
    );
    let default = l.default_filter_chain.unwrap();
    assert_eq!(default.name, "passthrough");
}

#[test]
fn virtual_inbound_restricts_every_mode_chain_to_its_target_port() {
    use crate::model::{MtlsMode, PortPolicy};
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    let mesh = with_policy(
        redirect_mesh(),
        "server",
        80,
        PortPolicy::converged(MtlsMode::Strict),
    );
    let t = translate(&mesh, "server-0");
    let l: Listener = get(&t.resources, type_url::LISTENER, "virtual-inbound");
    let chains: Vec<(String, u32, String, Vec<String>)> = l
        .filter_chains
        .iter()
        .map(|c| {
            let m = c.filter_chain_match.clone().unwrap();
            (
                c.name.clone(),
                m.destination_port.unwrap().value,
                m.transport_protocol,
                m.application_protocols,
            )
        })
        .collect();
    assert_eq!(
        chains,
        vec![
            (
                "8080|mtls".into(),
                8080,
                "tls".into(),
                vec!["ward-mtls".into()]
            ),
            ("8080|mtls-other-alpn".into(), 8080, "tls".into(), vec![]),
            // Plaintext must not fall through to the passthrough chain.
            ("8080|refused".into(), 8080, String::new(), vec![]),
            ("blackhole|15006".into(), 15006, String::new(), vec![]),
        ]
    );
    // original_dst must run before the TLS inspector.
    let filters: Vec<&str> = l.listener_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        filters,
        vec![
            "envoy.filters.listener.original_dst",
            "envoy.filters.listener.tls_inspector"
        ]
    );
}
