//! xDS protocol edge cases (DESIGN.md rules 1–9), each pinned with fake
//! clients against a running Ward: SotW (`Ads`) and delta (`DeltaAds`).
//! Also push efficiency (only affected proxies and types are pushed) and
//! a connect/disconnect leak check.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryResponse};
use support::{Ads, DeltaAds, Ward, delta_names, eventually, generated_ward, resource_names};
use ward::meshgen::{self, MeshSpec};
use ward::translate::type_url as t;

const S: usize = 3;
const N: usize = 6;

fn node(j: usize) -> String {
    meshgen::pod_key(j).to_string()
}

async fn sotw(w: &Ward, j: usize) -> Ads {
    Ads::connect(w, Some(w.pod_credential(S, j)), &node(j))
        .await
        .expect("connects")
}

async fn delta(w: &Ward, j: usize) -> DeltaAds {
    DeltaAds::connect(w, Some(w.pod_credential(S, j)), &node(j))
        .await
        .expect("connects")
}

fn c(i: usize) -> String {
    meshgen::cluster_name(i)
}

/// The generated mesh with `services` services, edited by `tweak`.
fn mesh(services: usize, tweak: impl Fn(String) -> String) -> String {
    tweak(meshgen::mesh_yaml(&MeshSpec { services, pods: N }))
}

/// Receive until a response of `type_url` arrives (skipping others).
async fn recv_type(ads: &mut Ads, type_url: &str) -> DiscoveryResponse {
    for _ in 0..10 {
        let r = ads.recv().await;
        if r.type_url == type_url {
            return r;
        }
        ads.ack(&r, &[]).await;
    }
    panic!("no {type_url} response");
}

// ---------------------------------------------------------------- rule 3

#[tokio::test]
async fn a_stale_nonce_never_loses_a_subscription_change_sotw() {
    let w = generated_ward(S, N).await;
    let mut ads = sotw(&w, 1).await;
    ads.request(t::ENDPOINT, &[&c(0)], "", "").await;
    let r1 = ads.recv().await;
    ads.ack(&r1, &[&c(0)]).await;
    // A push the client has not seen yet when it changes its names.
    meshgen::write_change(&w.config_dir, 1).unwrap();
    let r2 = ads.recv().await;
    assert_ne!(r2.nonce, r1.nonce);
    // The client still answers r1's nonce (stale) with a new name list.
    ads.request(t::ENDPOINT, &[&c(0), &c(1)], &r1.version_info, &r1.nonce)
        .await;
    let r3 = ads.recv().await;
    assert_eq!(resource_names(&r3), [c(0), c(1)]);
}

#[tokio::test]
async fn a_stale_nonce_never_loses_a_subscription_change_delta() {
    let w = generated_ward(S, N).await;
    let mut ads = delta(&w, 1).await;
    ads.subscribe(t::ENDPOINT, &[&c(0)], &[]).await;
    let r1 = ads.recv().await;
    meshgen::write_change(&w.config_dir, 1).unwrap();
    let r2 = ads.recv().await;
    assert_eq!(delta_names(&r2), [c(0)]);
    ads.send(DeltaDiscoveryRequest {
        type_url: t::ENDPOINT.into(),
        response_nonce: r1.nonce.clone(),
        resource_names_subscribe: vec![c(1)],
        ..Default::default()
    })
    .await;
    let r3 = ads.recv().await;
    assert_eq!(delta_names(&r3), [c(1)]);
}

// ---------------------------------------------------------------- rule 4

#[tokio::test]
async fn names_requested_before_they_exist_are_sent_when_they_appear() {
    let w = generated_ward(S, N).await;
    let mut a = sotw(&w, 1).await;
    let mut d = delta(&w, 2).await;
    // svc-3 does not exist yet.
    a.request(t::ENDPOINT, &[&c(3)], "", "").await;
    d.subscribe(t::ENDPOINT, &[&c(3)], &[]).await;
    // Both requests are in before the service appears.
    a.request(t::CLUSTER, &[], "", "").await;
    let cds = a.recv().await;
    assert_eq!(cds.type_url, t::CLUSTER, "no EDS answer for a missing name");
    a.ack(&cds, &[]).await;
    d.subscribe(t::CLUSTER, &[], &[]).await;
    let cds = d.recv().await;
    assert_eq!(cds.type_url, t::CLUSTER, "no EDS answer for a missing name");
    d.ack(&cds).await;

    w.write(meshgen::MESH_FILE, &mesh(S + 1, |m| m));
    let eds = recv_type(&mut a, t::ENDPOINT).await;
    assert_eq!(resource_names(&eds), [c(3)]);
    loop {
        let r = d.recv().await;
        if r.type_url == t::ENDPOINT {
            assert_eq!(delta_names(&r), [c(3)]);
            break;
        }
        d.ack(&r).await;
    }
}

