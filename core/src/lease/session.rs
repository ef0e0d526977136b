//! Pure session logic: renewing one's own session ([`RenewState`]) and deciding whether
//! a predecessor session on this node is provably dead ([`predecessor_fate`]).

use crate::clock::Mono;
use crate::lease::{LeaseParams, NodeIdentity, SessionRecord};
use crate::store::{Version, Versioned};

/// The renewal loop's memory. Each attempt writes a strictly higher `renewals` count and
/// remembers when it was sent; the deadline is only ever extended to
/// `send + (D − margin)` of an attempt the store is known to have applied.
#[derive(Clone, Debug)]
pub struct RenewState {
    record: SessionRecord,
    version: Version,
    /// Attempts sent since the last one known applied: (renewals, send instant).
    pending: Vec<(u64, Mono)>,
}

/// What a renewal attempt (or its aftermath) means for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenewOutcome {
    /// Renewed: the self-fence deadline may move to this instant.
    Extended(Mono),
    /// The record is gone or was rewritten by someone else: this session is over. Its
    /// deadline must never be extended again.
    Lost,
}

impl RenewState {
    /// `created` was written with version `version`.
    pub fn new(created: SessionRecord, version: Version) -> Self {
        RenewState {
            record: created,
            version,
            pending: Vec::new(),
        }
    }

    pub fn record(&self) -> &SessionRecord {
        &self.record
    }

    pub fn version(&self) -> &Version {
        &self.version
    }

    /// The next renewal to send at `now`: the record to write and the version it must
    /// replace.
    pub fn begin(&mut self, now: Mono) -> (SessionRecord, Version) {
        let last = self.pending.last().map_or(self.record.renewals, |p| p.0);
        let next = SessionRecord {
            renewals: last + 1,
            ..self.record.clone()
        };
        self.pending.push((next.renewals, now));
        (next, self.version.clone())
    }

    /// The store applied the attempt that wrote `renewals`, giving `version`.
    pub fn succeeded(
        &mut self,
        renewals: u64,
        version: Version,
        params: &LeaseParams,
    ) -> RenewOutcome {
        let Some(sent) = self.take_pending(renewals) else {
            return RenewOutcome::Lost;
        };
        self.record.renewals = renewals;
        self.version = version;
        RenewOutcome::Extended(sent + params.self_fence_after())
    }

    /// A renewal got a conflict; `current` is the record re-read afterwards. If it is
    /// one of our own attempts (an earlier, timed-out try that did land), adopt it: its
    /// send instant bounds the window exactly as a direct answer would. Anything else
    /// means someone deleted or replaced the session: lost.
    pub fn conflicted(
        &mut self,
        current: Option<Versioned<SessionRecord>>,
        params: &LeaseParams,
    ) -> RenewOutcome {
        match current {
            Some(cur) if cur.value.key() == self.record.key() => {
                let renewals = cur.value.renewals;
                self.succeeded(renewals, cur.version, params)
            }
            _ => RenewOutcome::Lost,
        }
    }

    fn take_pending(&mut self, renewals: u64) -> Option<Mono> {
        let sent = self.pending.iter().find(|p| p.0 == renewals)?.1;
        // Every pending attempt named the version this one replaced: none can apply now.
        self.pending.clear();
        Some(sent)
    }
}

/// Proof that a predecessor session's process is dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeathProof {
    /// Same machine id, different boot id: the machine rebooted since.
    Rebooted,
    /// Same boot, and this instance obtained the predecessor's flock: the kernel drops it
    /// only when the holding process is gone.
    LockReleased,
}

/// What probing a predecessor's node-local lock file gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockProbe {
    /// The non-blocking flock succeeded: no process holds it.
    Acquired,
    /// Another process holds it: the predecessor is alive (rolling-update overlap).
    Held,
    /// No lock file for that instance in this node's state dir.
    Missing,
}

