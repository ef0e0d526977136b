//! A simulated node plugin process (its session renewal lives in [`super::renewal`]):
//! the glue between the world's messages and timers
//! and the real protocol code. Like the real client, it keeps one renewal and one other
//! store operation in flight, abandons an operation that times out (its reply, if it
//! ever comes, is ignored), and releases a volume only after its data path stopped.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::clock::Mono;
use crate::lease::decide::{claim_status_of, decide_release, ClaimStatus, Observations};
use crate::lease::flow::{AcquireAttempt, AttemptEnd, Step, StoreOp, StoreReply};
use crate::lease::session::{predecessor_fate, LockProbe, RenewState};
use crate::lease::{
    ClaimRecord, ClaimState, Epoch, Holder, LeaseError, NodeIdentity, SessionKey, SessionRecord,
};
use crate::store::{StoreError, Version};

use super::checker::record_grant;
use super::store::{SimOp, SimReply};
use super::world::{Ev, Real, TimerKind, World};
use super::Weakness;

pub(super) struct Want {
    volume: String,
    pod: String,
    wait_until: Option<Mono>,
    races: u32,
}

pub(super) enum RenewPhase {
    Idle,
    Creating(SessionRecord),
    CreateReread(SessionRecord),
    Renewing(u64),
    Rereading,
}

pub(super) enum Work {
    Idle,
    Listing,
    ListingClaims(Vec<(SessionKey, Version)>),
    Cleaning(Vec<SimOp>),
    Acquire(Box<AcquireAttempt>, Want),
    ReleaseRead { volume: String, epoch: Epoch },
    ReleaseWrite { volume: String, epoch: Epoch },
    Check { volume: String, epoch: Epoch },
}

pub(super) struct Proc {
    pub id: u64,
    pub node: usize,
    pub instance: String,
    pub alive: bool,
    pub paused_until: Real,
    pub deadline: Mono,
    /// Volumes whose data path is open: volume → (pod, epoch).
    pub holds: BTreeMap<String, (String, Epoch)>,
    pub(super) session: Option<RenewState>,
    pub(super) first_create_sent: Option<Mono>,
    seen: Observations,
    to_release: Vec<(String, Epoch)>,
    want: Option<Want>,
    pub(super) renew_token: u64,
    pub(super) renew: RenewPhase,
    work_token: u64,
    pub(super) work: Work,
}

impl World {
    pub(super) fn local_now(&self, id: u64) -> Mono {
        self.nodes[self.procs[&id].node].clock.local(self.now)
    }

    pub(super) fn after_local(&mut self, id: u64, local: Duration, kind: TimerKind) {
        let at = self.now + self.nodes[self.procs[&id].node].clock.real_for(local);
        self.schedule(at, Ev::Timer { proc: id, kind });
    }

    pub(super) fn key_of(&self, id: u64) -> SessionKey {
        let p = &self.procs[&id];
        SessionKey {
            node: self.nodes[p.node].name.clone(),
            instance: p.instance.clone(),
        }
    }

    pub(super) fn start_proc(&mut self, node: usize) {
        let id = self.next_id;
        self.next_id += 1;
        let instance = format!("n{node}b{}p{id}", self.nodes[node].boot);
        self.nodes[node].locks.insert(instance.clone(), id);
        let proc = Proc {
            id,
            node,
            instance,
            alive: true,
            paused_until: 0,
            deadline: Mono::ZERO,
            holds: BTreeMap::new(),
            session: None,
            first_create_sent: None,
            seen: Observations::default(),
            to_release: Vec::new(),
            want: None,
            renew_token: 0,
            renew: RenewPhase::Idle,
            work_token: 0,
            work: Work::Idle,
        };
        self.procs.insert(id, proc);
        self.create_session(id);
        let tick = self.cfg.params.duration / 5;
        self.after_local(id, tick, TimerKind::Work);
    }

    /// Sends a request on the renewal (`renewal`) or the work channel, with a timeout.
    pub(super) fn request(&mut self, id: u64, renewal: bool, op: SimOp) {
        let token = self.next_id;
        self.next_id += 1;
        let p = self.procs.get_mut(&id).unwrap();
        if renewal {
            p.renew_token = token;
        } else {
            p.work_token = token;
        }
        self.send(id, token, op);
        let timeout = self.cfg.params.renew_interval();
        self.after_local(id, timeout, TimerKind::Timeout(token));
    }