// ---------------------------------------------------------------- rule 5

#[tokio::test]
async fn sotw_lds_and_cds_are_complete_sets() {
    let w = generated_ward(S, N).await;
    let mut ads = sotw(&w, 1).await;
    ads.request(t::CLUSTER, &[], "", "").await;
    let cds = ads.recv().await;
    ads.ack(&cds, &[]).await;
    ads.request(t::LISTENER, &[], "", "").await;
    let lds = ads.recv().await;
    ads.ack(&lds, &[]).await;
    assert_eq!(resource_names(&lds).len(), S + 1, "S outbound + 1 inbound");

    w.write(meshgen::MESH_FILE, &mesh(S - 1, |m| m));
    let cds = recv_type(&mut ads, t::CLUSTER).await;
    let mut want: Vec<String> = (0..S - 1).map(c).collect();
    want.push("inbound|8080|local".into());
    want.sort();
    assert_eq!(
        resource_names(&cds),
        want,
        "every remaining cluster, not a diff"
    );
    ads.ack(&cds, &[]).await;
    let lds = recv_type(&mut ads, t::LISTENER).await;
    let names = resource_names(&lds);
    assert_eq!(names.len(), S, "S-1 outbound + 1 inbound: {names:?}");
    assert!(!names.contains(&c(S - 1)));
}

// ---------------------------------------------------------------- rule 6

/// Rename svc-0's port from `http` to `tcp`: its cluster and listener
/// change, its endpoints do not.
fn svc0_to_tcp(m: String) -> String {
    m.replacen(
        "selector: {app: svc-0}\n  ports:\n  - {name: http,",
        "selector: {app: svc-0}\n  ports:\n  - {name: tcp,",
        1,
    )
}

#[tokio::test]
async fn pushes_are_make_before_break_and_a_changed_cluster_resends_its_endpoints_sotw() {
    let w = generated_ward(S, N).await;
    let mut ads = sotw(&w, 1).await;
    let all: Vec<String> = (0..S).map(c).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    for (ty, names) in [
        (t::SECRET, vec!["default", "ROOTCA"]),
        (t::CLUSTER, vec![]),
        (t::ENDPOINT, all.clone()),
        (t::LISTENER, vec![]),
    ] {
        ads.request(ty, &names, "", "").await;
        let r = ads.recv().await;
        ads.ack(&r, &names).await;
    }
    let edited = mesh(S, svc0_to_tcp);
    assert_ne!(edited, mesh(S, |m| m));
    w.write(meshgen::MESH_FILE, &edited);
    let mut order = Vec::new();
    while order.len() < 3 {
        let r = ads.recv().await;
        let names = if r.type_url == t::ENDPOINT {
            all.clone()
        } else {
            vec![]
        };
        order.push(t::short(&r.type_url));
        if r.type_url == t::ENDPOINT {
            assert_eq!(
                resource_names(&r),
                all,
                "endpoints resent although unchanged"
            );
        }
        ads.ack(&r, &names).await;
    }
    assert_eq!(order, ["cds", "eds", "lds"]);
}

#[tokio::test]
async fn a_changed_cluster_resends_its_endpoints_delta() {
    let w = generated_ward(S, N).await;
    let mut ads = delta(&w, 1).await;
    ads.subscribe(t::CLUSTER, &[], &[]).await;
    let r = ads.recv().await;
    ads.ack(&r).await;
    ads.subscribe(t::ENDPOINT, &[&c(0), &c(1)], &[]).await;
    let r = ads.recv().await;
    ads.ack(&r).await;
    w.write(meshgen::MESH_FILE, &mesh(S, svc0_to_tcp));
    let cds = ads.recv().await;
    assert_eq!(cds.type_url, t::CLUSTER);
    assert_eq!(delta_names(&cds), [c(0)]);
    ads.ack(&cds).await;
    let eds = ads.recv().await;
    assert_eq!(eds.type_url, t::ENDPOINT);
    assert_eq!(
        delta_names(&eds),
        [c(0)],
        "only the changed cluster's endpoints"
    );
}

