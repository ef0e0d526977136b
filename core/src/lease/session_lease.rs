//! [`SessionLease`]: one node plugin instance's session. It owns the renewal task (the
//! only writer of its [`SessionDeadline`]), the instance's node-local lock, and the
//! acquire / release / status calls made on behalf of this session.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::Mono;
use crate::lease::client::{acquire_as, LeaseClient};
use crate::lease::decide::ClaimStatus;
use crate::lease::node_lock::NodeLock;
use crate::lease::recovery::{recover_predecessors, DataPathSurvives, RecoveryReport};
use crate::lease::session::{RenewOutcome, RenewState};
use crate::lease::{
    Epoch, Grant, Holder, LeaseError, LeaseParams, NodeIdentity, PodName, SessionDeadline,
    SessionKey, SessionRecord,
};
use crate::store::{LeaseStore, StoreError};

/// Whether the data paths of a session are known to be stopped at shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPaths {
    /// Every volume of this session is unmounted or its FUSE server stopped: the session
    /// record may be deleted, freeing its claims at once.
    Stopped,
    /// Some data path may still be live: keep the record, let it expire by timeout.
    MayBeLive,
}

/// Optional behaviour of [`SessionLease::start_with`].
#[derive(Clone, Default)]
pub struct SessionOptions {
    /// For a dead same-boot predecessor's claims: whether their data path outlived the
    /// process (then the claim is adopted rather than released). `None`: released.
    pub data_path_survives: Option<DataPathSurvives>,
}

#[derive(Default)]
struct Flags {
    lost: AtomicBool,
    fenced: AtomicBool,
}

pub struct SessionLease {
    client: Arc<LeaseClient>,
    key: SessionKey,
    deadline: SessionDeadline,
    flags: Arc<Flags>,
    recovery: RecoveryReport,
    stop: watch::Sender<bool>,
    renewer: Option<JoinHandle<RenewState>>,
    lock: NodeLock,
    /// What recovery needs to run again later (`recover_again`).
    identity: NodeIdentity,
    state_dir: PathBuf,
    survives: Option<DataPathSurvives>,
    /// One recovery at a time: two publishes meeting the same dead instance would
    /// otherwise race to settle the same claims.
    recovering: tokio::sync::Mutex<()>,
}

impl SessionLease {
    /// Creates this instance's session: takes its node-local lock, writes the session
    /// record, frees the claims of predecessors proven dead, and starts renewing.
    pub async fn start(
        store: Arc<dyn LeaseStore>,
        identity: NodeIdentity,
        params: LeaseParams,
        state_dir: &Path,
    ) -> Result<SessionLease, LeaseError> {
        Self::start_with(
            store,
            identity,
            params,
            state_dir,
            SessionOptions::default(),
        )
        .await
    }

    pub async fn start_with(
        store: Arc<dyn LeaseStore>,
        identity: NodeIdentity,
        params: LeaseParams,
        state_dir: &Path,
        options: SessionOptions,
    ) -> Result<SessionLease, LeaseError> {
        let client = Arc::new(LeaseClient::new(store, identity.clone(), params)?);
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let lock = NodeLock::acquire(state_dir, &instance)?;
        let record = SessionRecord {
            node: identity.node.clone(),
            instance: instance.clone(),
            boot_id: identity.boot_id.clone(),
            machine_id: identity.machine_id.clone(),
            duration_ms: params.duration.as_millis() as u64,
            renewals: 0,
        };
        let sent = Mono::now();
        let version = client.store().put_session(&record, None).await?;
        let deadline = SessionDeadline::new();
        deadline.extend_to(sent + params.self_fence_after());
        // Renewing starts before recovery, which may take a while on a busy store.
        let flags = Arc::new(Flags::default());
        let (stop, stopped) = watch::channel(false);
        let renewer = tokio::spawn(renew_loop(
            client.clone(),
            RenewState::new(record.clone(), version),
            deadline.clone(),
            flags.clone(),
            stopped,
        ));
        // Built before recovery so that, if this future is dropped mid-way, dropping
        // the lease stops the renewer.
        let mut lease = SessionLease {
            client,
            key: record.key(),
            deadline,
            flags,
            recovery: RecoveryReport::default(),
            stop,
            renewer: Some(renewer),
            lock,
            identity: identity.clone(),
            state_dir: state_dir.to_path_buf(),
            survives: options.data_path_survives.clone(),
            recovering: tokio::sync::Mutex::new(()),
        };
        lease.recovery = recover_predecessors(
            lease.client.store().as_ref(),
            &identity,
            &instance,
            state_dir,
            options.data_path_survives.as_ref(),
        )
        .await
        .unwrap_or_else(|err| {
            tracing::warn!(%err, "recovery of predecessor sessions failed; their claims will expire");
            RecoveryReport::default()
        });
        Ok(lease)
    }

