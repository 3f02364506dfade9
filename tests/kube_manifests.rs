//! The manifests, validated offline: every document parses into its
//! k8s-openapi type with no unknown or misspelt field, `kubectl kustomize`
//! renders the whole set, the Deployment has what the issue asks for, and
//! the RBAC rules grant exactly `ward::ha::API_CALLS`.
//!
//! `kubectl create --dry-run=client` is not used: even in client mode it
//! asks the API server for discovery data, so it cannot run offline.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use ward::ha::{API_CALLS, Scope};

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml")
            && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            out.push(p);
        }
    }
}

fn docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|d| {
            let v: serde_norway::Value = serde::Deserialize::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Parse into `T` and back: any field the type does not know (a typo, a
/// field at the wrong level) makes the round trip differ.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value, file: &Path) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{}: {}: {e}", file.display(), doc["kind"]));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        normalize(back),
        normalize(doc.clone()),
        "{}: {} {} has fields its type does not know",
        file.display(),
        doc["kind"],
        doc["metadata"]["name"]
    );
    t
}

/// YAML numbers-as-strings and empty maps aside, the same JSON.
fn normalize(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, normalize(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        other => other,
    }
}

struct Parsed {
    deployments: Vec<Deployment>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    count: usize,
}

fn parse_all() -> Parsed {
    let mut files = Vec::new();
    yaml_files(&manifests(), &mut files);
    assert!(!files.is_empty());
    let mut p = Parsed {
        deployments: vec![],
        cluster_roles: vec![],
        roles: vec![],
        count: 0,
    };
    for file in files {
        // Policy examples are applied one by one, not by the kustomization.
        let example = file.components().any(|c| c.as_os_str() == "policies");
        for doc in docs(&std::fs::read_to_string(&file).unwrap()) {
            if !example {
                p.count += 1;
            }
            match doc["kind"].as_str().unwrap_or_default() {
                "Namespace" => drop(typed::<Namespace>(&doc, &file)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(&doc, &file)),
                "Service" => drop(typed::<Service>(&doc, &file)),
                "ConfigMap" => drop(typed::<ConfigMap>(&doc, &file)),
                "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(&doc, &file)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc, &file)),
                "RoleBinding" => drop(typed::<RoleBinding>(&doc, &file)),
                "Deployment" => p.deployments.push(typed(&doc, &file)),
                "ClusterRole" => p.cluster_roles.push(typed(&doc, &file)),
                "Role" => p.roles.push(typed(&doc, &file)),
                other => panic!("{}: unexpected kind {other:?}", file.display()),
            }
        }
    }
    p
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let p = parse_all();
    assert!(p.count >= 16, "{}", p.count);
}

#[test]
fn ward_deployment_is_ha_probed_sized_and_non_root() {
    let p = parse_all();
    let ward = p
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("ward"))
        .expect("ward Deployment");
    let spec = ward.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("ward"));
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let c = &pod.containers[0];
    assert!(
        c.args
            .as_ref()
            .unwrap()
            .contains(&"--kubernetes".to_string())
    );
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    let ports: BTreeSet<i32> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.container_port)
        .collect();
    // xDS, admin, and the sidecar-init credential endpoint.
    assert_eq!(ports, BTreeSet::from([15010, 15012, 15014]));
    assert!(
        c.args
            .as_ref()
            .unwrap()
            .contains(&"--credential-addr=0.0.0.0:15012".to_string())
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
}

#[test]
fn kubectl_kustomize_renders_every_manifest() {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(manifests())
        .output()
        .expect("kubectl must be installed (Debian package `kubectl`) to validate the manifests");
    assert!(
        out.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = docs(&String::from_utf8(out.stdout).unwrap());
    let p = parse_all();
    // Everything under manifests/ but the policy examples is part of the kustomization.
    assert_eq!(rendered.len(), p.count);
    let kinds: BTreeSet<&str> = rendered.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(k), "{k} missing from the kustomization");
    }
}

