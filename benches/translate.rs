//! Criterion micro-benchmarks: translation and encoding, and the per-stream
//! work of an endpoint change (`just bench`; results in BENCHMARKS.md).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use ward::ca::{Authority, WorkloadCert};
use ward::meshgen::{self, MeshSpec};
use ward::model::{Mesh, SpiffeId};
use ward::translate::{self, type_url};
use ward::xds::cache::ProxyBuilder;
use ward::xds::delta::DeltaStream;
use ward::xds::sotw::SotwStream;

const TD: &str = "cluster.local";

fn mesh(services: usize, pods: usize, change: u32) -> (Mesh, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    meshgen::write_dir(tmp.path(), &MeshSpec { services, pods }).unwrap();
    meshgen::write_change(tmp.path(), change).unwrap();
    let (m, _, errors) = ward::discovery::DirSource::load_once(tmp.path()).unwrap();
    assert!(errors.is_empty());
    (m, tmp)
}

fn cert() -> Arc<WorkloadCert> {
    let ca = Authority::generate_in_memory(TD).unwrap();
    let c = ca
        .issue_workload(
            &SpiffeId::new(TD, "load", "sa-0"),
            Duration::from_secs(3600),
        )
        .unwrap();
    Arc::new(WorkloadCert {
        cert_pem: c.cert_pem,
        key_pem: c.key_pem,
        trust_bundle_pem: ca.trust_bundle_pem(),
        info: c.info,
    })
}

fn translation(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate");
    g.sample_size(10);
    for s in [100usize, 1000] {
        let (m, _tmp) = mesh(s, s, 0);
        g.bench_with_input(BenchmarkId::new("mesh_resources", s), &m, |b, m| {
            b.iter(|| black_box(translate::mesh_resources(m, TD)))
        });
        let shared = translate::mesh_resources(&m, TD);
        let pod = meshgen::pod_key(1);
        g.bench_with_input(BenchmarkId::new("proxy_resources_with", s), &m, |b, m| {
            b.iter(|| black_box(translate::proxy_resources_with(m, &shared, TD, &pod).unwrap()))
        });
        let full = translate::proxy_resources_with(&m, &shared, TD, &pod)
            .unwrap()
            .resources;
        g.bench_with_input(BenchmarkId::new("check_consistency", s), &full, |b, r| {
            b.iter(|| black_box(translate::check_consistency(r, &["default", "ROOTCA"])))
        });
    }
    g.finish();
}

fn encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    let (m, _tmp) = mesh(100, 100, 0);
    let shared = translate::mesh_resources(&m, TD);
    let r = translate::proxy_resources_with(&m, &shared, TD, &meshgen::pod_key(1))
        .unwrap()
        .resources;
    let cluster = r
        .get(type_url::CLUSTER)
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    let listener = r
        .get(type_url::LISTENER)
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    let cla = r
        .get(type_url::ENDPOINT)
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    let cluster_msg = Cluster::decode(cluster.any.value.as_slice()).unwrap();
    let listener_msg = Listener::decode(listener.any.value.as_slice()).unwrap();
    let cla_msg = ClusterLoadAssignment::decode(cla.any.value.as_slice()).unwrap();
    // Resource::new = encode + content hash: the cost paid once per distinct resource.
    g.bench_function("resource_new/cluster", |b| {
        b.iter(|| black_box(translate::Resource::new("c", cluster_msg.clone())))
    });
    g.bench_function("resource_new/listener", |b| {
        b.iter(|| black_box(translate::Resource::new("l", listener_msg.clone())))
    });
    g.bench_function("resource_new/endpoints", |b| {
        b.iter(|| black_box(translate::Resource::new("e", cla_msg.clone())))
    });
    g.finish();
}

/// The work each stream does for one endpoint change, with S services:
/// rebuild the proxy snapshot (memoized translation) and compute what to
/// send (delta: one resource; SotW: every subscribed EDS resource).
fn fan_out(c: &mut Criterion) {
    let mut g = c.benchmark_group("per_stream_endpoint_change");
    let cert = cert();
    for s in [100usize, 1000] {
        let (m1, _t1) = mesh(s, s, 1);
        let (m2, _t2) = mesh(s, s, 2);
        let (snap1, snap2) = ward::xds::cache::bench_snapshots(Arc::new(m1), Arc::new(m2), TD);
        let pod = meshgen::pod_key(1);
        let mut builder = ProxyBuilder::new(pod.clone(), TD);
        let p1 = builder.build(&snap1, &cert).unwrap();
        let p2 = builder.build(&snap2, &cert).unwrap();
        let eds: Vec<String> = (0..s).map(meshgen::cluster_name).collect();
        g.bench_with_input(BenchmarkId::new("proxy_builder_build", s), &s, |b, _| {
            b.iter(|| black_box(builder.build(&snap2, &cert).unwrap()))
        });
        g.bench_with_input(BenchmarkId::new("delta_on_snapshot", s), &s, |b, _| {
            b.iter_batched(
                || {
                    let mut d = DeltaStream::new();
                    d.on_request(
                        &DeltaDiscoveryRequest {
                            type_url: type_url::ENDPOINT.into(),
                            resource_names_subscribe: eds.clone(),
                            ..Default::default()
                        },
                        &p1,
                    );
                    d
                },
                |mut d| {
                    let out = d.on_snapshot(&p2);
                    assert_eq!(out[0].resources.len(), 1);
                    black_box(out[0].encode_to_vec())
                },
                criterion::BatchSize::SmallInput,
            )
        });
        g.bench_with_input(BenchmarkId::new("sotw_on_snapshot", s), &s, |b, _| {
            b.iter_batched(
                || {
                    let mut st = SotwStream::new();
                    st.on_request(
                        &DiscoveryRequest {
                            type_url: type_url::ENDPOINT.into(),
                            resource_names: eds.clone(),
                            ..Default::default()
                        },
                        &p1,
                    );
                    st
                },
                |mut st| {
                    let out = st.on_snapshot(&p2);
                    assert_eq!(out[0].resources.len(), s);
                    black_box(out[0].encode_to_vec())
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, translation, encoding, fan_out);
criterion_main!(benches);