    pub(super) fn on_timer(&mut self, id: u64, kind: TimerKind) {
        match kind {
            TimerKind::Renew => self.renew_tick(id),
            TimerKind::Exit => {
                let node = self.procs[&id].node;
                self.kill_proc(id);
                let at = self.now + self.d_frac(0.05, 0.5);
                self.schedule(at, Ev::Restart { node });
            }
            TimerKind::Work => self.work_tick(id),
            TimerKind::Poll => {
                if matches!(self.procs[&id].work, Work::Idle) {
                    if let Some(want) = self.procs.get_mut(&id).unwrap().want.take() {
                        self.start_acquire(id, want);
                    }
                }
            }
            TimerKind::Timeout(token) => {
                let p = self.procs.get_mut(&id).unwrap();
                if token == p.renew_token {
                    p.renew_token = 0;
                    match std::mem::replace(&mut p.renew, RenewPhase::Idle) {
                        RenewPhase::Creating(_) | RenewPhase::CreateReread(_) => {
                            self.create_session(id)
                        }
                        _ => self.renew_tick(id),
                    }
                } else if token == p.work_token {
                    p.work_token = 0;
                    if let Work::Acquire(_, want) = std::mem::replace(&mut p.work, Work::Idle) {
                        self.acquire_failed(id, want, None);
                    }
                }
            }
        }
    }

    pub(super) fn on_reply(&mut self, id: u64, token: u64, reply: SimReply) {
        let p = &self.procs[&id];
        if token == p.renew_token {
            self.procs.get_mut(&id).unwrap().renew_token = 0;
            self.on_renew_reply(id, reply);
        } else if token == p.work_token {
            self.procs.get_mut(&id).unwrap().work_token = 0;
            self.on_work_reply(id, reply);
        }
    }

    fn probe_lock(&self, node: usize, instance: &str) -> LockProbe {
        match self.nodes[node].locks.get(instance) {
            None => LockProbe::Missing,
            Some(holder) if self.procs.get(holder).is_some_and(|p| p.alive) => LockProbe::Held,
            Some(_) => LockProbe::Acquired,
        }
    }

    fn identity(&self, node: usize) -> NodeIdentity {
        let n = &self.nodes[node];
        NodeIdentity {
            node: n.name.clone(),
            boot_id: format!("{}-boot{}", n.machine_id, n.boot),
            machine_id: n.machine_id.clone(),
        }
    }

    fn work_tick(&mut self, id: u64) {
        let d = self.cfg.params.duration;
        let next = d.mul_f64(0.1 + 0.4 * self.rng.unit());
        self.after_local(id, next, TimerKind::Work);
        let p = &self.procs[&id];
        if !matches!(p.work, Work::Idle) || p.session.is_none() || p.want.is_some() {
            return;
        }
        if let Some((volume, epoch)) = p.to_release.first().cloned() {
            return self.start_release(id, volume, epoch);
        }
        let roll = self.rng.unit();
        let held: Vec<(String, Epoch)> =
            p.holds.iter().map(|(v, (_, e))| (v.clone(), *e)).collect();
        if roll < 0.45 && !held.is_empty() {
            let (volume, epoch) = held[self.rng.pick(held.len())].clone();
            if roll < 0.30 {
                // Unmount first (the data path stops), then release.
                let p = self.procs.get_mut(&id).unwrap();
                p.holds.remove(&volume);
                p.to_release.push((volume.clone(), epoch));
                p.seen.released.insert(volume.clone(), epoch);
                return self.start_release(id, volume, epoch);
            }
            self.procs.get_mut(&id).unwrap().work = Work::Check {
                volume: volume.clone(),
                epoch,
            };
            return self.request(id, false, SimOp::Flow(StoreOp::GetClaim(volume)));
        }
        let volume = format!("vol{}", self.rng.pick(self.cfg.volumes));
        let pod = format!("pod-{}-{}", p.node, self.rng.pick(2));
        let wait_until = self
            .rng
            .chance(0.5)
            .then(|| self.local_now(id) + self.cfg.params.takeover_wait() * 2);
        self.start_acquire(
            id,
            Want {
                volume,
                pod,
                wait_until,
                races: 0,
            },
        );
    }

