//! The fenced FUSE data path: one published volume's backing directory served at the
//! pod's target path, every operation gated by the volume's [`VolumeGate`].
//!
//! This module owns the FUSE mount, the daemon threads that serve it and every syscall on
//! the backing directory made on a pod's behalf. Nothing else in the driver touches
//! `/dev/fuse` or the backing files of a FUSE volume.
//!
//! # Fencing
//!
//! Every request checks the gate *first* ([`fence::Fence::pass`]). When the volume is
//! stopped (fenced, or its session past its deadline on CLOCK_BOOTTIME):
//! - [`FenceAction::Error`]: the request gets `EIO`;
//! - [`FenceAction::Freeze`]: the worker thread parks the request without replying until
//!   the gate opens again or the volume is unmounted (then `EIO`). The caller sits in an
//!   uninterruptible wait, like on a hard NFS mount.
//!
//! A fence-watcher thread also notices the stop within [`FuseOptions::fence_poll`] (at the
//! session deadline exactly) and invalidates the kernel's cached pages and attributes of
//! every inode, so that later reads and stats go to the daemon and fail too instead of
//! being answered from the page cache.
//!
//! *The kernel page cache.* By default (no writeback cache) every `write(2)` is a
//! synchronous `WRITE` through the gate: after the fence it fails with `EIO` at once.
//! With [`FuseOptions::writeback_cache`] a `write(2)` is acknowledged once it is in the
//! FUSE page cache and reaches the daemon later as a `WRITE`, which the gate refuses
//! after the fence: data not fsync'd before the fence is lost, and the loss is reported
//! by `fsync`/`close` as `EIO` — correct for a holder that lost its claim, and the same
//! contract as a local filesystem (only fsync'd data is promised). In both modes data
//! whose `fsync` returned success went through the gate and the backing `fsync` before
//! the fence, and is safe. Memory-mapped pages can still be read and dirtied in memory
//! after a fence; their write-back is refused like any other write.
//!
//! *Shared backing storage.* A `WRITE` the daemon accepted sits in the backing
//! filesystem's own page cache until that filesystem writes it back. On a network or
//! cluster filesystem that cache is a *client* cache: a partitioned node keeps it and
//! sends it to the server when the partition heals — after the fence, possibly over the
//! new holder's data. Nothing in the daemon can recall it, and the epoch on the storage
//! only lets the new holder notice. [`FuseOptions::write_through`] opens backing files
//! `O_DSYNC`, so a `WRITE` is acknowledged only once the server has it; what can still
//! arrive late is only the `WRITE`s in flight at the partition, at most one per worker
//! thread (`threads × max_write`, 2 MiB by default) instead of every un-fsync'd byte
//! (up to the node's dirty limit, gigabytes).
//!
//! The default (`None`) turns it on unless the backing directory is on a known local
//! filesystem (ext4, xfs, btrfs, tmpfs, …; see `sys::is_local_fs`): a local disk is
//! mounted by this node only, any later holder on this node goes through the same page
//! cache, and no other node can take the volume over, so there is no late flush to
//! fear and write-through would only cost. Measured on local ext4 (`benches/datapath.rs`,
//! fuse/bind, 6 rounds, 2 noisy cores), write-through off → on: sequential 1 MiB writes
//! and fsync 0.62 → 0.33, 4 KiB random write + fsync 1.55 → 0.40 (noisy: the fsync after
//! an `O_DSYNC` write is a second flush), cold sequential read 1.01 → 0.95 and
//! create/stat/unlink 0.44 → 0.35 (unchanged within noise). On NFS the cost is a stable
//! server write per `WRITE`; applications that fsync each transaction (databases) pay
//! little more than they already do. Cheaper bounds were considered and rejected as the
//! default: `sync_file_range` kicks or a periodic `syncfs` from the daemon only start or
//! bound write-back while the server is reachable; in the partition that matters they
//! block like everything else, and the whole dirty cache still goes out at the heal.
//!
//! *Paused daemon.* The gate reads CLOCK_BOOTTIME, which keeps counting while the process
//! is stopped, so a daemon woken after its deadline refuses every request it dequeues.
//!
//! *Residual window.* A `WRITE` re-checks the gate immediately before its `pwrite(2)`
//! (and `fsync`, `fallocate`, `setattr` immediately before their syscalls). A thread that
//! passed that check and is then paused (SIGSTOP, preemption, VM pause) before the
//! syscall enters the kernel still performs that one syscall when it resumes, possibly
//! after the deadline: at most one in-flight mutation per worker thread (each at most
//! `max_write` bytes). No check in user space can close this window; the epoch written
//! on the storage (the protocol's second channel) is what lets the next holder detect it.
//!
//! *Process death.* The mount is made with mount(2) directly (no fusermount, no
//! auto-unmount helper). When the serving process dies the kernel closes `/dev/fuse`,
//! aborts the connection, and every later operation on the mount fails with `ENOTCONN`.
//!
//! # Inodes
//!
//! The inode table ([`inodes`]) is keyed by the backing file's `(st_dev, st_ino)` and holds
//! an `O_PATH` fd per inode: renames and hard links need no path bookkeeping, every
//! operation is an `*at()` call relative to an fd, and a request's name is one component
//! (`/`, `.`, `..`, empty and NUL are refused) looked up with `O_NOFOLLOW`, so no request
//! can reach outside the backing directory. Existing inodes are reopened through
//! `/proc/self/fd/N`, which names the inode itself, never a path.
//!
//! # Ownership and permissions
//!
//! The daemon runs as root. The kernel checks modes (`default_permissions`); new files,
//! directories, nodes and symlinks are created by root and then `fchown`ed to the caller's
//! uid and gid (the parent's gid under a set-gid directory), and given the caller's mode.
//!
//! # Performance choices
//!
//! 1 MiB `max_write` with `max_pages` 256, readahead raised through the mount's BDI (and
//! the BDI's strict 1% dirty limit lifted), one worker thread per core (2 to 4) each with
//! a cloned `/dev/fuse` fd (measured: cloning neither helps nor hurts on 2 cores),
//! `keep_cache` on open, long attribute/entry TTLs, and lookup misses cached as negative
//! entries for the same TTL (`stat` of a missing name 0.07 → 0.49 of a bind mount). Every
//! one of these caches is cut at the fence: the watcher invalidates the pages and
//! attributes of every inode the kernel holds, and with `default_permissions` every
//! path walk then re-checks each directory it passes with the daemon, so neither a
//! cached page nor a cached entry (positive or negative) answers after the fence
//! (`tests/fuse_fencing.rs`: `cached_pages_…`, `cached_lookup_misses_…`). The writeback
//! cache is off by default: measured again with the write and fsync phases apart, it
//! speeds the `write(2)` phase (0.26 → 0.34 of bind) but a 256 MiB burst stays under
//! the dirty background threshold, so nothing is sent before `fsync`, which then does
//! every daemon copy serially (fsync phase 1.09 → 0.42; total 0.48 → 0.39, no better
//! with the BDI's `max_ratio` at 2). It also weakens the fence's error reporting (see
//! above); it is a knob. Requests really are 1 MiB: the daemon's `pwrite`/`pread` sizes
//! during the sequential rows are all 1048576 (traced). Caching is safe because while
//! this daemon holds the claim it is the only writer of the backing directory.
//!
//! What remains of the sequential-write gap is copies on the critical path: a
//! synchronous 1 MiB `WRITE` is copied into the FUSE page cache, out through
//! `/dev/fuse`, and into the backing page cache, one after the other, where a bind
//! mount copies once. Splicing from `/dev/fuse` would drop one copy; fuser does not
//! offer it.
//!
//! Kernel passthrough (`FUSE_PASSTHROUGH`) is opt-in ([`FuseOptions::passthrough`],
//! the driver's `--fuse-passthrough`) and used only where the kernel itself can fence it.
//! With passthrough the kernel serves `read(2)`/`write(2)` of an open file straight from
//! the backing file, without a request to the daemon, so the gate never sees them and a
//! paused or dead daemon could not stop them. The fence then moves into the kernel
//! ([`kernel_fence`]): BPF LSM programs, pinned on bpffs so they outlive the plugin,
//! refuse every read and write on the mount once CLOCK_BOOTTIME passes the session
//! deadline the fence watcher last wrote (0 at a fence), and refuse with `ENOTCONN` once
//! the FUSE connection is gone. Stores through a shared writable mapping need no syscall
//! and cannot be refused, so an inode whose first open is read-write stays with the
//! daemon, and a read-write open of a passthrough inode cannot be mapped shared
//! ([`passthrough`]). Where the programs cannot be loaded (no `bpf` LSM, or a kernel
//! that refuses trampoline-attached programs) every open goes through the daemon.

