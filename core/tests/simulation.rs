//! Deterministic simulation of the lease protocol (see `holdfast_core::sim`).
//!
//! - `HOLDFAST_SIM_SEED=1234 cargo test -p holdfast-core --test simulation` replays one
//!   schedule (printing its outcome);
//! - `HOLDFAST_SIM_SEEDS=20000` runs more schedules than the default.

use std::time::Instant;

use holdfast_core::sim::{run, SimConfig, Weakness};

const DEFAULT_SEEDS: u64 = 2000;

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("HOLDFAST_SIM_SEED") {
        return vec![seed.parse().expect("HOLDFAST_SIM_SEED must be a number")];
    }
    let count = std::env::var("HOLDFAST_SIM_SEEDS")
        .ok()
        .map(|n| n.parse().expect("HOLDFAST_SIM_SEEDS must be a number"))
        .unwrap_or(DEFAULT_SEEDS);
    (0..count).collect()
}

/// The protocol as built keeps the invariant under every schedule.
#[test]
fn no_schedule_violates_the_invariant() {
    let config = SimConfig::standard();
    let started = Instant::now();
    let (mut events, mut grants, mut takeovers, mut seen, mut freed) = (0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    let seeds = seeds();
    for &seed in &seeds {
        let outcome = run(seed, &config);
        events += outcome.events;
        grants += outcome.grants;
        takeovers += outcome.takeovers_by_timeout;
        seen += outcome.predecessors_seen;
        freed += outcome.predecessors_freed;
        if seeds.len() == 1 {
            println!("seed {seed}: {outcome:?}");
        }
        if let Some(v) = outcome.violation {
            failures.push(format!(
                "seed {seed}: {v}\n  replay: HOLDFAST_SIM_SEED={seed} cargo test -p holdfast-core --test simulation"
            ));
        }
    }
    println!(
        "simulation: {} schedules, {} violations, {events} events, {grants} grants, \
         {takeovers} takeovers by timeout, {freed} of {seen} predecessor sessions proven \
         dead, {:.1}s",
        seeds.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "invariant violated:\n{}",
        failures.join("\n")
    );
    if seeds.len() > 100 {
        // Not vacuous: the schedules exercise grants, timeout takeovers, and both
        // proven-dead and possibly-alive predecessors.
        let n = seeds.len() as u64;
        assert!(
            grants > n && takeovers > n / 10,
            "{grants} grants, {takeovers} takeovers"
        );
        assert!(
            freed > n / 10 && seen > freed,
            "{freed} of {seen} predecessors freed"
        );
    }
}

#[test]
fn the_same_seed_replays_the_same_schedule() {
    let config = SimConfig::standard();
    for seed in [3, 77, 1234] {
        let a = run(seed, &config);
        let b = run(seed, &config);
        assert_eq!(
            (a.events, a.grants, a.violation),
            (b.events, b.grants, b.violation)
        );
    }
}

/// Runs weakened schedules until one violates the invariant; returns that seed.
fn first_violation(weakness: Weakness, budget: u64) -> Option<(u64, String)> {
    let config = SimConfig::weakened(weakness);
    (0..budget).find_map(|seed| run(seed, &config).violation.map(|v| (seed, v)))
}

fn assert_found(weakness: Weakness) {
    match first_violation(weakness, 1000) {
        Some((seed, v)) => println!("{weakness:?}: seed {seed}: {v}"),
        None => panic!("{weakness:?}: the simulation found no violation in 1000 schedules"),
    }
}

#[test]
fn finds_the_violation_when_the_margin_is_zero() {
    assert_found(Weakness::ZeroMargin);
}

#[test]
fn finds_the_violation_when_trusting_the_holders_clock() {
    assert_found(Weakness::TrustHolderClock);
}

#[test]
fn finds_the_violation_when_release_is_unconditional() {
    assert_found(Weakness::UnconditionalRelease);
}

#[test]
fn finds_the_violation_when_a_timeout_takeover_keeps_the_session() {
    assert_found(Weakness::NoSessionExpiry);
}

#[test]
fn finds_the_violation_when_a_live_predecessor_is_presumed_dead() {
    assert_found(Weakness::NoNodeLock);
}

#[test]
fn finds_the_violation_when_the_deadline_counts_from_the_reply() {
    assert_found(Weakness::DeadlineFromReply);
}
