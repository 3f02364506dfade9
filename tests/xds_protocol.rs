//! The ADS server against a fake Envoy: protocol rules (DESIGN.md 1–8) and
//! connection authentication.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{Ads, Ward, eventually, repo_path, resource_names};
use ward::translate::type_url as t;

fn demo_mesh() -> String {
    std::fs::read_to_string(repo_path("examples/local-mesh/mesh.yaml")).unwrap()
}

async fn ward() -> Ward {
    Ward::start(&[("mesh.yaml", &demo_mesh())]).await
}

async fn client_stream(w: &Ward) -> Ads {
    Ads::connect(
        w,
        Some(w.credential("demo/client-0", "client")),
        "demo/client-0",
    )
    .await
    .expect("connects")
}

fn assert_well_formed(resp: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse) {
    assert!(!resp.nonce.is_empty(), "nonce set");
    assert!(!resp.version_info.is_empty(), "version set");
    for any in &resp.resources {
        assert_eq!(
            any.type_url, resp.type_url,
            "every Any has the response's type_url"
        );
    }
    let names = resource_names(resp);
    let unique: BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "no duplicate names in {names:?}");
}

#[tokio::test]
async fn responses_follow_nonce_version_and_type_url_rules() {
    let w = ward().await;
    let mut ads = client_stream(&w).await;
    let mut nonces = BTreeSet::new();
    ads.request(t::CLUSTER, &[], "", "").await;
    let cds = ads.recv().await;
    assert_well_formed(&cds);
    assert_eq!(cds.type_url, t::CLUSTER);
    assert!(resource_names(&cds).contains(&"outbound|demo|server|9080".to_string()));
    nonces.insert(cds.nonce.clone());
    ads.ack(&cds, &[]).await;

    ads.request(t::LISTENER, &[], "", "").await;
    let lds = ads.recv().await;
    assert_well_formed(&lds);
    nonces.insert(lds.nonce.clone());

    ads.request(t::SECRET, &["default", "ROOTCA"], "", "").await;
    let sds = ads.recv().await;
    assert_well_formed(&sds);
    assert_eq!(resource_names(&sds), ["ROOTCA", "default"]);
    nonces.insert(sds.nonce.clone());

    ads.request(t::ENDPOINT, &["outbound|demo|server|9080"], "", "")
        .await;
    let eds = ads.recv().await;
    assert_well_formed(&eds);
    assert_eq!(resource_names(&eds), ["outbound|demo|server|9080"]);
    nonces.insert(eds.nonce.clone());
    assert_eq!(nonces.len(), 4, "nonces are unique within the stream");
}

#[tokio::test]
async fn sds_answers_exactly_the_requested_names_and_only_own_identity() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use prost::Message;
    let w = ward().await;
    let mut ads = client_stream(&w).await;
    ads.request(t::SECRET, &["default", "no-such-secret"], "", "")
        .await;
    let sds = ads.recv().await;
    assert_eq!(resource_names(&sds), ["default"]);
    let secret = Secret::decode(sds.resources[0].value.as_slice()).unwrap();
    let Some(secret::Type::TlsCertificate(tls)) = secret.r#type else {
        panic!("default is a TLS certificate")
    };
    let Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineString(pem)) =
        tls.certificate_chain.and_then(|d| d.specifier)
    else {
        panic!("inline chain")
    };
    let der = ward::ca::pem_to_der_certs(&pem).unwrap();
    let info = ward::ca::cert_info(&der[0]).unwrap();
    assert_eq!(info.uri_sans, ["spiffe://cluster.local/ns/demo/sa/client"]);
}

