//! Per-proxy workload certificates and their rotation.
//!
//! The shape follows istio/ztunnel's `identity/manager.rs`: callers
//! subscribe and get a `watch::Receiver`; one task ([`CertManager::run`])
//! owns the rotation queue and is the only place certificates are renewed.
//! A proxy keeps its last good certificate until a new one is signed, so a
//! failing signer degrades into retries with backoff, never into an outage
//! before the certificate actually expires.
//!
//! Scheduling uses the tokio clock (so tests run with paused time); the
//! certificates themselves carry wall-clock times.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::CaError;
use super::authority::{Authority, CertInfo, IssuedCert, SecretPem};
use crate::model::{ObjectKey, SpiffeId};

/// Renewals taken off the queue and signed together, at most.
const ROTATION_BATCH: usize = 512;

/// Certificates a signing thread gets at least before another is used.
const MIN_PER_SIGNER: usize = 4;

/// What the manager needs from a CA. [`Authority`] implements it; tests
/// inject signers that fail on demand.
pub trait Signer: Send + Sync {
    fn issue_workload(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedCert, CaError>;
    /// Roots a peer certificate must chain to; shipped with each cert.
    fn trust_bundle_pem(&self) -> String;
}

impl Signer for Authority {
    fn issue_workload(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedCert, CaError> {
        Authority::issue_workload(self, id, ttl)
    }

    fn trust_bundle_pem(&self) -> String {
        Authority::trust_bundle_pem(self)
    }
}

/// When certificates are renewed.
#[derive(Clone, Debug, PartialEq)]
pub struct RotationConfig {
    /// Lifetime of a workload certificate.
    pub ttl: Duration,
    /// Fraction of the lifetime after which a certificate is renewed.
    pub rotate_at: f64,
    /// Random spread around `rotate_at`, as a fraction of the lifetime, so
    /// proxies started together do not all renew in the same instant.
    pub jitter: f64,
    /// First retry delay after a failed signing.
    pub retry_min: Duration,
    /// Cap of the exponential retry backoff.
    pub retry_max: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            ttl: Duration::from_secs(3600),
            rotate_at: 0.5,
            jitter: 0.05,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// A proxy's current certificate, as served over SDS.
#[derive(Clone, Debug)]
pub struct WorkloadCert {
    /// Leaf followed by the intermediates (the SDS `default` secret chain).
    pub cert_pem: String,
    /// The leaf's private key; redacted in `Debug`.
    pub key_pem: SecretPem,
    /// Roots the proxy validates peers against (the SDS `ROOTCA` secret),
    /// taken from the signer that issued this cert.
    pub trust_bundle_pem: String,
    /// The leaf, read back (serial, expiry) for status and metrics.
    pub info: CertInfo,
}

/// One proxy's certificate state, for the admin API.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CertStatus {
    /// The pod whose sidecar holds this certificate.
    pub proxy: ObjectKey,
    /// Identity in the certificate's URI SAN.
    pub spiffe_id: String,
    /// Serial (lowercase hex), to match against Envoy's `/certs`.
    pub serial: String,
    /// Start of validity (backdated for clock skew).
    pub not_before: SystemTime,
    /// Expiry: the number operators alert on.
    pub not_after: SystemTime,
    /// Which CA signed it (changes during a root rotation).
    pub issuer: String,
    /// Successful renewals since the first issue.
    pub rotations: u64,
    /// Streams currently holding this certificate; 0 = kept for reuse only.
    pub subscribers: usize,
    /// Error of the last failed renewal, cleared by a success.
    pub last_error: Option<String>,
    /// Failed renewals since the last success.
    pub consecutive_failures: u32,
    /// When the next renewal (or retry) is due; `None` when not rotated.
    pub next_rotation: Option<SystemTime>,
}

/// Handle to the certificate manager; cheap to clone.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RotationConfig,
    /// Swapped by root rotation; read (cloned) for every signing.
    signer: RwLock<Arc<dyn Signer>>,
    /// Per-proxy state. A std mutex: never held across `.await` or signing.
    entries: Mutex<HashMap<ObjectKey, Entry>>,
    /// Subscribers tell the run task about new deadlines through this.
    queue_tx: mpsc::UnboundedSender<Scheduled>,
    /// Taken by the single run task.
    queue_rx: Mutex<Option<mpsc::UnboundedReceiver<Scheduled>>>,
    /// Certificates signed (metrics).
    issued: AtomicU64,
    /// Failed signings (metrics).
    failures: AtomicU64,
    /// Directory where issued certificates (and keys, 0600) are kept so a
    /// restarted Ward reuses them instead of re-issuing for every proxy.
    store: Mutex<Option<PathBuf>>,
    /// The store's writer thread. Writes are durable (two fsyncs each), so
    /// they happen off the signing and serving path, in order, the newest
    /// certificate of a proxy winning over older ones still queued.
    store_tx: Mutex<Option<std::sync::mpsc::Sender<StoreMsg>>>,
    /// Certificates reused from `store` (status: no needless re-issue).
    reused: AtomicU64,
}

struct Entry {
    /// Identity the certificate was issued for; a different identity on
    /// subscribe forces a new certificate.
    id: SpiffeId,
    /// Publishes new certificates to every stream of this proxy.
    tx: watch::Sender<Arc<WorkloadCert>>,
    /// Streams holding this certificate; rotation stops at zero.
    subscribers: usize,
    /// Successful renewals (status).
    rotations: u64,
    /// Last renewal error, cleared by a success (status).
    last_error: Option<String>,
    /// Failed renewals since the last success (status).
    consecutive_failures: u32,
    /// Current retry delay; `None` while renewals succeed.
    backoff: Option<Duration>,
    /// When the current certificate is due for renewal (tokio clock).
    renew_at: Instant,
    /// When the current certificate expires (tokio clock).
    expires_at: Instant,
    /// The one queue item for this entry that is live; any other item
    /// popped for it is stale and ignored (lazy deletion).
    next_attempt: Instant,
    /// The live item only checks for expiry (nobody subscribed).
    purge_pending: bool,
}

/// An item of the rotation queue.
struct Scheduled {
    /// When the run task should look at the proxy.
    at: Instant,
    /// Whose certificate is due.
    proxy: ObjectKey,
}

impl CertManager {
    pub fn new(authority: Arc<Authority>, cfg: RotationConfig) -> CertManager {
        CertManager::with_signer(authority, cfg)
    }

