//! The attach gate's rows, one table; and the proof that each row is the node's own
//! acquire decision for a pod of the attaching node.

use super::*;
use crate::lease::decide::SessionObserver;
use crate::lease::ClaimState;
use crate::store::Version;

fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_secs(3), 0.01, Duration::from_millis(300)).unwrap()
}

fn at(ms: u64) -> Mono {
    Mono(Duration::from_millis(ms))
}

fn holder(node: &str, instance: &str) -> Holder {
    Holder {
        node: node.into(),
        pod_uid: format!("uid-on-{node}"),
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

fn seen(version: &str, first_seen: Mono) -> SessionView {
    SessionView::Seen {
        version: Version(version.into()),
        first_seen,
    }
}

/// One row: what the store shows and what this observer has timed.
struct Row {
    name: &'static str,
    node: &'static str,
    claim: Option<ClaimRecord>,
    session: SessionView,
    fenced: bool,
    high_water: Option<Epoch>,
    now: Mono,
    expect: AttachDecision,
}

impl Row {
    fn decide(&self) -> AttachDecision {
        let input = AttachInput {
            volume_id: "vol",
            node: self.node,
            claim: self.claim.as_ref(),
            holder_session: &self.session,
            holder_node_fenced: self.fenced,
            high_water: self.high_water,
            now: self.now,
        };
        decide_attach(&input, &params())
    }
}

fn rows() -> Vec<Row> {
    let w = params().takeover_wait();
    let t0 = at(10_000);
    let a = holder("n1", "i1");
    let held = claim(a.clone(), ClaimState::Held, 3);
    let refuse = |unrenewed_for: Duration, expires_in: Duration| AttachDecision::Refuse {
        holder: a.clone(),
        epoch: 3,
        unrenewed_for,
        expires_in: Some(expires_in),
    };
    let row = |name, node, claim: Option<&ClaimRecord>, session, fenced, now, expect| Row {
        name,
        node,
        claim: claim.cloned(),
        session,
        fenced,
        high_water: None,
        now,
        expect,
    };
    let grant = AttachDecision::Grant;
    vec![
        row(
            "free: no claim record",
            "n2",
            None,
            SessionView::Absent,
            false,
            t0,
            grant(AttachGrant::Free),
        ),
        row(
            "released by its holder",
            "n2",
            Some(&claim(a.clone(), ClaimState::Released, 3)),
            seen("7", t0),
            false,
            t0,
            grant(AttachGrant::Released),
        ),
        row(
            "fenced by the CLI: the claim marked fenced",
            "n2",
            Some(&claim(a.clone(), ClaimState::Fenced, 4)),
            seen("7", t0),
            true,
            t0,
            grant(AttachGrant::Fenced),
        ),
        row(
            "fenced by the CLI: fence record written, claim not yet marked",
            "n2",
            Some(&held),
            seen("7", t0),
            true,
            t0,
            grant(AttachGrant::HolderNodeFenced),
        ),
        row(
            "same node: held from the node asked for, session live",
            "n1",
            Some(&held),
            seen("7", t0),
            false,
            t0,
            grant(AttachGrant::HeldOnThisNode),
        ),
        row(
            "same node: held through an older plugin instance of that node",
            "n1",
            Some(&claim(holder("n1", "i0"), ClaimState::Held, 3)),
            seen("7", t0),
            false,
            t0 + w / 2,
            grant(AttachGrant::HeldOnThisNode),
        ),
        row(
            "live holder elsewhere, first seen just now (a controller that just started)",
            "n2",
            Some(&held),
            seen("7", t0),
            false,
            t0,
            refuse(Duration::ZERO, w),
        ),
        row(
            "live holder elsewhere, unrenewed for just under W",
            "n2",
            Some(&held),
            seen("7", t0),
            false,
            t0 + w - Duration::from_nanos(1),
            refuse(w - Duration::from_nanos(1), Duration::from_nanos(1)),
        ),
        row(
            "expired: unrenewed for W on this clock",
            "n2",
            Some(&held),
            seen("7", t0),
            false,
            t0 + w,
            grant(AttachGrant::HolderSessionExpired),
        ),
        // The out-of-service taint fences through the same records as the CLI (the
        // controller's Node watch writes the node's fence and marks its claims): the
        // gate cannot tell the two apart, and must not need to.
        row(
            "fenced by the out-of-service taint: the claim marked fenced",
            "n2",
            Some(&claim(a.clone(), ClaimState::Fenced, 4)),
            seen("7", t0),
            true,
            t0,
            grant(AttachGrant::Fenced),
        ),
        row(
            "fenced by the out-of-service taint: fence written, claim not yet marked",
            "n2",
            Some(&held),
            seen("7", t0),
            true,
            t0,
            grant(AttachGrant::HolderNodeFenced),
        ),
        // A holder pod that is gone is not an input: its node's plugin releases the
        // claim (NodeUnpublishVolume, or its gone-pod check once it can prove the mounts
        // dead), and until it does, a live session means the old pod may still write.
        row(
            "holder pod gone, its node alive (session renewing): refused until released",
            "n2",
            Some(&held),
            seen("8", t0),
            false,
            t0 + w / 2,
            refuse(w / 2, w - w / 2),
        ),
        row(
            "holder pod gone, then released by its node's plugin",
            "n2",
            Some(&claim(a.clone(), ClaimState::Released, 3)),
            seen("8", t0),
            false,
            t0,
            grant(AttachGrant::Released),
        ),
        row(
            "holder pod gone, its node partitioned (session unrenewed for W)",
            "n2",
            Some(&held),
            seen("8", t0),
            false,
            t0 + w,
            grant(AttachGrant::HolderSessionExpired),
        ),
        row(
            "holder's session gone entirely",
            "n2",
            Some(&held),
            SessionView::Absent,
            false,
            t0,
            grant(AttachGrant::HolderSessionGone),
        ),
    ]
}

#[test]
fn every_row_of_the_gate() {
    for row in rows() {
        assert_eq!(row.decide(), row.expect, "row: {}", row.name);
    }
}

/// The gate is the node's decision: for every row not held from the attaching node,
/// the attach is granted exactly when a pod of that node, through its own session,
/// would be allowed to take the claim (at once, or after deleting the timed version).
#[test]
fn every_row_is_the_nodes_own_acquire_decision() {
    for row in rows() {
        let held_here = row
            .claim
            .as_ref()
            .is_some_and(|c| c.state == ClaimState::Held && c.holder.node == row.node);
        if held_here {
            continue;
        }
        let pod = Holder {
            node: row.node.into(),
            pod_uid: "a-new-pod".into(),
            instance: "its-session".into(),
            pod: None,
        };
        let input = AcquireInput {
            volume_id: "vol",
            claim: row.claim.as_ref(),
            holder_session: &row.session,
            holder_node_fenced: row.fenced,
            me: &pod,
            high_water: row.high_water,
            released: None,
            now: row.now,
        };
        let node_may_take = matches!(
            decide_acquire(&input, &params()),
            AcquireDecision::Take { .. } | AcquireDecision::ExpireSession { .. }
        );
        let granted = matches!(row.decide(), AttachDecision::Grant(_));
        assert_eq!(granted, node_may_take, "row: {}", row.name);
    }
}

#[test]
fn a_renewal_seen_restarts_the_wait() {
    let p = params();
    let held = claim(holder("n1", "i1"), ClaimState::Held, 3);
    let key = held.holder.session();
    let mut observer = SessionObserver::new();
    let t0 = at(5_000);
    observer.observe(&key, Some(&Version("1".into())), t0);
    let renewed_at = t0 + p.takeover_wait() - Duration::from_millis(1);
    let view = observer.observe(&key, Some(&Version("2".into())), renewed_at);
    let now = t0 + p.takeover_wait() + Duration::from_millis(1);
    let input = AttachInput {
        volume_id: "vol",
        node: "n2",
        claim: Some(&held),
        holder_session: &view,
        holder_node_fenced: false,
        high_water: None,
        now,
    };
    match decide_attach(&input, &p) {
        AttachDecision::Refuse {
            unrenewed_for,
            expires_in,
            ..
        } => {
            assert_eq!(unrenewed_for, Duration::from_millis(2));
            assert_eq!(expires_in, Some(p.takeover_wait() - unrenewed_for));
        }
        other => panic!("granted across a renewal: {other:?}"),
    }
}

#[test]
fn a_stored_epoch_below_one_seen_is_refused_not_free() {
    let mut row = rows().remove(1);
    row.high_water = Some(5);
    assert_eq!(
        row.decide(),
        AttachDecision::Regressed { seen: 5, stored: 3 }
    );
}
