//! A deterministic simulation of the lease protocol: N nodes, one store, and a seeded
//! schedule of faults — clock-rate drift within ε, message delay and loss, partitions,
//! process pauses longer than D, crashes and restarts, reboots (new boot id), rolling
//! updates (two instances overlapping on one node), store outages, and admin fences of
//! powered-off nodes.
//!
//! The simulated plugins run the real pure protocol: [`crate::lease::flow::AcquireAttempt`]
//! for every acquire, [`crate::lease::session::RenewState`] for renewals,
//! [`crate::lease::decide`] for release, status and fence, and
//! [`crate::lease::session::predecessor_fate`] for recovery. Only the I/O is simulated.
//!
//! After every event a checker asserts the invariant: no two processes both hold an
//! unexpired (by their own deadline on their own clock), unfenced right to write the
//! same volume; and no epoch of a volume is ever granted to two different holders.
//!
//! [`Weakness`] deliberately breaks one rule in the simulation's glue (never in the
//! product code), to show that the checker finds what each rule prevents.

mod checker;
mod proc;
mod renewal;
pub mod rng;
pub mod store;
mod world;

use std::time::Duration;

use crate::lease::LeaseParams;

/// A rule deliberately broken, to show the simulation catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weakness {
    /// The protocol as built.
    None,
    /// Margin 0 (parameters built without validation): the windows can overlap.
    ZeroMargin,
    /// The acquirer times a session from the holder's own clock reading of its renewal
    /// instead of from when it first saw the version.
    TrustHolderClock,
    /// Release frees the claim whoever holds it, at whatever epoch.
    UnconditionalRelease,
    /// A timeout takeover skips deleting the timed session version, so the old holder
    /// can still renew afterwards.
    NoSessionExpiry,
    /// Recovery presumes every same-boot predecessor dead without taking its flock,
    /// so a live old instance (rolling update) loses its claims while still writing.
    NoNodeLock,
    /// The holder counts its window from when the renewal's reply arrived rather than
    /// from when it was sent, so a slow reply stretches the window past the acquirer's.
    DeadlineFromReply,
}

/// One simulation's shape.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub volumes: usize,
    /// Simulated real time, in multiples of D.
    pub horizon: u32,
    pub params: LeaseParams,
    pub weakness: Weakness,
}

impl SimConfig {
    /// Three nodes, three volumes, and tight but valid timing: D = 3 s, clocks off by up
    /// to ±20 %, margin barely above the bound `ε(1+ε)D/2` = 360 ms.
    pub fn standard() -> Self {
        SimConfig {
            nodes: 3,
            volumes: 3,
            horizon: 12,
            params: LeaseParams::new(Duration::from_secs(3), 0.2, Duration::from_millis(400))
                .expect("valid simulation parameters"),
            weakness: Weakness::None,
        }
    }

    pub fn weakened(weakness: Weakness) -> Self {
        let mut config = Self::standard();
        config.weakness = weakness;
        if weakness == Weakness::ZeroMargin {
            let p = config.params;
            config.params = LeaseParams::unchecked(p.duration, p.epsilon, Duration::ZERO);
        }
        config
    }
}

/// What one schedule produced.
#[derive(Clone, Debug, Default)]
pub struct SimOutcome {
    pub events: u64,
    pub grants: u64,
    pub takeovers_by_timeout: u64,
    /// Other sessions of its node a starting instance looked at, and those it proved
    /// dead (reboot or released flock) and freed.
    pub predecessors_seen: u64,
    pub predecessors_freed: u64,
    /// The first invariant violation, described with its time and holders.
    pub violation: Option<String>,
}

/// Runs one schedule. Same seed and config, same run.
pub fn run(seed: u64, config: &SimConfig) -> SimOutcome {
    world::World::new(seed, config.clone()).run()
}
