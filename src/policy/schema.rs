//! The policy ConfigMap schema: one ConfigMap labelled `ward.io/policy`
//! is one [`Policy`].
//!
//! ```yaml
//! apiVersion: v1
//! kind: ConfigMap
//! metadata:
//!   name: server-mtls
//!   namespace: demo
//!   labels: {ward.io/policy: "true"}
//! data:
//!   scope: service          # mesh | namespace | service
//!   service: server         # service scope: a Service in this namespace
//!   mode: STRICT            # STRICT | PERMISSIVE | DISABLE | DEFAULT (any case)
//!   ports: |                # service scope: port number or name -> mode
//!     9080: PERMISSIVE
//!     metrics: DISABLE
//! ```
//!
//! This module checks what one ConfigMap can check on its own (keys, modes,
//! YAML); whether the service and its ports exist is checked against the
//! mesh in [`super::resolve`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde_norway::Value;

use crate::discovery::ConfigError;
use crate::model::{MtlsMode, ObjectKey, Policy, PolicyScope, PortSelector};

/// The data keys a policy ConfigMap may carry.
pub const DATA_KEYS: [&str; 4] = ["scope", "service", "mode", "ports"];

/// `ConfigMap namespace/name`, the way errors name a policy.
pub fn object_name(key: &ObjectKey) -> String {
    format!("ConfigMap {key}")
}

/// `data.ports["9080"]`: the field path of one port entry.
pub fn port_field(port: &str) -> String {
    format!("data.ports[{port:?}]")
}

fn unknown_mode(value: &str) -> String {
    format!("unknown mode {value:?}; expected STRICT, PERMISSIVE, DISABLE or DEFAULT")
}

/// Parse one policy ConfigMap. Every problem is reported (not just the
/// first), each naming the ConfigMap and the field.
pub fn parse_config_map(key: &ObjectKey, cm: &ConfigMap) -> Result<Policy, Vec<ConfigError>> {
    let object = object_name(key);
    let err = |field: &str, msg: String| ConfigError::new(&object, field, msg);
    let mut errors = Vec::new();
    let empty = BTreeMap::new();
    let data = cm.data.as_ref().unwrap_or(&empty);
    if data.is_empty() {
        return Err(vec![err(
            "data",
            "is required: a policy needs at least data.scope".into(),
        )]);
    }
    for k in data.keys() {
        if !DATA_KEYS.contains(&k.as_str()) {
            errors.push(err(
                &format!("data.{k}"),
                format!("unknown key; expected one of {}", DATA_KEYS.join(", ")),
            ));
        }
    }
    let get = |k: &str| data.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());

    let mode = match get("mode") {
        None => None,
        Some(v) => match MtlsMode::parse(v) {
            Some(m) => Some(m),
            None => {
                errors.push(err("data.mode", unknown_mode(v)));
                None
            }
        },
    };
    let service = get("service");
    let scope = match get("scope").map(str::to_ascii_lowercase).as_deref() {
        None => {
            errors.push(err(
                "data.scope",
                "is required: mesh, namespace or service".into(),
            ));
            None
        }
        Some("mesh") => Some(PolicyScope::Mesh),
        Some("namespace") => Some(PolicyScope::Namespace(key.namespace.clone())),
        Some("service") => match service {
            Some(s) if !s.contains('/') => Some(PolicyScope::Service(ObjectKey::new(
                key.namespace.clone(),
                s,
            ))),
            Some(s) => {
                errors.push(err(
                    "data.service",
                    format!(
                        "{s:?}: name a Service in this ConfigMap's namespace ({}), without a namespace",
                        key.namespace
                    ),
                ));
                None
            }
            None => {
                errors.push(err("data.service", "is required for scope service".into()));
                None
            }
        },
        Some(other) => {
            errors.push(err(
                "data.scope",
                format!("unknown scope {other:?}; expected mesh, namespace or service"),
            ));
            None
        }
    };
    let is_service = matches!(scope, Some(PolicyScope::Service(_)));
    if let Some(scope) = &scope
        && !is_service
    {
        if service.is_some() {
            errors.push(err(
                "data.service",
                format!("is only allowed with scope service (this policy's scope is {scope})"),
            ));
        }
        if get("ports").is_some() {
            errors.push(err(
                "data.ports",
                format!("is only allowed with scope service (this policy's scope is {scope})"),
            ));
        }
        if mode.is_none() && get("mode").is_none() {
            errors.push(err(
                "data.mode",
                format!("is required for a {scope} policy"),
            ));
        }
    }
    let ports = match get("ports") {
        Some(text) if is_service => parse_ports(text, &object, &mut errors),
        _ => BTreeMap::new(),
    };
    if is_service
        && mode.is_none()
        && get("mode").is_none()
        && ports.is_empty()
        && errors.is_empty()
    {
        errors.push(err(
            "data",
            "a service policy needs data.mode or data.ports".into(),
        ));
    }
    match scope {
        Some(scope) if errors.is_empty() => Ok(Policy {
            config_map: key.clone(),
            scope,
            mode: mode.unwrap_or(MtlsMode::Default),
            ports,
        }),
        _ => Err(errors),
    }
}

