//! Certainty, not timeout: when a plugin instance starts, it looks at the other
//! sessions under its node name and frees the claims of those it can *prove* dead —
//! the machine rebooted since (same machine id, other boot id), or their flock was
//! released by the kernel (same boot). Everything else is left to expire by timeout.
//!
//! Claims of a predecessor that died with its machine are released: every pod of that
//! boot is dead too. Claims of a predecessor that died alone are released only if the
//! caller says their data path died with it (FUSE); the others (bind mounts, through
//! which the pod may still be writing) are adopted by the new session instead, so they
//! stay held.

use std::path::Path;
use std::sync::Arc;

use crate::lease::client::MAX_RACES;
use crate::lease::node_lock::{check_instance, NodeLock, Probe};
use crate::lease::session::{predecessor_fate, DeathProof};
use crate::lease::{ClaimRecord, ClaimState, Epoch, Holder, LeaseError, NodeIdentity, SessionKey};
use crate::store::{LeaseStore, StoreError, Versioned};

/// Says whether a dead same-boot predecessor's claim still has a live data path (the
/// pod may still be writing: adopt it) or not (it died with the process: release it).
pub type DataPathSurvives = Arc<dyn Fn(&ClaimRecord) -> bool + Send + Sync>;

/// What recovery found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Predecessor sessions proven dead and deleted.
    pub dead: Vec<(SessionKey, DeathProof)>,
    /// Predecessor sessions that may be alive (left to expire or to finish).
    pub alive: Vec<SessionKey>,
    /// (volume, epoch) released.
    pub released: Vec<(String, Epoch)>,
    /// Claims now held by the new session, at their new epoch.
    pub adopted: Vec<ClaimRecord>,
}

/// Runs recovery for the new session `me` (instance `instance`) on this node.
pub async fn recover_predecessors(
    store: &dyn LeaseStore,
    identity: &NodeIdentity,
    instance: &str,
    state_dir: &Path,
    survives: Option<&DataPathSurvives>,
) -> Result<RecoveryReport, LeaseError> {
    let mut report = RecoveryReport::default();
    let sessions = store.list_sessions(&identity.node).await?;
    let mut claims: Option<Vec<Versioned<ClaimRecord>>> = None;
    for session in sessions {
        let theirs = &session.value;
        if theirs.instance == instance {
            continue;
        }
        let probe = if check_instance(&theirs.instance).is_ok() {
            NodeLock::probe(state_dir, &theirs.instance)?
        } else {
            Probe::Missing
        };
        let Some(proof) = predecessor_fate(identity, theirs, probe.as_lock_probe()) else {
            report.alive.push(theirs.key());
            continue;
        };
        if claims.is_none() {
            claims = Some(store.list_claims().await?);
        }
        let key = theirs.key();
        for claim in claims.iter().flatten() {
            if claim.value.state != ClaimState::Held || claim.value.holder.session() != key {
                continue;
            }
            let adopt =
                proof == DeathProof::LockReleased && survives.is_some_and(|f| f(&claim.value));
            let outcome = settle_claim(
                store,
                &claim.value.volume_id,
                &key,
                claim.value.epoch,
                adopt.then_some(instance),
            )
            .await?;
            match outcome {
                Some(rec) if rec.state == ClaimState::Held => report.adopted.push(rec),
                Some(rec) => report.released.push((rec.volume_id, rec.epoch)),
                None => {}
            }
        }
        // Delete exactly the version read: the owner is dead and cannot have renewed.
        match store.delete_session(&key, &session.version).await {
            Ok(()) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if let Probe::Dead(lock) = probe {
            lock.remove()?;
        }
        report.dead.push((key, proof));
    }
    // Lock files of instances without a session: remove those whose process is gone.
    for other in NodeLock::other_instances(state_dir, instance)? {
        if let Probe::Dead(lock) = NodeLock::probe(state_dir, &other)? {
            lock.remove()?;
        }
    }
    Ok(report)
}

/// Releases (or, with `adopt_as`, re-homes onto that instance at epoch + 1) the dead
/// session's claim on `volume_id`, if it is still exactly the claim at `epoch`.
async fn settle_claim(
    store: &dyn LeaseStore,
    volume_id: &str,
    dead: &SessionKey,
    epoch: Epoch,
    adopt_as: Option<&str>,
) -> Result<Option<ClaimRecord>, LeaseError> {
    for _ in 0..MAX_RACES {
        let Some(current) = store.get_claim(volume_id).await? else {
            return Ok(None);
        };
        let c = &current.value;
        if c.state != ClaimState::Held || &c.holder.session() != dead || c.epoch != epoch {
            return Ok(None);
        }
        let next = match adopt_as {
            Some(instance) => ClaimRecord {
                holder: Holder {
                    instance: instance.to_string(),
                    pod: None,
                    ..c.holder.clone()
                },
                epoch: c.epoch + 1,
                ..c.clone()
            },
            None => ClaimRecord {
                state: ClaimState::Released,
                ..c.clone()
            },
        };
        match store.put_claim(&next, Some(&current.version)).await {
            Ok(_) => return Ok(Some(next)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(LeaseError::Contended {
        volume: volume_id.to_string(),
        attempts: MAX_RACES,
    })
}
