//! A simulated process's session: creating it, renewing it with the real
//! [`RenewState`], and what happens when it is lost (the process exits and a
//! supervisor restarts it with a new session).

use crate::clock::Mono;
use crate::lease::flow::{StoreOp, StoreReply};
use crate::lease::session::{RenewOutcome, RenewState};
use crate::lease::SessionRecord;
use crate::store::{StoreError, Versioned};

use super::proc::{RenewPhase, Work};
use super::store::{SimOp, SimReply};
use super::world::{Ev, TimerKind, World};
use super::Weakness;

impl World {
    pub(super) fn create_session(&mut self, id: u64) {
        let n = &self.nodes[self.procs[&id].node];
        let rec = SessionRecord {
            node: n.name.clone(),
            instance: self.procs[&id].instance.clone(),
            boot_id: format!("{}-boot{}", n.machine_id, n.boot),
            machine_id: n.machine_id.clone(),
            duration_ms: self.cfg.params.duration.as_millis() as u64,
            renewals: 0,
        };
        let now = self.local_now(id);
        let p = self.procs.get_mut(&id).unwrap();
        p.first_create_sent.get_or_insert(now);
        p.renew = RenewPhase::Creating(rec.clone());
        self.request(id, true, SimOp::PutSession(rec, None, now));
    }

    pub(super) fn renew_tick(&mut self, id: u64) {
        let now = self.local_now(id);
        let p = self.procs.get_mut(&id).unwrap();
        let Some(state) = p.session.as_mut() else {
            return;
        };
        let (rec, expected) = state.begin(now);
        p.renew = RenewPhase::Renewing(rec.renewals);
        self.request(id, true, SimOp::PutSession(rec, Some(expected), now));
    }

    pub(super) fn on_renew_reply(&mut self, id: u64, reply: SimReply) {
        let params = self.cfg.params;
        let retry = params.renew_interval() / 4;
        let now = self.local_now(id);
        let from_reply = self.cfg.weakness == Weakness::DeadlineFromReply;
        let p = self.procs.get_mut(&id).unwrap();
        let phase = std::mem::replace(&mut p.renew, RenewPhase::Idle);
        let outcome = match (phase, reply) {
            (
                RenewPhase::Creating(rec) | RenewPhase::CreateReread(rec),
                SimReply::Flow(StoreReply::Put(v)),
            )
            | (
                RenewPhase::CreateReread(rec),
                SimReply::Flow(StoreReply::Session(Some(Versioned { version: v, .. }))),
            ) => {
                p.session = Some(RenewState::new(rec, v));
                // The earliest create sent bounds the window of whichever one landed.
                RenewOutcome::Extended(p.first_create_sent.unwrap() + params.self_fence_after())
            }
            (
                RenewPhase::Creating(rec),
                SimReply::Flow(StoreReply::Failed(StoreError::Conflict { .. })),
            ) => {
                let key = rec.key();
                p.renew = RenewPhase::CreateReread(rec);
                self.request(id, true, SimOp::Flow(StoreOp::GetSession(key)));
                return;
            }
            (
                RenewPhase::Creating(_) | RenewPhase::CreateReread(_),
                SimReply::Flow(StoreReply::Session(None)),
            ) => RenewOutcome::Lost,
            (RenewPhase::Creating(_) | RenewPhase::CreateReread(_), _) => {
                return self.create_session(id);
            }
            (RenewPhase::Renewing(n), SimReply::Flow(StoreReply::Put(v))) => {
                p.session.as_mut().unwrap().succeeded(n, v, &params)
            }
            (
                RenewPhase::Renewing(_),
                SimReply::Flow(StoreReply::Failed(StoreError::Conflict { .. })),
            ) => {
                p.renew = RenewPhase::Rereading;
                let key = self.key_of(id);
                self.request(id, true, SimOp::Flow(StoreOp::GetSession(key)));
                return;
            }
            (RenewPhase::Rereading, SimReply::Flow(StoreReply::Session(current))) => {
                p.session.as_mut().unwrap().conflicted(current, &params)
            }
            _ => {
                return self.after_local(id, retry, TimerKind::Renew);
            }
        };
        match outcome {
            RenewOutcome::Extended(until) => {
                // Weakened: count the window from the reply, not from the send.
                let until = if from_reply {
                    now + params.self_fence_after()
                } else {
                    until
                };
                let first = p.deadline == Mono::ZERO;
                p.deadline = p.deadline.max(until);
                self.after_local(id, params.renew_interval(), TimerKind::Renew);
                if first {
                    self.begin_recovery(id);
                }
            }
            RenewOutcome::Lost => {
                // The session is over: the process stops all writes and exits; a
                // supervisor restarts it with a new session.
                let node = p.node;
                self.kill_proc(id);
                let at = self.now + self.d_frac(0.05, 0.5);
                self.schedule(at, Ev::Restart { node });
            }
        }
    }

    pub(super) fn begin_recovery(&mut self, id: u64) {
        let node = self.nodes[self.procs[&id].node].name.clone();
        self.procs.get_mut(&id).unwrap().work = Work::Listing;
        self.request(id, false, SimOp::ListSessions(node));
    }
}