    /// Like [`CertManager::new`] with any [`Signer`] (tests inject failures).
    pub fn with_signer(signer: Arc<dyn Signer>, cfg: RotationConfig) -> CertManager {
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        CertManager {
            inner: Arc::new(Inner {
                cfg,
                signer: RwLock::new(signer),
                entries: Mutex::new(HashMap::new()),
                queue_tx,
                queue_rx: Mutex::new(Some(queue_rx)),
                issued: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                store: Mutex::new(None),
                store_tx: Mutex::new(None),
                reused: AtomicU64::new(0),
            }),
        }
    }

    /// Keep issued certificates in `dir` (created 0700, files 0600) and
    /// reuse them on the next start while they are still fresh.
    pub fn persist_to(&self, dir: PathBuf) -> Result<(), CaError> {
        super::store::create_private_dir(&dir)?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("ward-cert-store".into())
            .spawn(move || store_writer(rx))
            .map_err(|e| CaError::io(&dir, "start the certificate store writer for", e))?;
        if let Ok(mut s) = self.inner.store.lock() {
            *s = Some(dir);
        }
        // Replacing a sender ends the previous writer once it has drained.
        if let Ok(mut t) = self.inner.store_tx.lock() {
            *t = Some(tx);
        }
        Ok(())
    }

    /// Wait (at most `timeout`) until every certificate handed to the store
    /// so far is on disk. Called at shutdown, so a restart finds them.
    pub fn flush_store(&self, timeout: Duration) {
        let Some(tx) = self.inner.store_tx.lock().ok().and_then(|t| t.clone()) else {
            return;
        };
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        if tx.send(StoreMsg::Flush(done_tx)).is_ok() && done_rx.recv_timeout(timeout).is_err() {
            tracing::warn!("certificate store writes did not finish within {timeout:?}");
        }
    }

    /// Drop certificates kept only for reconnects (no subscriber): after a
    /// root rotation they chain to a root that is leaving the bundle.
    pub fn forget_released(&self) {
        self.entries().retain(|_, e| e.subscribers > 0);
    }

    /// The trust bundle (PEM) certificates are issued with now.
    pub fn trust_bundle_pem(&self) -> String {
        self.signer().trust_bundle_pem()
    }

    /// Certificates reused from the store instead of being re-issued.
    pub fn reused_total(&self) -> u64 {
        self.inner.reused.load(Ordering::Relaxed)
    }

    fn store_path(&self, proxy: &ObjectKey) -> Option<PathBuf> {
        let dir = self.inner.store.lock().ok()?.clone()?;
        Some(dir.join(format!("{}.{}.pem", proxy.namespace, proxy.name)))
    }

    /// Queue `cert` for the store (see `store_tx`).
    fn persist(&self, proxy: &ObjectKey, cert: &WorkloadCert) {
        let Some(path) = self.store_path(proxy) else {
            return;
        };
        let body = SecretPem::new(format!("{}{}", cert.cert_pem, cert.key_pem.expose()));
        let sent = self.inner.store_tx.lock().ok().and_then(|t| {
            t.as_ref()
                .map(|tx| tx.send(StoreMsg::Write(path, body)).is_ok())
        });
        if sent != Some(true) {
            tracing::warn!(%proxy, "cannot persist workload certificate: the store writer has stopped");
        }
    }

    /// A stored certificate for `id` that is still before its rotation
    /// point and chains to the current signer's trust bundle.
    fn load_persisted(&self, proxy: &ObjectKey, id: &SpiffeId) -> Option<WorkloadCert> {
        let path = self.store_path(proxy)?;
        let text = std::fs::read_to_string(&path).ok()?;
        let key_start = text.find("-----BEGIN PRIVATE KEY-----")?;
        let (cert_pem, key_pem) = text.split_at(key_start);
        let ders = super::pem_to_der_certs(cert_pem).ok()?;
        let info = super::cert_info(ders.first()?).ok()?;
        let bundle = self.signer().trust_bundle_pem();
        let remaining = info.not_after.duration_since(SystemTime::now()).ok()?;
        let cfg = &self.inner.cfg;
        let fresh = remaining.as_secs_f64() > cfg.ttl.as_secs_f64() * (1.0 - cfg.rotate_at);
        if info.uri_sans != [id.uri()] || !fresh || !super::chains_to(cert_pem, &bundle) {
            return None;
        }
        self.inner.reused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%proxy, serial = %info.serial, "reusing the stored workload certificate");
        Some(WorkloadCert {
            cert_pem: cert_pem.to_string(),
            key_pem: SecretPem::new(key_pem.to_string()),
            trust_bundle_pem: bundle,
            info,
        })
    }

    pub fn config(&self) -> &RotationConfig {
        &self.inner.cfg
    }

    /// Swap the signer (root rotation). Certificates issued from now on
    /// come from it and carry its trust bundle.
    pub fn set_authority(&self, authority: Arc<Authority>) {
        self.set_signer(authority);
    }

    pub fn set_signer(&self, signer: Arc<dyn Signer>) {
        let mut guard = match self.inner.signer.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = signer;
    }

