//! One acquire attempt as a step machine without I/O: it asks for store operations and
//! is fed their replies. The async client runs it against a real store; the simulation
//! runs the very same machine against a simulated one with delays, loss and outages.
//!
//! Steps: read this node's fence; read the claim; if someone else holds it, read their
//! session (recording its version in the [`crate::lease::SessionObserver`]) and their node's fence;
//! decide; if the holder's session timed out, delete exactly the version timed; write
//! the claim with a compare-and-swap on the version read.

use crate::clock::Mono;
use crate::lease::decide::{
    decide_acquire, AcquireDecision, AcquireInput, Observations, SessionView,
};
use crate::lease::{
    ClaimRecord, ClaimState, Epoch, Holder, LeaseError, LeaseParams, NodeFence, SessionKey,
    SessionRecord,
};
use crate::store::{StoreError, Version, Versioned};

/// A store operation the attempt needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    GetFence(String),
    GetClaim(String),
    GetSession(SessionKey),
    DeleteSession(SessionKey, Version),
    PutClaim(ClaimRecord, Option<Version>),
}

/// The answer to a [`StoreOp`].
#[derive(Debug)]
pub enum StoreReply {
    Fence(Option<Versioned<NodeFence>>),
    Claim(Option<Versioned<ClaimRecord>>),
    Session(Option<Versioned<SessionRecord>>),
    Deleted,
    Put(Version),
    Failed(StoreError),
}

/// A granted claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub volume_id: String,
    pub holder: Holder,
    pub epoch: Epoch,
}

/// How an attempt ended.
#[derive(Debug)]
pub enum AttemptEnd {
    Granted(Grant),
    /// A compare-and-swap lost a race: read again and retry at once.
    Raced,
    Failed(LeaseError),
}

#[derive(Debug)]
pub enum Step {
    Do(StoreOp),
    Done(AttemptEnd),
}

#[derive(Debug)]
enum Phase {
    OwnFence,
    Claim,
    HolderSession,
    HolderFence { view: SessionView },
    Expiring,
    Writing { epoch: Epoch },
}

/// One pass of acquire for `me` on `volume_id`.
#[derive(Debug)]
pub struct AcquireAttempt {
    volume_id: String,
    me: Holder,
    params: LeaseParams,
    phase: Phase,
    claim: Option<Versioned<ClaimRecord>>,
}

impl AcquireAttempt {
    pub fn new(volume_id: &str, me: Holder, params: LeaseParams) -> (Self, Step) {
        let attempt = AcquireAttempt {
            volume_id: volume_id.to_string(),
            me,
            params,
            phase: Phase::OwnFence,
            claim: None,
        };
        let first = Step::Do(StoreOp::GetFence(attempt.me.node.clone()));
        (attempt, first)
    }

