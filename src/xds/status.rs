//! Per-proxy status: who is connected, what identity they proved, and what
//! each proxy ACKed or NACKed. Each stream writes only its own entry
//! (`DashMap`), the admin API reads them all.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use dashmap::DashMap;
use serde::Serialize;

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
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
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
