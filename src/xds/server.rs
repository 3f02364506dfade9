//! The ADS gRPC server: authenticates each connection, then runs one task
//! per stream that drives the [`SotwStream`] or [`DeltaStream`] state
//! machine from three inputs — requests, mesh snapshots and the proxy's
//! certificate. Both protocols share a [`Session`]: authorization of the
//! node, the registry entry, the certificate subscription and the proxy's
//! snapshot.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::cache::{MeshSnapshot, ProxyBuilder, ProxySnapshot};
use super::delta::DeltaStream;
use super::sotw::{RequestKind, SotwStream};
use super::status::{AckedCert, NackStatus, ProxyRegistry, ProxyStatus, unix_now};
use crate::ca::{CertManager, WorkloadCert, xds_client_identity};
use crate::metrics::{Metrics, ReasonLabels, TypeLabels};
use crate::model::{ObjectKey, SpiffeId};
use crate::translate::{names, type_url};

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("xDS server TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("xDS server on {addr}: {source}")]
    Serve {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Everything a stream needs, shared by all streams.
pub struct XdsContext {
    pub trust_domain: String,
    /// Latest mesh snapshot (single writer: [`super::cache::MeshCache`]).
    pub snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    pub certs: CertManager,
    pub registry: Arc<ProxyRegistry>,
    pub metrics: Arc<Metrics>,
    /// `--insecure-xds`: trust `node.id` without a client certificate.
    pub insecure: bool,
    /// Ends every stream on shutdown.
    pub shutdown: CancellationToken,
    /// Live stream tasks (for the admin metrics and leak tests).
    pub stream_tasks: Arc<TaskCounter>,
}

/// The server's TLS material: its own cert and key, and the CA bundle
/// that client (sidecar) credentials must chain to.
pub struct XdsTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

/// Serve ADS on an already-bound listener until `shutdown`.
pub async fn serve(
    ctx: Arc<XdsContext>,
    listener: TcpListener,
    tls: Option<XdsTls>,
) -> Result<(), XdsError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let shutdown = ctx.shutdown.clone();
    let mut builder = tonic::transport::Server::builder()
        // Detect dead sidecars whose TCP connection vanished silently.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = tls {
        let cfg = ServerTlsConfig::new()
            .identity(Identity::from_pem(tls.cert_pem, tls.key_pem))
            .client_ca_root(Certificate::from_pem(tls.client_ca_pem));
        builder = builder.tls_config(cfg).map_err(XdsError::Tls)?;
    }
    let svc = AggregatedDiscoveryServiceServer::new(AdsService { ctx })
        .max_decoding_message_size(16 * 1024 * 1024);
    builder
        .add_service(svc)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
        .map_err(|source| XdsError::Serve { addr, source })
}

struct AdsService {
    ctx: Arc<XdsContext>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the TLS handshake proved about the peer.
#[derive(Clone, Debug)]
struct Proven {
    pod: ObjectKey,
    id: SpiffeId,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.open(request, SotwStream::new())
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.open(request, DeltaStream::new())
    }
}

impl AdsService {
    /// Authenticate the connection, then serve the stream with `proto` on
    /// its own task (it ends with the stream or on shutdown).
    fn open<P: Protocol + 'static>(
        &self,
        request: Request<Streaming<P::Req>>,
        proto: P,
    ) -> Result<Response<ResponseStream<P::Resp>>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let proven = if self.ctx.insecure {
            None
        } else {
            Some(self.authenticate(&request, &peer)?)
        };
        let (tx, rx) = mpsc::channel(16);
        let ctx = self.ctx.clone();
        let inbound = request.into_inner();
        let count = ctx.stream_tasks.enter();
        tokio::spawn(async move {
            let _count = count;
            if let Err(status) = drive(&ctx, proven, peer.clone(), inbound, &tx, proto).await {
                tracing::warn!(peer = %peer, protocol = P::NAME, "xDS stream refused: {}", status.message());
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    fn authenticate<T>(&self, request: &Request<T>, peer: &str) -> Result<Proven, Status> {
        let refuse = |reason: &'static str, msg: String| {
            self.ctx
                .metrics
                .xds_auth_failures
                .get_or_create(&ReasonLabels { reason })
                .inc();
            tracing::warn!(peer = %peer, reason, "xDS connection refused: {msg}");
            Status::unauthenticated(msg)
        };
        let certs = request.peer_certs().ok_or_else(|| {
            refuse(
                "no_client_cert",
                "a client certificate from `ward bootstrap` is required".into(),
            )
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| refuse("no_client_cert", "empty client certificate chain".into()))?;
        let (pod, id) = xds_client_identity(leaf.as_ref(), &self.ctx.trust_domain)
            .map_err(|e| refuse("bad_client_cert", format!("client certificate: {e}")))?;
        Ok(Proven { pod, id })
    }
}

/// Removes the stream's traces when it ends, however it ends.
struct StreamGuard<'a> {
    ctx: &'a XdsContext,
    stream: u64,
    pod: ObjectKey,
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.ctx.registry.remove(self.stream);
        self.ctx.certs.release(&self.pod);
        self.ctx.metrics.connected_proxies.dec();
        tracing::info!(pod = %self.pod, stream = self.stream, "proxy disconnected");
    }
}

