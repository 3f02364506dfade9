//! The CA in a Kubernetes Secret.
//!
//! Secret `ward-ca` in Ward's namespace (type Opaque) holds `ca.crt`,
//! `ca.key` and, for a plugged-in intermediate, `chain.crt` (the
//! certificates above it up to the root). Every replica calls
//! [`load_or_create_ca`] at start: it reads the Secret, and only when it is
//! absent generates a root and *creates* it. Create fails with
//! `409 AlreadyExists` for every replica but one, and those re-read and use
//! the winner's root: two replicas can never end up with two roots, with no
//! lock and no leader needed.
//!
//! To plug in your own CA, create the Secret before Ward starts
//! (`kubectl create secret generic ward-ca --from-file=ca.crt
//! --from-file=ca.key [--from-file=chain.crt]`); Ward never overwrites it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use super::{HaError, is_status};
use crate::ca::Authority;

/// Name of the CA Secret in Ward's namespace.
pub const CA_SECRET: &str = "ward-ca";
/// Default name of the xDS CA Secret (`<--ca-secret>-xds`): every replica
/// must sign and trust sidecar credentials with the same xDS CA.
pub const XDS_CA_SECRET: &str = "ward-ca-xds";
pub const CERT_KEY: &str = "ca.crt";
pub const KEY_KEY: &str = "ca.key";
pub const CHAIN_KEY: &str = "chain.crt";

/// Read the CA from Secret `name`, or create it (with a new root) when it
/// does not exist. Returns the authority and whether this call created it.
pub async fn load_or_create_ca(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<(Authority, bool), HaError> {
    let object = format!("Secret {namespace}/{name}");
    let api_err = |source| HaError::Api {
        object: object.clone(),
        source,
    };
    // Two rounds suffice: a create that loses the race is followed by a
    // read that finds the winner's Secret.
    for _ in 0..3 {
        if let Some(secret) = api.get_opt(name).await.map_err(api_err)? {
            return Ok((parse(&object, &secret, trust_domain)?, false));
        }
        let (cert, key) =
            Authority::generate_root_pem(trust_domain).map_err(|source| HaError::Ca {
                object: object.clone(),
                source,
            })?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "ward".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (CERT_KEY.to_string(), ByteString(cert.into_bytes())),
                (
                    KEY_KEY.to_string(),
                    ByteString(key.expose().as_bytes().to_vec()),
                ),
            ])),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(created) => {
                tracing::info!(secret = %object, "generated a new root CA and stored it");
                return Ok((parse(&object, &created, trust_domain)?, true));
            }
            Err(e) if is_status(&e, 409) => {
                tracing::info!(secret = %object, "another replica created the CA first; using it");
                continue;
            }
            Err(e) => return Err(api_err(e)),
        }
    }
    Err(HaError::Contended {
        object,
        attempts: 3,
    })
}

fn text<'a>(object: &str, secret: &'a Secret, key: &str) -> Result<Option<&'a str>, HaError> {
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) else {
        return Ok(None);
    };
    std::str::from_utf8(&bytes.0)
        .map(Some)
        .map_err(|_| HaError::BadData {
            object: object.to_string(),
            key: key.to_string(),
            message: "is not UTF-8 PEM text".into(),
        })
}

fn parse(object: &str, secret: &Secret, trust_domain: &str) -> Result<Authority, HaError> {
    let required = |key: &str| {
        text(object, secret, key)?.ok_or_else(|| HaError::BadData {
            object: object.to_string(),
            key: key.to_string(),
            message: "is missing".into(),
        })
    };
    let cert = required(CERT_KEY)?;
    let key = required(KEY_KEY)?;
    let chain = text(object, secret, CHAIN_KEY)?;
    Authority::from_pem_text(object, cert, key, chain, trust_domain).map_err(|source| HaError::Ca {
        object: object.to_string(),
        source,
    })
}
