//! "May I still write?" — the check the data path makes before forwarding an operation.
//!
//! A [`SessionDeadline`] is shared by every volume of one session: the renewal loop
//! pushes it forward after each successful renewal (to the moment the renewal was
//! *sent* plus D − margin) and never backwards. A [`VolumeGate`] adds what is particular
//! to one volume: whether it was fenced (node fence, higher epoch on storage, claim
//! lost). Both are atomics, so the check costs two loads and one vDSO clock read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::clock::Mono;

/// The session's self-fence deadline, as boot-time nanoseconds. Zero means "not yet
/// renewed": nothing may be written.
#[derive(Clone, Debug, Default)]
pub struct SessionDeadline(Arc<AtomicU64>);

impl SessionDeadline {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the deadline to `deadline` if that is later than the current one. A renewal
    /// answered out of order must never shorten, nor a stale one lengthen, the window
    /// beyond what its own send time proves.
    pub fn extend_to(&self, deadline: Mono) {
        self.0.fetch_max(deadline.as_nanos(), Ordering::SeqCst);
    }

    /// Ends the session's right to write at once (shutdown, session lost).
    pub fn revoke(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    pub fn deadline(&self) -> Mono {
        Mono::from_nanos(self.0.load(Ordering::SeqCst))
    }

    pub fn is_live_at(&self, now: Mono) -> bool {
        now < self.deadline()
    }
}

/// Why a volume's data path was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceCause {
    /// The session could not be proven renewed before its deadline.
    SessionExpired,
    /// The node was fenced by an admin or a fencing agent.
    NodeFenced,
    /// A higher epoch was found on the volume's storage: someone else holds it.
    EpochSuperseded,
    /// The claim in the store no longer names this holder.
    ClaimLost,
}

/// One published volume's gate.
#[derive(Clone, Debug)]
pub struct VolumeGate {
    session: SessionDeadline,
    /// 0 while open; otherwise the code of the first [`FenceCause`].
    fenced: Arc<AtomicU64>,
}

impl VolumeGate {
    pub fn new(session: SessionDeadline) -> Self {
        Self {
            session,
            fenced: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A gate that is always open, for volumes published without a claim
    /// (`exclusive: "false"`).
    pub fn unclaimed() -> Self {
        let session = SessionDeadline::new();
        session.extend_to(Mono(std::time::Duration::MAX / 2));
        Self::new(session)
    }

    /// Stops the volume for good. The first cause is kept.
    pub fn fence(&self, cause: FenceCause) {
        let _ =
            self.fenced
                .compare_exchange(0, cause_code(cause), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Why the volume is stopped, if it is: fenced, or its session past its deadline.
    pub fn stopped_at(&self, now: Mono) -> Option<FenceCause> {
        let code = self.fenced.load(Ordering::SeqCst);
        if code != 0 {
            return Some(code_cause(code));
        }
        if !self.session.is_live_at(now) {
            return Some(FenceCause::SessionExpired);
        }
        None
    }

    /// The data path's check, made before every operation is forwarded.
    pub fn may_write(&self) -> bool {
        self.stopped_at(Mono::now()).is_none()
    }

    pub fn session(&self) -> &SessionDeadline {
        &self.session
    }
}

fn cause_code(cause: FenceCause) -> u64 {
    match cause {
        FenceCause::SessionExpired => 1,
        FenceCause::NodeFenced => 2,
        FenceCause::EpochSuperseded => 3,
        FenceCause::ClaimLost => 4,
    }
}

fn code_cause(code: u64) -> FenceCause {
    match code {
        2 => FenceCause::NodeFenced,
        3 => FenceCause::EpochSuperseded,
        4 => FenceCause::ClaimLost,
        _ => FenceCause::SessionExpired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn closed_until_renewed_then_open_until_deadline() {
        let session = SessionDeadline::new();
        let gate = VolumeGate::new(session.clone());
        let t = Mono(Duration::from_secs(100));
        assert_eq!(gate.stopped_at(t), Some(FenceCause::SessionExpired));
        session.extend_to(t + Duration::from_secs(5));
        assert_eq!(gate.stopped_at(t), None);
        assert_eq!(
            gate.stopped_at(t + Duration::from_secs(5)),
            Some(FenceCause::SessionExpired)
        );
    }

    #[test]
    fn deadline_never_moves_back() {
        let session = SessionDeadline::new();
        session.extend_to(Mono(Duration::from_secs(10)));
        session.extend_to(Mono(Duration::from_secs(7)));
        assert_eq!(session.deadline(), Mono(Duration::from_secs(10)));
    }

    #[test]
    fn fence_is_final_and_keeps_first_cause() {
        let session = SessionDeadline::new();
        session.extend_to(Mono(Duration::from_secs(1000)));
        let gate = VolumeGate::new(session);
        let t = Mono(Duration::from_secs(1));
        gate.fence(FenceCause::EpochSuperseded);
        gate.fence(FenceCause::NodeFenced);
        assert_eq!(gate.stopped_at(t), Some(FenceCause::EpochSuperseded));
    }
}