    /// Feeds the reply to the last operation, read at `now` on this node's clock.
    pub fn on_reply(&mut self, reply: StoreReply, now: Mono, seen: &mut Observations) -> Step {
        if let StoreReply::Failed(err) = reply {
            return match err {
                StoreError::Conflict { .. } => Step::Done(AttemptEnd::Raced),
                other => Step::Done(AttemptEnd::Failed(other.into())),
            };
        }
        let phase = std::mem::replace(&mut self.phase, Phase::OwnFence);
        match (phase, reply) {
            (Phase::OwnFence, StoreReply::Fence(fence)) => {
                if let Some(f) = fence {
                    return fail(LeaseError::NodeFenced {
                        node: f.value.node,
                        reason: f.value.reason,
                    });
                }
                self.phase = Phase::Claim;
                Step::Do(StoreOp::GetClaim(self.volume_id.clone()))
            }
            (Phase::Claim, StoreReply::Claim(claim)) => {
                if let Some(c) = &claim {
                    if c.value.volume_id != self.volume_id {
                        return fail(LeaseError::InvalidInput(format!(
                            "store returned claim of {} for {}",
                            c.value.volume_id, self.volume_id
                        )));
                    }
                }
                // Another session's claim: look at that session. (A claim of our own
                // session needs no look: it is ours, or another pod's that never
                // times out from here.)
                let held_by_other = claim.as_ref().is_some_and(|c| {
                    c.value.state == ClaimState::Held
                        && c.value.holder.session() != self.me.session()
                });
                self.claim = claim;
                if held_by_other {
                    let key = self
                        .claim
                        .as_ref()
                        .map(|c| c.value.holder.session())
                        .unwrap_or_else(|| self.me.session());
                    self.phase = Phase::HolderSession;
                    return Step::Do(StoreOp::GetSession(key));
                }
                self.decide(SessionView::Absent, false, now, seen)
            }
            (Phase::HolderSession, StoreReply::Session(session)) => {
                let key = self.holder().session();
                let view = seen
                    .sessions
                    .observe(&key, session.as_ref().map(|s| &s.version), now);
                let node = self.holder().node.clone();
                self.phase = Phase::HolderFence { view };
                Step::Do(StoreOp::GetFence(node))
            }
            (Phase::HolderFence { view }, StoreReply::Fence(fence)) => {
                self.decide(view, fence.is_some(), now, seen)
            }
            (Phase::Expiring, StoreReply::Deleted) => {
                self.decide(SessionView::Absent, false, now, seen)
            }
            (Phase::Writing { epoch }, StoreReply::Put(_)) => {
                let _ = seen.see_epoch(&self.volume_id, epoch);
                Step::Done(AttemptEnd::Granted(Grant {
                    volume_id: self.volume_id.clone(),
                    holder: self.me.clone(),
                    epoch,
                }))
            }
            (phase, reply) => fail(LeaseError::InvalidInput(format!(
                "reply {reply:?} does not answer {phase:?}"
            ))),
        }
    }

    fn holder(&self) -> &Holder {
        &self
            .claim
            .as_ref()
            .expect("holder read before its claim")
            .value
            .holder
    }

    fn decide(
        &mut self,
        view: SessionView,
        holder_fenced: bool,
        now: Mono,
        seen: &mut Observations,
    ) -> Step {
        let claim = self.claim.as_ref().map(|c| &c.value);
        let high_water = seen.high_water(&self.volume_id);
        let input = AcquireInput {
            volume_id: &self.volume_id,
            claim,
            holder_session: &view,
            holder_node_fenced: holder_fenced,
            me: &self.me,
            high_water,
            released: seen.released.get(&self.volume_id).copied(),
            now,
        };
        let decision = decide_acquire(&input, &self.params);
        match decision {
            AcquireDecision::Regressed { seen, stored } => fail(LeaseError::EpochRegressed {
                volume: self.volume_id.clone(),
                seen,
                stored,
            }),
            AcquireDecision::Refuse { holder, expires_in } => {
                if let Some(c) = claim {
                    let _ = seen.see_epoch(&self.volume_id, c.epoch);
                }
                fail(LeaseError::Held {
                    holder: Box::new(holder),
                    expires_in,
                })
            }
            AcquireDecision::AlreadyHeld { epoch } => {
                let _ = seen.see_epoch(&self.volume_id, epoch);
                Step::Done(AttemptEnd::Granted(Grant {
                    volume_id: self.volume_id.clone(),
                    holder: self.me.clone(),
                    epoch,
                }))
            }
            AcquireDecision::ExpireSession { session, version } => {
                self.phase = Phase::Expiring;
                Step::Do(StoreOp::DeleteSession(session, version))
            }
            AcquireDecision::Take { claim: new, .. } => {
                self.phase = Phase::Writing { epoch: new.epoch };
                let expected = self.claim.as_ref().map(|c| c.version.clone());
                Step::Do(StoreOp::PutClaim(new, expected))
            }
        }
    }
}

fn fail(err: LeaseError) -> Step {
    Step::Done(AttemptEnd::Failed(err))
}

#[cfg(test)]
#[path = "flow_tests.rs"]
mod tests;
