//! One test per rule of [`super`]; each fails if its rule is removed.

use super::*;

fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_secs(3), 0.01, Duration::from_millis(300)).unwrap()
}

fn holder(node: &str, pod: &str, instance: &str) -> Holder {
    Holder {
        node: node.into(),
        pod_uid: pod.into(),
        instance: instance.into(),
        pod: None,
    }
}

fn claim(h: Holder, state: ClaimState, epoch: Epoch) -> ClaimRecord {
    ClaimRecord {
        volume_id: "vol".into(),
        holder: h,
        state,
        epoch,
        expired: None,
    }
}

fn at(ms: u64) -> Mono {
    Mono(Duration::from_millis(ms))
}

fn v(s: &str) -> Version {
    Version(s.into())
}

fn me() -> Holder {
    holder("b", "pod-b", "ib")
}

fn decide(c: Option<&ClaimRecord>, view: &SessionView, fenced: bool, now: Mono) -> AcquireDecision {
    let me = me();
    let input = AcquireInput {
        volume_id: "vol",
        claim: c,
        holder_session: view,
        holder_node_fenced: fenced,
        me: &me,
        high_water: None,
        released: None,
        now,
    };
    decide_acquire(&input, &params())
}

fn taken(d: AcquireDecision) -> (ClaimRecord, TakeReason) {
    match d {
        AcquireDecision::Take { claim, reason } => (claim, reason),
        other => panic!("expected Take, got {other:?}"),
    }
}

#[test]
fn free_claim_is_taken_at_epoch_one_or_above_the_high_water_mark() {
    let (c, reason) = taken(decide(None, &SessionView::Absent, false, at(0)));
    assert_eq!(
        (c.epoch, c.state, reason),
        (1, ClaimState::Held, TakeReason::Free)
    );
    assert_eq!((c.volume_id.as_str(), c.holder), ("vol", me()));
    let me = me();
    let input = AcquireInput {
        volume_id: "vol",
        claim: None,
        holder_session: &SessionView::Absent,
        holder_node_fenced: false,
        me: &me,
        high_water: Some(7),
        released: None,
        now: at(0),
    };
    let d = decide_acquire(&input, &params());
    assert_eq!(taken(d).0.epoch, 8);
}

#[test]
fn released_and_fenced_claims_are_taken_with_a_higher_epoch() {
    let old = holder("a", "pod-a", "ia");
    let live = SessionView::Seen {
        version: v("1"),
        first_seen: at(0),
    };
    for (state, why) in [
        (ClaimState::Released, TakeReason::Released),
        (ClaimState::Fenced, TakeReason::Fenced),
    ] {
        let (c, reason) = taken(decide(
            Some(&claim(old.clone(), state, 4)),
            &live,
            false,
            at(1),
        ));
        assert_eq!((c.epoch, reason), (5, why));
    }
}

#[test]
fn held_claim_is_refused_before_the_window_and_expired_after() {
    let p = params();
    let held = claim(holder("a", "pod-a", "ia"), ClaimState::Held, 3);
    let mut obs = SessionObserver::new();
    let key = held.holder.session();
    let t0 = at(1000);
    let view = obs.observe(&key, Some(&v("9")), t0);
    let wait = p.takeover_wait();
    let just_before = t0 + wait - Duration::from_nanos(1);
    let view_later = obs.observe(&key, Some(&v("9")), just_before);
    assert_eq!(
        view, view_later,
        "an unchanged version keeps its first-seen time"
    );
    match decide(Some(&held), &view_later, false, just_before) {
        AcquireDecision::Refuse { holder, expires_in } => {
            assert_eq!(holder, held.holder);
            assert_eq!(expires_in, Some(Duration::from_nanos(1)));
        }
        other => panic!("taken before the window closed: {other:?}"),
    }
    assert_eq!(
        decide(Some(&held), &view, false, t0 + wait),
        AcquireDecision::ExpireSession {
            session: key,
            version: v("9")
        }
    );
}

