//! Root rotation without downtime. One task owns it; each phase waits until
//! every connected proxy ACKed the secrets of the phase before the next:
//!
//! 1. **Distribute**: the trust bundle carries the old and the new root;
//!    leaves are still signed by the old one.
//! 2. **Re-issue**: leaves come from the new root (bundle still has both), so
//!    a peer still holding an old leaf is trusted, and so is a new one.
//! 3. **Retire**: once no live leaf chains to the old root, the bundle holds
//!    only the new root, and the new root replaces the old one on disk.
//!
//! Proxies that are not connected do not block a phase: they receive the
//! state of the moment when they connect.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::authority::{Authority, IssuedCert, RootKind};
use super::manager::{CertManager, Signer};
use super::{CaError, store};
use crate::model::SpiffeId;

/// What a proxy's Envoy serves, as far as rotation cares.
#[derive(Clone, Debug)]
pub struct ProxyAck {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Issuer (subject) of the ACKed leaf; `None` until an SDS ACK.
    pub issuer: Option<String>,
    /// Content hash of the ACKed trust bundle.
    pub bundle: Option<String>,
}

/// Where rotation learns what proxies ACKed (the xDS status registry).
pub trait AckSource: Send + Sync {
    fn acks(&self) -> Vec<ProxyAck>;
}

/// Phase of the current (or last) rotation, for `ward status` and `/debug/certs`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RotationStatus {
    /// idle | distributing | reissuing | retiring | done | failed
    pub phase: String,
    pub old_root: Option<String>,
    pub new_root: Option<String>,
    /// Connected proxies that reached the current phase, of all connected.
    pub acked: usize,
    pub total: usize,
    pub message: String,
}

/// Signs with one authority but hands out a chosen trust bundle.
struct BundleSigner {
    signer: Arc<Authority>,
    bundle_pem: String,
}

impl Signer for BundleSigner {
    fn issue_workload(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedCert, CaError> {
        self.signer.issue_workload(id, ttl)
    }

    fn trust_bundle_pem(&self) -> String {
        self.bundle_pem.clone()
    }
}

/// Handle to ask for a rotation and watch its progress.
#[derive(Clone)]
pub struct RootRotation {
    requests: mpsc::Sender<()>,
    status: watch::Receiver<RotationStatus>,
    /// The authority that signs new leaves (swapped at the re-issue phase).
    current: Arc<ArcSwap<Authority>>,
}

impl RootRotation {
    /// Start a rotation; refused while one is running.
    pub fn request(&self) -> Result<(), String> {
        let phase = self.status.borrow().phase.clone();
        if matches!(phase.as_str(), "distributing" | "reissuing" | "retiring") {
            return Err(format!("a root rotation is already in progress ({phase})"));
        }
        self.requests
            .try_send(())
            .map_err(|_| "a root rotation is already queued".to_string())
    }

    pub fn status(&self) -> RotationStatus {
        self.status.borrow().clone()
    }

    /// The authority signing leaves now.
    pub fn current(&self) -> Arc<Authority> {
        self.current.load_full()
    }
}

/// The rotation task.
pub struct RootRotator {
    certs: CertManager,
    acks: Arc<dyn AckSource>,
    /// `None` for a plugged-in CA: its replacement comes from the user.
    state_dir: Option<PathBuf>,
    trust_domain: String,
    current: Arc<ArcSwap<Authority>>,
    requests: mpsc::Receiver<()>,
    status: watch::Sender<RotationStatus>,
    /// How often ACKs are checked.
    poll: Duration,
    /// Rotate automatically once the root is this old (`--root-rotation-interval`).
    interval: Option<Duration>,
}

impl RootRotator {
    pub fn new(
        authority: Arc<Authority>,
        certs: CertManager,
        acks: Arc<dyn AckSource>,
        state_dir: Option<PathBuf>,
    ) -> (Self, RootRotation) {
        let (req_tx, req_rx) = mpsc::channel(1);
        let (status_tx, status_rx) = watch::channel(RotationStatus {
            phase: "idle".into(),
            ..Default::default()
        });
        let trust_domain = authority.trust_domain().to_string();
        let current = Arc::new(ArcSwap::new(authority));
        let handle = RootRotation {
            requests: req_tx,
            status: status_rx,
            current: current.clone(),
        };
        let task = Self {
            certs,
            acks,
            state_dir,
            trust_domain,
            current,
            requests: req_rx,
            status: status_tx,
            poll: Duration::from_millis(200),
            interval: None,
        };
        (task, handle)
    }

    /// Rotate by configuration: whenever the root reaches `every` of age.
    pub fn with_interval(mut self, every: Option<Duration>) -> Self {
        self.interval = every;
        self
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        // How often the root's age is looked at when rotating by interval.
        let check = self
            .interval
            .map(|i| (i / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)));
        loop {
            let current = self.current.clone();
            let rotatable = self.state_dir.is_some();
            let interval = self.interval;
            let due = async move {
                match (check, interval) {
                    (Some(check), Some(every)) if rotatable => loop {
                        tokio::time::sleep(check).await;
                        if root_age(&current.load()) >= every {
                            return;
                        }
                    },
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                req = self.requests.recv() => if req.is_none() { return },
                () = due => tracing::info!("the mesh root reached --root-rotation-interval; rotating it"),
            }
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.rotate() => r,
            };
            if let Err(e) = outcome {
                tracing::error!("root rotation failed: {e}");
                self.status.send_modify(|s| {
                    s.phase = "failed".into();
                    s.message = e.to_string();
                });
            }
        }
    }