#[tokio::test]
async fn nack_is_recorded_and_the_rejected_version_is_not_resent() {
    let w = ward().await;
    let mut ads = client_stream(&w).await;
    ads.request(t::LISTENER, &[], "", "").await;
    let lds = ads.recv().await;
    ads.nack(t::LISTENER, &[], &lds.nonce, "listener rejected: test")
        .await;
    // Ask for something else: if the rejected LDS were resent it would come
    // first, since the stream answers in order.
    ads.request(t::CLUSTER, &[], "", "").await;
    let next = ads.recv().await;
    assert_eq!(
        next.type_url,
        t::CLUSTER,
        "the rejected listener version is not resent"
    );

    let proxies = eventually(Duration::from_secs(5), || async {
        let v = w.get_json("/debug/proxies").await;
        let nack = v["proxies"][0]["types"]["lds"]["last_nack"].clone();
        (!nack.is_null()).then_some(v)
    })
    .await
    .expect("NACK shows in /debug/proxies");
    let p = &proxies["proxies"][0];
    assert_eq!(p["pod"], "demo/client-0");
    assert_eq!(
        p["types"]["lds"]["last_nack"]["message"],
        "listener rejected: test"
    );
    assert_eq!(
        p["types"]["lds"]["last_nack"]["version"],
        lds.version_info.as_str()
    );
    assert!(p["types"]["lds"]["acked_version"].is_null());

    let metrics = reqwest::get(format!("{}/metrics", w.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("ward_xds_nacks_total{type=\"lds\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_reconnect_receives_the_full_subscribed_state() {
    let w = ward().await;
    let mut first = client_stream(&w).await;
    first.request(t::CLUSTER, &[], "", "").await;
    let cds = first.recv().await;
    first.ack(&cds, &[]).await;
    first
        .request(t::SECRET, &["default", "ROOTCA"], "", "")
        .await;
    let sds = first.recv().await;
    drop(first);

    // Envoy reconnects saying which versions it has; it still gets everything.
    let mut again = client_stream(&w).await;
    again.request(t::CLUSTER, &[], &cds.version_info, "").await;
    let cds2 = again.recv().await;
    assert_eq!(resource_names(&cds2), resource_names(&cds));
    assert_eq!(cds2.version_info, cds.version_info);
    again
        .request(t::SECRET, &["default", "ROOTCA"], &sds.version_info, "")
        .await;
    let sds2 = again.recv().await;
    assert_eq!(resource_names(&sds2), ["ROOTCA", "default"]);
    // The certificate survived the reconnect: no needless re-issue.
    assert_eq!(sds2.version_info, sds.version_info);
}

#[tokio::test]
async fn another_pods_credential_gets_nothing() {
    let w = ward().await;
    // The server's credential, claiming to be the client.
    let mut ads = Ads::connect(
        &w,
        Some(w.credential("demo/server-0", "server")),
        "demo/client-0",
    )
    .await
    .expect("TLS connects");
    ads.request(t::SECRET, &["default"], "", "").await;
    let err = ads.recv_err().await;
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("demo/server-0"), "{}", err.message());
    let metrics = reqwest::get(format!("{}/metrics", w.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("reason=\"node_id_mismatch\""), "{metrics}");
    assert_eq!(
        w.get_json("/debug/proxies").await["proxies"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test]
async fn a_connection_without_a_credential_is_refused() {
    let w = ward().await;
    let result = async {
        let mut ads = Ads::connect(&w, None, "demo/client-0").await?;
        ads.request(t::SECRET, &["default"], "", "").await;
        Err::<(), _>(ads.recv_err().await)
    }
    .await;
    assert!(result.is_err(), "no client certificate, no stream");
}

#[tokio::test]
async fn a_workload_certificate_is_not_an_xds_credential() {
    let w = ward().await;
    let id = ward::model::SpiffeId::new("cluster.local", "demo", "client");
    let leaf = w
        .running
        .authority
        .issue_workload(&id, Duration::from_secs(600))
        .unwrap();
    let cred = (leaf.cert_pem.clone(), leaf.key_pem.expose().to_string());
    let outcome = async {
        let mut ads = Ads::connect(&w, Some(cred), "demo/client-0").await?;
        ads.request(t::SECRET, &["default"], "", "").await;
        Err::<(), _>(ads.recv_err().await)
    }
    .await;
    // Refused during the TLS handshake (the xDS CA did not sign it), or by
    // the credential check if it ever got that far: either way, no stream.
    let err = outcome.unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok, "{err:?}");
}

#[tokio::test]
async fn a_directory_edit_is_pushed_to_the_stream() {
    let w = ward().await;
    let mut ads = client_stream(&w).await;
    let cluster = "outbound|demo|server|9080";
    ads.request(t::ENDPOINT, &[cluster], "", "").await;
    let eds = ads.recv().await;
    ads.ack(&eds, &[cluster]).await;
    // A second server pod appears.
    w.write(
        "server-1.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: server-1, namespace: demo, labels: {app: server}}
spec:
  serviceAccountName: server
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 127.0.0.21}
"#,
    );
    let start = std::time::Instant::now();
    let pushed = ads.recv().await;
    assert_eq!(pushed.type_url, t::ENDPOINT);
    assert_ne!(pushed.version_info, eds.version_info);
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use prost::Message;
    let cla = ClusterLoadAssignment::decode(pushed.resources[0].value.as_slice()).unwrap();
    assert_eq!(
        cla.endpoints
            .iter()
            .map(|l| l.lb_endpoints.len())
            .sum::<usize>(),
        2
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "edit reached the proxy in {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_proxy_that_does_not_ack_its_new_certificate_is_flagged() {
    let w = Ward::start_with(&[("mesh.yaml", &demo_mesh())], |cfg| {
        cfg.rotation = ward::ca::RotationConfig {
            ttl: Duration::from_secs(5),
            rotate_at: 0.5,
            jitter: 0.0,
            ..Default::default()
        };
    })
    .await;
    let mut ads = client_stream(&w).await;
    ads.request(t::SECRET, &["default", "ROOTCA"], "", "").await;
    let sds = ads.recv().await;
    ads.ack(&sds, &["default", "ROOTCA"]).await;
    // The rotation is pushed; this proxy never ACKs it.
    let rotated = ads.recv().await;
    assert_eq!(rotated.type_url, t::SECRET);
    assert_ne!(rotated.version_info, sds.version_info);

    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    let text = eventually(Duration::from_secs(10), || async {
        let t = reqwest::get(format!("{}/metrics", w.admin()))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (metric(&t, "ward_proxies_cert_past_80_percent") == 1.0).then_some(t)
    })
    .await
    .expect("the stale proxy is counted");
    assert!(
        metric(&text, "ward_cert_nearest_expiry_seconds") > 0.0,
        "{text}"
    );
    let certs = w.get_json("/debug/certs").await;
    let c = &certs["certificates"][0];
    assert_eq!(c["envoy"][0]["acked_current"], false, "{certs}");
    assert_eq!(c["envoy"][0]["past_80_percent"], true, "{certs}");
    assert!(!certs.to_string().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn the_root_rotates_by_configuration_and_proxies_follow() {
    let w = Ward::start_with(&[("mesh.yaml", &demo_mesh())], |cfg| {
        cfg.root_rotation_interval = Some(Duration::from_secs(2));
    })
    .await;
    let first_root = w.get_json("/debug/certs").await["trust_bundle"][0]["serial"].clone();
    // A proxy that ACKs every secret push, like Envoy.
    let mut ads = client_stream(&w).await;
    let names = ["default", "ROOTCA"];
    ads.request(t::SECRET, &names, "", "").await;
    let acking = tokio::spawn(async move {
        loop {
            let r = ads.recv().await;
            ads.ack(&r, &names).await;
        }
    });
    let done = eventually(Duration::from_secs(20), || async {
        let v = w.get_json("/debug/certs").await;
        (v["root_rotation"]["phase"] == "done").then_some(v)
    })
    .await
    .expect("the root rotates once it reaches --root-rotation-interval");
    acking.abort();
    let bundle = done["trust_bundle"].as_array().unwrap();
    assert_eq!(bundle.len(), 1, "only the new root remains: {done}");
    assert_ne!(bundle[0]["serial"], first_root);
    assert_eq!(
        done["root_rotation"]["total"], 1,
        "the connected proxy took part: {done}"
    );
    let leaf = &done["certificates"][0];
    assert_eq!(leaf["issuer"], bundle[0]["subject"]);
    assert_eq!(leaf["envoy"][0]["acked_current"], true, "{done}");
}
