//! The simulated world: real time, per-node clocks, the network, the store, the event
//! queue and the fault schedule. Plugin processes live in [`super::proc`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use crate::clock::Mono;
use crate::lease::flow::StoreReply;
use crate::lease::{Epoch, Holder};
use crate::store::StoreError;

use super::proc::Proc;
use super::rng::SimRng;
use super::store::{SimOp, SimReply, SimStore};
use super::{checker, SimConfig, SimOutcome};

/// Simulated real time, in microseconds.
pub(super) type Real = u64;

/// One boot's CLOCK_BOOTTIME: starts at a random reading and runs at a rate within
/// [1 − ε, 1 + ε] of real time, which drifts now and then (piecewise constant).
pub(super) struct Clock {
    pub rate: f64,
    /// The reading at real time `boot_at` (the boot, or the last rate change).
    pub offset_ns: u64,
    pub boot_at: Real,
}

impl Clock {
    pub fn local(&self, real: Real) -> Mono {
        let elapsed_ns = (real - self.boot_at) as f64 * 1000.0 * self.rate;
        Mono::from_nanos(self.offset_ns + elapsed_ns as u64)
    }

    /// Changes the rate from `now` on, keeping the reading continuous.
    pub fn drift(&mut self, now: Real, rate: f64) {
        self.offset_ns = self.local(now).as_nanos();
        self.boot_at = now;
        self.rate = rate;
    }

    /// The real time this clock takes to advance by `local` at its current rate.
    pub fn real_for(&self, local: Duration) -> Real {
        (local.as_nanos() as f64 / self.rate / 1000.0).ceil() as Real
    }
}

pub(super) struct Node {
    pub name: String,
    pub machine_id: String,
    pub boot: u32,
    pub clock: Clock,
    pub up: bool,
    pub partitioned_until: Real,
    /// Lock files in the node's state dir: instance → the process that created it.
    /// The flock is held exactly while that process is alive.
    pub locks: BTreeMap<String, u64>,
    pub fenced: bool,
}

pub(super) enum TimerKind {
    Renew,
    Work,
    Poll,
    /// The old instance of a rolling update exits.
    Exit,
    Timeout(u64),
}

pub(super) enum Ev {
    AtStore {
        node: usize,
        proc: u64,
        token: u64,
        op: SimOp,
    },
    AtProc {
        proc: u64,
        token: u64,
        reply: SimReply,
    },
    Timer {
        proc: u64,
        kind: TimerKind,
    },
    Fault,
    Boot {
        node: usize,
    },
    Restart {
        node: usize,
    },
}

pub(super) struct World {
    pub cfg: SimConfig,
    pub rng: SimRng,
    pub now: Real,
    pub d_real: Real,
    seq: u64,
    queue: BinaryHeap<Reverse<(Real, u64)>>,
    events: BTreeMap<u64, Ev>,
    pub store: SimStore,
    pub store_down_until: Real,
    pub nodes: Vec<Node>,
    pub procs: BTreeMap<u64, Proc>,
    pub next_id: u64,
    pub outcome: SimOutcome,
    /// (volume, epoch) → holder granted it: an epoch is never granted twice.
    pub granted: BTreeMap<(String, Epoch), Holder>,
}

impl World {
    pub fn new(seed: u64, cfg: SimConfig) -> Self {
        let d_real = cfg.params.duration.as_micros() as Real;
        let nodes = (0..cfg.nodes)
            .map(|i| Node {
                name: format!("node{i}"),
                machine_id: format!("machine{i}"),
                boot: 0,
                clock: Clock {
                    rate: 1.0,
                    offset_ns: 0,
                    boot_at: 0,
                },
                up: false,
                partitioned_until: 0,
                locks: BTreeMap::new(),
                fenced: false,
            })
            .collect();
        World {
            cfg,
            rng: SimRng::new(seed),
            now: 0,
            d_real,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            store: SimStore::default(),
            store_down_until: 0,
            nodes,
            procs: BTreeMap::new(),
            next_id: 1,
            outcome: SimOutcome::default(),
            granted: BTreeMap::new(),
        }
    }