// ---------------------------------------------------------------- rule 7

#[tokio::test]
async fn sds_answers_exactly_the_requested_names() {
    let w = generated_ward(S, N).await;
    let mut a = sotw(&w, 1).await;
    a.request(t::SECRET, &["default", "missing"], "", "").await;
    let r = a.recv().await;
    assert_eq!(resource_names(&r), ["default"]);
    a.ack(&r, &["default", "missing"]).await;
    a.request(t::SECRET, &["ROOTCA"], &r.version_info, &r.nonce)
        .await;
    let r = a.recv().await;
    assert_eq!(resource_names(&r), ["ROOTCA"]);

    let mut d = delta(&w, 2).await;
    d.subscribe(t::SECRET, &["ROOTCA", "missing"], &[]).await;
    let r = d.recv().await;
    assert_eq!(delta_names(&r), ["ROOTCA"]);
}

// ---------------------------------------------------------------- rule 8

#[tokio::test]
async fn a_reconnect_gets_the_full_state_even_claiming_the_current_version() {
    let w = generated_ward(S, N).await;
    let mut a = sotw(&w, 1).await;
    a.request(t::CLUSTER, &[], "", "").await;
    let first = a.recv().await;
    drop(a);
    let mut a = sotw(&w, 1).await;
    // Envoy sends its last version on reconnect; it still gets everything.
    a.request(t::CLUSTER, &[], &first.version_info, "").await;
    let again = a.recv().await;
    assert_eq!(resource_names(&again), resource_names(&first));
    assert_eq!(again.version_info, first.version_info);

    let mut d = delta(&w, 1).await;
    d.subscribe(t::CLUSTER, &[], &[]).await;
    let r = d.recv().await;
    assert_eq!(delta_names(&r), resource_names(&first));
}

// ---------------------------------------------------------- push efficiency

#[tokio::test]
async fn only_affected_proxies_and_types_are_pushed() {
    let w = generated_ward(S, N).await;
    // pod-1 and pod-2 on SotW: all types, EDS only for its own service's
    // cluster on pod-2. pod-4 on delta, everything.
    let mut p1 = sotw(&w, 1).await;
    let mut p2 = sotw(&w, 2).await;
    let mut p4 = delta(&w, 4).await;
    for (ads, eds) in [(&mut p1, c(1)), (&mut p2, c(2))] {
        for (ty, names) in [
            (t::SECRET, vec!["default", "ROOTCA"]),
            (t::CLUSTER, vec![]),
            (t::ENDPOINT, vec![eds.as_str()]),
            (t::LISTENER, vec![]),
        ] {
            ads.request(ty, &names, "", "").await;
            let r = ads.recv().await;
            ads.ack(&r, &names).await;
        }
    }
    for ty in [t::SECRET, t::CLUSTER, t::LISTENER] {
        let names: &[&str] = if ty == t::SECRET {
            &["default", "ROOTCA"]
        } else {
            &[]
        };
        p4.subscribe(ty, names, &[]).await;
        let r = p4.recv().await;
        p4.ack(&r).await;
    }
    let all: Vec<String> = (0..S).map(c).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    p4.subscribe(t::ENDPOINT, &all, &[]).await;
    let r = p4.recv().await;
    p4.ack(&r).await;

    let g = w.wait_streams_synced(1).await;
    let before: Vec<_> = [1, 2, 4].map(|j| w.pushes(&node(j))).into();

    // 1. An endpoint change of svc-0: nobody's CDS/LDS/SDS, pod-1 and pod-2
    //    do not watch svc-0's endpoints, pod-4 gets one EDS push.
    meshgen::write_change(&w.config_dir, 3).unwrap();
    let r = p4.recv().await;
    assert_eq!(delta_names(&r), [c(0)]);
    p4.ack(&r).await;
    let g = w.wait_streams_synced(g + 1).await;
    let after: Vec<_> = [1, 2, 4].map(|j| w.pushes(&node(j))).into();
    assert_eq!(after[0], before[0], "pod-1 got nothing");
    assert_eq!(after[1], before[1], "pod-2 got nothing");
    for ty in ["sds", "cds", "lds"] {
        assert_eq!(after[2][ty], before[2][ty], "pod-4 {ty}");
    }
    assert_eq!(after[2]["eds"], before[2]["eds"] + 1);

    // 2. A change only pod-1's configuration depends on (its app address):
    //    pod-1 gets one CDS push (its inbound cluster), no one else anything.
    let edited = mesh(S, |m| {
        m.replacen(
            "name: pod-1\n  namespace: load\n  labels: {app: svc-1}\n  annotations: {",
            "name: pod-1\n  namespace: load\n  labels: {app: svc-1}\n  annotations: {ward.io/app-ip: 127.0.0.9, ",
            1,
        )
    });
    w.write(meshgen::MESH_FILE, &edited);
    let r = p1.recv().await;
    assert_eq!(r.type_url, t::CLUSTER);
    p1.ack(&r, &[]).await;
    w.wait_streams_synced(g + 1).await;
    let last: Vec<_> = [1, 2, 4].map(|j| w.pushes(&node(j))).into();
    assert_eq!(last[0]["cds"], after[0]["cds"] + 1);
    for ty in ["sds", "eds", "lds"] {
        assert_eq!(last[0][ty], after[0][ty], "pod-1 {ty}");
    }
    assert_eq!(last[1], after[1], "pod-2 got nothing");
    assert_eq!(last[2], after[2], "pod-4 got nothing");
}

