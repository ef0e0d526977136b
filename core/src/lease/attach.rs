//! The attach gate's decision: may volume V be attached to node N now?
//!
//! This is not a second set of rules. It asks [`decide_acquire`] — the very function a
//! node plugin's NodePublishVolume runs — on behalf of a *newcomer* of node N: a pod of
//! N that holds nothing yet. The attach is granted exactly when that newcomer could take
//! the claim (free, released, fenced, holder's node fenced, holder's session gone, or
//! silent for `W = D·(1+ε)+margin` on the observer's own clock), plus one rule of the
//! gate's own: a claim already held from node N is granted, because an attach is per
//! node and N's plugin arbitrates between its own pods when they publish.
//!
//! Why granting is safe even on a snapshot that is stale a moment later: an attach
//! gives no access to the data. Only a node plugin's acquire — a compare-and-swap on the
//! claim's version, with its own timing of the holder's session on its own clock —
//! admits a writer. What the gate adds is that the orchestrator keeps a replacement pod
//! waiting, with the reason, while the old holder may still write. So the gate only
//! reads: on an expired session it grants without deleting the session version the
//! node's decision would delete (the acquiring node does that itself, after timing it).
//!
//! Why refusing is the default: every timer starts when the observer first sees a
//! session version, and an observer that just started has seen nothing, so a live or
//! a silent holder alike is refused until `W` has passed on the observer's clock. A
//! restart can only delay an attach, never hasten one.

use std::time::Duration;

use crate::clock::Mono;
use crate::lease::decide::{
    decide_acquire, AcquireDecision, AcquireInput, SessionView, TakeReason,
};
use crate::lease::{ClaimRecord, Epoch, Holder, LeaseParams};

/// Everything [`decide_attach`] looks at: one snapshot, read claim → holder's session →
/// holder's node fence, as a node's acquire reads them.
#[derive(Clone, Debug)]
pub struct AttachInput<'a> {
    pub volume_id: &'a str,
    /// The node the volume is to be attached to.
    pub node: &'a str,
    /// The claim as read (`None`: no record).
    pub claim: Option<&'a ClaimRecord>,
    /// The claim holder's session as this observer has timed it.
    pub holder_session: &'a SessionView,
    /// A fence record names the holder's node.
    pub holder_node_fenced: bool,
    /// The highest epoch this observer has seen for the volume.
    pub high_water: Option<Epoch>,
    /// This observer's clock, read after the snapshot was.
    pub now: Mono,
}

/// Why an attach was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachGrant {
    /// No claim record.
    Free,
    /// Its holder released it after unmounting.
    Released,
    /// The claim was marked fenced (a node fence or the out-of-service taint).
    Fenced,
    /// Held from the node asked for.
    HeldOnThisNode,
    /// Held, but a fence record names the holder's node.
    HolderNodeFenced,
    /// Held, but the holder's session record is gone: its owner can no longer write.
    HolderSessionGone,
    /// Held, but the holder's session was seen unchanged for `W` on this clock.
    HolderSessionExpired,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachDecision {
    Grant(AttachGrant),
    /// A pod of another node holds the claim and may still be writing.
    Refuse {
        holder: Holder,
        epoch: Epoch,
        /// How long this observer has seen the holder's session version unchanged.
        unrenewed_for: Duration,
        /// How long, on this observer's clock, until the session can be taken over by
        /// timeout if it stays unrenewed. `None` when no timeout applies.
        expires_in: Option<Duration>,
    },
    /// The stored epoch is below one this observer has already seen: the store went
    /// back in time. Never treated as a free claim.
    Regressed {
        seen: Epoch,
        stored: Epoch,
    },
}

/// Decides whether `input.volume_id` may be attached to `input.node`.
pub fn decide_attach(input: &AttachInput<'_>, params: &LeaseParams) -> AttachDecision {
    // The newcomer's session is on `node` and names no instance: for any holder on
    // another node it is a stranger (neither the same pod nor the same session), so
    // `decide_acquire` applies to that holder exactly the rules it applies to a pod of
    // another node. A holder on `node` itself is granted below whatever it answers.
    let newcomer = Holder {
        node: input.node.to_string(),
        pod_uid: String::new(),
        instance: String::new(),
        pod: None,
    };
    let acquire = AcquireInput {
        volume_id: input.volume_id,
        claim: input.claim,
        holder_session: input.holder_session,
        holder_node_fenced: input.holder_node_fenced,
        me: &newcomer,
        high_water: input.high_water,
        released: None,
        now: input.now,
    };
    match decide_acquire(&acquire, params) {
        AcquireDecision::Regressed { seen, stored } => AttachDecision::Regressed { seen, stored },
        AcquireDecision::Take { reason, .. } => AttachDecision::Grant(match reason {
            TakeReason::Free => AttachGrant::Free,
            TakeReason::Released => AttachGrant::Released,
            TakeReason::Fenced => AttachGrant::Fenced,
            TakeReason::HolderNodeFenced => AttachGrant::HolderNodeFenced,
            TakeReason::HolderSessionGone => AttachGrant::HolderSessionGone,
            // Only the holder's own session re-acquires; that session is on this node.
            TakeReason::Reacquired => AttachGrant::HeldOnThisNode,
        }),
        // The node would delete exactly the version it timed, then take the claim.
        AcquireDecision::ExpireSession { .. } => {
            AttachDecision::Grant(AttachGrant::HolderSessionExpired)
        }
        // Only the holder itself is told "already held"; it is on this node.
        AcquireDecision::AlreadyHeld { .. } => AttachDecision::Grant(AttachGrant::HeldOnThisNode),
        AcquireDecision::Refuse { holder, .. } if holder.node == input.node => {
            AttachDecision::Grant(AttachGrant::HeldOnThisNode)
        }
        AcquireDecision::Refuse { holder, expires_in } => AttachDecision::Refuse {
            epoch: input.claim.map_or(0, |c| c.epoch),
            unrenewed_for: match input.holder_session {
                SessionView::Seen { first_seen, .. } => input.now.since(*first_seen),
                SessionView::Absent => Duration::ZERO,
            },
            holder,
            expires_in,
        },
    }
}

#[cfg(test)]
#[path = "attach_tests.rs"]
mod tests;