    pub fn schedule(&mut self, at: Real, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// A fraction `lo..=hi` of D, in real microseconds.
    pub fn d_frac(&mut self, lo: f64, hi: f64) -> Real {
        let d = self.d_real as f64;
        self.rng.range((d * lo) as Real, (d * hi) as Real)
    }

    pub fn run(mut self) -> SimOutcome {
        for node in 0..self.nodes.len() {
            let at = self.d_frac(0.0, 0.2);
            self.schedule(at, Ev::Boot { node });
        }
        let first_fault = self.d_frac(0.5, 1.5);
        self.schedule(first_fault, Ev::Fault);
        let horizon = self.d_real * self.cfg.horizon as Real;
        while let Some(Reverse((at, seq))) = self.queue.pop() {
            if at > horizon {
                break;
            }
            self.now = at;
            let ev = self.events.remove(&seq).expect("queued event");
            self.outcome.events += 1;
            self.handle(ev);
            if let Some(v) = checker::check(&self) {
                self.outcome.violation = Some(format!("at {:.3}s: {v}", self.now as f64 / 1e6));
                break;
            }
            if self.outcome.violation.is_some() {
                break;
            }
        }
        self.outcome
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::AtStore {
                node,
                proc,
                token,
                op,
            } => self.at_store(node, proc, token, op),
            Ev::AtProc { proc, token, reply } => {
                let Some(p) = self.procs.get(&proc).filter(|p| p.alive) else {
                    return;
                };
                if self.partitioned(p.node) {
                    return;
                }
                if p.paused_until > self.now {
                    let wake = p.paused_until;
                    self.schedule(wake, Ev::AtProc { proc, token, reply });
                    return;
                }
                self.on_reply(proc, token, reply);
            }
            Ev::Timer { proc, kind } => {
                let Some(p) = self.procs.get(&proc).filter(|p| p.alive) else {
                    return;
                };
                if p.paused_until > self.now {
                    let wake = p.paused_until;
                    self.schedule(wake, Ev::Timer { proc, kind });
                    return;
                }
                self.on_timer(proc, kind);
            }
            Ev::Fault => self.fault(),
            Ev::Boot { node } => self.boot(node),
            Ev::Restart { node } => {
                if self.nodes[node].up && !self.procs.values().any(|p| p.alive && p.node == node) {
                    self.start_proc(node);
                }
            }
        }
    }

    pub fn partitioned(&self, node: usize) -> bool {
        self.nodes[node].partitioned_until > self.now
    }

    /// Mostly short delays, sometimes long ones (up to D/2).
    pub fn delay(&mut self) -> Real {
        if self.rng.chance(0.05) {
            self.d_frac(0.0, 0.5)
        } else {
            self.d_frac(0.0, 0.01)
        }
    }

    /// Sends `op` from `proc` to the store (maybe lost on the way).
    pub fn send(&mut self, proc: u64, token: u64, op: SimOp) {
        let node = self.procs[&proc].node;
        if self.partitioned(node) || self.rng.chance(0.02) {
            return;
        }
        let at = self.now + self.delay();
        self.schedule(
            at,
            Ev::AtStore {
                node,
                proc,
                token,
                op,
            },
        );
    }

    fn at_store(&mut self, node: usize, proc: u64, token: u64, op: SimOp) {
        if self.partitioned(node) {
            return;
        }
        let reply = if self.store_down_until > self.now {
            if self.rng.chance(0.5) {
                return;
            }
            SimReply::Flow(StoreReply::Failed(StoreError::Unavailable(
                "simulated outage".into(),
            )))
        } else {
            self.store.apply(&op)
        };
        if self.rng.chance(0.02) {
            return;
        }
        let at = self.now + self.delay();
        self.schedule(at, Ev::AtProc { proc, token, reply });
    }