    fn signer(&self) -> Arc<dyn Signer> {
        match self.inner.signer.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<ObjectKey, Entry>> {
        // A panic elsewhere must not take certificate serving down with it;
        // the map is consistent after every individual update.
        match self.inner.entries.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Subscribe a proxy to its certificate. Returns at once with a valid
    /// certificate: the current one if it is still fresh and for the same
    /// identity, otherwise a newly signed one. Each call must be paired with
    /// one [`CertManager::release`].
    pub fn subscribe(
        &self,
        proxy: &ObjectKey,
        id: &SpiffeId,
    ) -> Result<watch::Receiver<Arc<WorkloadCert>>, CaError> {
        if let Some(rx) = self.attach_fresh(proxy, id) {
            return Ok(rx);
        }
        // Sign without holding the lock: many streams subscribe at once.
        let known = self.entries().contains_key(proxy);
        let (signed, from_store) = match (!known).then(|| self.load_persisted(proxy, id)).flatten()
        {
            Some(cert) => (Ok(cert), true),
            None => (self.sign(id), false),
        };
        let mut entries = self.entries();
        let now = Instant::now();
        match signed {
            Ok(cert) => {
                let rx = match entries.get_mut(proxy) {
                    // Another subscriber raced us and installed a fresh one.
                    Some(e) if e.id == *id && now < e.renew_at => {
                        e.subscribers += 1;
                        self.resume(proxy, e, now);
                        e.tx.subscribe()
                    }
                    Some(e) => {
                        e.id = id.clone();
                        e.subscribers += 1;
                        if !from_store {
                            self.persist(proxy, &cert);
                        }
                        self.install(proxy, e, cert, now);
                        e.tx.subscribe()
                    }
                    None => {
                        if !from_store {
                            self.persist(proxy, &cert);
                        }
                        let (tx, rx) = watch::channel(Arc::new(cert));
                        let mut e = Entry {
                            id: id.clone(),
                            tx,
                            subscribers: 1,
                            rotations: 0,
                            last_error: None,
                            consecutive_failures: 0,
                            backoff: None,
                            renew_at: now,
                            expires_at: now,
                            next_attempt: now,
                            purge_pending: false,
                        };
                        self.set_deadlines(proxy, &mut e, now);
                        entries.insert(proxy.clone(), e);
                        rx
                    }
                };
                Ok(rx)
            }
            Err(err) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%proxy, spiffe_id = %id, error = %err, "cannot sign workload certificate");
                // A stale but unexpired certificate beats no certificate.
                match entries.get_mut(proxy) {
                    Some(e) if e.id == *id && now < e.expires_at => {
                        e.subscribers += 1;
                        e.last_error = Some(err.to_string());
                        self.resume(proxy, e, now);
                        Ok(e.tx.subscribe())
                    }
                    _ => Err(err),
                }
            }
        }
    }

    /// Attach to an existing certificate that is for `id` and not yet due
    /// for renewal.
    fn attach_fresh(
        &self,
        proxy: &ObjectKey,
        id: &SpiffeId,
    ) -> Option<watch::Receiver<Arc<WorkloadCert>>> {
        let mut entries = self.entries();
        let now = Instant::now();
        let e = entries.get_mut(proxy)?;
        if e.id != *id || now >= e.renew_at {
            return None;
        }
        e.subscribers += 1;
        self.resume(proxy, e, now);
        Some(e.tx.subscribe())
    }

    /// Drop one subscription. The last one stops rotation; the certificate
    /// is kept until it expires so a reconnect can reuse it.
    pub fn release(&self, proxy: &ObjectKey) {
        let mut entries = self.entries();
        if let Some(e) = entries.get_mut(proxy) {
            e.subscribers = e.subscribers.saturating_sub(1);
        }
        // The run task notices `subscribers == 0` when the pending item pops
        // and turns it into an expiry check.
    }

    /// The current certificate of a proxy, if any.
    pub fn current(&self, proxy: &ObjectKey) -> Option<Arc<WorkloadCert>> {
        self.entries().get(proxy).map(|e| e.tx.borrow().clone())
    }

    /// Renew every subscribed proxy's certificate now (after a root
    /// change, or on an operator's `POST /certs/rotate`). Returns how many
    /// renewals were scheduled.
    pub fn rotate_all_now(&self) -> usize {
        let mut entries = self.entries();
        let now = Instant::now();
        let mut scheduled = 0;
        for (proxy, e) in entries.iter_mut() {
            if e.subscribers > 0 {
                self.schedule(proxy, e, now, false);
                scheduled += 1;
            }
        }
        scheduled
    }

    /// Certificates signed so far (first issues and renewals).
    pub fn issued_total(&self) -> u64 {
        self.inner.issued.load(Ordering::Relaxed)
    }

