//! The protocol's decisions, as pure functions of records, observations and a reading
//! of this node's [`Mono`] clock. No I/O: the client and the simulation both call these.
//!
//! Rules (each has a test below that fails without it):
//! - a claim may be taken when it is absent, released or fenced; when it is already held
//!   by the same pod through this same session (idempotent); when the holder's node is
//!   fenced; when the
//!   holder's session record is absent; or when the holder's session was seen unchanged
//!   for `W` on *this* node's clock ([`SessionObserver`]) — and then only after deleting
//!   exactly that session version;
//! - taking a claim from anyone (or after a release/fence) writes `epoch + 1`, and so
//!   does re-taking one's own claim after beginning to release it;
//! - release and fence only act on the exact holder and epoch they name;
//! - a stored epoch below one already seen is an error, never a free claim.
//!
//! Why an absent session frees its claims: a session record is created before any claim
//! hangs off it, its instance id is never reused, and it is deleted only (a) by its owner
//! after its data paths stopped, (b) by a successor that proved the owner dead (same
//! machine rebooted, or the owner's flock was released by the kernel), or (c) by an
//! acquirer that deleted the exact version it timed for `W`, after the owner's window
//! for that version had closed (see [`crate::lease::params`]). The owner renews with a
//! compare-and-swap naming its last version, so once the record is gone no renewal can
//! succeed and its deadline never moves again. Absent therefore means "its owner can no
//! longer write". This assumes the store does not silently lose records; a store
//! rolled back to an old snapshot shows up as an epoch regression where we have seen one.

use std::collections::HashMap;
use std::time::Duration;

use crate::clock::Mono;
use crate::lease::{ClaimRecord, ClaimState, Epoch, Holder, LeaseParams, SessionKey};
use crate::store::Version;

/// What this node knows of another session: only versions, and when it first saw each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionView {
    /// The store has no record for the session.
    Absent,
    /// The store shows `version`, which this node first saw at `first_seen`.
    Seen { version: Version, first_seen: Mono },
}

/// Remembers, per session, the version last read and the local instant it was first
/// seen. Lives in memory only: after a restart every timer starts afresh, which can
/// only delay a takeover, never hasten one.
#[derive(Clone, Debug, Default)]
pub struct SessionObserver {
    seen: HashMap<SessionKey, (Version, Mono)>,
}

impl SessionObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records what a read of `key` returned at `now` (this node's clock).
    pub fn observe(
        &mut self,
        key: &SessionKey,
        version: Option<&Version>,
        now: Mono,
    ) -> SessionView {
        let Some(version) = version else {
            self.seen.remove(key);
            return SessionView::Absent;
        };
        let entry = self
            .seen
            .entry(key.clone())
            .or_insert_with(|| (version.clone(), now));
        if &entry.0 != version {
            *entry = (version.clone(), now);
        }
        SessionView::Seen {
            version: entry.0.clone(),
            first_seen: entry.1,
        }
    }
}

/// What this client has learnt so far: session versions and, per volume, the highest
/// epoch seen (a stored epoch below it means the store went back in time).
#[derive(Clone, Debug, Default)]
pub struct Observations {
    pub sessions: SessionObserver,
    pub epochs: HashMap<String, Epoch>,
    /// Per volume, the epoch this session last began releasing.
    pub released: HashMap<String, Epoch>,
}

impl Observations {
    pub fn high_water(&self, volume_id: &str) -> Option<Epoch> {
        self.epochs.get(volume_id).copied()
    }

    /// Raises the volume's high-water mark; returns the stored epoch back if it is below
    /// the mark already seen.
    pub fn see_epoch(&mut self, volume_id: &str, epoch: Epoch) -> Result<(), Epoch> {
        let mark = self.epochs.entry(volume_id.to_string()).or_insert(epoch);
        if epoch < *mark {
            return Err(*mark);
        }
        *mark = epoch;
        Ok(())
    }
}

/// Why a claim could be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeReason {
    Free,
    Released,
    Fenced,
    /// Same pod, same session, after this session released (or began releasing) it.
    Reacquired,
    HolderNodeFenced,
    HolderSessionGone,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AcquireDecision {
    /// Write `claim` (compare-and-swap against the version read).
    Take {
        claim: ClaimRecord,
        reason: TakeReason,
    },
    /// The same pod already holds it through this very session: nothing to write.
    AlreadyHeld { epoch: Epoch },
    /// The holder's session was silent for `W`: delete exactly this version, then the
    /// session is absent and the claim may be taken.
    ExpireSession {
        session: SessionKey,
        version: Version,
    },
    Refuse {
        holder: Holder,
        expires_in: Option<Duration>,
    },
    /// The stored epoch is below one this client has already seen.
    Regressed { seen: Epoch, stored: Epoch },
}

/// Everything [`decide_acquire`] looks at.
#[derive(Clone, Debug)]
pub struct AcquireInput<'a> {
    pub volume_id: &'a str,
    /// The claim as read (`None`: no record).
    pub claim: Option<&'a ClaimRecord>,
    /// The current holder's session, as this node observes it (ignored unless the
    /// claim is held by someone else).
    pub holder_session: &'a SessionView,
    /// A fence record names the holder's node.
    pub holder_node_fenced: bool,
    pub me: &'a Holder,
    /// The highest epoch this client has seen for the volume.
    pub high_water: Option<Epoch>,
    /// The epoch of this volume this very session last released (or began releasing).
    /// A re-acquire after that must not reuse the epoch: a release still in flight
    /// names it and would otherwise free the new grant.
    pub released: Option<Epoch>,
    pub now: Mono,
}

