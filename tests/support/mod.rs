//! Shared test helpers: start Ward in-process on loopback with a config
//! directory, and a fake ADS client that speaks like Envoy.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Status, Streaming};
use ward::app::{self, Running, ServeConfig};
use ward::ca::RotationConfig;
use ward::model::{ObjectKey, SpiffeId};

pub use ward::local::eventually;

pub const TD: &str = "cluster.local";

/// Ward running in-process with its own scratch directories.
pub struct Ward {
    pub running: Running,
    pub config_dir: PathBuf,
    pub _tmp: tempfile::TempDir,
}

impl Ward {
    pub async fn start(files: &[(&str, &str)]) -> Ward {
        Self::start_with(files, |_| {}).await
    }

    pub async fn start_with(files: &[(&str, &str)], tweak: impl FnOnce(&mut ServeConfig)) -> Ward {
        let tmp = tempfile::tempdir().unwrap();
        let config_dir = tmp.path().join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        for (name, body) in files {
            std::fs::write(config_dir.join(name), body).unwrap();
        }
        let mut cfg = ServeConfig {
            config_dir: config_dir.clone(),
            state_dir: tmp.path().join("state"),
            xds_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            trust_domain: TD.into(),
            insecure_xds: false,
            rotation: RotationConfig::default(),
            ca_files: None,
            xds_server_names: vec![],
            root_rotation_interval: None,
            policy_step_timeout: std::time::Duration::from_secs(30),
            push_debounce: Duration::ZERO,
        };
        tweak(&mut cfg);
        let running = app::start(cfg).await.expect("ward starts");
        let ward = Ward {
            running,
            config_dir,
            _tmp: tmp,
        };
        ward.wait_ready().await;
        ward
    }

    pub fn admin(&self) -> String {
        format!("http://{}", self.running.admin_addr)
    }

    pub async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.admin());
        eventually(Duration::from_secs(10), || async {
            reqwest::get(&url)
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await
        .expect("ward becomes ready");
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.admin()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub fn write(&self, name: &str, body: &str) {
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, self.config_dir.join(name)).unwrap();
    }

    /// An xDS client credential for `pod`, as `ward bootstrap` issues it.
    pub fn credential(&self, pod: &str, service_account: &str) -> (String, String) {
        let pod: ObjectKey = pod.parse().unwrap();
        let id = SpiffeId::new(TD, &pod.namespace, service_account);
        let c = self
            .running
            .xds_ca
            .issue_xds_client(&pod, &id, Duration::from_secs(3600))
            .unwrap();
        (c.cert_pem.clone(), c.key_pem.expose().to_string())
    }
}

/// A fake Envoy on one ADS stream.
pub struct Ads {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    node: Option<Node>,
}