    /// The self-fence deadline every volume gate of this session shares.
    pub fn deadline(&self) -> SessionDeadline {
        self.deadline.clone()
    }

    pub fn key(&self) -> SessionKey {
        self.key.clone()
    }

    pub fn client(&self) -> &LeaseClient {
        &self.client
    }

    /// What start-up recovery did (for logs and for re-gating adopted claims).
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Recovery again, after start-up: frees (or adopts) the claims of this node's other
    /// instances that can be proven dead *now*. An instance still exiting when this one
    /// started held its flock then, so its claims were left to expire; the kernel drops
    /// the flock only with its process, so the same proof holds at any later time.
    pub async fn recover_again(&self) -> Result<RecoveryReport, LeaseError> {
        let _one = self.recovering.lock().await;
        self.check_live()?;
        recover_predecessors(
            self.client.store().as_ref(),
            &self.identity,
            &self.key.instance,
            &self.state_dir,
            self.survives.as_ref(),
        )
        .await
    }

    /// The session record was deleted or replaced by someone else: it is over.
    pub fn is_lost(&self) -> bool {
        self.flags.lost.load(Ordering::SeqCst)
    }

    /// The node is fenced: nothing may be written until it is unfenced.
    pub fn is_fenced(&self) -> bool {
        self.flags.fenced.load(Ordering::SeqCst)
    }

    fn check_live(&self) -> Result<(), LeaseError> {
        if self.is_fenced() {
            return Err(LeaseError::NodeFenced {
                node: self.key.node.clone(),
                reason: "a fence record names this node".into(),
            });
        }
        if self.is_lost() || !self.deadline.is_live_at(Mono::now()) {
            return Err(LeaseError::SessionNotLive {
                instance: self.key.instance.clone(),
            });
        }
        Ok(())
    }

    /// Takes `volume_id` for `pod_uid`. `wait_until`: `None` = refuse at once if held;
    /// `Some(t)` = keep trying until `t` on this node's clock.
    pub async fn acquire(
        &self,
        volume_id: &str,
        pod_uid: &str,
        wait_until: Option<Mono>,
    ) -> Result<Grant, LeaseError> {
        self.acquire_for_pod(volume_id, pod_uid, None, wait_until)
            .await
    }

    /// [`SessionLease::acquire`], recording the pod's namespace and name on the claim so
    /// that a refused pod (and `kubectl describe`) can be told who holds the volume.
    pub async fn acquire_for_pod(
        &self,
        volume_id: &str,
        pod_uid: &str,
        pod: Option<PodName>,
        wait_until: Option<Mono>,
    ) -> Result<Grant, LeaseError> {
        let me = Holder {
            node: self.key.node.clone(),
            pod_uid: pod_uid.to_string(),
            instance: self.key.instance.clone(),
            pod,
        };
        acquire_as(&self.client, me, volume_id, wait_until, || {
            self.check_live()
        })
        .await
    }