#[test]
fn a_new_session_version_restarts_the_timer() {
    let held = claim(holder("a", "pod-a", "ia"), ClaimState::Held, 3);
    let key = held.holder.session();
    let mut obs = SessionObserver::new();
    obs.observe(&key, Some(&v("1")), at(0));
    let later = at(0) + params().takeover_wait();
    let view = obs.observe(&key, Some(&v("2")), later);
    assert_eq!(
        view,
        SessionView::Seen {
            version: v("2"),
            first_seen: later
        }
    );
    assert!(matches!(
        decide(Some(&held), &view, false, later),
        AcquireDecision::Refuse { .. }
    ));
}

#[test]
fn a_restarted_observer_starts_every_timer_afresh() {
    let key = holder("a", "pod-a", "ia").session();
    let mut before = SessionObserver::new();
    before.observe(&key, Some(&v("1")), at(0));
    let mut after_restart = SessionObserver::new();
    let view = after_restart.observe(&key, Some(&v("1")), at(50_000));
    assert_eq!(
        view,
        SessionView::Seen {
            version: v("1"),
            first_seen: at(50_000)
        }
    );
}

#[test]
fn same_pod_through_an_older_live_session_waits_for_that_session() {
    let mine_old = claim(holder("b", "pod-b", "old-instance"), ClaimState::Held, 2);
    let live = SessionView::Seen {
        version: v("1"),
        first_seen: at(0),
    };
    assert!(matches!(
        decide(Some(&mine_old), &live, false, at(1)),
        AcquireDecision::Refuse { .. }
    ));
    let (c, reason) = taken(decide(Some(&mine_old), &SessionView::Absent, false, at(1)));
    assert_eq!(
        (c.epoch, c.holder, reason),
        (3, me(), TakeReason::HolderSessionGone)
    );
    let mine = claim(me(), ClaimState::Held, 2);
    assert_eq!(
        decide(Some(&mine), &live, false, at(1)),
        AcquireDecision::AlreadyHeld { epoch: 2 }
    );
}

#[test]
fn same_pod_uid_on_another_node_is_a_conflict() {
    let elsewhere = claim(holder("a", "pod-b", "ia"), ClaimState::Held, 2);
    let live = SessionView::Seen {
        version: v("1"),
        first_seen: at(0),
    };
    assert!(matches!(
        decide(Some(&elsewhere), &live, false, at(1)),
        AcquireDecision::Refuse { .. }
    ));
}

#[test]
fn a_fenced_holder_node_frees_the_claim_at_once() {
    let held = claim(holder("a", "pod-a", "ia"), ClaimState::Held, 2);
    let live = SessionView::Seen {
        version: v("1"),
        first_seen: at(0),
    };
    let (c, reason) = taken(decide(Some(&held), &live, true, at(1)));
    assert_eq!((c.epoch, reason), (3, TakeReason::HolderNodeFenced));
    assert!(matches!(
        decide(Some(&held), &live, false, at(1)),
        AcquireDecision::Refuse { .. }
    ));
}

#[test]
fn an_absent_holder_session_frees_the_claim() {
    let held = claim(holder("a", "pod-a", "ia"), ClaimState::Held, 2);
    let (c, reason) = taken(decide(Some(&held), &SessionView::Absent, false, at(1)));
    assert_eq!((c.epoch, reason), (3, TakeReason::HolderSessionGone));
}

#[test]
fn another_pod_on_our_own_session_never_times_out() {
    let neighbour = claim(holder("b", "pod-x", "ib"), ClaimState::Held, 2);
    let ancient = SessionView::Seen {
        version: v("1"),
        first_seen: at(0),
    };
    assert_eq!(
        decide(Some(&neighbour), &ancient, false, at(10_000_000)),
        AcquireDecision::Refuse {
            holder: neighbour.holder.clone(),
            expires_in: None
        }
    );
}