impl Ads {
    /// Connect with a credential (None: no client certificate).
    pub async fn connect(
        ward: &Ward,
        credential: Option<(String, String)>,
        node_id: &str,
    ) -> Result<Ads, Status> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                ward.running.xds_ca.trust_bundle_pem(),
            ))
            .domain_name("localhost");
        if let Some((cert, key)) = credential {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let channel = Channel::from_shared(format!("https://{}", ward.running.xds_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e:?}")))?;
        Self::open(channel, node_id).await
    }

    async fn open(channel: Channel, node_id: &str) -> Result<Ads, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let resp = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?;
        Ok(Ads {
            tx,
            rx: resp.into_inner(),
            node: Some(Node {
                id: node_id.into(),
                ..Default::default()
            }),
        })
    }

    pub async fn request(&mut self, type_url: &str, names: &[&str], version: &str, nonce: &str) {
        self.send(type_url, names, version, nonce, None).await
    }

    pub async fn nack(&mut self, type_url: &str, names: &[&str], nonce: &str, message: &str) {
        self.send(type_url, names, "", nonce, Some(message)).await
    }

    async fn send(
        &mut self,
        type_url: &str,
        names: &[&str],
        version: &str,
        nonce: &str,
        error: Option<&str>,
    ) {
        let req = DiscoveryRequest {
            node: self.node.take(),
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| RpcStatus {
                code: 3,
                message: m.into(),
                details: vec![],
            }),
            ..Default::default()
        };
        self.tx.send(req).await.expect("stream open");
    }

    /// ACK a response.
    pub async fn ack(&mut self, resp: &DiscoveryResponse, names: &[&str]) {
        self.request(&resp.type_url, names, &resp.version_info, &resp.nonce)
            .await
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        match tokio::time::timeout(Duration::from_secs(10), self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    /// The stream's terminal error.
    pub async fn recv_err(&mut self) -> Status {
        match tokio::time::timeout(Duration::from_secs(10), self.rx.message()).await {
            Ok(Err(s)) => s,
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

/// Names of the resources in a response, decoded by type.
pub fn resource_names(resp: &DiscoveryResponse) -> Vec<String> {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    use prost::Message;
    use ward::translate::type_url as t;
    resp.resources
        .iter()
        .map(|a| {
            let v = a.value.as_slice();
            match a.type_url.as_str() {
                t::CLUSTER => Cluster::decode(v).unwrap().name,
                t::ENDPOINT => ClusterLoadAssignment::decode(v).unwrap().cluster_name,
                t::LISTENER => Listener::decode(v).unwrap().name,
                t::ROUTE => RouteConfiguration::decode(v).unwrap().name,
                t::SECRET => Secret::decode(v).unwrap().name,
                other => panic!("unexpected type {other}"),
            }
        })
        .collect()
}

pub fn repo_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A fake Envoy on one delta (incremental) ADS stream.
pub struct DeltaAds {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
    node: Option<Node>,
}

impl DeltaAds {
    pub async fn connect(
        ward: &Ward,
        credential: Option<(String, String)>,
        node_id: &str,
    ) -> Result<DeltaAds, Status> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                ward.running.xds_ca.trust_bundle_pem(),
            ))
            .domain_name("localhost");
        if let Some((cert, key)) = credential {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let channel = Channel::from_shared(format!("https://{}", ward.running.xds_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e:?}")))?;
        let (tx, rx) = mpsc::channel(16);
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let resp = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await?;
        Ok(DeltaAds {
            tx,
            rx: resp.into_inner(),
            node: Some(Node {
                id: node_id.into(),
                ..Default::default()
            }),
        })
    }

    /// Send a request (the first one carries the node).
    pub async fn send(&mut self, mut req: DeltaDiscoveryRequest) {
        req.node = self.node.take();
        self.tx.send(req).await.expect("stream open");
    }

    /// Subscribe to / unsubscribe from names of a type.
    pub async fn subscribe(&mut self, type_url: &str, sub: &[&str], unsub: &[&str]) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    pub async fn ack(&mut self, resp: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await
    }

    pub async fn nack(&mut self, resp: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: message.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(Duration::from_secs(10), self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            other => panic!("expected a delta response, got {other:?}"),
        }
    }
}

/// Names of the resources in a delta response, sorted.
pub fn delta_names(resp: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = resp.resources.iter().map(|r| r.name.clone()).collect();
    v.sort();
    v
}

/// A Ward serving a generated mesh (see `ward::meshgen`).
pub async fn generated_ward(services: usize, pods: usize) -> Ward {
    let yaml = ward::meshgen::mesh_yaml(&ward::meshgen::MeshSpec { services, pods });
    Ward::start(&[
        (ward::meshgen::MESH_FILE, &yaml),
        (ward::meshgen::CHANGE_FILE, &ward::meshgen::change_yaml(0)),
    ])
    .await
}

impl Ward {
    /// Credential of generated pod `j`.
    pub fn pod_credential(&self, services: usize, j: usize) -> (String, String) {
        let spec = ward::meshgen::MeshSpec { services, pods: 0 };
        self.credential(
            &ward::meshgen::pod_key(j).to_string(),
            &ward::meshgen::service_account(ward::meshgen::pod_service(&spec, j)),
        )
    }

    /// Wait until every connected stream has evaluated the latest snapshot
    /// (and sent what it changed). Returns that generation.
    pub async fn wait_streams_synced(&self, at_least: u64) -> u64 {
        eventually(Duration::from_secs(20), || async {
            let list = self.running.registry.list();
            let min = list.iter().map(|p| p.generation).min()?;
            (min >= at_least && list.iter().all(|p| p.generation == min)).then_some(min)
        })
        .await
        .expect("every stream evaluates the latest snapshot")
    }

    /// Pushes per stream and type so far, by pod.
    pub fn pushes(&self, pod: &str) -> std::collections::BTreeMap<&'static str, u64> {
        self.running
            .registry
            .list()
            .iter()
            .filter(|p| p.pod == pod)
            .flat_map(|p| p.types.iter().map(|(t, s)| (*t, s.pushes)))
            .collect()
    }
}