    /// Failed signings so far.
    pub fn failures_total(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Earliest expiry among certificates in use (subscribed proxies only;
    /// certificates kept for reuse are not served to anyone).
    pub fn nearest_expiry(&self) -> Option<SystemTime> {
        self.entries()
            .values()
            .filter(|e| e.subscribers > 0)
            .map(|e| e.tx.borrow().info.not_after)
            .min()
    }

    /// Every proxy's certificate state, sorted by proxy.
    pub fn status(&self) -> Vec<CertStatus> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut out: Vec<CertStatus> = self
            .entries()
            .iter()
            .map(|(proxy, e)| {
                let cert = e.tx.borrow().clone();
                CertStatus {
                    proxy: proxy.clone(),
                    spiffe_id: e.id.uri(),
                    serial: cert.info.serial.clone(),
                    not_before: cert.info.not_before,
                    not_after: cert.info.not_after,
                    issuer: cert.info.issuer.clone(),
                    rotations: e.rotations,
                    subscribers: e.subscribers,
                    last_error: e.last_error.clone(),
                    consecutive_failures: e.consecutive_failures,
                    next_rotation: (e.subscribers > 0 && !e.purge_pending)
                        .then(|| wall + e.next_attempt.saturating_duration_since(now)),
                }
            })
            .collect();
        out.sort_by(|a, b| a.proxy.cmp(&b.proxy));
        out
    }

    /// The rotation task. Only one runs per manager; it stops on `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let taken = match self.inner.queue_rx.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        let Some(mut rx) = taken else {
            tracing::error!("CertManager::run called twice; the second call does nothing");
            return;
        };
        // (due time, insertion order) -> proxy. The order keeps equal times distinct.
        let mut queue: BTreeMap<(Instant, u64), ObjectKey> = BTreeMap::new();
        let mut seq = 0u64;
        loop {
            let next_due = queue.first_key_value().map(|((at, _), _)| *at);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                item = rx.recv() => match item {
                    Some(s) => {
                        seq += 1;
                        queue.insert((s.at, seq), s.proxy);
                    }
                    // Inner holds a sender, so this cannot happen while `self` lives.
                    None => break,
                },
                _ = sleep_until_opt(next_due) => {
                    let now = Instant::now();
                    // Take what is due in batches: each batch is signed on
                    // every core at once, then published, so a full rotation
                    // of thousands of proxies streams out batch by batch
                    // instead of waiting for the last signature.
                    loop {
                        let mut due = Vec::new();
                        while due.len() < ROTATION_BATCH {
                            let Some(entry) = queue.first_entry() else {
                                break;
                            };
                            if entry.key().0 > now {
                                break;
                            }
                            let ((at, _), proxy) = entry.remove_entry();
                            due.push((proxy, at));
                        }
                        if due.is_empty() {
                            break;
                        }
                        self.attempt_batch(due).await;
                        // Thousands of renewals at once must not starve other tasks.
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
        // A restart reuses what is on disk: let queued writes land first.
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.flush_store(Duration::from_secs(10))).await;
        tracing::debug!("certificate rotation stopped");
    }

    /// Handle due queue items: decide which need a new certificate, sign
    /// those in parallel, then publish each result (or schedule its retry).
    async fn attempt_batch(&self, due: Vec<(ObjectKey, Instant)>) {
        let jobs: Vec<(ObjectKey, Instant, SpiffeId)> = due
            .into_iter()
            .filter_map(|(proxy, at)| self.due_identity(&proxy, at).map(|id| (proxy, at, id)))
            .collect();
        if jobs.is_empty() {
            return;
        }
        let ids: Vec<(ObjectKey, SpiffeId)> = jobs
            .iter()
            .map(|(proxy, _, id)| (proxy.clone(), id.clone()))
            .collect();
        let results = self.sign_parallel(ids).await;
        for ((proxy, at, id), signed) in jobs.into_iter().zip(results) {
            self.finish_attempt(&proxy, at, &id, signed);
        }
    }

    /// Sign one certificate per `(proxy, identity)`, spread
    /// over the cores: signing is CPU-bound and a full rotation of 10,000
    /// proxies would otherwise take one core for about a second. Results
    /// come back in input order.
    async fn sign_parallel(
        &self,
        ids: Vec<(ObjectKey, SpiffeId)>,
    ) -> Vec<Result<WorkloadCert, CaError>> {
        let sign_one = |me: &CertManager, (_, id): &(ObjectKey, SpiffeId)| me.sign(id);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Below a few certificates a thread hop costs more than it saves.
        let workers = cores.min(ids.len() / MIN_PER_SIGNER).max(1);
        if workers == 1 {
            return ids.iter().map(|job| sign_one(self, job)).collect();
        }
        let per_worker = ids.len().div_ceil(workers);
        let mut parts = Vec::with_capacity(workers);
        let mut rest = ids;
        while !rest.is_empty() {
            let tail = rest.split_off(per_worker.min(rest.len()));
            parts.push(std::mem::replace(&mut rest, tail));
        }
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                let me = self.clone();
                let len = part.len();
                let task = tokio::task::spawn_blocking(move || {
                    part.iter()
                        .map(|job| sign_one(&me, job))
                        .collect::<Vec<_>>()
                });
                (task, len)
            })
            .collect();
        let mut out = Vec::new();
        for (task, len) in handles {
            match task.await {
                Ok(results) => out.extend(results),
                // A panicking signer must not take rotation down: the
                // affected proxies are retried with backoff like any failure.
                Err(e) => out.extend((0..len).map(|_| {
                    Err(CaError::sign(
                        "workload certificate",
                        format!("the signing task failed: {e}"),
                    ))
                })),
            }
        }
        out
    }

    /// For a due queue item: the identity to sign for, or `None` when the
    /// item is stale or the entry only needed an expiry check.
    fn due_identity(&self, proxy: &ObjectKey, at: Instant) -> Option<SpiffeId> {
        let now = Instant::now();
        let mut entries = self.entries();
        let e = entries.get_mut(proxy)?;
        if e.next_attempt != at {
            return None; // superseded by a newer schedule
        }
        if e.subscribers == 0 {
            if now >= e.expires_at {
                entries.remove(proxy);
                tracing::debug!(%proxy, "purged expired certificate");
            } else if !e.purge_pending {
                let expires_at = e.expires_at;
                self.schedule(proxy, e, expires_at, true);
            }
            return None;
        }
        Some(e.id.clone())
    }

    /// Publish a renewal's result, or schedule its retry.
    fn finish_attempt(
        &self,
        proxy: &ObjectKey,
        at: Instant,
        id: &SpiffeId,
        signed: Result<WorkloadCert, CaError>,
    ) {
        let mut entries = self.entries();
        let Some(e) = entries.get_mut(proxy) else {
            return;
        };
        if e.next_attempt != at || e.id != *id {
            return; // a subscribe replaced the certificate meanwhile
        }
        let now = Instant::now();
        match signed {
            Ok(cert) => {
                e.rotations += 1;
                tracing::debug!(%proxy, serial = %cert.info.serial, "rotated workload certificate");
                self.persist(proxy, &cert);
                self.install(proxy, e, cert, now);
            }
            Err(err) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                let cfg = &self.inner.cfg;
                let backoff = match e.backoff {
                    None => cfg.retry_min,
                    Some(b) => (b * 2).min(cfg.retry_max),
                };
                e.backoff = Some(backoff);
                e.consecutive_failures += 1;
                e.last_error = Some(err.to_string());
                tracing::warn!(
                    %proxy, spiffe_id = %id, error = %err, retry_in = ?backoff,
                    "cannot renew workload certificate; keeping the current one"
                );
                self.schedule(proxy, e, now + backoff, false);
            }
        }
    }

    fn sign(&self, id: &SpiffeId) -> Result<WorkloadCert, CaError> {
        let signer = self.signer();
        let issued = signer.issue_workload(id, self.inner.cfg.ttl)?;
        // A signer close to its own expiry caps leaves to almost nothing;
        // publishing them would turn rotation into a busy loop.
        let lifetime = issued
            .info
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if lifetime < self.min_lifetime() {
            return Err(CaError::sign(
                format!("workload certificate for {id}"),
                format!(
                    "it would be valid for only {}s: the signing certificate expires too soon",
                    lifetime.as_secs()
                ),
            ));
        }
        self.inner.issued.fetch_add(1, Ordering::Relaxed);
        Ok(WorkloadCert {
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            trust_bundle_pem: signer.trust_bundle_pem(),
            info: issued.info,
        })
    }

    /// Publish a new certificate for an existing entry and schedule its
    /// renewal. The caller queues it for the store (under the same lock, so
    /// the store sees certificates in the order they were installed).
    fn install(&self, proxy: &ObjectKey, e: &mut Entry, cert: WorkloadCert, now: Instant) {
        e.tx.send_replace(Arc::new(cert));
        e.last_error = None;
        e.consecutive_failures = 0;
        e.backoff = None;
        self.set_deadlines(proxy, e, now);
    }

    /// Derive renewal and expiry deadlines from the entry's current certificate.
    fn set_deadlines(&self, proxy: &ObjectKey, e: &mut Entry, now: Instant) {
        let not_after = e.tx.borrow().info.not_after;
        let lifetime = not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let cfg = &self.inner.cfg;
        let jitter = cfg.jitter.abs();
        let lo = cfg.rotate_at - jitter;
        let hi = cfg.rotate_at + jitter;
        let frac = if hi > lo {
            rand::rng().random_range(lo..=hi)
        } else {
            cfg.rotate_at
        };
        let frac = if frac.is_finite() {
            frac.clamp(0.0, 1.0)
        } else {
            0.5
        };
        // Never renew sooner than `retry_min` after an issue (rotate_at = 0
        // would otherwise spin).
        e.renew_at = now + lifetime.mul_f64(frac).max(cfg.retry_min).min(lifetime);
        e.expires_at = now + lifetime;
        let renew_at = e.renew_at;
        self.schedule(proxy, e, renew_at, false);
    }

    /// Shortest certificate lifetime worth publishing.
    fn min_lifetime(&self) -> Duration {
        (self.inner.cfg.retry_min * 2).max(Duration::from_secs(2))
    }

    /// After a new subscription: make sure a subscribed entry is rotated.
    fn resume(&self, proxy: &ObjectKey, e: &mut Entry, now: Instant) {
        if e.purge_pending {
            let at = if e.backoff.is_some() {
                now
            } else {
                e.renew_at.max(now)
            };
            self.schedule(proxy, e, at, false);
        }
    }

    fn schedule(&self, proxy: &ObjectKey, e: &mut Entry, at: Instant, purge: bool) {
        e.next_attempt = at;
        e.purge_pending = purge;
        // Fails only when the receiver is gone, i.e. the run task has
        // stopped at shutdown: nothing is rotated any more anyway.
        let _ = self.inner.queue_tx.send(Scheduled {
            at,
            proxy: proxy.clone(),
        });
    }
}