/// Decides whether `input.me` may take the claim.
pub fn decide_acquire(input: &AcquireInput<'_>, params: &LeaseParams) -> AcquireDecision {
    let AcquireInput {
        volume_id,
        claim,
        holder_session,
        holder_node_fenced,
        me,
        high_water,
        released,
        now,
    } = *input;
    let take = |epoch: Epoch, reason| AcquireDecision::Take {
        claim: ClaimRecord {
            volume_id: volume_id.to_string(),
            holder: me.clone(),
            state: ClaimState::Held,
            epoch,
            // A new holder starts clean: the previous holder's expired mark was about
            // the previous holder.
            expired: None,
        },
        reason,
    };
    let Some(claim) = claim else {
        // A missing claim whose epoch we saw is recreated above that epoch.
        return take(high_water.unwrap_or(0) + 1, TakeReason::Free);
    };
    if let Some(seen) = high_water {
        if claim.epoch < seen {
            return AcquireDecision::Regressed {
                seen,
                stored: claim.epoch,
            };
        }
    }
    let next = claim.epoch + 1;
    match claim.state {
        ClaimState::Released => return take(next, TakeReason::Released),
        ClaimState::Fenced => return take(next, TakeReason::Fenced),
        ClaimState::Held => {}
    }
    let holder = &claim.holder;
    if holder.is_same_pod(me) {
        if released == Some(claim.epoch) {
            return take(next, TakeReason::Reacquired);
        }
        return AcquireDecision::AlreadyHeld { epoch: claim.epoch };
    }
    // The same pod through *another* session of this node (an older plugin instance)
    // is treated like any other holder: that instance may still serve the pod's data
    // path, and if the new instance took the claim and later released it, the old
    // path would stay open beside the next holder. It is free once that session is
    // gone — deleted by its owner at shutdown, proven dead at start-up, or timed out.
    if holder_node_fenced {
        return take(next, TakeReason::HolderNodeFenced);
    }
    if holder.session() == me.session() {
        // Another pod through our own live session: it never times out from here.
        return AcquireDecision::Refuse {
            holder: holder.clone(),
            expires_in: None,
        };
    }
    match holder_session {
        SessionView::Absent => take(next, TakeReason::HolderSessionGone),
        SessionView::Seen {
            version,
            first_seen,
        } => {
            let silent_for = now.since(*first_seen);
            let wait = params.takeover_wait();
            if silent_for >= wait {
                AcquireDecision::ExpireSession {
                    session: holder.session(),
                    version: version.clone(),
                }
            } else {
                AcquireDecision::Refuse {
                    holder: holder.clone(),
                    expires_in: Some(wait - silent_for),
                }
            }
        }
    }
}

/// Gives up `holder`'s claim at `epoch`, or does nothing: a release naming an older
/// epoch or another holder can never free a newer holder's claim.
pub fn decide_release(
    claim: Option<&ClaimRecord>,
    session: &SessionKey,
    epoch: Epoch,
) -> Option<ClaimRecord> {
    let claim = claim?;
    if claim.state != ClaimState::Held || claim.epoch != epoch || &claim.holder.session() != session
    {
        return None;
    }
    Some(ClaimRecord {
        state: ClaimState::Released,
        ..claim.clone()
    })
}

/// Marks a claim of the fenced `node` fenced, bumping its epoch, or does nothing.
pub fn decide_fence(claim: &ClaimRecord, node: &str) -> Option<ClaimRecord> {
    if claim.state != ClaimState::Held || claim.holder.node != node {
        return None;
    }
    Some(ClaimRecord {
        state: ClaimState::Fenced,
        epoch: claim.epoch + 1,
        ..claim.clone()
    })
}

/// Where a grant stands now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimStatus {
    /// Still held by this session at this epoch.
    Held,
    /// Released by this session (nobody took it since).
    Released,
    /// This session's claim was fenced.
    Fenced,
    /// Someone took it over at a higher epoch.
    Superseded { holder: Holder, epoch: Epoch },
    /// No claim record at all.
    Missing,
}

/// Compares the stored claim with a grant (`session`, `epoch`). `Err(stored)` if the
/// stored epoch is below the grant's: the store went backwards.
pub fn claim_status_of(
    claim: Option<&ClaimRecord>,
    session: &SessionKey,
    epoch: Epoch,
) -> Result<ClaimStatus, Epoch> {
    let Some(claim) = claim else {
        return Ok(ClaimStatus::Missing);
    };
    let ours = &claim.holder.session() == session;
    if claim.epoch < epoch {
        return Err(claim.epoch);
    }
    Ok(match (ours, claim.state) {
        (true, ClaimState::Held) if claim.epoch == epoch => ClaimStatus::Held,
        (true, ClaimState::Released) if claim.epoch == epoch => ClaimStatus::Released,
        (true, ClaimState::Fenced) if claim.epoch == epoch + 1 => ClaimStatus::Fenced,
        _ => ClaimStatus::Superseded {
            holder: claim.holder.clone(),
            epoch: claim.epoch,
        },
    })
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