/// Live stream tasks (SotW and delta). Kept by the tasks themselves so a
/// leak test can see that closed streams leave nothing running.
#[derive(Debug, Default)]
pub struct TaskCounter(AtomicUsize);

impl TaskCounter {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn enter(self: &Arc<Self>) -> TaskCount {
        self.0.fetch_add(1, Ordering::Relaxed);
        TaskCount(self.clone())
    }
}

/// Held by a stream task for its whole life.
struct TaskCount(Arc<TaskCounter>);

impl Drop for TaskCount {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What both protocols share for one stream: the proven identity, the
/// registry entry, the certificate subscription, and the proxy's current
/// resources (rebuilt from mesh snapshots and certificates).
struct Session<'a> {
    ctx: &'a XdsContext,
    pod: ObjectKey,
    stream: u64,
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    certs: watch::Receiver<Arc<WorkloadCert>>,
    builder: ProxyBuilder,
    /// What the proxy should have now; the last good one when a new
    /// snapshot is inconsistent.
    current: ProxySnapshot,
    /// Mesh generation of `current`.
    generation: u64,
    /// The certificate `current` was built with.
    current_cert: Arc<WorkloadCert>,
    /// Which certificate each recent SDS response carried, so an ACK tells
    /// which certificate and trust bundle Envoy now serves.
    sent_certs: SentCerts,
    _guard: StreamGuard<'a>,
}

/// Why a stream's select loop woke up.
enum Wake<R> {
    Request(R),
    Changed,
    Closed,
}

impl<'a> Session<'a> {
    /// Authorize `node` against what the connection proved, register the
    /// stream, subscribe to the certificate and build the first snapshot.
    fn open(
        ctx: &'a XdsContext,
        proven: Option<Proven>,
        peer: String,
        node: Option<&Node>,
        protocol: &'static str,
    ) -> Result<Session<'a>, Status> {
        let node_id = node.map(|n| n.id.as_str()).unwrap_or_default();
        let pod = names::parse_node_id(node_id).ok_or_else(|| {
            Status::invalid_argument(format!(
                "node.id {node_id:?} is not NAMESPACE/NAME of a pod (use `ward bootstrap`)"
            ))
        })?;
        let mut snapshots = ctx.snapshots.clone();
        let (id, authenticated) = match &proven {
            Some(p) if p.pod != pod => {
                ctx.metrics
                    .xds_auth_failures
                    .get_or_create(&ReasonLabels {
                        reason: "node_id_mismatch",
                    })
                    .inc();
                return Err(Status::permission_denied(format!(
                    "credential is for pod {} but node.id claims {pod}; no configuration or secrets are served",
                    p.pod
                )));
            }
            Some(p) => (p.id.clone(), true),
            None => {
                let view = snapshots.borrow_and_update().clone();
                let w = view.mesh.workloads.get(&pod).ok_or_else(|| {
                    Status::unavailable(format!("pod {pod} is not known (yet); retry later"))
                })?;
                (w.spiffe_id(&ctx.trust_domain), false)
            }
        };
        if let Some(w) = snapshots.borrow().mesh.workloads.get(&pod)
            && w.service_account != id.service_account
        {
            tracing::warn!(pod = %pod, "pod now runs as service account {:?} but its credential proves {id}; serving {id}", w.service_account);
        }
        let certs = ctx
            .certs
            .subscribe(&pod, &id)
            .map_err(|e| Status::unavailable(format!("certificate for {id}: {e}")))?;