/// Work for the store writer thread.
enum StoreMsg {
    /// Write this certificate and key (PEM) to this file.
    Write(PathBuf, SecretPem),
    /// Answer once everything sent before is written.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// The store writer: takes whatever is queued, keeps the newest body per
/// file, writes them (atomically and durably), answers flushes, repeats.
/// Ends when every sender is gone.
fn store_writer(rx: std::sync::mpsc::Receiver<StoreMsg>) {
    while let Ok(first) = rx.recv() {
        let mut writes: BTreeMap<PathBuf, SecretPem> = BTreeMap::new();
        let mut flushes = Vec::new();
        for msg in std::iter::once(first).chain(rx.try_iter()) {
            match msg {
                StoreMsg::Write(path, body) => {
                    writes.insert(path, body);
                }
                StoreMsg::Flush(done) => flushes.push(done),
            }
        }
        for (path, body) in writes {
            if let Err(e) = super::store::write_private_file(&path, body.expose().as_bytes()) {
                tracing::warn!("cannot persist workload certificate: {e}");
            }
        }
        for done in flushes {
            let _ = done.try_send(());
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    const TD: &str = "cluster.local";

    /// Wraps an Authority; can be told to fail, and records when it was asked.
    struct FlakySigner {
        inner: RwLock<Arc<Authority>>,
        fail: AtomicBool,
        calls: Mutex<Vec<Instant>>,
    }

    impl FlakySigner {
        fn new() -> Arc<Self> {
            Arc::new(FlakySigner {
                inner: RwLock::new(Arc::new(Authority::generate_in_memory(TD).unwrap())),
                fail: AtomicBool::new(false),
                calls: Mutex::new(Vec::new()),
            })
        }
        fn set_fail(&self, fail: bool) {
            self.fail.store(fail, Ordering::SeqCst);
        }
        fn calls(&self) -> Vec<Instant> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Signer for FlakySigner {
        fn issue_workload(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedCert, CaError> {
            self.calls.lock().unwrap().push(Instant::now());
            if self.fail.load(Ordering::SeqCst) {
                return Err(CaError::sign("test", "injected failure"));
            }
            self.inner.read().unwrap().issue_workload(id, ttl)
        }
        fn trust_bundle_pem(&self) -> String {
            self.inner.read().unwrap().trust_bundle_pem()
        }
    }

    fn start(signer: Arc<dyn Signer>, cfg: RotationConfig) -> (CertManager, CancellationToken) {
        let m = CertManager::with_signer(signer, cfg);
        let shutdown = CancellationToken::new();
        tokio::spawn(m.clone().run(shutdown.clone()));
        (m, shutdown)
    }

    fn pod() -> ObjectKey {
        ObjectKey::new("demo", "web-0")
    }

    fn id() -> SpiffeId {
        SpiffeId::new(TD, "demo", "web")
    }

    fn serial(rx: &watch::Receiver<Arc<WorkloadCert>>) -> String {
        rx.borrow().info.serial.clone()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn rotates_at_half_life_within_jitter_and_keeps_rotating() {
        let signer = FlakySigner::new();
        let (m, shutdown) = start(signer.clone(), RotationConfig::default());
        let t0 = Instant::now();
        let mut rx = m.subscribe(&pod(), &id()).unwrap();
        let first = rx.borrow_and_update().clone();
        assert_eq!(first.info.uri_sans, vec![id().uri()]);
        assert_eq!(first.trust_bundle_pem, signer.trust_bundle_pem());
        assert_eq!(m.issued_total(), 1);
        let next = m.status()[0].next_rotation.unwrap();
        let ahead = next.duration_since(SystemTime::now()).unwrap();
        assert!(
            ahead >= HOUR.mul_f64(0.44) && ahead <= HOUR.mul_f64(0.55),
            "{ahead:?}"
        );

        // Nothing before rotate_at - jitter (0.45 of the lifetime; the
        // lifetime is a little under the TTL because of second precision).
        tokio::time::sleep(HOUR.mul_f64(0.449)).await;
        assert!(!rx.has_changed().unwrap());

        rx.changed().await.unwrap();
        let elapsed = t0.elapsed();
        assert!(elapsed <= HOUR.mul_f64(0.55), "rotated after {elapsed:?}");
        let second = rx.borrow_and_update().clone();
        assert_ne!(second.info.serial, first.info.serial);
        assert_ne!(second.key_pem, first.key_pem);
        assert_eq!(m.issued_total(), 2);
        assert_eq!(m.status()[0].rotations, 1);

        // And again, about half a lifetime after the previous rotation.
        let t1 = Instant::now();
        rx.changed().await.unwrap();
        let gap = t1.elapsed();
        assert!(
            gap >= HOUR.mul_f64(0.449) && gap <= HOUR.mul_f64(0.55),
            "{gap:?}"
        );
        let third = rx.borrow_and_update().clone();
        assert_ne!(third.info.serial, second.info.serial);
        rx.changed().await.unwrap();
        assert_eq!(m.status()[0].rotations, 3);
        assert_eq!(m.failures_total(), 0);
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_rotations() {
        let signer = FlakySigner::new();
        let (m, shutdown) = start(signer, RotationConfig::default());
        for i in 0..50 {
            m.subscribe(&ObjectKey::new("demo", format!("p-{i}")), &id())
                .unwrap();
        }
        let now = SystemTime::now();
        let aheads: Vec<Duration> = m
            .status()
            .iter()
            .map(|s| s.next_rotation.unwrap().duration_since(now).unwrap())
            .collect();
        let min = aheads.iter().min().unwrap();
        let max = aheads.iter().max().unwrap();
        assert!(
            *min >= HOUR.mul_f64(0.44) && *max <= HOUR.mul_f64(0.551),
            "{min:?}..{max:?}"
        );
        // 50 uniform draws over a 6-minute window are not all within a minute.
        assert!(*max - *min > Duration::from_secs(60), "{min:?}..{max:?}");
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn failed_signing_keeps_the_old_cert_and_retries_with_backoff() {
        let signer = FlakySigner::new();
        let cfg = RotationConfig {
            jitter: 0.0,
            ..RotationConfig::default()
        };
        let (m, shutdown) = start(signer.clone(), cfg);
        let mut rx = m.subscribe(&pod(), &id()).unwrap();
        let original = serial(&rx);
        signer.set_fail(true);

        // Past the rotation point and a few minutes of retries.
        tokio::time::sleep(HOUR / 2 + Duration::from_secs(300)).await;
        assert!(
            !rx.has_changed().unwrap(),
            "a failed rotation must not publish"
        );
        assert_eq!(serial(&rx), original);
        let st = &m.status()[0];
        assert!(
            st.last_error
                .as_deref()
                .unwrap()
                .contains("injected failure"),
            "{st:?}"
        );
        assert!(st.consecutive_failures >= 5);
        assert_eq!(m.failures_total(), u64::from(st.consecutive_failures));

        // Attempts after the first failure: 1, 2, 4, 8, 16 s, then capped at 30 s.
        let calls = signer.calls();
        let gaps: Vec<u64> = calls[1..]
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs())
            .collect();
        assert_eq!(&gaps[..7], &[1, 2, 4, 8, 16, 30, 30], "{gaps:?}");
        assert!(gaps.iter().all(|g| *g <= 30));

        // The signer recovers: the next retry publishes a new cert.
        signer.set_fail(false);
        let t = Instant::now();
        rx.changed().await.unwrap();
        assert!(t.elapsed() <= Duration::from_secs(30));
        assert_ne!(serial(&rx), original);
        let st = &m.status()[0];
        assert_eq!(st.last_error, None);
        assert_eq!(st.consecutive_failures, 0);
        assert_eq!(st.rotations, 1);
        // Back on the normal schedule: next rotation about half a lifetime away.
        let ahead = st
            .next_rotation
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(ahead >= HOUR.mul_f64(0.49), "{ahead:?}");
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn release_stops_rotation_and_expired_certs_are_purged() {
        let signer = FlakySigner::new();
        let (m, shutdown) = start(signer, RotationConfig::default());
        let rx = m.subscribe(&pod(), &id()).unwrap();
        m.release(&pod());
        assert_eq!(m.status()[0].subscribers, 0);
        assert_eq!(m.status()[0].next_rotation, None);
        assert_eq!(m.nearest_expiry(), None);

        tokio::time::sleep(HOUR * 3 / 4).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(m.issued_total(), 1);
        assert_eq!(m.status().len(), 1, "kept until it expires");

        tokio::time::sleep(HOUR / 2).await;
        assert!(m.status().is_empty(), "purged after expiry");
        assert!(m.current(&pod()).is_none());
        assert_eq!(m.issued_total(), 1);
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn resubscribe_reuses_a_fresh_cert_and_resumes_rotation() {
        let signer = FlakySigner::new();
        let (m, shutdown) = start(signer, RotationConfig::default());
        let rx = m.subscribe(&pod(), &id()).unwrap();
        let first = serial(&rx);
        m.release(&pod());
        tokio::time::sleep(Duration::from_secs(600)).await;

        let mut rx2 = m.subscribe(&pod(), &id()).unwrap();
        assert_eq!(serial(&rx2), first, "reconnect reuses the cert");
        assert_eq!(m.issued_total(), 1);
        assert_eq!(m.status()[0].subscribers, 1);
        assert!(m.status()[0].next_rotation.is_some());

        // Two streams for one proxy share the cert; one leaving keeps rotation.
        let mut rx3 = m.subscribe(&pod(), &id()).unwrap();
        assert_eq!(serial(&rx3), first);
        m.release(&pod());
        rx2.changed().await.unwrap();
        assert_ne!(serial(&rx2), first);
        assert!(rx3.has_changed().unwrap());
        rx3.borrow_and_update();
        assert_eq!(m.issued_total(), 2);
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn resubscribe_after_half_life_or_with_new_identity_reissues() {
        let signer = FlakySigner::new();
        let (m, shutdown) = start(signer, RotationConfig::default());
        let rx = m.subscribe(&pod(), &id()).unwrap();
        let first = serial(&rx);
        m.release(&pod());
        tokio::time::sleep(HOUR * 2 / 3).await;
        let rx = m.subscribe(&pod(), &id()).unwrap();
        let second = serial(&rx);
        assert_ne!(
            second, first,
            "a cert past its rotation point is not handed out again"
        );

        let other = SpiffeId::new(TD, "demo", "other");
        let rx = m.subscribe(&pod(), &other).unwrap();
        assert_eq!(rx.borrow().info.uri_sans, vec![other.uri()]);
        assert_eq!(m.status()[0].spiffe_id, other.uri());
        assert_eq!(m.issued_total(), 3);
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn subscribe_without_any_cert_fails_when_signing_fails() {
        let signer = FlakySigner::new();
        signer.set_fail(true);
        let (m, shutdown) = start(signer.clone(), RotationConfig::default());
        let err = m.subscribe(&pod(), &id()).unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(m.failures_total(), 1);
        assert!(m.status().is_empty());

        // With a valid (if due) cert in hand, a failed re-issue still serves it.
        signer.set_fail(false);
        let rx = m.subscribe(&pod(), &id()).unwrap();
        let first = serial(&rx);
        signer.set_fail(true);
        tokio::time::sleep(HOUR * 2 / 3).await;
        let rx2 = m.subscribe(&pod(), &id()).unwrap();
        assert_eq!(serial(&rx2), first);
        assert!(m.status()[0].last_error.is_some());
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn new_authority_applies_to_subsequent_certs() {
        let a1 = Arc::new(Authority::generate_in_memory(TD).unwrap());
        let a2 = Arc::new(Authority::generate_in_memory(TD).unwrap());
        let m = CertManager::new(a1.clone(), RotationConfig::default());
        let shutdown = CancellationToken::new();
        tokio::spawn(m.clone().run(shutdown.clone()));
        let mut rx = m.subscribe(&pod(), &id()).unwrap();
        assert_eq!(
            rx.borrow_and_update().trust_bundle_pem,
            a1.trust_bundle_pem()
        );

        m.set_authority(a2.clone());
        assert_eq!(
            rx.borrow().trust_bundle_pem,
            a1.trust_bundle_pem(),
            "no change before rotation"
        );
        m.rotate_all_now();
        rx.changed().await.unwrap();
        let cert = rx.borrow_and_update().clone();
        assert_eq!(cert.trust_bundle_pem, a2.trust_bundle_pem());
        assert_eq!(cert.info.issuer, a2.signing_cert().subject);
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotate_all_now_renews_every_proxy_in_parallel_batches_and_persists() {
        // More proxies than one batch, so the queue is drained batch by batch.
        let n = ROTATION_BATCH + 40;
        let store = tempfile::tempdir().unwrap();
        let signer = FlakySigner::new();
        let (m, shutdown) = start(signer.clone(), RotationConfig::default());
        m.persist_to(store.path().join("certs")).unwrap();
        let pods: Vec<ObjectKey> = (0..n)
            .map(|i| ObjectKey::new("demo", format!("web-{i}")))
            .collect();
        let mut rxs: Vec<_> = pods
            .iter()
            .map(|p| m.subscribe(p, &id()).unwrap())
            .collect();
        let first: Vec<String> = rxs
            .iter_mut()
            .map(|rx| rx.borrow_and_update().info.serial.clone())
            .collect();

        assert_eq!(m.rotate_all_now(), n);
        for (rx, old) in rxs.iter_mut().zip(&first) {
            tokio::time::timeout(Duration::from_secs(60), rx.changed())
                .await
                .expect("every proxy gets a new certificate")
                .unwrap();
            assert_ne!(&rx.borrow_and_update().info.serial, old);
        }
        assert_eq!(m.issued_total(), 2 * n as u64);
        assert!(
            m.status()
                .iter()
                .all(|s| s.rotations == 1 && s.last_error.is_none())
        );
        // The renewed certificate is what a restart would reuse.
        m.flush_store(Duration::from_secs(30));
        let stored =
            std::fs::read_to_string(store.path().join("certs").join("demo.web-7.pem")).unwrap();
        let current = m.current(&pods[7]).unwrap();
        assert!(
            stored.starts_with(&current.cert_pem),
            "the store holds the renewed certificate"
        );
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_batch_keeps_every_certificate_and_schedules_retries() {
        let signer = FlakySigner::new();
        let (m, shutdown) = start(signer.clone(), RotationConfig::default());
        let pods: Vec<ObjectKey> = (0..20)
            .map(|i| ObjectKey::new("demo", format!("web-{i}")))
            .collect();
        let rxs: Vec<_> = pods
            .iter()
            .map(|p| m.subscribe(p, &id()).unwrap())
            .collect();
        signer.set_fail(true);
        assert_eq!(m.rotate_all_now(), 20);
        crate::local::eventually(Duration::from_secs(30), || async {
            (m.failures_total() >= 20).then_some(())
        })
        .await
        .expect("every renewal of the batch failed");
        for (rx, status) in rxs.iter().zip(m.status()) {
            assert!(
                !rx.has_changed().unwrap(),
                "no certificate replaced by a failure"
            );
            assert_eq!(status.consecutive_failures, 1);
            assert!(status.last_error.unwrap().contains("injected failure"));
        }
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn degenerate_lifetimes_do_not_spin() {
        // A signer that expires in a second caps every leaf to ~1 s.
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.not_before = (SystemTime::now() - HOUR).into();
        p.not_after = (SystemTime::now() + Duration::from_secs(1)).into();
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("c.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("c.key"), key.serialize_pem()).unwrap();
        let a = Authority::from_files(
            &dir.path().join("c.crt"),
            &dir.path().join("c.key"),
            None,
            TD,
        )
        .unwrap();
        let m = CertManager::new(Arc::new(a), RotationConfig::default());
        let err = m.subscribe(&pod(), &id()).unwrap_err().to_string();
        assert!(err.contains("expires too soon"), "{err}");
        assert_eq!(m.issued_total(), 0);

        // rotate_at = 0 still waits at least retry_min between renewals.
        let cfg = RotationConfig {
            rotate_at: 0.0,
            jitter: 0.0,
            ..RotationConfig::default()
        };
        let (m, shutdown) = start(FlakySigner::new(), cfg);
        m.subscribe(&pod(), &id()).unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(m.issued_total() <= 11, "{}", m.issued_total());
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn status_and_nearest_expiry() {
        let signer = FlakySigner::new();
        let (m, shutdown) = start(signer, RotationConfig::default());
        let a = ObjectKey::new("demo", "a");
        let b = ObjectKey::new("demo", "b");
        let rb = m.subscribe(&b, &id()).unwrap();
        let ra = m.subscribe(&a, &id()).unwrap();
        let st = m.status();
        assert_eq!(
            st.iter().map(|s| s.proxy.clone()).collect::<Vec<_>>(),
            vec![a.clone(), b.clone()]
        );
        assert_eq!(st[0].serial, ra.borrow().info.serial);
        assert_eq!(st[0].spiffe_id, id().uri());
        assert_eq!(st[0].not_after, ra.borrow().info.not_after);
        assert!(!st[0].issuer.is_empty());
        let nearest = ra.borrow().info.not_after.min(rb.borrow().info.not_after);
        assert_eq!(m.nearest_expiry(), Some(nearest));
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_on_shutdown() {
        let signer = FlakySigner::new();
        let m = CertManager::with_signer(signer, RotationConfig::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(m.clone().run(shutdown.clone()));
        m.subscribe(&pod(), &id()).unwrap();
        // Let the spawned runner start and take the queue.
        tokio::task::yield_now().await;
        // A second runner refuses to start instead of double-rotating.
        tokio::time::timeout(Duration::from_secs(1), m.clone().run(shutdown.clone()))
            .await
            .unwrap();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn rotates_many_proxies() {
        let signer = FlakySigner::new();
        let (m, shutdown) = start(signer, RotationConfig::default());
        let mut rxs: Vec<_> = (0..200)
            .map(|i| {
                m.subscribe(&ObjectKey::new("demo", format!("p-{i}")), &id())
                    .unwrap()
            })
            .collect();
        tokio::time::sleep(HOUR.mul_f64(0.56)).await;
        for rx in &mut rxs {
            assert!(rx.has_changed().unwrap());
        }
        assert_eq!(m.issued_total(), 400);
        assert!(m.status().iter().all(|s| s.rotations == 1));
        shutdown.cancel();
    }
}
