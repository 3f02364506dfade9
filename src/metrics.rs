//! Prometheus metrics. Counters owned by other modules (e.g. certificates
//! issued, kept by the CA) are read at scrape time through [`Sampled`], so
//! those modules need not know about Prometheus.

use std::fmt;
use std::sync::Mutex;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// Label set for per-xDS-type metrics (`type="cds"` ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub r#type: &'static str,
}

/// Label for things counted by kind (`reason="..."`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Every metric Ward exports. Cheap to clone handles live inside.
pub struct Metrics {
    /// Owns the encoders; the admin server encodes it on each scrape.
    registry: Mutex<Registry>,
    /// ADS streams currently open.
    pub connected_proxies: Gauge,
    /// Responses sent, by xDS type.
    pub pushes: Family<TypeLabels, Counter>,
    /// ACKs received, by xDS type.
    pub acks: Family<TypeLabels, Counter>,
    /// NACKs received, by xDS type: a non-zero rate means Envoy rejects config.
    pub nacks: Family<TypeLabels, Counter>,
    /// xDS connections refused (no credential, wrong pod, unknown pod).
    pub xds_auth_failures: Family<ReasonLabels, Counter>,
    /// Snapshots not published because they failed the consistency check.
    pub inconsistent_snapshots: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ward");
        let connected_proxies = Gauge::default();
        let pushes = Family::<TypeLabels, Counter>::default();
        let acks = Family::<TypeLabels, Counter>::default();
        let nacks = Family::<TypeLabels, Counter>::default();
        let xds_auth_failures = Family::<ReasonLabels, Counter>::default();
        let inconsistent_snapshots = Counter::default();
        registry.register(
            "connected_proxies",
            "ADS streams currently open",
            connected_proxies.clone(),
        );
        registry.register("xds_pushes", "xDS responses sent, by type", pushes.clone());
        registry.register("xds_acks", "xDS ACKs received, by type", acks.clone());
        registry.register("xds_nacks", "xDS NACKs received, by type", nacks.clone());
        registry.register(
            "xds_auth_failures",
            "xDS connections refused, by reason",
            xds_auth_failures.clone(),
        );
        registry.register(
            "inconsistent_snapshots",
            "Proxy snapshots withheld because a referenced resource was missing",
            inconsistent_snapshots.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            connected_proxies,
            pushes,
            acks,
            nacks,
            xds_auth_failures,
            inconsistent_snapshots,
        }
    }

    /// Register a value read at scrape time (name without the `ward_` prefix).
    pub fn register_sampled(&self, sampled: Sampled) {
        if let Ok(mut r) = self.registry.lock() {
            r.register_collector(Box::new(sampled));
        }
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        let registry = self.registry.lock().map_err(|_| fmt::Error)?;
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// A metric whose value another module owns, read by a closure on scrape.
pub struct Sampled {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    read: Box<dyn Fn() -> f64 + Send + Sync>,
}

impl fmt::Debug for Sampled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampled").field("name", &self.name).finish()
    }
}

impl Sampled {
    pub fn counter(
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> f64 + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            help,
            kind: MetricType::Counter,
            read: Box::new(read),
        }
    }

    pub fn gauge(
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> f64 + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            help,
            kind: MetricType::Gauge,
            read: Box::new(read),
        }
    }
}

impl prometheus_client::collector::Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // The registry adds the `ward_` prefix.
        let value = (self.read)();
        let metric = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        match self.kind {
            MetricType::Counter => ConstCounter::new(value).encode(metric),
            _ => ConstGauge::new(value).encode(metric),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_contains_owned_and_sampled_metrics() {
        let m = Metrics::new();
        m.pushes.get_or_create(&TypeLabels { r#type: "cds" }).inc();
        m.register_sampled(Sampled::counter(
            "certs_issued",
            "Certificates issued",
            || 7.0,
        ));
        let text = m.encode().unwrap();
        assert!(
            text.contains("ward_xds_pushes_total{type=\"cds\"} 1"),
            "{text}"
        );
        assert!(text.contains("ward_certs_issued_total 7"), "{text}");
    }
}
