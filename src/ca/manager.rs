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
    pub proxy: ObjectKey,
    pub spiffe_id: String,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
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
    issued: AtomicU64,
    failures: AtomicU64,
}

struct Entry {
    /// Identity the certificate was issued for; a different identity on
    /// subscribe forces a new certificate.
    id: SpiffeId,
    /// Publishes new certificates to every stream of this proxy.
    tx: watch::Sender<Arc<WorkloadCert>>,
    subscribers: usize,
    rotations: u64,
    last_error: Option<String>,
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
    at: Instant,
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
            }),
        }
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
        let signed = self.sign(id);
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
                        self.install(proxy, e, cert, now);
                        e.tx.subscribe()
                    }
                    None => {
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

    /// Renew every subscribed proxy's certificate now (after a root change).
    pub fn rotate_all_now(&self) {
        let mut entries = self.entries();
        let now = Instant::now();
        for (proxy, e) in entries.iter_mut() {
            if e.subscribers > 0 {
                self.schedule(proxy, e, now, false);
            }
        }
    }

    /// Certificates signed so far (first issues and renewals).
    pub fn issued_total(&self) -> u64 {
        self.inner.issued.load(Ordering::Relaxed)
    }

    /// Failed signings so far.
    pub fn failures_total(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Earliest expiry among certificates in use.
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
                    let mut handled = 0usize;
                    while let Some(entry) = queue.first_entry() {
                        if entry.key().0 > now {
                            break;
                        }
                        let ((at, _), proxy) = entry.remove_entry();
                        self.attempt(&proxy, at);
                        handled += 1;
                        // Thousands of renewals at once must not starve other tasks.
                        if handled % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                }
            }
        }
        tracing::debug!("certificate rotation stopped");
    }

    /// Handle one due queue item.
    fn attempt(&self, proxy: &ObjectKey, at: Instant) {
        let now = Instant::now();
        let id = {
            let mut entries = self.entries();
            let Some(e) = entries.get_mut(proxy) else {
                return;
            };
            if e.next_attempt != at {
                return; // superseded by a newer schedule
            }
            if e.subscribers == 0 {
                if now >= e.expires_at {
                    entries.remove(proxy);
                    tracing::debug!(%proxy, "purged expired certificate");
                } else if !e.purge_pending {
                    let expires_at = e.expires_at;
                    self.schedule(proxy, e, expires_at, true);
                }
                return;
            }
            e.id.clone()
        };
        let signed = self.sign(&id);
        let mut entries = self.entries();
        let Some(e) = entries.get_mut(proxy) else {
            return;
        };
        if e.next_attempt != at || e.id != id {
            return; // a subscribe replaced the certificate meanwhile
        }
        let now = Instant::now();
        match signed {
            Ok(cert) => {
                e.rotations += 1;
                tracing::debug!(%proxy, serial = %cert.info.serial, "rotated workload certificate");
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
        self.inner.issued.fetch_add(1, Ordering::Relaxed);
        Ok(WorkloadCert {
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            trust_bundle_pem: signer.trust_bundle_pem(),
            info: issued.info,
        })
    }

    /// Publish a new certificate for an existing entry and schedule its renewal.
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
        let frac = if frac.is_finite() { frac.clamp(0.0, 1.0) } else { 0.5 };
        e.renew_at = now + lifetime.mul_f64(frac);
        e.expires_at = now + lifetime;
        let renew_at = e.renew_at;
        self.schedule(proxy, e, renew_at, false);
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

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
