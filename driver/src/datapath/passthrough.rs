//! Kernel passthrough: which opens the kernel serves straight from the backing file, and
//! the per-inode bookkeeping that keeps it consistent and fenced.
//!
//! With `FOPEN_PASSTHROUGH` the kernel sends `read(2)`/`write(2)` (and splice, and mmap)
//! of an open file to the backing file without a request to this daemon, so the gate in
//! [`super::fence`] never sees them. Passthrough is therefore offered only once the
//! kernel itself guards the mount ([`KernelFence::guard`]): the deadline of the session
//! and the FUSE connection are checked by a BPF LSM program on every such access, which
//! keeps working while this daemon is paused or after it died.
//!
//! What the kernel fence cannot see is a store to a shared writable *mapping*: a page
//! fault needs no syscall. With passthrough a mapping is a mapping of the backing file,
//! so such stores would reach the backing filesystem after a fence. Hence the rule here:
//! - an inode's first open decides its mode: opened read-only or write-only it is served
//!   by passthrough (neither fd can create a shared writable mapping); opened read-write
//!   it goes through the daemon (cached mode, where mapped pages are written back as
//!   `WRITE`s the gate refuses after the fence);
//! - later opens follow the inode's mode while any open of it remains (the kernel
//!   refuses mixed modes on one inode);
//! - a read-write open of a passthrough inode can exist only in that second case; for it
//!   the kernel fence refuses `MAP_SHARED` mappings ([`KernelFence::mark_passthrough`]).
//!
//! The daemon's counts can only lag the kernel's (an open is counted before it is
//! answered, a release after the kernel let go), so the mode chosen here is always one
//! the kernel accepts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use fuser::BackingId;

use super::kernel_fence::KernelFence;

/// The kernel guard of one mounted volume. `fence` is `None` only in this crate's unit
/// tests, which check the passthrough plumbing on kernels that cannot run the fence.
struct Guard {
    fence: Option<Arc<KernelFence>>,
    dev: u64,
}

enum InodeIo {
    Cached {
        opens: usize,
    },
    Passthrough {
        opens: usize,
        backing: Arc<BackingId>,
    },
}

/// Passthrough state of one mounted volume. Disabled until [`Passthrough::enable`].
pub(super) struct Passthrough {
    guard: OnceLock<Guard>,
    inodes: Mutex<HashMap<u64, InodeIo>>,
    /// Open file handle → node id, for the release bookkeeping.
    opens: Mutex<HashMap<u64, u64>>,
}

/// True when `flags` (of an open) can back a shared writable mapping.
fn read_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE == libc::O_RDWR
}

impl Passthrough {
    pub fn new() -> Self {
        Self {
            guard: OnceLock::new(),
            inodes: Mutex::new(HashMap::new()),
            opens: Mutex::new(HashMap::new()),
        }
    }

    /// Turns passthrough on for this mount: the kernel guard for `dev` (the mount's
    /// device number) must already hold the session's deadline.
    pub fn enable(&self, fence: Arc<KernelFence>, dev: u64) {
        let _ = self.guard.set(Guard {
            fence: Some(fence),
            dev,
        });
    }

    /// Passthrough with no kernel fence at all: unsafe for a claim, only for the unit
    /// tests of the plumbing.
    #[cfg(test)]
    pub fn enable_unfenced(&self, dev: u64) {
        let _ = self.guard.set(Guard { fence: None, dev });
    }

    pub fn enabled(&self) -> bool {
        self.guard.get().is_some()
    }

    /// Moves the kernel's deadline for this mount (boot-time ns; 0 stops it at once).
    pub fn set_deadline(&self, deadline_ns: u64) {
        if let Some(g) = self.guard.get() {
            let Some(fence) = &g.fence else { return };
            if let Err(e) = fence.guard(g.dev, deadline_ns, true) {
                tracing::error!(dev = g.dev, error = %e, "updating the kernel fence failed");
            }
        }
    }

    /// Removes the kernel guard; only once the mount's superblock is gone (no file of it
    /// can be open any more).
    pub fn unguard(&self) {
        if let Some(Guard {
            fence: Some(fence),
            dev,
        }) = self.guard.get()
        {
            let _ = fence.unguard(*dev);
        }
    }

