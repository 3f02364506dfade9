//! Per-proxy status: who is connected, what identity they proved, and what
//! each proxy ACKed or NACKed. Each stream writes only its own entry
//! (`DashMap`), the admin API reads them all.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use dashmap::DashMap;
use serde::Serialize;

use crate::ca::WorkloadCert;

/// A rejected configuration, as Envoy reported it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct NackStatus {
    pub version: String,
    pub message: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// One xDS type on one stream.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TypeStatus {
    /// Version of the last response sent.
    pub sent_version: Option<String>,
    /// Version Envoy last ACKed: what it runs now.
    pub acked_version: Option<String>,
    /// The last NACK on this stream, kept after later ACKs so operators can
    /// see what was rejected.
    pub last_nack: Option<NackStatus>,
    pub pushes: u64,
    pub acks: u64,
    pub nacks: u64,
    /// Mesh snapshot generation the sent config is current for: the one it
    /// was built from, or a later one that left this type unchanged.
    pub sent_generation: Option<u64>,
    /// Generation of what Envoy runs (the `sent_generation` of the last
    /// ACKed response): the policy rollout waits on it.
    pub acked_generation: Option<u64>,
}

/// One connected proxy (one ADS stream).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProxyStatus {
    /// Stream id, unique for the life of the process.
    pub stream: u64,
    /// The pod (`namespace/name`) the sidecar runs for.
    pub pod: String,
    /// SPIFFE id the proxy is served secrets for.
    pub identity: String,
    /// Whether the identity was proven by a client certificate (false only
    /// with `--insecure-xds`).
    pub authenticated: bool,
    pub peer: String,
    /// Seconds since the Unix epoch.
    pub connected_at: u64,
    /// `ads` (state of the world) or `delta`.
    pub protocol: &'static str,
    /// The last mesh generation this stream evaluated (and pushed, if it
    /// changed anything for the proxy).
    pub generation: u64,
    /// By short type name (`cds`, `eds`, `lds`, `rds`, `sds`).
    pub types: BTreeMap<&'static str, TypeStatus>,
    /// The workload certificate Envoy last ACKed over SDS: what it serves now.
    pub cert: Option<AckedCert>,
}

/// A certificate (and trust bundle) a proxy ACKed. No key material.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AckedCert {
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    pub issuer: String,
    /// Content hash of the trust bundle (ROOTCA) sent with it.
    pub bundle: String,
    /// Serial numbers of the roots in that trust bundle.
    pub bundle_roots: Vec<String>,
}

impl AckedCert {
    pub fn new(cert: &WorkloadCert) -> Self {
        let secs = |t: std::time::SystemTime| {
            t.duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default()
        };
        let bundle_roots = crate::ca::pem_to_der_certs(&cert.trust_bundle_pem)
            .unwrap_or_default()
            .iter()
            .filter_map(|d| crate::ca::cert_info(d).ok().map(|i| i.serial))
            .collect();
        Self {
            serial: cert.info.serial.clone(),
            not_before: secs(cert.info.not_before),
            not_after: secs(cert.info.not_after),
            issuer: cert.info.issuer.clone(),
            bundle: crate::translate::content_hash(&[cert.trust_bundle_pem.as_bytes()]),
            bundle_roots,
        }
    }

    /// Past `fraction` of its lifetime at `now` (seconds since the epoch)?
    pub fn past(&self, fraction: f64, now: u64) -> bool {
        let life = self.not_after.saturating_sub(self.not_before) as f64;
        now as f64 >= self.not_before as f64 + life * fraction
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl crate::ca::AckSource for ProxyRegistry {
    fn acks(&self) -> Vec<crate::ca::ProxyAck> {
        self.list()
            .into_iter()
            .map(|p| crate::ca::ProxyAck {
                pod: p.pod,
                issuer: p.cert.as_ref().map(|c| c.issuer.clone()),
                bundle: p.cert.map(|c| c.bundle),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(not_before: u64, not_after: u64) -> AckedCert {
        AckedCert {
            serial: "1".into(),
            not_before,
            not_after,
            issuer: "root".into(),
            bundle: "b".into(),
            bundle_roots: vec![],
        }
    }

    #[test]
    fn past_a_fraction_of_lifetime() {
        let c = acked(1000, 2000);
        assert!(!c.past(0.8, 1799));
        assert!(c.past(0.8, 1800));
        assert!(c.past(0.8, 5000));
    }

    #[test]
    fn registry_tracks_acked_certificates_and_forgets_closed_streams() {
        let r = ProxyRegistry::new();
        let id = r.next_stream_id();
        r.insert(ProxyStatus {
            stream: id,
            pod: "demo/a".into(),
            identity: "spiffe://cluster.local/ns/demo/sa/a".into(),
            authenticated: true,
            peer: "127.0.0.1:1".into(),
            connected_at: 0,
            types: Default::default(),
            cert: None,
            protocol: "ads",
            generation: 0,
        });
        r.set_cert(id, acked(0, 10));
        use crate::ca::AckSource;
        let acks = r.acks();
        assert_eq!(acks[0].issuer.as_deref(), Some("root"));
        r.remove(id);
        assert!(r.is_empty());
    }
}

/// All connected proxies.
#[derive(Debug, Default)]
pub struct ProxyRegistry {
    streams: DashMap<u64, ProxyStatus>,
    next_id: AtomicU64,
}

impl ProxyRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn next_stream_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn insert(&self, status: ProxyStatus) {
        self.streams.insert(status.stream, status);
    }

    pub fn remove(&self, stream: u64) {
        self.streams.remove(&stream);
    }

    /// Update one type of one stream.
    pub fn update(&self, stream: u64, short_type: &'static str, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(mut s) = self.streams.get_mut(&stream) {
            f(s.types.entry(short_type).or_default());
        }
    }

    pub fn set_cert(&self, stream: u64, cert: AckedCert) {
        if let Some(mut s) = self.streams.get_mut(&stream) {
            s.cert = Some(cert);
        }
    }

    /// The stream rebuilt its config from snapshot `generation`; `sent`
    /// are the types it just sent responses for. Types not resent did not
    /// change, so what was sent (and, if ACKed, what runs) is current for
    /// `generation` too.
    pub fn observe_generation(&self, stream: u64, generation: u64, sent: &[&'static str]) {
        if let Some(mut s) = self.streams.get_mut(&stream) {
            for (ty, t) in s.types.iter_mut() {
                if sent.contains(ty) {
                    t.sent_generation = Some(generation);
                } else if t.sent_version.is_some() {
                    t.sent_generation = Some(generation);
                    if t.acked_version == t.sent_version {
                        t.acked_generation = Some(generation);
                    }
                }
            }
        }
    }

    /// Record the mesh generation a stream has evaluated.
    pub fn set_generation(&self, stream: u64, generation: u64) {
        if let Some(mut s) = self.streams.get_mut(&stream) {
            s.generation = generation;
        }
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Sorted by pod, then stream.
    pub fn list(&self) -> Vec<ProxyStatus> {
        let mut v: Vec<ProxyStatus> = self.streams.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| (&a.pod, a.stream).cmp(&(&b.pod, b.stream)));
        v
    }
}