/// Whether `theirs` — another session under this node's name — is provably dead.
/// `None` means nothing is proven: leave it to expire by timeout.
pub fn predecessor_fate(
    me: &NodeIdentity,
    theirs: &SessionRecord,
    lock: LockProbe,
) -> Option<DeathProof> {
    if theirs.node != me.node || theirs.machine_id != me.machine_id {
        // Another machine under the same node name: nothing here says anything about it.
        return None;
    }
    if theirs.boot_id != me.boot_id {
        return Some(DeathProof::Rebooted);
    }
    (lock == LockProbe::Acquired).then_some(DeathProof::LockReleased)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn params() -> LeaseParams {
        LeaseParams::new(Duration::from_secs(3), 0.01, Duration::from_millis(300)).unwrap()
    }

    fn record(boot: &str, machine: &str) -> SessionRecord {
        SessionRecord {
            node: "n".into(),
            instance: "i".into(),
            boot_id: boot.into(),
            machine_id: machine.into(),
            duration_ms: 3000,
            renewals: 0,
        }
    }

    fn me() -> NodeIdentity {
        NodeIdentity {
            node: "n".into(),
            boot_id: "boot-2".into(),
            machine_id: "m".into(),
        }
    }

    #[test]
    fn deadline_counts_from_the_send_of_the_applied_attempt() {
        let p = params();
        let mut s = RenewState::new(record("b", "m"), Version("1".into()));
        let (first, expected) = s.begin(Mono(Duration::from_secs(10)));
        assert_eq!((first.renewals, expected), (1, Version("1".into())));
        let (second, _) = s.begin(Mono(Duration::from_secs(11)));
        assert_eq!(second.renewals, 2);
        // The first (timed-out) attempt is the one that landed: its send time counts.
        let cur = Versioned {
            value: first.clone(),
            version: Version("2".into()),
        };
        assert_eq!(
            s.conflicted(Some(cur), &p),
            RenewOutcome::Extended(Mono(Duration::from_secs(10)) + p.self_fence_after())
        );
        assert_eq!(s.version(), &Version("2".into()));
        assert_eq!(
            s.succeeded(2, Version("3".into()), &p),
            RenewOutcome::Lost,
            "attempt 2 named a dead version"
        );
    }

    #[test]
    fn a_deleted_or_foreign_session_is_lost() {
        let p = params();
        let mut s = RenewState::new(record("b", "m"), Version("1".into()));
        s.begin(Mono(Duration::from_secs(1)));
        assert_eq!(s.conflicted(None, &p), RenewOutcome::Lost);
        let mut other = record("b", "m");
        other.instance = "someone-else".into();
        s.begin(Mono(Duration::from_secs(2)));
        assert_eq!(
            s.conflicted(
                Some(Versioned {
                    value: other,
                    version: Version("9".into())
                }),
                &p
            ),
            RenewOutcome::Lost
        );
    }

    #[test]
    fn reboot_of_the_same_machine_proves_death() {
        assert_eq!(
            predecessor_fate(&me(), &record("boot-1", "m"), LockProbe::Missing),
            Some(DeathProof::Rebooted)
        );
    }

    #[test]
    fn another_machine_under_the_same_name_proves_nothing() {
        for lock in [LockProbe::Acquired, LockProbe::Missing, LockProbe::Held] {
            assert_eq!(
                predecessor_fate(&me(), &record("boot-1", "other"), lock),
                None
            );
        }
    }

    #[test]
    fn same_boot_needs_the_released_lock() {
        assert_eq!(
            predecessor_fate(&me(), &record("boot-2", "m"), LockProbe::Acquired),
            Some(DeathProof::LockReleased)
        );
        assert_eq!(
            predecessor_fate(&me(), &record("boot-2", "m"), LockProbe::Held),
            None
        );
        assert_eq!(
            predecessor_fate(&me(), &record("boot-2", "m"), LockProbe::Missing),
            None
        );
    }
}
