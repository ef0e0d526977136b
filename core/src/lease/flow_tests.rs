//! The attempt's order of operations, fed scripted replies.

use super::*;
use std::time::Duration;

fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_secs(3), 0.01, Duration::from_millis(300)).unwrap()
}

fn me() -> Holder {
    Holder {
        node: "b".into(),
        pod_uid: "pod-b".into(),
        instance: "ib".into(),
        pod: None,
    }
}

fn other() -> Holder {
    Holder {
        node: "a".into(),
        pod_uid: "pod-a".into(),
        instance: "ia".into(),
        pod: None,
    }
}

fn held_by_other() -> Versioned<ClaimRecord> {
    Versioned {
        value: ClaimRecord {
            volume_id: "vol".into(),
            holder: other(),
            state: ClaimState::Held,
            epoch: 4,
            expired: None,
        },
        version: Version("c1".into()),
    }
}

fn session_of_other() -> Versioned<SessionRecord> {
    Versioned {
        value: SessionRecord {
            node: "a".into(),
            instance: "ia".into(),
            boot_id: "b".into(),
            machine_id: "m".into(),
            duration_ms: 3000,
            renewals: 1,
        },
        version: Version("s1".into()),
    }
}

fn expect_op(step: Step) -> StoreOp {
    match step {
        Step::Do(op) => op,
        Step::Done(end) => panic!("expected an operation, got {end:?}"),
    }
}

/// Runs an attempt against `held_by_other` up to its decision at `now`.
fn run_to_decision(seen: &mut Observations, now: Mono) -> (AcquireAttempt, Step) {
    let (mut a, step) = AcquireAttempt::new("vol", me(), params());
    assert_eq!(expect_op(step), StoreOp::GetFence("b".into()));
    let step = a.on_reply(StoreReply::Fence(None), now, seen);
    assert_eq!(expect_op(step), StoreOp::GetClaim("vol".into()));
    let step = a.on_reply(StoreReply::Claim(Some(held_by_other())), now, seen);
    assert_eq!(expect_op(step), StoreOp::GetSession(other().session()));
    let step = a.on_reply(StoreReply::Session(Some(session_of_other())), now, seen);
    assert_eq!(expect_op(step), StoreOp::GetFence("a".into()));
    let step = a.on_reply(StoreReply::Fence(None), now, seen);
    (a, step)
}

#[test]
fn timeout_takeover_deletes_the_timed_session_version_before_writing() {
    let mut seen = Observations::default();
    let t0 = Mono(Duration::from_secs(100));
    match run_to_decision(&mut seen, t0).1 {
        Step::Done(AttemptEnd::Failed(LeaseError::Held { expires_in, .. })) => {
            assert_eq!(expires_in, Some(params().takeover_wait()))
        }
        other => panic!("{other:?}"),
    }
    let later = t0 + params().takeover_wait();
    let (mut a, step) = run_to_decision(&mut seen, later);
    assert_eq!(
        expect_op(step),
        StoreOp::DeleteSession(other().session(), Version("s1".into()))
    );
    let step = a.on_reply(StoreReply::Deleted, later, &mut seen);
    match expect_op(step) {
        StoreOp::PutClaim(claim, expected) => {
            assert_eq!(
                (claim.holder, claim.epoch, expected),
                (me(), 5, Some(Version("c1".into())))
            );
        }
        other => panic!("{other:?}"),
    }
    match a.on_reply(StoreReply::Put(Version("c2".into())), later, &mut seen) {
        Step::Done(AttemptEnd::Granted(g)) => assert_eq!(g.epoch, 5),
        other => panic!("{other:?}"),
    }
    assert_eq!(seen.high_water("vol"), Some(5));
}

#[test]
fn a_renewal_racing_the_expiry_makes_the_attempt_retry() {
    let mut seen = Observations::default();
    let t0 = Mono(Duration::from_secs(100));
    run_to_decision(&mut seen, t0);
    let later = t0 + params().takeover_wait();
    let (mut a, _) = run_to_decision(&mut seen, later);
    let raced = a.on_reply(
        StoreReply::Failed(StoreError::Conflict { key: "s".into() }),
        later,
        &mut seen,
    );
    assert!(matches!(raced, Step::Done(AttemptEnd::Raced)));
}

#[test]
fn own_node_fenced_refuses_and_outage_is_an_error_not_a_grant() {
    let mut seen = Observations::default();
    let (mut a, _) = AcquireAttempt::new("vol", me(), params());
    let fence = Versioned {
        value: NodeFence {
            node: "b".into(),
            reason: "taint".into(),
        },
        version: Version("f".into()),
    };
    assert!(matches!(
        a.on_reply(StoreReply::Fence(Some(fence)), Mono::ZERO, &mut seen),
        Step::Done(AttemptEnd::Failed(LeaseError::NodeFenced { .. }))
    ));
    let (mut a, _) = AcquireAttempt::new("vol", me(), params());
    let down = StoreReply::Failed(StoreError::Unavailable("down".into()));
    assert!(matches!(
        a.on_reply(down, Mono::ZERO, &mut seen),
        Step::Done(AttemptEnd::Failed(LeaseError::Store(
            StoreError::Unavailable(_)
        )))
    ));
}
