//! The node's claims: which published volume this plugin holds, for which pod, at which
//! epoch, behind which [`VolumeGate`] — and the session they hang off.
//!
//! Owned by the plugin; mutated by the Node service (publish registers a claim after its
//! grant and epoch write, unpublish removes it before releasing) under the volume's lock,
//! and read by the enforcement task ([`crate::lock::enforcer`]), which fences gates but never
//! adds or removes claims.
//!
//! Releasing: a claim is removed from the book first (so the enforcer stops watching a
//! volume this node no longer serves), then released in the store at exactly its epoch.
//! If the store cannot be reached the release is queued and retried with backoff; until
//! it lands the claim ends by expiry of this session if the node dies — slower, never
//! unsafe, since a late epoch-conditional release cannot free a newer grant.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use holdfast_core::clock::Mono;
use holdfast_core::lease::{Epoch, FenceCause, LeaseError, PodName, SessionLease, VolumeGate};
use tokio::sync::mpsc;

use crate::csi::error::NodeError;
use crate::lock::epoch_file::{self, EpochWrite};
use crate::publish::published::DataPathKind;

/// How long an unpublish waits for the store before queueing its release.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);
/// Backoff of queued releases.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One volume this node holds.
#[derive(Debug)]
pub struct ClaimedVolume {
    pub volume_id: String,
    pub pod_uid: String,
    /// The pod's namespace and name when kubelet sent them (`podInfoOnMount`): what
    /// [`crate::lock::gone_pods`] looks up to learn that the pod is gone.
    pub pod: Option<PodName>,
    pub epoch: Epoch,
    pub gate: VolumeGate,
    pub kind: DataPathKind,
    /// `<root>/volumes/<id>/.holdfast-epoch`.
    pub epoch_file: PathBuf,
    /// `<root>/volumes/<id>/data`: what bind targets show (for the holder scan).
    pub data_dir: PathBuf,
    /// Why the gate was fenced, in words for NodeGetVolumeStats.
    detail: Mutex<Option<String>>,
}

impl ClaimedVolume {
    /// Fences the gate (first cause wins) and remembers why, for stats and logs.
    pub fn fence(&self, cause: FenceCause, detail: String) {
        if self.gate.stopped_at(Mono::now()).is_none() {
            tracing::warn!(volume = %self.volume_id, epoch = self.epoch, ?cause, %detail, "fencing volume: all I/O stops");
            let mut slot = self.detail.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(detail);
            }
        }
        self.gate.fence(cause);
    }

    /// Why the volume may not be used, if it may not.
    pub fn problem(&self) -> Option<String> {
        let now = Mono::now();
        let cause = self.gate.stopped_at(now)?;
        if let Some(detail) = self
            .detail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(detail);
        }
        Some(match cause {
            FenceCause::SessionExpired => {
                let deadline = self.gate.session().deadline();
                if deadline.as_nanos() == 0 {
                    "session expired: the node plugin stopped renewing its session; I/O is stopped"
                        .to_string()
                } else {
                    format!(
                        "session expired {:.1}s ago: the lease store could not be reached to \
                         renew this node's session; I/O is stopped until a renewal is proven",
                        now.since(deadline).as_secs_f64()
                    )
                }
            }
            FenceCause::NodeFenced => {
                "node fenced: an admin or fencing agent fenced this node".into()
            }
            FenceCause::EpochSuperseded => {
                "fenced: a newer holder wrote a higher epoch on storage".into()
            }
            FenceCause::ClaimLost => {
                "claim lost: the lease store no longer names this pod as holder".into()
            }
        })
    }
}

pub struct ClaimBook {
    session: Arc<SessionLease>,
    volumes: Mutex<BTreeMap<String, Arc<ClaimedVolume>>>,
    retries: mpsc::UnboundedSender<(String, Epoch)>,
}

/// What a publish needs to know to take a claim.
pub struct ClaimRequest {
    pub volume_id: String,
    pub pod_uid: String,
    /// The pod's namespace and name when kubelet sent them (for messages only).
    pub pod: Option<PodName>,
    pub kind: DataPathKind,
    pub epoch_file: PathBuf,
    pub data_dir: PathBuf,
}

impl ClaimBook {
    /// The book and the receiving end of its release queue (for [`run_release_retries`]).
    pub fn new(
        session: Arc<SessionLease>,
    ) -> (Arc<ClaimBook>, mpsc::UnboundedReceiver<(String, Epoch)>) {
        let (retries, queue) = mpsc::unbounded_channel();
        let book = Arc::new(ClaimBook {
            session,
            volumes: Mutex::new(BTreeMap::new()),
            retries,
        });
        (book, queue)
    }

    pub fn session(&self) -> &Arc<SessionLease> {
        &self.session
    }