mod fence;
mod fs;
mod fuse_mount;
mod handles;
mod inodes;
mod io_ops;
pub mod kernel_fence;
mod meta_ops;
mod passthrough;
mod sys;

use std::path::{Path, PathBuf};
use std::time::Duration;

use holdfast_core::lease::VolumeGate;

pub use fuse_mount::FuseVolume;

/// What a fenced volume does to the operations of its (former) holder. Chosen per
/// StorageClass (`fenceAction: error|freeze`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceAction {
    /// Every operation fails with `EIO`.
    Error,
    /// Every operation blocks until the gate opens or the volume is unmounted.
    Freeze,
}

/// How a volume is served.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    pub fence_action: FenceAction,
    pub read_only: bool,
    /// Kernel writeback cache: `write(2)` completes in the page cache, the daemon gets
    /// large batched `WRITE`s. Un-fsync'd data is lost on a fence (see module doc).
    pub writeback_cache: bool,
    /// Worker threads, each with its own cloned `/dev/fuse` fd.
    pub threads: usize,
    /// Largest `WRITE`/`READ` the kernel sends (bytes, ≤ 1 MiB with the default
    /// `max_pages_limit`).
    pub max_write: u32,
    /// Readahead of the mount, in KiB (written to the mount's BDI).
    pub readahead_kb: u32,
    /// Share (percent) of the dirty-page limit the mount may use; 0 keeps the kernel's
    /// strict 1% for FUSE (see `fuse_mount::tune_bdi`).
    pub dirty_max_ratio: u32,
    /// How long the kernel may cache attributes and directory entries.
    pub attr_ttl: Duration,
    /// Open backing files with `O_DSYNC`: every acknowledged `WRITE` is on stable storage,
    /// so nothing accepted before a fence can be flushed to a shared backing filesystem
    /// after it by the backing client's own writeback. `None` (the default) decides by
    /// the backing directory's filesystem: on unless it is a known local filesystem
    /// (see "Shared backing storage" in the module doc).
    pub write_through: Option<bool>,
    /// How often the fence watcher looks for an explicit fence between deadlines.
    pub fence_poll: Duration,
    /// Serve read-only and write-only opens by kernel passthrough when the kernel fence
    /// (BPF LSM) can guard the mount; see [`passthrough`]. Off by default (opt-in with
    /// the driver's `--fuse-passthrough`). Never with
    /// [`FenceAction::Freeze`] (the kernel fence can only fail an access, not park it)
    /// nor with the writeback cache (the kernel does not combine them).
    pub passthrough: bool,
}