    /// A clock rate within the bound, often at its extremes.
    fn pick_rate(&mut self) -> f64 {
        let eps = self.cfg.params.epsilon;
        match self.rng.pick(3) {
            0 => 1.0 - eps,
            1 => 1.0 + eps,
            _ => 1.0 - eps + 2.0 * eps * self.rng.unit(),
        }
    }

    fn boot(&mut self, node: usize) {
        let rate = self.pick_rate();
        let offset_ns = self.rng.range(0, self.d_real * 10 * 1000);
        let n = &mut self.nodes[node];
        n.boot += 1;
        n.up = true;
        n.clock = Clock {
            rate,
            offset_ns,
            boot_at: self.now,
        };
        self.start_proc(node);
    }

    pub fn kill_proc(&mut self, id: u64) {
        if let Some(p) = self.procs.get_mut(&id) {
            p.alive = false;
            // The data path (FUSE) dies with the process.
            p.holds.clear();
        }
    }

    fn fault(&mut self) {
        let next = self.now + self.d_frac(0.3, 1.5);
        self.schedule(next, Ev::Fault);
        let alive: Vec<u64> = self
            .procs
            .values()
            .filter(|p| p.alive)
            .map(|p| p.id)
            .collect();
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].up)
            .collect();
        let roll = self.rng.unit();
        if roll < 0.25 && !alive.is_empty() {
            let id = alive[self.rng.pick(alive.len())];
            let until = self.now + self.d_frac(0.1, 3.0);
            self.procs.get_mut(&id).unwrap().paused_until = until;
        } else if roll < 0.40 && !alive.is_empty() {
            let id = alive[self.rng.pick(alive.len())];
            let node = self.procs[&id].node;
            self.kill_proc(id);
            let at = self.now + self.d_frac(0.05, 1.0);
            self.schedule(at, Ev::Restart { node });
        } else if roll < 0.55 && !up.is_empty() {
            let node = up[self.rng.pick(up.len())];
            let ids: Vec<u64> = alive
                .iter()
                .copied()
                .filter(|id| self.procs[id].node == node)
                .collect();
            for id in ids {
                self.kill_proc(id);
            }
            self.nodes[node].up = false;
            // An admin may fence a node only once it is powered off.
            if self.rng.chance(0.4) {
                let name = self.nodes[node].name.clone();
                self.store.fence_node(&name);
                self.nodes[node].fenced = true;
            }
            let at = self.now + self.d_frac(0.1, 2.0);
            self.schedule(at, Ev::Boot { node });
        } else if roll < 0.75 {
            let node = self.rng.pick(self.nodes.len());
            self.nodes[node].partitioned_until = self.now + self.d_frac(0.2, 3.0);
        } else if roll < 0.80 {
            let node = self.rng.pick(self.nodes.len());
            let rate = self.pick_rate();
            self.nodes[node].clock.drift(self.now, rate);
        } else if roll < 0.88 {
            self.store_down_until = self.now + self.d_frac(0.1, 2.0);
        } else if roll < 0.96 && !alive.is_empty() {
            // A rolling update: a new instance starts beside the old one, which keeps
            // its claims until it exits a little later.
            let id = alive[self.rng.pick(alive.len())];
            let node = self.procs[&id].node;
            if alive.iter().filter(|p| self.procs[p].node == node).count() == 1 {
                self.start_proc(node);
                let exit = self.nodes[node]
                    .clock
                    .real_for(self.cfg.params.duration.mul_f64(0.1 + self.rng.unit()));
                self.schedule(
                    self.now + exit,
                    Ev::Timer {
                        proc: id,
                        kind: TimerKind::Exit,
                    },
                );
            }
        } else if let Some(&node) = up.iter().find(|&&n| self.nodes[n].fenced) {
            let name = self.nodes[node].name.clone();
            self.store.unfence_node(&name);
            self.nodes[node].fenced = false;
        }
    }
}
