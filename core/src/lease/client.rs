//! The async shell around the pure protocol: [`LeaseClient`] runs decisions against a
//! [`LeaseStore`]; [`crate::lease::SessionLease`] is one plugin instance's session — it renews, keeps
//! the [`crate::lease::SessionDeadline`] the data path checks, and acquires and releases claims.
//!
//! Nothing here decides anything itself: every choice is made by [`crate::lease::decide`],
//! [`crate::lease::session`] or the [`AcquireAttempt`] step machine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Mono;
use crate::lease::decide::{claim_status_of, decide_release, ClaimStatus, Observations};
use crate::lease::flow::{AcquireAttempt, AttemptEnd, Grant, Step, StoreOp, StoreReply};
use crate::lease::{Epoch, Holder, LeaseError, LeaseParams, NodeIdentity, SessionKey};
use crate::store::{LeaseStore, StoreError};

/// How many compare-and-swap races one call tolerates before giving up.
pub(crate) const MAX_RACES: u32 = 16;

/// Store access plus what this node has observed (session versions, epochs).
pub struct LeaseClient {
    store: Arc<dyn LeaseStore>,
    params: LeaseParams,
    identity: NodeIdentity,
    seen: Mutex<Observations>,
}

impl LeaseClient {
    pub fn new(
        store: Arc<dyn LeaseStore>,
        identity: NodeIdentity,
        params: LeaseParams,
    ) -> Result<Self, LeaseError> {
        params.validate()?;
        Ok(LeaseClient {
            store,
            params,
            identity,
            seen: Mutex::new(Observations::default()),
        })
    }

    pub fn store(&self) -> &Arc<dyn LeaseStore> {
        &self.store
    }

    pub fn params(&self) -> &LeaseParams {
        &self.params
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    fn observations(&self) -> std::sync::MutexGuard<'_, Observations> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One acquire attempt for `me`, start to end.
    pub(crate) async fn attempt(&self, volume_id: &str, me: Holder) -> AttemptEnd {
        let (mut attempt, mut step) = AcquireAttempt::new(volume_id, me, self.params);
        loop {
            match step {
                Step::Done(end) => return end,
                Step::Do(op) => {
                    let reply = self.execute(op).await;
                    let now = Mono::now();
                    step = attempt.on_reply(reply, now, &mut self.observations());
                }
            }
        }
    }

    async fn execute(&self, op: StoreOp) -> StoreReply {
        let s = &self.store;
        let result = match op {
            StoreOp::GetFence(node) => s.get_fence(&node).await.map(StoreReply::Fence),
            StoreOp::GetClaim(volume) => s.get_claim(&volume).await.map(StoreReply::Claim),
            StoreOp::GetSession(key) => s.get_session(&key).await.map(StoreReply::Session),
            StoreOp::DeleteSession(key, version) => s
                .delete_session(&key, &version)
                .await
                .map(|()| StoreReply::Deleted),
            StoreOp::PutClaim(claim, expected) => s
                .put_claim(&claim, expected.as_ref())
                .await
                .map(StoreReply::Put),
        };
        result.unwrap_or_else(StoreReply::Failed)
    }

    /// Releases `session`'s claim on `volume_id` at exactly `epoch`; does nothing if the
    /// claim has moved on (a late release never frees a newer holder's claim).
    pub async fn release_for(
        &self,
        session: &SessionKey,
        volume_id: &str,
        epoch: Epoch,
    ) -> Result<(), LeaseError> {
        // Remembered before anything is sent: this release may land at any later time,
        // so a re-acquire of this volume must take a new epoch (see `AcquireInput`).
        self.observations()
            .released
            .insert(volume_id.to_string(), epoch);
        for _ in 0..MAX_RACES {
            let Some(current) = self.store.get_claim(volume_id).await? else {
                return Ok(());
            };
            let Some(released) = decide_release(Some(&current.value), session, epoch) else {
                return Ok(());
            };
            match self
                .store
                .put_claim(&released, Some(&current.version))
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaseError::Contended {
            volume: volume_id.to_string(),
            attempts: MAX_RACES,
        })
    }

    /// Where the grant (`session`, `epoch`) on `volume_id` stands in the store now.
    pub async fn status_for(
        &self,
        session: &SessionKey,
        volume_id: &str,
        epoch: Epoch,
    ) -> Result<ClaimStatus, LeaseError> {
        let claim = self.store.get_claim(volume_id).await?;
        let mut seen = self.observations();
        if let Some(c) = &claim {
            if let Err(mark) = seen.see_epoch(volume_id, c.value.epoch) {
                return Err(LeaseError::EpochRegressed {
                    volume: volume_id.to_string(),
                    seen: mark,
                    stored: c.value.epoch,
                });
            }
        }
        claim_status_of(claim.as_ref().map(|c| &c.value), session, epoch).map_err(|stored| {
            LeaseError::EpochRegressed {
                volume: volume_id.to_string(),
                seen: epoch,
                stored,
            }
        })
    }
}

/// Acquires `volume_id` for `me`. `wait_until` `None` fails at once on conflict; `Some(t)`
/// keeps re-reading (so the observer keeps timing the holder's session) until `t`.
pub(crate) async fn acquire_as(
    client: &LeaseClient,
    me: Holder,
    volume_id: &str,
    wait_until: Option<Mono>,
    session_live: impl Fn() -> Result<(), LeaseError>,
) -> Result<Grant, LeaseError> {
    check_id("volume id", volume_id)?;
    check_id("pod uid", &me.pod_uid)?;
    let mut races = 0;
    loop {
        session_live()?;
        let err = match client.attempt(volume_id, me.clone()).await {
            AttemptEnd::Granted(grant) => return Ok(grant),
            AttemptEnd::Raced => {
                races += 1;
                if races >= MAX_RACES {
                    return Err(LeaseError::Contended {
                        volume: volume_id.to_string(),
                        attempts: races,
                    });
                }
                continue;
            }
            AttemptEnd::Failed(err) => err,
        };
        let retry_in = match &err {
            LeaseError::Held { expires_in, .. } => expires_in.unwrap_or(Duration::MAX),
            LeaseError::Store(StoreError::Unavailable(_)) => Duration::MAX,
            _ => return Err(err),
        };
        let now = Mono::now();
        let Some(until) = wait_until.filter(|t| now < *t) else {
            return Err(err);
        };
        // Poll often enough to see each renewal of a live holder; a late first sighting
        // only delays a takeover, never hastens it.
        let pause = (client.params.renew_interval() / 2)
            .min(retry_in)
            .min(until.since(now))
            .max(Duration::from_millis(1));
        tokio::time::sleep(pause).await;
    }
}

fn check_id(what: &str, id: &str) -> Result<(), LeaseError> {
    if id.is_empty() || id.len() > 253 || id.chars().any(|c| c.is_control()) {
        return Err(LeaseError::InvalidInput(format!(
            "{what} {id:?} must be 1-253 printable characters"
        )));
    }
    Ok(())
}