    fn set_phase(&self, phase: &str, message: String) {
        tracing::info!(phase, "root rotation: {message}");
        self.status.send_modify(|s| {
            s.phase = phase.into();
            s.message = message;
        });
    }

    async fn rotate(&mut self) -> Result<(), CaError> {
        let Some(state_dir) = self.state_dir.clone() else {
            return Err(CaError::InvalidCert(
                "the mesh CA is plugged in (--ca-cert) or kept in a Kubernetes Secret: rotate it by replacing those (automatic rotation works for a root Ward keeps in --state-dir)"
                    .into(),
            ));
        };
        let old = self.current.load_full();
        // The new root is persisted next to the old one before anything uses
        // it, so a restart mid-rotation can finish with the same root.
        let next_dir = state_dir.join("next");
        let new = Arc::new(Authority::load_or_generate_as(
            &next_dir,
            &self.trust_domain,
            RootKind::Mesh,
        )?);
        let old_subject = old.signing_cert().subject.clone();
        let new_subject = new.signing_cert().subject.clone();
        self.status.send_modify(|s| {
            s.old_root = Some(old.signing_cert().serial.clone());
            s.new_root = Some(new.signing_cert().serial.clone());
        });
        let both = format!("{}{}", old.trust_bundle_pem(), new.trust_bundle_pem());
        let both_hash = crate::translate::content_hash(&[both.as_bytes()]);

        self.set_phase(
            "distributing",
            "trust bundle now carries the old and the new root".into(),
        );
        self.certs.set_signer(Arc::new(BundleSigner {
            signer: old.clone(),
            bundle_pem: both.clone(),
        }));
        self.certs.rotate_all_now();
        self.wait(|a| a.bundle.as_deref() == Some(both_hash.as_str()))
            .await;

        self.set_phase("reissuing", "leaves are re-issued from the new root".into());
        self.current.store(new.clone());
        self.certs.set_signer(Arc::new(BundleSigner {
            signer: new.clone(),
            bundle_pem: both.clone(),
        }));
        self.certs.rotate_all_now();
        self.wait(|a| a.issuer.as_deref() == Some(new_subject.as_str()))
            .await;

        // No live leaf may chain to the old root any more: certificates kept
        // for reconnects were issued by it, so they are dropped.
        self.certs.forget_released();
        let live_old = self
            .certs
            .status()
            .iter()
            .filter(|c| c.issuer == old_subject)
            .count();
        if live_old > 0 {
            return Err(CaError::InvalidCert(format!(
                "{live_old} live certificate(s) still chain to the old root; it stays in the bundle"
            )));
        }
        self.set_phase("retiring", "the old root leaves the trust bundle".into());
        self.certs.set_authority(new.clone());
        self.certs.rotate_all_now();
        let only_new = crate::translate::content_hash(&[new.trust_bundle_pem().as_bytes()]);
        self.wait(|a| a.bundle.as_deref() == Some(only_new.as_str()))
            .await;

        promote(&state_dir, &old)?;
        self.set_phase(
            "done",
            format!("the mesh root is now {}", new.signing_cert().serial),
        );
        Ok(())
    }

    /// Wait until every connected proxy satisfies `reached`, publishing
    /// progress ("applied to N of M proxies").
    async fn wait(&self, reached: impl Fn(&ProxyAck) -> bool) {
        loop {
            let acks = self.acks.acks();
            let done = acks.iter().filter(|a| reached(a)).count();
            self.status.send_modify(|s| {
                s.acked = done;
                s.total = acks.len();
            });
            if done == acks.len() {
                return;
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// Age of a root (its notBefore is backdated for clock skew).
fn root_age(root: &Authority) -> Duration {
    let not_before = root.signing_cert().not_before + super::authority::CLOCK_SKEW;
    std::time::SystemTime::now()
        .duration_since(not_before)
        .unwrap_or(Duration::ZERO)
}

/// Make `<state>/next/ca` the root in `<state>/ca`; keep the old one in
/// `<state>/retired/<serial>/` (never deleted: an operator may need it).
fn promote(state_dir: &std::path::Path, old: &Authority) -> Result<(), CaError> {
    let io = |path: PathBuf, op: &'static str| move |source| CaError::Io { path, op, source };
    let retired = state_dir.join("retired").join(&old.signing_cert().serial);
    store::create_private_dir(&retired)?;
    let ca = state_dir.join("ca");
    std::fs::rename(&ca, retired.join("ca")).map_err(io(ca.clone(), "retire the old root"))?;
    let next = state_dir.join("next").join("ca");
    std::fs::rename(&next, &ca).map_err(io(next.clone(), "promote the new root"))?;
    Ok(())
}