    fn start_acquire(&mut self, id: u64, want: Want) {
        let now = self.local_now(id);
        let p = &self.procs[&id];
        if now >= p.deadline {
            return self.acquire_failed(id, want, None);
        }
        let me = Holder {
            node: self.nodes[p.node].name.clone(),
            pod_uid: want.pod.clone(),
            instance: p.instance.clone(),
            pod: None,
        };
        let (attempt, step) = AcquireAttempt::new(&want.volume, me, self.cfg.params);
        self.drive_acquire(id, Box::new(attempt), want, step);
    }

    fn drive_acquire(
        &mut self,
        id: u64,
        mut attempt: Box<AcquireAttempt>,
        want: Want,
        mut step: Step,
    ) {
        loop {
            match step {
                Step::Do(StoreOp::DeleteSession(..))
                    if self.cfg.weakness == Weakness::NoSessionExpiry =>
                {
                    // Weakened: pretend the timed session version was deleted.
                    let now = self.local_now(id);
                    let p = self.procs.get_mut(&id).unwrap();
                    step = attempt.on_reply(StoreReply::Deleted, now, &mut p.seen);
                }
                Step::Do(op) => {
                    self.procs.get_mut(&id).unwrap().work = Work::Acquire(attempt, want);
                    return self.request(id, false, SimOp::Flow(op));
                }
                Step::Done(AttemptEnd::Granted(grant)) => {
                    let p = self.procs.get_mut(&id).unwrap();
                    p.holds
                        .insert(grant.volume_id.clone(), (want.pod, grant.epoch));
                    return record_grant(self, &grant.volume_id, grant.epoch, &grant.holder);
                }
                Step::Done(AttemptEnd::Raced) if want.races < 16 => {
                    return self.start_acquire(
                        id,
                        Want {
                            races: want.races + 1,
                            ..want
                        },
                    );
                }
                Step::Done(AttemptEnd::Raced) => return,
                Step::Done(AttemptEnd::Failed(err)) => {
                    return self.acquire_failed(id, want, Some(err))
                }
            }
        }
    }

    /// A refused or failed attempt: in wait mode, poll again until the wait ends.
    fn acquire_failed(&mut self, id: u64, want: Want, err: Option<LeaseError>) {
        let now = self.local_now(id);
        let retry = match err {
            None | Some(LeaseError::Store(_)) => None,
            Some(LeaseError::Held { expires_in, .. }) => expires_in,
            Some(_) => return,
        };
        let Some(until) = want.wait_until.filter(|t| now < *t) else {
            return;
        };
        let poll = (self.cfg.params.duration / 20)
            .min(retry.unwrap_or(Duration::MAX))
            .min(until.since(now));
        self.procs.get_mut(&id).unwrap().want = Some(want);
        self.after_local(id, poll.max(Duration::from_millis(1)), TimerKind::Poll);
    }

    fn start_release(&mut self, id: u64, volume: String, epoch: Epoch) {
        self.procs.get_mut(&id).unwrap().work = Work::ReleaseRead {
            volume: volume.clone(),
            epoch,
        };
        self.request(id, false, SimOp::Flow(StoreOp::GetClaim(volume)));
    }