// --------------------------------------------------------------- leaks

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

async fn metric(w: &Ward, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", w.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name || k == format!("ward_{name}")).then(|| v.parse().ok())?
        })
        .unwrap_or_else(|| panic!("metric {name} in\n{text}"))
}

/// Connect, get clusters (SotW or delta), disconnect.
async fn cycle(w: &Ward, creds: &[(String, String)], i: usize) {
    let j = i % creds.len();
    if i.is_multiple_of(2) {
        let mut a = Ads::connect(w, Some(creds[j].clone()), &node(j))
            .await
            .expect("connects");
        a.request(t::CLUSTER, &[], "", "").await;
        a.recv().await;
    } else {
        let mut d = DeltaAds::connect(w, Some(creds[j].clone()), &node(j))
            .await
            .expect("connects");
        d.subscribe(t::CLUSTER, &[], &[]).await;
        d.recv().await;
    }
}

async fn cycles(w: &Ward, creds: &[(String, String)], range: std::ops::Range<usize>) {
    use futures::StreamExt;
    futures::stream::iter(range)
        .for_each_concurrent(25, |i| cycle(w, creds, i))
        .await;
}

async fn wait_idle(w: &Ward) {
    eventually(Duration::from_secs(30), || async {
        let idle = w.running.stream_tasks.get() == 0
            && w.running.registry.is_empty()
            && w.running.certs.status().iter().all(|s| s.subscribers == 0);
        idle.then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "streams left behind: {} tasks, {} registered",
            w.running.stream_tasks.get(),
            w.running.registry.len()
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connects_and_disconnects_leave_tasks_and_memory_at_baseline() {
    let w = generated_ward(S, 20).await;
    let creds: Vec<(String, String)> = (0..20).map(|j| w.pod_credential(S, j)).collect();
    // Warm up: allocator arenas, TLS session caches, interned tables.
    cycles(&w, &creds, 0..100).await;
    wait_idle(&w).await;
    let rss_before = rss_bytes();
    assert_eq!(metric(&w, "xds_stream_tasks").await, 0.0);

    cycles(&w, &creds, 100..1100).await;
    wait_idle(&w).await;
    assert_eq!(metric(&w, "xds_stream_tasks").await, 0.0);
    assert_eq!(metric(&w, "cert_subscriptions").await, 0.0);
    assert_eq!(metric(&w, "connected_proxies").await, 0.0);
    let rss_after = rss_bytes();
    let growth = rss_after.saturating_sub(rss_before);
    // A leaked session (snapshot, registry entry, channel buffers) is tens
    // of KB: 1,000 of them would be tens of MB. Allow allocator noise.
    assert!(
        growth < 16 << 20,
        "RSS grew by {} KB over 1,000 connect/disconnect cycles ({} → {} KB)",
        growth >> 10,
        rss_before >> 10,
        rss_after >> 10
    );
    let pods: BTreeSet<String> = w
        .running
        .certs
        .status()
        .iter()
        .map(|s| s.proxy.to_string())
        .collect();
    assert!(
        pods.len() <= 20,
        "certificates kept for reuse only, one per pod"
    );
}