/// `data.ports`: a YAML map of port (number or name) to mode.
fn parse_ports(
    text: &str,
    object: &str,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<PortSelector, MtlsMode> {
    let mut out = BTreeMap::new();
    let value: Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            errors.push(ConfigError::new(
                object,
                "data.ports",
                format!("is not valid YAML: {e}"),
            ));
            return out;
        }
    };
    let Value::Mapping(map) = value else {
        errors.push(ConfigError::new(
            object,
            "data.ports",
            "must be a YAML map of port (number or name) to mode, e.g. `9080: STRICT`",
        ));
        return out;
    };
    for (k, v) in map {
        let label = match &k {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => format!("{other:?}"),
        };
        let field = port_field(&label);
        let selector = match &k {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .map(PortSelector::Number),
            Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .map(PortSelector::Number),
            Value::String(s) if is_port_name(s) => Some(PortSelector::Name(s.clone())),
            _ => None,
        };
        let Some(selector) = selector else {
            errors.push(ConfigError::new(
                object,
                &field,
                "is not a port number (1-65535) or a port name",
            ));
            continue;
        };
        let mode = match &v {
            Value::String(s) => MtlsMode::parse(s).ok_or_else(|| unknown_mode(s)),
            other => Err(format!(
                "must be a mode (STRICT, PERMISSIVE, DISABLE or DEFAULT), not {other:?}"
            )),
        };
        match mode {
            Ok(m) => {
                if out.insert(selector, m).is_some() {
                    errors.push(ConfigError::new(object, &field, "is listed twice"));
                }
            }
            Err(msg) => errors.push(ConfigError::new(object, &field, msg)),
        }
    }
    out
}