    fn on_work_reply(&mut self, id: u64, reply: SimReply) {
        let now = self.local_now(id);
        let key = self.key_of(id);
        let weakness = self.cfg.weakness;
        let work = std::mem::replace(&mut self.procs.get_mut(&id).unwrap().work, Work::Idle);
        match (work, reply) {
            (Work::Acquire(mut attempt, want), SimReply::Flow(reply)) => {
                if let (Weakness::TrustHolderClock, StoreReply::Session(Some(s))) =
                    (weakness, &reply)
                {
                    // Weakened: time the session from the holder's own clock reading.
                    let holder = s.value.key();
                    if let Some(stamp) = self.store.renew_stamp(&holder, &s.version) {
                        let seen = &mut self.procs.get_mut(&id).unwrap().seen.sessions;
                        seen.observe(&holder, None, now);
                        seen.observe(&holder, Some(&s.version), stamp);
                    }
                }
                if matches!(reply, StoreReply::Deleted) {
                    self.outcome.takeovers_by_timeout += 1;
                }
                let p = self.procs.get_mut(&id).unwrap();
                let step = attempt.on_reply(reply, now, &mut p.seen);
                self.drive_acquire(id, attempt, want, step);
            }
            (Work::Listing, SimReply::Sessions(sessions)) => {
                let node = self.procs[&id].node;
                let me = self.identity(node);
                self.outcome.predecessors_seen += sessions.len().saturating_sub(1) as u64;
                let dead: Vec<(SessionKey, Version)> = sessions
                    .into_iter()
                    .filter(|s| s.value.instance != key.instance)
                    .filter(|s| {
                        let probe = match weakness {
                            // Weakened: every same-boot predecessor presumed dead.
                            Weakness::NoNodeLock => LockProbe::Acquired,
                            _ => self.probe_lock(node, &s.value.instance),
                        };
                        predecessor_fate(&me, &s.value, probe).is_some()
                    })
                    .map(|s| (s.value.key(), s.version))
                    .collect();
                if !dead.is_empty() {
                    self.procs.get_mut(&id).unwrap().work = Work::ListingClaims(dead);
                    self.request(id, false, SimOp::ListClaims);
                }
            }
            (Work::ListingClaims(dead), SimReply::Claims(claims)) => {
                let mut ops = Vec::new();
                for (session, _) in &dead {
                    for c in claims.iter().filter(|c| c.value.state == ClaimState::Held) {
                        if let Some(released) =
                            decide_release(Some(&c.value), session, c.value.epoch)
                        {
                            ops.push(SimOp::Flow(StoreOp::PutClaim(
                                released,
                                Some(c.version.clone()),
                            )));
                        }
                    }
                }
                let node = self.procs[&id].node;
                self.outcome.predecessors_freed += dead.len() as u64;
                for (session, version) in dead {
                    self.nodes[node].locks.remove(&session.instance);
                    ops.push(SimOp::Flow(StoreOp::DeleteSession(session, version)));
                }
                ops.reverse();
                self.next_cleaning(id, ops);
            }
            (Work::Cleaning(ops), _) => self.next_cleaning(id, ops),
            (Work::ReleaseRead { volume, epoch }, SimReply::Flow(StoreReply::Claim(current))) => {
                let claim = current.as_ref().map(|c| &c.value);
                let released = if weakness == Weakness::UnconditionalRelease {
                    claim
                        .filter(|c| c.state == ClaimState::Held)
                        .map(|c| ClaimRecord {
                            state: ClaimState::Released,
                            ..c.clone()
                        })
                } else {
                    decide_release(claim, &key, epoch)
                };
                match (released, current) {
                    (Some(rec), Some(cur)) => {
                        self.procs.get_mut(&id).unwrap().work =
                            Work::ReleaseWrite { volume, epoch };
                        self.request(
                            id,
                            false,
                            SimOp::Flow(StoreOp::PutClaim(rec, Some(cur.version))),
                        );
                    }
                    _ => self.release_done(id, &volume, epoch),
                }
            }
            (Work::ReleaseWrite { volume, epoch }, SimReply::Flow(StoreReply::Put(_))) => {
                self.release_done(id, &volume, epoch)
            }
            (
                Work::ReleaseWrite { volume, epoch },
                SimReply::Flow(StoreReply::Failed(StoreError::Conflict { .. })),
            ) => self.start_release(id, volume, epoch),
            (Work::Check { volume, epoch }, SimReply::Flow(StoreReply::Claim(current))) => {
                let status = claim_status_of(current.as_ref().map(|c| &c.value), &key, epoch);
                if status != Ok(ClaimStatus::Held) {
                    // The claim was lost: fence this volume's data path.
                    let p = self.procs.get_mut(&id).unwrap();
                    if p.holds.get(&volume).is_some_and(|h| h.1 == epoch) {
                        p.holds.remove(&volume);
                    }
                }
            }
            _ => {}
        }
    }

    fn next_cleaning(&mut self, id: u64, mut ops: Vec<SimOp>) {
        if let Some(op) = ops.pop() {
            self.procs.get_mut(&id).unwrap().work = Work::Cleaning(ops);
            self.request(id, false, op);
        }
    }

    fn release_done(&mut self, id: u64, volume: &str, epoch: Epoch) {
        let p = self.procs.get_mut(&id).unwrap();
        p.to_release.retain(|(v, e)| !(v == volume && *e == epoch));
    }
}