    /// Device number of the guarded mount, if passthrough is enabled.
    pub fn dev(&self) -> Option<u64> {
        self.guard.get().map(|g| g.dev)
    }

    /// Records the open `fh` of node `ino` and decides how it is served. `register`
    /// opens the backing file and registers it with the kernel; it is called only for the
    /// first passthrough open of an inode. `Some` = reply with passthrough on that backing.
    pub fn open(
        &self,
        ino: u64,
        fh: u64,
        flags: i32,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        // Enabled once at mount, before any open: a mount without it keeps no books.
        if !self.enabled() {
            return None;
        }
        let mut inodes = self.inodes.lock().unwrap_or_else(|e| e.into_inner());
        let chosen = match inodes.get_mut(&ino) {
            Some(InodeIo::Cached { opens }) => {
                *opens += 1;
                None
            }
            Some(InodeIo::Passthrough { opens, backing }) => {
                *opens += 1;
                Some(backing.clone())
            }
            None => {
                let io = self.first_open(ino, flags, register);
                let chosen = match &io {
                    InodeIo::Passthrough { backing, .. } => Some(backing.clone()),
                    InodeIo::Cached { .. } => None,
                };
                inodes.insert(ino, io);
                chosen
            }
        };
        self.opens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, ino);
        chosen
    }

    fn first_open(
        &self,
        ino: u64,
        flags: i32,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> InodeIo {
        let cached = InodeIo::Cached { opens: 1 };
        let Some(g) = self.guard.get() else {
            return cached;
        };
        if read_write(flags) {
            return cached;
        }
        let backing = match register() {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(ino, error = %e, "passthrough refused; serving through the daemon");
                return cached;
            }
        };
        // Marked before the kernel learns of the passthrough open, so no shared writable
        // mapping of it can ever be made.
        let marked = g
            .fence
            .as_ref()
            .map_or(Ok(()), |f| f.mark_passthrough(g.dev, ino));
        if let Err(e) = marked {
            tracing::warn!(ino, error = %e, "marking a passthrough inode failed; serving through the daemon");
            return cached;
        }
        InodeIo::Passthrough {
            opens: 1,
            backing: Arc::new(backing),
        }
    }

    /// Forgets the open `fh`; the last release of a passthrough inode closes its
    /// backing registration.
    pub fn release(&self, fh: u64) {
        if !self.enabled() {
            return;
        }
        let Some(ino) = self
            .opens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh)
        else {
            return;
        };
        let mut inodes = self.inodes.lock().unwrap_or_else(|e| e.into_inner());
        let last = match inodes.get_mut(&ino) {
            Some(InodeIo::Cached { opens }) | Some(InodeIo::Passthrough { opens, .. }) => {
                *opens -= 1;
                *opens == 0
            }
            None => false,
        };
        if !last {
            return;
        }
        if let Some(InodeIo::Passthrough { .. }) = inodes.remove(&ino) {
            if let Some(Guard {
                fence: Some(fence),
                dev,
            }) = self.guard.get()
            {
                let _ = fence.unmark_passthrough(*dev, ino);
            }
        }
    }

    /// Whether node `ino` is currently served by passthrough (for tests and stats).
    #[cfg(test)]
    pub fn is_passthrough(&self, ino: u64) -> bool {
        matches!(
            self.inodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&ino),
            Some(InodeIo::Passthrough { .. })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_write_opens_can_map_shared_writable() {
        assert!(read_write(libc::O_RDWR));
        assert!(read_write(libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC));
        assert!(!read_write(libc::O_RDONLY));
        assert!(!read_write(libc::O_WRONLY | libc::O_APPEND));
    }

    #[test]
    fn without_the_kernel_guard_nothing_is_passthrough() {
        let p = Passthrough::new();
        let got = p.open(7, 1, libc::O_RDONLY, || {
            panic!("must not register a backing file without the kernel guard")
        });
        assert!(got.is_none());
        assert!(!p.is_passthrough(7));
        p.release(1);
    }
}