impl FuseOptions {
    pub fn new(fence_action: FenceAction) -> Self {
        Self {
            fence_action,
            read_only: false,
            writeback_cache: false,
            threads: default_threads(),
            max_write: 1 << 20,
            readahead_kb: 4096,
            dirty_max_ratio: 50,
            attr_ttl: Duration::from_secs(10),
            write_through: None,
            fence_poll: Duration::from_millis(50),
            passthrough: false,
        }
    }
}

/// One worker per core, at least 2 (so a slow backing syscall does not stall every
/// request) and at most 4. Measured on 2 cores (`benches/datapath.rs`): 2 threads beat 4
/// on every row (sequential write +30%, create/stat/unlink +50%), because surplus
/// workers only add wake-ups and cache misses; fewer workers also mean fewer in-flight
/// mutations in the residual window (see the module doc).
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4)
}

impl Default for FuseOptions {
    fn default() -> Self {
        Self::new(FenceAction::Error)
    }
}

/// Errors of mounting and unmounting a FUSE volume.
#[derive(Debug, thiserror::Error)]
pub enum DataPathError {
    #[error("backing directory {path}: {source}")]
    Backing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount target {path}: {source}")]
    Target {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting FUSE at {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unmounting {path}: {source}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("FUSE session: {0}")]
    Session(std::io::Error),
    #[error("invalid options: {0}")]
    Options(&'static str),
}

/// Convenience for callers: mount with the given gate and options.
pub fn mount(
    backing_dir: &Path,
    target: &Path,
    gate: VolumeGate,
    opts: FuseOptions,
) -> Result<FuseVolume, DataPathError> {
    FuseVolume::mount(backing_dir, target, gate, opts)
}