/// A Kubernetes port name: lowercase alphanumerics and '-', at most 15.
fn is_port_name(s: &str) -> bool {
    s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn cm(ns: &str, name: &str, data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some([("ward.io/policy".to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn parse(data: &[(&str, &str)]) -> Result<Policy, Vec<String>> {
        parse_config_map(&ObjectKey::new("demo", "p"), &cm("demo", "p", data))
            .map_err(|e| e.iter().map(ToString::to_string).collect())
    }

    /// The shipped examples (manifests/policies) are valid policies.
    #[test]
    fn shipped_examples_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/policies");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let cm: ConfigMap =
                serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let meta = &cm.metadata;
            let key = ObjectKey::new(meta.namespace.clone().unwrap(), meta.name.clone().unwrap());
            parse_config_map(&key, &cm).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
            n += 1;
        }
        assert!(n >= 7, "one example per mode and per scope");
    }

    #[test]
    fn parses_every_scope_case_insensitively() {
        let p = parse(&[("scope", "Mesh"), ("mode", "strict")]).unwrap();
        assert_eq!((p.scope, p.mode), (PolicyScope::Mesh, MtlsMode::Strict));
        let p = parse(&[("scope", "namespace"), ("mode", "Disable")]).unwrap();
        assert_eq!(p.scope, PolicyScope::Namespace("demo".into()));
        assert_eq!(p.mode, MtlsMode::Disable);
        let p = parse(&[
            ("scope", "service"),
            ("service", "server"),
            (
                "ports",
                "9080: permissive\n\"9090\": DISABLE\nmetrics: default\n",
            ),
        ])
        .unwrap();
        assert_eq!(
            p.scope,
            PolicyScope::Service(ObjectKey::new("demo", "server"))
        );
        assert_eq!(p.mode, MtlsMode::Default);
        assert_eq!(
            p.ports,
            BTreeMap::from([
                (PortSelector::Number(9080), MtlsMode::Permissive),
                (PortSelector::Number(9090), MtlsMode::Disable),
                (PortSelector::Name("metrics".into()), MtlsMode::Default),
            ])
        );
        // Canonical uppercase output.
        assert_eq!(serde_json::to_value(p.ports).unwrap()["9080"], "PERMISSIVE");
    }

    /// Every validation error, with the field it names.
    #[test]
    fn every_schema_error_names_the_config_map_and_field() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "ConfigMap demo/p: data: is required"),
            (
                &[("scope", "mesh"), ("mode", "STRCT")],
                "ConfigMap demo/p: data.mode: unknown mode \"STRCT\"; expected STRICT, PERMISSIVE, DISABLE or DEFAULT",
            ),
            (
                &[("scope", "mesh"), ("mode", "STRICT"), ("colour", "blue")],
                "ConfigMap demo/p: data.colour: unknown key; expected one of scope, service, mode, ports",
            ),
            (
                &[("mode", "STRICT")],
                "ConfigMap demo/p: data.scope: is required",
            ),
            (
                &[("scope", "cluster"), ("mode", "STRICT")],
                "ConfigMap demo/p: data.scope: unknown scope \"cluster\"",
            ),
            (
                &[("scope", "mesh")],
                "ConfigMap demo/p: data.mode: is required for a mesh policy",
            ),
            (
                &[("scope", "service"), ("mode", "STRICT")],
                "ConfigMap demo/p: data.service: is required for scope service",
            ),
            (
                &[
                    ("scope", "service"),
                    ("service", "other/server"),
                    ("mode", "STRICT"),
                ],
                "ConfigMap demo/p: data.service: \"other/server\": name a Service in this ConfigMap's namespace",
            ),
            (
                &[
                    ("scope", "namespace"),
                    ("mode", "STRICT"),
                    ("service", "server"),
                ],
                "ConfigMap demo/p: data.service: is only allowed with scope service",
            ),
            (
                &[
                    ("scope", "namespace"),
                    ("mode", "STRICT"),
                    ("ports", "80: STRICT"),
                ],
                "ConfigMap demo/p: data.ports: is only allowed with scope service",
            ),
            (
                &[
                    ("scope", "service"),
                    ("service", "server"),
                    ("ports", "80: [STRICT"),
                ],
                "ConfigMap demo/p: data.ports: is not valid YAML",
            ),
            (
                &[
                    ("scope", "service"),
                    ("service", "server"),
                    ("ports", "- 80"),
                ],
                "ConfigMap demo/p: data.ports: must be a YAML map",
            ),
            (
                &[
                    ("scope", "service"),
                    ("service", "server"),
                    ("ports", "\"0\": STRICT"),
                ],
                "ConfigMap demo/p: data.ports[\"0\"]: is not a port number (1-65535) or a port name",
            ),
            (
                &[
                    ("scope", "service"),
                    ("service", "server"),
                    ("ports", "70000: STRICT"),
                ],
                "ConfigMap demo/p: data.ports[\"70000\"]: is not a port number",
            ),
            (
                &[
                    ("scope", "service"),
                    ("service", "server"),
                    ("ports", "Bad_Name: STRICT"),
                ],
                "ConfigMap demo/p: data.ports[\"Bad_Name\"]: is not a port number",
            ),
            (
                &[
                    ("scope", "service"),
                    ("service", "server"),
                    ("ports", "9080: SOMETIMES"),
                ],
                "ConfigMap demo/p: data.ports[\"9080\"]: unknown mode \"SOMETIMES\"",
            ),
            (
                &[
                    ("scope", "service"),
                    ("service", "server"),
                    ("ports", "9080: 3"),
                ],
                "ConfigMap demo/p: data.ports[\"9080\"]: must be a mode",
            ),
            (
                &[
                    ("scope", "service"),
                    ("service", "server"),
                    ("ports", "9080: STRICT\n\"9080\": DISABLE"),
                ],
                "ConfigMap demo/p: data.ports[\"9080\"]: is listed twice",
            ),
            (
                &[("scope", "service"), ("service", "server")],
                "ConfigMap demo/p: data: a service policy needs data.mode or data.ports",
            ),
        ];
        for (data, expected) in cases {
            let errors = parse(data).expect_err(expected);
            assert!(
                errors.iter().any(|e| e.starts_with(expected)),
                "{data:?}: expected {expected:?}, got {errors:?}"
            );
        }
    }
}