type Grant = (Scope, String, String, String, Option<String>);

fn expand(scope: Scope, rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for r in rules {
        let groups = r.api_groups.clone().unwrap_or_default();
        let resources = r.resources.clone().unwrap_or_default();
        let names: Vec<Option<String>> = match &r.resource_names {
            Some(n) if !n.is_empty() => n.iter().cloned().map(Some).collect(),
            _ => vec![None],
        };
        for g in &groups {
            for res in &resources {
                for v in &r.verbs {
                    assert_ne!(v, "*", "no wildcard verbs");
                    assert_ne!(res, "*", "no wildcard resources");
                    for n in &names {
                        out.insert((scope, g.clone(), res.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_what_the_code_calls() {
    let p = parse_all();
    let mut granted = BTreeSet::new();
    for cr in &p.cluster_roles {
        granted.extend(expand(
            Scope::Cluster,
            cr.rules.as_deref().unwrap_or_default(),
        ));
    }
    for r in &p.roles {
        assert_eq!(r.metadata.namespace.as_deref(), Some("ward-system"));
        granted.extend(expand(
            Scope::WardNamespace,
            r.rules.as_deref().unwrap_or_default(),
        ));
    }
    let used: BTreeSet<Grant> = API_CALLS
        .iter()
        .map(|c| {
            (
                c.scope,
                c.group.to_string(),
                c.resource.to_string(),
                c.verb.to_string(),
                c.name.map(String::from),
            )
        })
        .collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&used).collect();
    assert!(missing.is_empty(), "calls RBAC does not grant: {missing:?}");
    assert!(
        extra.is_empty(),
        "RBAC grants more than Ward uses: {extra:?}"
    );
}

/// The demo pods' init containers run `ward sidecar-init` with flags the
/// binary accepts, mount the projected token (audience `ward`) and the
/// trust bundle where those flags point, and share the emptyDir with Envoy.
#[test]
fn demo_init_containers_run_sidecar_init_as_the_cli_defines_it() {
    let p = parse_all();
    let mut seen = 0;
    for d in &p.deployments {
        let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let Some(init) = spec
            .init_containers
            .as_ref()
            .and_then(|c| c.iter().find(|c| c.name == "ward-init"))
        else {
            continue;
        };
        seen += 1;
        let name = d.metadata.name.clone().unwrap_or_default();
        let args = init.args.clone().unwrap();
        assert_eq!(args[0], "sidecar-init", "{name}");
        // Run the real binary with the manifest's arguments: clap accepts
        // them, and the first failure is the (absent here) token file.
        let out = Command::new(env!("CARGO_BIN_EXE_ward"))
            .args(&args)
            .env("POD_NAME", "x-0")
            .env("POD_NAMESPACE", "demo")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("reading /var/run/secrets/ward/token"),
            "{name}: {stderr}"
        );
        let volumes = spec.volumes.as_ref().unwrap();
        let token = volumes.iter().find(|v| v.name == "ward-token").unwrap();
        let sources = token.projected.as_ref().unwrap().sources.as_ref().unwrap();
        let sat = sources[0].service_account_token.as_ref().unwrap();
        assert_eq!(sat.audience.as_deref(), Some("ward"), "{name}");
        let mounts = init.volume_mounts.as_ref().unwrap();
        let mount = |v: &str| {
            mounts
                .iter()
                .find(|m| m.name == v)
                .map(|m| m.mount_path.clone())
        };
        assert_eq!(
            mount("ward-token").as_deref(),
            Some("/var/run/secrets/ward")
        );
        assert!(args.contains(&"--ca-file=/var/run/ward-trust-bundle/xds-ca.pem".to_string()));
        assert_eq!(
            mount("ward-trust-bundle").as_deref(),
            Some("/var/run/ward-trust-bundle")
        );
        let boot = volumes.iter().find(|v| v.name == "ward-bootstrap").unwrap();
        assert!(boot.empty_dir.is_some(), "{name}");
        let envoy = spec.containers.iter().find(|c| c.name == "envoy").unwrap();
        assert!(
            envoy
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == "ward-bootstrap" && m.mount_path == "/etc/ward")
        );
    }
    assert_eq!(seen, 2, "client and server");
}

/// Every demo pod annotated for redirection has the `ward-redirect` init
/// container: the redirect-init image, args the binary accepts (its
/// `--dry-run` prints the rules), NET_ADMIN and NET_RAW and nothing else,
/// uid 0; its Envoy runs as the uid the rules exempt; the app needs no
/// sidecar address (it listens on 0.0.0.0 and calls services by name).
#[test]
fn redirected_demo_pods_have_the_iptables_init_container() {
    let p = parse_all();
    let mut seen = 0;
    for d in &p.deployments {
        let template = &d.spec.as_ref().unwrap().template;
        let annotations = template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default();
        if annotations.get("ward.io/interception").map(String::as_str) != Some("redirect") {
            continue;
        }
        seen += 1;
        let name = d.metadata.name.clone().unwrap_or_default();
        assert!(
            !annotations.contains_key("ward.io/outbound-ip"),
            "{name}: redirected pods need no outbound address"
        );
        let spec = template.spec.as_ref().unwrap();
        let inits = spec.init_containers.as_ref().unwrap();
        let init = inits
            .iter()
            .find(|c| c.name == "ward-redirect")
            .unwrap_or_else(|| panic!("{name}: no ward-redirect init container"));
        assert_eq!(init.image.as_deref(), Some("ward-redirect-init:dev"));
        let args = init.args.clone().unwrap();
        assert_eq!(args[0], "redirect-init", "{name}");
        let out = Command::new(env!("CARGO_BIN_EXE_ward"))
            .args(&args)
            .arg("--dry-run")
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {out:?}");
        let sc = init.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_user, Some(0), "{name}");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{name}");
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        let mut added = caps.add.clone().unwrap();
        added.sort();
        assert_eq!(added, vec!["NET_ADMIN", "NET_RAW"], "{name}");
        let envoy = spec.containers.iter().find(|c| c.name == "envoy").unwrap();
        let envoy_uid = envoy
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .unwrap();
        assert!(
            rules.contains(&format!("--uid-owner {envoy_uid} -j RETURN")),
            "{name}: the rules must exempt Envoy's uid {envoy_uid}:\n{rules}"
        );
        let app = spec.containers.iter().find(|c| c.name == "app").unwrap();
        let app_args = app.args.clone().unwrap().join(" ");
        assert!(app_args.contains("--listen=0.0.0.0:"), "{name}: {app_args}");
        assert!(!app_args.contains("127.0.0.1:9080"), "{name}: {app_args}");
    }
    assert_eq!(seen, 2, "client and server demo pods are redirected");
}

/// The Dockerfile's build stage copies everything Cargo needs to build the
/// `ward` binary: the manifest's declared targets (cargo refuses to load a
/// manifest whose bench file is missing) and every `include_str!`ed file.
#[test]
fn dockerfile_copies_what_the_build_reads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copied: BTreeSet<String> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut needed: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "src", "benches"]
        .map(String::from)
        .into();
    let mut sources = Vec::new();
    fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                rs_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    rs_files(&root.join("src"), &mut sources);
    for f in sources {
        let text = std::fs::read_to_string(&f).unwrap();
        for part in text.split("include_str!(\"").skip(1) {
            let rel = &part[..part.find('"').unwrap()];
            let abs = f.parent().unwrap().join(rel);
            let abs = abs.canonicalize().unwrap_or(abs);
            if let Ok(inside) = abs.strip_prefix(root.canonicalize().unwrap()) {
                let top = inside.components().next().unwrap();
                needed.insert(top.as_os_str().to_string_lossy().into_owned());
            }
        }
    }
    let missing: Vec<_> = needed.difference(&copied).collect();
    assert!(missing.is_empty(), "Dockerfile does not COPY {missing:?}");
}