    /// Gives up this session's claim at `epoch`; does nothing if it has moved on.
    pub async fn release(&self, volume_id: &str, epoch: Epoch) -> Result<(), LeaseError> {
        self.client.release_for(&self.key, volume_id, epoch).await
    }

    /// Whether this session still holds `volume_id` at `epoch`.
    pub async fn claim_status(
        &self,
        volume_id: &str,
        epoch: Epoch,
    ) -> Result<ClaimStatus, LeaseError> {
        self.client.status_for(&self.key, volume_id, epoch).await
    }

    /// Stops renewing and closes every gate. Deletes the session record — freeing its
    /// claims at once — only if the caller says its data paths are stopped.
    pub async fn shutdown(mut self, data_paths: DataPaths) -> Result<(), LeaseError> {
        let _ = self.stop.send(true);
        self.deadline.revoke();
        let Some(renewer) = self.renewer.take() else {
            return Ok(());
        };
        let state = match renewer.await {
            Ok(state) => state,
            Err(join) => {
                return Err(LeaseError::InvalidInput(format!(
                    "renewal task failed: {join}"
                )))
            }
        };
        // Again, now that no renewal can still be landing.
        self.deadline.revoke();
        if data_paths == DataPaths::Stopped && !self.is_lost() {
            match self
                .client
                .store()
                .delete_session(&self.key, state.version())
                .await
            {
                Ok(()) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            // Its record is gone: nothing is left for a successor to prove.
            self.lock.remove_file();
        }
        // Otherwise the record stays, and so does the lock file: the next instance on
        // this node proves this one dead by taking its flock, and frees its claims then
        // rather than at their expiry.
        Ok(())
    }
}

impl Drop for SessionLease {
    /// Dropped without [`SessionLease::shutdown`]: stop renewing, keep the record (it
    /// expires by timeout), close every gate.
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        self.deadline.revoke();
    }
}

/// Renews every D/3; retries a failed renewal sooner; extends the deadline only to
/// `send + (D − margin)` of a renewal the store applied; stops for good when the
/// session is lost. While the node is fenced the deadline stays revoked.
async fn renew_loop(
    client: Arc<LeaseClient>,
    mut state: RenewState,
    deadline: SessionDeadline,
    flags: Arc<Flags>,
    mut stopped: watch::Receiver<bool>,
) -> RenewState {
    let params = *client.params();
    let interval = params.renew_interval();
    let retry = (interval / 4).max(Duration::from_millis(5));
    let store = client.store().clone();
    let mut wait = interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => return state,
        }
        wait = retry;
        match store.get_fence(&state.record().node).await {
            Ok(Some(_)) => {
                flags.fenced.store(true, Ordering::SeqCst);
                deadline.revoke();
                continue;
            }
            Ok(None) => flags.fenced.store(false, Ordering::SeqCst),
            Err(_) => continue,
        }
        let (record, expected) = state.begin(Mono::now());
        let outcome =
            match tokio::time::timeout(interval, store.put_session(&record, Some(&expected))).await
            {
                Ok(Ok(version)) => state.succeeded(record.renewals, version, &params),
                Ok(Err(StoreError::Conflict { .. })) => {
                    match store.get_session(&record.key()).await {
                        Ok(current) => state.conflicted(current, &params),
                        Err(_) => continue,
                    }
                }
                Ok(Err(err)) => {
                    tracing::debug!(%err, "session renewal failed; retrying");
                    continue;
                }
                Err(_elapsed) => continue,
            };
        match outcome {
            RenewOutcome::Extended(until) => {
                if !flags.fenced.load(Ordering::SeqCst) && !*stopped.borrow() {
                    deadline.extend_to(until);
                }
                wait = interval;
            }
            RenewOutcome::Lost => {
                tracing::warn!(instance = %state.record().instance, "session lost: stopping all writes");
                flags.lost.store(true, Ordering::SeqCst);
                deadline.revoke();
                return state;
            }
        }
    }
}

#[cfg(test)]
#[path = "session_lease_tests.rs"]
mod tests;