    fn volumes(&self) -> MutexGuard<'_, BTreeMap<String, Arc<ClaimedVolume>>> {
        self.volumes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, volume_id: &str) -> Option<Arc<ClaimedVolume>> {
        self.volumes().get(volume_id).cloned()
    }

    /// Every claim held now.
    pub fn snapshot(&self) -> Vec<Arc<ClaimedVolume>> {
        self.volumes().values().cloned().collect()
    }

    /// Registers a claim taken over from a dead predecessor at start-up.
    pub fn adopt(&self, claim: ClaimedVolume) -> Arc<ClaimedVolume> {
        let claim = Arc::new(claim);
        self.volumes()
            .insert(claim.volume_id.clone(), claim.clone());
        claim
    }

    /// Takes (or confirms) the claim, then puts its epoch on the storage. Returns the
    /// claim and whether this call took it (false: the pod already held it here).
    /// Call with the volume's lock held.
    pub async fn acquire(
        &self,
        req: ClaimRequest,
    ) -> Result<(Arc<ClaimedVolume>, bool), NodeError> {
        let existing = self.get(&req.volume_id);
        if let Some(claim) = existing.as_ref().filter(|c| c.pod_uid == req.pod_uid) {
            return match claim.problem() {
                // Its data path is stopped; the pod must go through unpublish.
                Some(problem) => Err(NodeError::Fenced {
                    volume: req.volume_id,
                    problem,
                }),
                // The pod holds it here and its gate is open (session live, no fence):
                // a repeated publish needs no store, so it succeeds during an outage
                // too. The enforcer keeps checking the claim as before.
                None => Ok((claim.clone(), false)),
            };
        }
        let grant = self
            .session
            .acquire_for_pod(&req.volume_id, &req.pod_uid, req.pod.clone(), None)
            .await
            .map_err(|e| NodeError::from_lease(&req.volume_id, e))?;
        if let Some(old) = existing {
            // Another pod's claim here is over (the store granted this one): its gate
            // must not outlive it unwatched.
            old.fence(
                FenceCause::ClaimLost,
                format!(
                    "claim lost: pod {} took the volume at epoch {}",
                    req.pod_uid, grant.epoch
                ),
            );
        }
        let path = req.epoch_file.clone();
        let epoch = grant.epoch;
        let written = tokio::task::spawn_blocking(move || epoch_file::write_epoch(&path, epoch))
            .await
            .map_err(|e| NodeError::Task(e.to_string()))?;
        let refused = match written {
            Ok(EpochWrite::Written) => None,
            Ok(EpochWrite::Higher(found)) => Some(NodeError::EpochSuperseded {
                volume: req.volume_id.clone(),
                ours: epoch,
                found,
            }),
            Err(e) => Some(NodeError::EpochFile(e)),
        };
        if let Some(err) = refused {
            self.release_epoch(&req.volume_id, epoch).await;
            return Err(err);
        }
        let claim = Arc::new(ClaimedVolume {
            volume_id: req.volume_id.clone(),
            pod_uid: req.pod_uid,
            pod: req.pod,
            epoch,
            gate: VolumeGate::new(self.session.deadline()),
            kind: req.kind,
            epoch_file: req.epoch_file,
            data_dir: req.data_dir,
            detail: Mutex::new(None),
        });
        self.volumes().insert(req.volume_id, claim.clone());
        tracing::info!(volume = %claim.volume_id, pod = %claim.pod_uid, epoch, "claim taken");
        Ok((claim, true))
    }

    /// A claim built for adoption (see [`ClaimBook::adopt`]).
    #[allow(clippy::too_many_arguments)]
    pub fn claimed(
        &self,
        volume_id: &str,
        pod_uid: &str,
        pod: Option<PodName>,
        epoch: Epoch,
        kind: DataPathKind,
        epoch_file: PathBuf,
        data_dir: PathBuf,
    ) -> ClaimedVolume {
        ClaimedVolume {
            volume_id: volume_id.to_string(),
            pod_uid: pod_uid.to_string(),
            pod,
            epoch,
            gate: VolumeGate::new(self.session.deadline()),
            kind,
            epoch_file,
            data_dir,
            detail: Mutex::new(None),
        }
    }

    /// Forgets the volume's claim and releases it in the store (queued if the store
    /// does not answer). Call only once no data path of the volume remains on this node.
    pub async fn release(&self, volume_id: &str) {
        let Some(claim) = self.volumes().remove(volume_id) else {
            return;
        };
        // Nothing may pass through a gate of a released claim, should anything still
        // hold it.
        claim.gate.fence(FenceCause::ClaimLost);
        self.release_epoch(volume_id, claim.epoch).await;
    }

    async fn release_epoch(&self, volume_id: &str, epoch: Epoch) {
        let attempt =
            tokio::time::timeout(RELEASE_TIMEOUT, self.session.release(volume_id, epoch)).await;
        match attempt {
            Ok(Ok(())) => tracing::info!(volume = volume_id, epoch, "claim released"),
            Ok(Err(e)) => self.queue_release(volume_id, epoch, &e.to_string()),
            Err(_) => self.queue_release(volume_id, epoch, "lease store did not answer"),
        }
    }

    fn queue_release(&self, volume_id: &str, epoch: Epoch, why: &str) {
        tracing::warn!(
            volume = volume_id,
            epoch,
            why,
            "release failed; retrying in the background"
        );
        let _ = self.retries.send((volume_id.to_string(), epoch));
    }
}

/// Retries queued releases with backoff until each lands (or the claim moved on, which
/// `release` treats as done). Runs for the plugin's life.
pub async fn run_release_retries(
    session: Arc<SessionLease>,
    mut queue: mpsc::UnboundedReceiver<(String, Epoch)>,
) {
    let mut pending: Vec<(String, Epoch)> = Vec::new();
    let mut backoff = RETRY_FIRST;
    loop {
        if pending.is_empty() {
            match queue.recv().await {
                Some(item) => pending.push(item),
                None => return,
            }
            backoff = RETRY_FIRST;
        }
        tokio::time::sleep(backoff).await;
        while let Ok(item) = queue.try_recv() {
            pending.push(item);
        }
        let mut still = Vec::new();
        for (volume, epoch) in pending.drain(..) {
            match tokio::time::timeout(RELEASE_TIMEOUT, session.release(&volume, epoch)).await {
                Ok(Ok(())) => tracing::info!(volume, epoch, "queued release landed"),
                Ok(Err(LeaseError::InvalidInput(e))) => {
                    tracing::error!(volume, epoch, error = %e, "dropping a release that can never succeed")
                }
                _ => still.push((volume, epoch)),
            }
        }
        pending = still;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}
