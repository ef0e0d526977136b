//! Fencing by the `node.kubernetes.io/out-of-service` taint: what to do for one Node,
//! given its taints and its fence record. The watch that calls this is
//! [`crate::kubernetes::node_watch`]; the fence itself is the same call as
//! `holdfast-controller fence` ([`crate::admin::fence_node`]).
//!
//! - A tainted node without a fence is fenced at once, with a reason that records the
//!   cause and the node's session instances at that moment. A fence already present
//!   (made by the taint earlier, or by an admin) is never rewritten; its node's claims
//!   still held are fenced (a fence interrupted half-way is completed).
//! - An untainted node keeps a taint-caused fence until its plugin has started a *new*
//!   session: one whose instance was not in the fence's list. A plugin that lived through
//!   the fence did not renew while fenced and may still have stale state; a new instance
//!   started after the node came back. The instance list lives in the fence record, so a
//!   restarted controller judges the same way, and no clock is compared.
//! - A fence whose reason does not carry the taint cause (an admin's, a fencing agent's)
//!   is never lifted here; the CLI refuses a `--reason` that would imitate the cause.

use std::collections::BTreeSet;

/// The taint's key (any effect counts).
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// How a fence made for the taint starts its reason.
pub const TAINT_CAUSE: &str = "out-of-service taint";

/// The metric label of taint-caused fences.
pub const TAINT_CAUSE_LABEL: &str = "out_of_service_taint";

const SESSIONS_AT_FENCE: &str = "; sessions at fence: ";

/// Why a fence record exists, read from its reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceCause {
    /// Made for the out-of-service taint; these session instances existed then.
    Taint { sessions_at_fence: BTreeSet<String> },
    /// Made by an admin or a fencing agent: only `holdfast-controller unfence` lifts it.
    Other,
}

/// The reason written on a fence made for the taint.
pub fn taint_reason(sessions_at_fence: &BTreeSet<String>) -> String {
    let list = if sessions_at_fence.is_empty() {
        "none".to_string()
    } else {
        sessions_at_fence
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("{TAINT_CAUSE} ({OUT_OF_SERVICE_TAINT}){SESSIONS_AT_FENCE}{list}")
}

/// Whether an admin's `--reason` would read as the taint's cause (refused by the CLI).
pub fn imitates_taint_cause(reason: &str) -> bool {
    reason.trim_start().starts_with(TAINT_CAUSE)
}

/// Reads a fence's cause. A reason that starts with the cause but whose session list
/// does not parse reads as [`FenceCause::Other`]: never lifted automatically.
pub fn cause_of(reason: &str) -> FenceCause {
    if !reason.starts_with(TAINT_CAUSE) {
        return FenceCause::Other;
    }
    let Some((_, list)) = reason.split_once(SESSIONS_AT_FENCE) else {
        return FenceCause::Other;
    };
    let sessions_at_fence = match list.trim() {
        "none" => BTreeSet::new(),
        "" => return FenceCause::Other,
        list => list.split(',').map(|s| s.trim().to_string()).collect(),
    };
    FenceCause::Taint { sessions_at_fence }
}

/// What to do for one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Tainted and not fenced: fence it, recording these sessions.
    Fence,
    /// Tainted and fenced: make sure every claim of the node is fenced (no new record).
    CompleteFence,
    /// Untainted, fenced for the taint, and a session started since: lift the fence.
    Lift { new_sessions: Vec<String> },
    /// Untainted, fenced for the taint, no new session yet: keep it and say why.
    KeepUntilNewSession,
    /// Nothing to do (no taint and no fence, or a fence the taint did not make).
    Nothing,
}

/// The decision for one node: `tainted` from its taints, `fence` the cause of its fence
/// record if any, `sessions` the session instances the store has for it now.
pub fn decide(tainted: bool, fence: Option<&FenceCause>, sessions: &BTreeSet<String>) -> Step {
    match (tainted, fence) {
        (true, None) => Step::Fence,
        (true, Some(_)) => Step::CompleteFence,
        (false, Some(FenceCause::Taint { sessions_at_fence })) => {
            let new_sessions: Vec<String> =
                sessions.difference(sessions_at_fence).cloned().collect();
            if new_sessions.is_empty() {
                Step::KeepUntilNewSession
            } else {
                Step::Lift { new_sessions }
            }
        }
        (false, Some(FenceCause::Other)) | (false, None) => Step::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_reason_round_trips_its_sessions() {
        for sessions in [set(&[]), set(&["a1"]), set(&["a1", "b2"])] {
            let reason = taint_reason(&sessions);
            assert!(reason.starts_with("out-of-service taint"), "{reason}");
            assert_eq!(
                cause_of(&reason),
                FenceCause::Taint {
                    sessions_at_fence: sessions.clone()
                }
            );
        }
        assert_eq!(
            cause_of("fenced with holdfast-controller fence"),
            FenceCause::Other
        );
        assert_eq!(cause_of("out-of-service taint, by hand"), FenceCause::Other);
        assert!(imitates_taint_cause(" out-of-service taint"));
        assert!(!imitates_taint_cause("power off confirmed"));
    }

    #[test]
    fn rows() {
        let taint = FenceCause::Taint {
            sessions_at_fence: set(&["old"]),
        };
        let none = set(&[]);
        assert_eq!(decide(true, None, &none), Step::Fence);
        assert_eq!(decide(true, Some(&taint), &none), Step::CompleteFence);
        assert_eq!(
            decide(true, Some(&FenceCause::Other), &none),
            Step::CompleteFence
        );
        // Untainted: the old session alone is not enough.
        assert_eq!(
            decide(false, Some(&taint), &set(&["old"])),
            Step::KeepUntilNewSession
        );
        assert_eq!(
            decide(false, Some(&taint), &none),
            Step::KeepUntilNewSession
        );
        assert_eq!(
            decide(false, Some(&taint), &set(&["old", "new"])),
            Step::Lift {
                new_sessions: vec!["new".into()]
            }
        );
        // An admin's fence is never lifted by the taint's removal.
        assert_eq!(
            decide(false, Some(&FenceCause::Other), &set(&["new"])),
            Step::Nothing
        );
        assert_eq!(decide(false, None, &set(&["new"])), Step::Nothing);
    }
}