#[test]
fn a_stored_epoch_below_the_high_water_mark_is_reported_not_taken() {
    let released = claim(holder("a", "pod-a", "ia"), ClaimState::Released, 4);
    let me = me();
    let input = AcquireInput {
        volume_id: "vol",
        claim: Some(&released),
        holder_session: &SessionView::Absent,
        holder_node_fenced: false,
        me: &me,
        high_water: Some(6),
        released: None,
        now: at(0),
    };
    let d = decide_acquire(&input, &params());
    assert_eq!(d, AcquireDecision::Regressed { seen: 6, stored: 4 });
    let mut obs = Observations::default();
    assert_eq!(obs.see_epoch("vol", 6), Ok(()));
    assert_eq!(obs.see_epoch("vol", 4), Err(6));
    assert_eq!(obs.high_water("vol"), Some(6));
}

#[test]
fn release_needs_the_exact_holder_and_epoch() {
    let h = holder("a", "pod-a", "ia");
    let held = claim(h.clone(), ClaimState::Held, 5);
    let released = decide_release(Some(&held), &h.session(), 5).unwrap();
    assert_eq!((released.state, released.epoch), (ClaimState::Released, 5));
    assert_eq!(
        decide_release(Some(&held), &h.session(), 4),
        None,
        "late release with an old epoch"
    );
    assert_eq!(
        decide_release(Some(&held), &me().session(), 5),
        None,
        "release by another holder"
    );
    assert_eq!(decide_release(Some(&released), &h.session(), 5), None);
    assert_eq!(decide_release(None, &h.session(), 5), None);
}

#[test]
fn fence_bumps_the_epoch_of_that_nodes_held_claims_only() {
    let held = claim(holder("a", "pod-a", "ia"), ClaimState::Held, 5);
    let fenced = decide_fence(&held, "a").unwrap();
    assert_eq!((fenced.state, fenced.epoch), (ClaimState::Fenced, 6));
    assert_eq!(decide_fence(&held, "b"), None);
    assert_eq!(decide_fence(&fenced, "a"), None);
}

#[test]
fn claim_status_tells_held_released_fenced_superseded_and_regressed() {
    let h = holder("a", "pod-a", "ia");
    let s = h.session();
    let held = claim(h.clone(), ClaimState::Held, 5);
    assert_eq!(claim_status_of(Some(&held), &s, 5), Ok(ClaimStatus::Held));
    assert_eq!(
        claim_status_of(Some(&claim(h.clone(), ClaimState::Released, 5)), &s, 5),
        Ok(ClaimStatus::Released)
    );
    assert_eq!(
        claim_status_of(Some(&decide_fence(&held, "a").unwrap()), &s, 5),
        Ok(ClaimStatus::Fenced)
    );
    let taken_over = claim(me(), ClaimState::Held, 6);
    assert_eq!(
        claim_status_of(Some(&taken_over), &s, 5),
        Ok(ClaimStatus::Superseded {
            holder: me(),
            epoch: 6
        })
    );
    assert_eq!(claim_status_of(Some(&held), &s, 7), Err(5));
    assert_eq!(claim_status_of(None, &s, 5), Ok(ClaimStatus::Missing));
}

#[test]
fn reacquire_after_own_release_never_reuses_the_released_epoch() {
    let mine = claim(me(), ClaimState::Held, 2);
    let live = SessionView::Seen {
        version: v("1"),
        first_seen: at(0),
    };
    let me = me();
    let mut input = AcquireInput {
        volume_id: "vol",
        claim: Some(&mine),
        holder_session: &live,
        holder_node_fenced: false,
        me: &me,
        high_water: None,
        released: Some(2),
        now: at(1),
    };
    // A release of epoch 2 may still land: the new grant must be epoch 3.
    let (c, reason) = taken(decide_acquire(&input, &params()));
    assert_eq!((c.epoch, reason), (3, TakeReason::Reacquired));
    input.released = Some(1);
    assert_eq!(
        decide_acquire(&input, &params()),
        AcquireDecision::AlreadyHeld { epoch: 2 }
    );
}
