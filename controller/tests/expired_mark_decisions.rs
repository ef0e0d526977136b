//! The expired mark is for people only: every decision of the lease protocol — the
//! node's acquire, the controller's attach gate, release, fence, and a holder's view of
//! its own claim — is the same with and without it, over every claim state, holder,
//! session view, node fence and epoch high-water mark.

use std::time::Duration;

use holdfast_core::clock::Mono;
use holdfast_core::lease::decide::{
    claim_status_of, decide_acquire, decide_fence, decide_release, AcquireDecision, AcquireInput,
};
use holdfast_core::lease::types::ExpiredMark;
use holdfast_core::lease::{
    decide_attach, AttachInput, ClaimRecord, ClaimState, Holder, LeaseParams, SessionView,
};
use holdfast_core::store::Version;

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

fn mark() -> ExpiredMark {
    ExpiredMark {
        at_unix_ms: 1_795_689_601_000,
        observed_by: "controller-0".into(),
        session_renewals: 7,
    }
}

fn without_mark(claim: Option<ClaimRecord>) -> Option<ClaimRecord> {
    claim.map(|c| ClaimRecord { expired: None, ..c })
}

#[test]
fn every_decision_is_the_same_with_and_without_the_mark() {
    let p = params();
    let now = Mono(Duration::from_secs(100));
    let views = [
        SessionView::Absent,
        // Seen just now, half of W ago, and longer than W ago.
        SessionView::Seen {
            version: Version("v1".into()),
            first_seen: now,
        },
        SessionView::Seen {
            version: Version("v1".into()),
            first_seen: Mono(now.0 - p.takeover_wait() / 2),
        },
        SessionView::Seen {
            version: Version("v1".into()),
            first_seen: Mono(now.0 - p.takeover_wait() * 2),
        },
    ];
    let holders = [
        holder("n1", "pod-a", "i1"),
        holder("n1", "pod-b", "i1"),
        holder("n1", "pod-a", "i0"),
        holder("n2", "pod-c", "i2"),
    ];
    let me = holder("n1", "pod-a", "i1");
    let mut cases = 0;
    for state in [ClaimState::Held, ClaimState::Released, ClaimState::Fenced] {
        for h in &holders {
            for epoch in [1, 5] {
                let plain = ClaimRecord {
                    volume_id: "vol".into(),
                    holder: h.clone(),
                    state,
                    epoch,
                    expired: None,
                };
                let marked = ClaimRecord {
                    expired: Some(mark()),
                    ..plain.clone()
                };
                for view in &views {
                    for fenced in [false, true] {
                        for high_water in [None, Some(1), Some(5), Some(9)] {
                            for released in [None, Some(epoch)] {
                                let acquire = |claim: &ClaimRecord| {
                                    decide_acquire(
                                        &AcquireInput {
                                            volume_id: "vol",
                                            claim: Some(claim),
                                            holder_session: view,
                                            holder_node_fenced: fenced,
                                            me: &me,
                                            high_water,
                                            released,
                                            now,
                                        },
                                        &p,
                                    )
                                };
                                let a = acquire(&plain);
                                let b = acquire(&marked);
                                assert_eq!(a, b, "acquire of {marked:?}");
                                if let AcquireDecision::Take { claim, .. } = b {
                                    assert_eq!(claim.expired, None, "a new holder carries no mark");
                                }
                                cases += 1;
                            }
                            for node in ["n1", "n2", "n3", ""] {
                                let attach = |claim: &ClaimRecord| {
                                    decide_attach(
                                        &AttachInput {
                                            volume_id: "vol",
                                            node,
                                            claim: Some(claim),
                                            holder_session: view,
                                            holder_node_fenced: fenced,
                                            high_water,
                                            now,
                                        },
                                        &p,
                                    )
                                };
                                assert_eq!(attach(&plain), attach(&marked), "attach of {marked:?}");
                                cases += 1;
                            }
                        }
                    }
                }
                for session in holders.iter().map(Holder::session) {
                    for e in [epoch - 1, epoch, epoch + 1] {
                        assert_eq!(
                            decide_release(Some(&plain), &session, e),
                            without_mark(decide_release(Some(&marked), &session, e)),
                        );
                        assert_eq!(
                            claim_status_of(Some(&plain), &session, e),
                            claim_status_of(Some(&marked), &session, e),
                        );
                        cases += 2;
                    }
                }
                for node in ["n1", "n2"] {
                    assert_eq!(
                        decide_fence(&plain, node),
                        without_mark(decide_fence(&marked, node)),
                    );
                    cases += 1;
                }
            }
        }
    }
    println!("{cases} decisions compared");
}
