//! The gate check every FUSE request makes first, and the watcher that drops the
//! kernel's caches when the gate closes.
//!
//! [`Fence`] is shared by all worker threads; it owns the parking of frozen requests and
//! the "unmounting" flag that releases them. The watcher thread is owned by
//! [`super::fuse_mount::FuseVolume`] and only reads the gate.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fuser::{Errno, INodeNo, Notifier};
use holdfast_core::clock::Mono;
use holdfast_core::lease::VolumeGate;

use super::inodes::InodeTable;
use super::passthrough::Passthrough;
use super::FenceAction;

/// How long a parked request sleeps between looks at the gate. The gate has no wake-up
/// channel of its own; a fence never reopens, and a late renewal is rare, so polling is
/// cheap and simple.
const PARK_POLL: Duration = Duration::from_millis(20);

pub(super) struct Fence {
    gate: VolumeGate,
    action: FenceAction,
    /// Set once the volume is being unmounted: parked requests leave with `EIO`.
    closing: Mutex<bool>,
    wake: Condvar,
}

impl Fence {
    pub fn new(gate: VolumeGate, action: FenceAction) -> Self {
        Self {
            gate,
            action,
            closing: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// The check made before every operation and again right before every mutating
    /// syscall. `Ok` means the volume may be used now; `Err(EIO)` means it may not, or
    /// is being unmounted. In freeze mode this blocks while the gate is closed.
    pub fn pass(&self) -> Result<(), Errno> {
        if self.gate.may_write() {
            return Ok(());
        }
        match self.action {
            FenceAction::Error => Err(Errno::EIO),
            FenceAction::Freeze => self.park(),
        }
    }

    fn park(&self) -> Result<(), Errno> {
        let mut closing = self.closing.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *closing {
                return Err(Errno::EIO);
            }
            if self.gate.may_write() {
                return Ok(());
            }
            closing = self
                .wake
                .wait_timeout(closing, PARK_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Releases every parked request (with `EIO`) and makes later ones fail at once.
    pub fn close(&self) {
        *self.closing.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    fn is_closing(&self) -> bool {
        *self.closing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The deadline the kernel fence must hold for this volume, as boot-time ns: the
    /// session's deadline while the gate is open, 0 (stop now) once it is closed or the
    /// volume is being unmounted. Never later than the gate's own answer.
    pub fn kernel_deadline_ns(&self) -> u64 {
        if self.is_closing() || self.gate.stopped_at(Mono::now()).is_some() {
            return 0;
        }
        let deadline = self.gate.session().deadline().0.as_nanos();
        u64::try_from(deadline).unwrap_or(u64::MAX)
    }

    /// Sleeps until the gate closes or the volume is unmounted, whichever comes first,
    /// calling `on_wake` with the session deadline (boot-time ns) at every look.
    /// Returns true if the gate closed.
    fn wait_for_stop(&self, poll: Duration, mut on_wake: impl FnMut(u64)) -> bool {
        let mut closing = self.closing.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *closing {
                return false;
            }
            let now = Mono::now();
            if self.gate.stopped_at(now).is_some() {
                return true;
            }
            let deadline = self.gate.session().deadline().0.as_nanos();
            on_wake(u64::try_from(deadline).unwrap_or(u64::MAX));
            // Wake exactly at the session deadline, or after `poll` to see an explicit fence.
            let until_deadline = self.gate.session().deadline().since(now);
            let nap = poll.min(until_deadline).max(Duration::from_millis(1));
            closing = self
                .wake
                .wait_timeout(closing, nap)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Runs until the gate closes, then invalidates the kernel's cached data and attributes
/// of every inode the kernel knows, so that no read or stat of this volume is answered
/// from the page cache after the fence. Returns when done or when the volume unmounts.
///
/// Meanwhile it carries every renewal to the kernel fence of a passthrough mount. The
/// kernel's deadline only ever trails the gate's: if this thread stalls, passthrough I/O
/// stops early (at the last deadline written), never late.
pub(super) fn watch(
    fence: Arc<Fence>,
    inodes: Arc<InodeTable>,
    passthrough: Arc<Passthrough>,
    notifier: Notifier,
    poll: Duration,
) {
    let mut written = None;
    let stopped = fence.wait_for_stop(poll, |deadline| {
        if written != Some(deadline) && passthrough.enabled() {
            passthrough.set_deadline(deadline);
            written = Some(deadline);
        }
    });
    if !stopped {
        return;
    }
    // An explicit fence stops passthrough I/O now; a passed deadline already did.
    passthrough.set_deadline(0);
    for ino in inodes.all() {
        if fence.is_closing() {
            return;
        }
        // Offset 0, length 0: every page of the inode, and its attributes. Dirty pages
        // are written back first, as WRITEs the gate now refuses. ENOENT (inode already
        // evicted) is ignored by the notifier; other errors only mean the connection is
        // gone, after which nothing can be served from this mount anyway.
        if notifier.inval_inode(INodeNo(ino), 0, 0).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_core::lease::{FenceCause, SessionDeadline};
    use std::sync::mpsc;

    fn open_gate() -> (VolumeGate, SessionDeadline) {
        let session = SessionDeadline::new();
        session.extend_to(Mono::now() + Duration::from_secs(60));
        (VolumeGate::new(session.clone()), session)
    }

    #[test]
    fn error_action_refuses_once_stopped() {
        let (gate, _) = open_gate();
        let fence = Fence::new(gate.clone(), FenceAction::Error);
        assert_eq!(fence.pass(), Ok(()));
        gate.fence(FenceCause::EpochSuperseded);
        assert_eq!(fence.pass(), Err(Errno::EIO));
    }

    #[test]
    fn freeze_action_parks_until_close() {
        let (gate, _) = open_gate();
        let fence = Arc::new(Fence::new(gate.clone(), FenceAction::Freeze));
        gate.fence(FenceCause::NodeFenced);
        let (tx, rx) = mpsc::channel();
        let f = fence.clone();
        std::thread::spawn(move || tx.send(f.pass()).unwrap());
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "must park"
        );
        fence.close();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            Err(Errno::EIO)
        );
        // After close nothing parks any more.
        assert_eq!(fence.pass(), Err(Errno::EIO));
    }

    #[test]
    fn freeze_action_resumes_when_the_session_is_renewed() {
        let session = SessionDeadline::new(); // never renewed: stopped
        let fence = Arc::new(Fence::new(
            VolumeGate::new(session.clone()),
            FenceAction::Freeze,
        ));
        let (tx, rx) = mpsc::channel();
        let f = fence.clone();
        std::thread::spawn(move || tx.send(f.pass()).unwrap());
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "must park"
        );
        session.extend_to(Mono::now() + Duration::from_secs(60));
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Ok(()));
    }

    #[test]
    fn watcher_wakes_at_the_session_deadline() {
        let session = SessionDeadline::new();
        session.extend_to(Mono::now() + Duration::from_millis(150));
        let fence = Fence::new(VolumeGate::new(session), FenceAction::Error);
        let start = std::time::Instant::now();
        // A long poll: only the deadline itself can end the wait this early.
        assert!(fence.wait_for_stop(Duration::from_secs(30), |_| {}));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(140) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }
}