        let stream = ctx.registry.next_stream_id();
        ctx.registry.insert(ProxyStatus {
            stream,
            pod: pod.to_string(),
            identity: id.uri(),
            authenticated,
            peer,
            connected_at: unix_now(),
            protocol,
            generation: 0,
            types: Default::default(),
            cert: None,
        });
        ctx.metrics.connected_proxies.inc();
        let guard = StreamGuard {
            ctx,
            stream,
            pod: pod.clone(),
        };
        tracing::info!(pod = %pod, identity = %id, stream, "proxy connected");
        let current_cert = certs.borrow().clone();
        let mut session = Session {
            ctx,
            builder: ProxyBuilder::new(pod.clone(), ctx.trust_domain.clone()),
            pod,
            stream,
            snapshots,
            certs,
            current: ProxySnapshot::default(),
            generation: 0,
            current_cert,
            sent_certs: SentCerts::default(),
            _guard: guard,
        };
        session.rebuild();
        Ok(session)
    }

    /// Rebuild from the latest snapshot and certificate; an inconsistent
    /// snapshot is withheld and the last good one stays in force.
    fn rebuild(&mut self) {
        let view = self.snapshots.borrow_and_update().clone();
        let cert = self.certs.borrow_and_update().clone();
        self.generation = view.generation;
        match self.builder.build(&view, &cert) {
            Ok(s) => {
                self.current = s;
                self.current_cert = cert;
            }
            Err(e) => {
                self.ctx.metrics.inconsistent_snapshots.inc();
                tracing::error!(pod = %self.pod, "snapshot withheld, last one stays in force: {e}");
            }
        }
    }

    /// Wait for the next request, snapshot or certificate change, or the end.
    async fn next<R>(
        &mut self,
        inbound: &mut (impl Stream<Item = Result<R, Status>> + Unpin),
    ) -> Wake<R> {
        tokio::select! {
            _ = self.ctx.shutdown.cancelled() => Wake::Closed,
            msg = inbound.next() => match msg {
                Some(Ok(r)) => Wake::Request(r),
                Some(Err(e)) => {
                    tracing::debug!(pod = %self.pod, "stream ended: {e}");
                    Wake::Closed
                }
                None => Wake::Closed,
            },
            Ok(()) = self.snapshots.changed() => Wake::Changed,
            Ok(()) = self.certs.changed() => Wake::Changed,
        }
    }

    /// Everything for the current generation has been sent.
    fn synced(&self) {
        self.ctx
            .registry
            .set_generation(self.stream, self.generation);
    }

    /// After a rebuild: `sent` are the types just pushed; the others are
    /// current for this generation too (the policy rollout waits on it).
    fn observe_generation(&self, responses: &[&str]) {
        let sent: Vec<&'static str> = responses.iter().map(|t| type_url::short(t)).collect();
        self.ctx
            .registry
            .observe_generation(self.stream, self.generation, &sent);
    }

    /// A request was handled: record what it meant; an SDS ACK tells which
    /// certificate Envoy serves now.
    fn record_request(&self, type_url: &str, kind: &RequestKind) {
        record_request(self.ctx, self.stream, &self.pod, type_url, kind);
        if let (RequestKind::Ack { version }, type_url::SECRET) = (kind, type_url)
            && let Some(cert) = self.sent_certs.acked(version)
        {
            self.ctx
                .registry
                .set_cert(self.stream, AckedCert::new(&cert));
        }
    }

    /// Count and record a response about to be sent.
    fn record_push(&mut self, type_url: &str, version: &str) {
        if type_url == type_url::SECRET {
            self.sent_certs.sent(version, &self.current_cert);
        }
        let generation = self.generation;
        let short = type_url::short(type_url);
        self.ctx
            .metrics
            .pushes
            .get_or_create(&TypeLabels { r#type: short })
            .inc();
        let version = version.to_string();
        self.ctx.registry.update(self.stream, short, |t| {
            t.sent_version = Some(version);
            t.sent_generation = Some(generation);
            t.pushes += 1;
        });
    }
}

/// Read the first request of a stream: it carries the node.
async fn first_request<R>(
    inbound: &mut (impl Stream<Item = Result<R, Status>> + Unpin),
) -> Result<Option<R>, Status> {
    match inbound.next().await {
        Some(Ok(req)) => Ok(Some(req)),
        Some(Err(e)) => Err(Status::cancelled(format!("stream error: {e}"))),
        None => Ok(None),
    }
}

/// What differs between state-of-the-world and delta ADS; everything else
/// (authentication, status, certificates, snapshots) is the shared
/// [`Session`] and [`drive`].
trait Protocol: Send {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    /// Name in status (`ads` / `delta`).
    const NAME: &'static str;
    fn node(req: &Self::Req) -> Option<&Node>;
    fn type_url(req: &Self::Req) -> &str;
    fn on_request(
        &mut self,
        req: &Self::Req,
        snap: &ProxySnapshot,
    ) -> (RequestKind, Vec<Self::Resp>);
    fn on_snapshot(&mut self, snap: &ProxySnapshot) -> Vec<Self::Resp>;
    /// (type URL, version) of a response.
    fn describe(resp: &Self::Resp) -> (&str, &str);
}

impl Protocol for SotwStream {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const NAME: &'static str = "ads";
    fn node(req: &Self::Req) -> Option<&Node> {
        req.node.as_ref()
    }
    fn type_url(req: &Self::Req) -> &str {
        &req.type_url
    }
    fn on_request(
        &mut self,
        req: &Self::Req,
        snap: &ProxySnapshot,
    ) -> (RequestKind, Vec<Self::Resp>) {
        let (kind, resp) = SotwStream::on_request(self, req, snap);
        (kind, resp.into_iter().collect())
    }
    fn on_snapshot(&mut self, snap: &ProxySnapshot) -> Vec<Self::Resp> {
        SotwStream::on_snapshot(self, snap)
    }
    fn describe(resp: &Self::Resp) -> (&str, &str) {
        (&resp.type_url, &resp.version_info)
    }
}

impl Protocol for DeltaStream {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";
    fn node(req: &Self::Req) -> Option<&Node> {
        req.node.as_ref()
    }
    fn type_url(req: &Self::Req) -> &str {
        &req.type_url
    }
    fn on_request(
        &mut self,
        req: &Self::Req,
        snap: &ProxySnapshot,
    ) -> (RequestKind, Vec<Self::Resp>) {
        DeltaStream::on_request(self, req, snap)
    }
    fn on_snapshot(&mut self, snap: &ProxySnapshot) -> Vec<Self::Resp> {
        DeltaStream::on_snapshot(self, snap)
    }
    fn describe(resp: &Self::Resp) -> (&str, &str) {
        (&resp.type_url, &resp.system_version_info)
    }
}

/// One stream, either protocol: requests, snapshot and certificate changes
/// in; responses out, recorded in status before they are sent.
async fn drive<P: Protocol>(
    ctx: &XdsContext,
    proven: Option<Proven>,
    peer: String,
    inbound: Streaming<P::Req>,
    tx: &mpsc::Sender<Result<P::Resp, Status>>,
    mut proto: P,
) -> Result<(), Status> {
    let mut inbound = inbound.fuse();
    let Some(first) = first_request(&mut inbound).await? else {
        return Ok(());
    };
    let mut session = Session::open(ctx, proven, peer, P::node(&first), P::NAME)?;
    let mut pending = Some(first);
    loop {
        let wake = match pending.take() {
            Some(r) => Wake::Request(r),
            None => session.next(&mut inbound).await,
        };
        let responses = match wake {
            Wake::Closed => return Ok(()),
            Wake::Request(req) => {
                let (kind, resp) = proto.on_request(&req, &session.current);
                session.record_request(P::type_url(&req), &kind);
                resp
            }
            Wake::Changed => {
                session.rebuild();
                let responses = proto.on_snapshot(&session.current);
                let types: Vec<&str> = responses.iter().map(|r| P::describe(r).0).collect();
                session.observe_generation(&types);
                responses
            }
        };
        for resp in responses {
            let (type_url, version) = P::describe(&resp);
            session.record_push(type_url, version);
            if tx.send(Ok(resp)).await.is_err() {
                return Ok(());
            }
        }
        session.synced();
    }
}

/// The last few SDS versions sent on a stream and the certificate in each.
#[derive(Default)]
struct SentCerts(std::collections::VecDeque<(String, Arc<WorkloadCert>)>);

impl SentCerts {
    /// Envoy may ACK an older response after a newer one was sent; a few
    /// entries cover that.
    const KEEP: usize = 4;

    fn sent(&mut self, version: &str, cert: &Arc<WorkloadCert>) {
        if self.0.len() == Self::KEEP {
            self.0.pop_front();
        }
        self.0.push_back((version.to_string(), cert.clone()));
    }

    fn acked(&self, version: &str) -> Option<Arc<WorkloadCert>> {
        self.0
            .iter()
            .rev()
            .find(|(v, _)| v == version)
            .map(|(_, c)| c.clone())
    }
}

fn record_request(
    ctx: &XdsContext,
    stream: u64,
    pod: &ObjectKey,
    type_url: &str,
    kind: &RequestKind,
) {
    let short = type_url::short(type_url);
    match kind {
        RequestKind::Ack { version } => {
            ctx.metrics
                .acks
                .get_or_create(&TypeLabels { r#type: short })
                .inc();
            ctx.registry.update(stream, short, |t| {
                t.acked_version = Some(version.clone());
                t.acked_generation = t.sent_generation;
                t.acks += 1;
            });
        }
        RequestKind::Nack { version, message } => {
            ctx.metrics
                .nacks
                .get_or_create(&TypeLabels { r#type: short })
                .inc();
            tracing::warn!(pod = %pod, r#type = short, version, "Envoy rejected config: {message}");
            ctx.registry.update(stream, short, |t| {
                t.nacks += 1;
                t.last_nack = Some(NackStatus {
                    version: version.clone(),
                    message: message.clone(),
                    at: unix_now(),
                });
            });
        }
        RequestKind::Unknown => {
            tracing::debug!(pod = %pod, type_url, "request for a type Ward does not serve");
        }
        RequestKind::Initial | RequestKind::Stale => {}
    }
}

/// Bind helper so callers (and tests) can learn the chosen port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
