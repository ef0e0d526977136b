//! The kernel-enforced fence: two BPF LSM programs that refuse I/O on a guarded
//! filesystem once its holder's session deadline has passed, with nobody awake in user
//! space.
//!
//! # Why the kernel
//!
//! With FUSE passthrough (`FOPEN_PASSTHROUGH`) a `read(2)` or `write(2)` on an open file
//! goes from the kernel straight to the backing file; the daemon never sees it, so its
//! gate (`fence.rs`) cannot refuse it. A daemon that is paused (SIGSTOP, a frozen cgroup,
//! a VM pause) or dead could not refuse anything anyway. The lock is only safe if, after
//! the deadline or an explicit fence, *no* read or write of the volume succeeds, so the
//! check has to run in the kernel, on every access:
//!
//! - `file_permission` (the LSM hook behind every read, write, readv/writev, pread/pwrite,
//!   splice, sendfile, copy_file_range, io_uring and aio read/write, readdir, fallocate)
//!   looks the file's superblock device up in the *guards* map and returns `EIO` once
//!   CLOCK_BOOTTIME has reached the guard's deadline. CLOCK_BOOTTIME
//!   (`bpf_ktime_get_boot_ns`, the same clock as `holdfast_core::clock::Mono`) keeps
//!   counting while the daemon is paused and while the machine is suspended, so a paused
//!   holder's deadline passes on time. A FUSE guard also returns `ENOTCONN` as soon as the
//!   FUSE connection is gone (the daemon died or the connection was aborted).
//! - `mmap_file` refuses every mapping on an expired guard, and a *shared* mapping of a
//!   file open for writing on an inode marked as passthrough (`EACCES`).
//!
//! Guards are keyed by the superblock's device number, and FUSE mounts get anonymous
//! device numbers, which the kernel hands out again soon after a filesystem is gone. A
//! guard can outlive its mount (the plugin died while a detached mount still had open
//! files), so before a FUSE guard refuses anything both programs check that the
//! superblock really is one of ours: FUSE's magic and the subtype `holdfast` (our mounts
//! are of type `fuse.holdfast`). A container's overlayfs, a tmpfs or another FUSE
//! filesystem that inherits the number of a stale guard is left alone.
//! [`KernelFence::guarded_devs`] lists the guards so that stale ones can be removed.
//!
//! The programs and maps are pinned on bpffs ([`KernelFence::default_pin_dir`]): the
//! links keep the programs attached and the maps keep the guards after the process that
//! set them exits, crashes or is killed. A restarted plugin reopens the same pins.
//!
//! # What it cannot cover
//!
//! - *Page faults on a mapping.* Stores into a shared writable mapping reach the backing
//!   file through page faults and write-back, which no LSM hook sees. That is why shared
//!   writable mappings of passthrough inodes are refused up front (read-only and private
//!   mappings are harmless: they cannot change the file). Mappings made before a guard
//!   expired keep their pages readable.
//! - *A syscall already past the check.* A `write(2)` that passed `file_permission` just
//!   before the deadline completes after it. The window is one syscall per thread, and
//!   the epoch on storage lets the next holder detect it.
//! - *Other paths to the backing files.* Only the guarded filesystem's own files are
//!   checked; whoever can open the backing directory directly is outside the fence.
//!
//! Loading fails (and callers then do not use passthrough) unless `bpf` is in the active
//! LSM list, the kernel has BTF, its structs have the layout the programs expect, and the
//! kernel build allows trampoline-attached programs at all: some builds refuse every LSM
//! and fentry program with `EPERM` before the verifier runs, even with `bpf` listed
//! ([`KernelFenceError::LsmRefused`]).

mod asm;
mod btf;
mod pins;
mod program;
mod syscall;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Every failure of the kernel fence. Any of them means: do not use passthrough.
#[derive(Debug, thiserror::Error)]
pub enum KernelFenceError {
    #[error("BPF LSM is not active on this kernel (`bpf` is not in /sys/kernel/security/lsm; boot with lsm=...,bpf)")]
    LsmInactive,
    #[error("kernel BTF: {0}")]
    Btf(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused the `{program}` LSM program: {source}; verifier log:\n{log}")]
    ProgLoad {
        program: &'static str,
        #[source]
        source: io::Error,
        log: String,
    },
    #[error("the kernel refused the `{program}` BPF LSM program before verifying it ({source}): this kernel build does not allow trampoline-attached BPF programs (LSM, fentry), so the kernel fence is unavailable")]
    LsmRefused {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{} is not on a bpffs, so nothing can be pinned there", pin_dir.display())]
    NotBpffs { pin_dir: PathBuf },
    #[error(
        "device number {st_dev:#x} does not fit the kernel's dev_t (12-bit major, 20-bit minor)"
    )]
    BadDevice { st_dev: u64 },
}

impl KernelFenceError {
    /// The error on one line, for a log: a verifier log is left out.
    pub fn headline(&self) -> String {
        match self {
            KernelFenceError::ProgLoad {
                program, source, ..
            } => format!("the kernel refused the `{program}` LSM program: {source}"),
            other => other.to_string(),
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KernelFenceError {
    let what = what.into();
    move |source| KernelFenceError::Io { what, source }
}

/// The loaded (or reopened) fence: its two maps and the links that keep its programs
/// attached. Dropping it closes the fds; the pins keep everything in force.
#[derive(Debug)]
pub struct KernelFence {
    guards: OwnedFd,
    passthrough: OwnedFd,
    _links: [OwnedFd; 2],
}

/// The kernel's internal `dev_t` (`MKDEV`: 12-bit major above a 20-bit minor) of a
/// userspace `st_dev`, which is what `super_block.s_dev` holds.
fn kernel_dev(st_dev: u64) -> Result<u32, KernelFenceError> {
    let (major, minor) = (libc::major(st_dev), libc::minor(st_dev));
    if major >= 1 << 12 || minor >= 1 << 20 {
        return Err(KernelFenceError::BadDevice { st_dev });
    }
    Ok((major << 20) | minor)
}

/// A guards map value: `{u64 deadline_ns; u32 flags; u32 pad}`.
fn guard_value(deadline_boot_ns: u64, fuse: bool) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&deadline_boot_ns.to_ne_bytes());
    let flags = if fuse { program::GUARD_FUSE } else { 0 };
    v[8..12].copy_from_slice(&flags.to_ne_bytes());
    v
}

/// The userspace `st_dev` of a kernel `dev_t` (the inverse of [`kernel_dev`]).
fn st_dev_of(dev: u32) -> u64 {
    libc::makedev(dev >> 20, dev & 0xf_ffff)
}

/// The `st_dev` of every key of a guards map.
fn devs_in_guards_map(guards: BorrowedFd) -> Result<Vec<u64>, KernelFenceError> {
    let keys = syscall::map_keys(guards, 4).map_err(io_err("list the guards"))?;
    Ok(keys
        .iter()
        .map(|k| st_dev_of(u32::from_ne_bytes(k[..4].try_into().expect("4-byte keys"))))
        .collect())
}

/// A passthrough map key: `{u32 dev; u32 pad; u64 ino}`.
fn inode_key(dev: u32, ino: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&dev.to_ne_bytes());
    k[8..].copy_from_slice(&ino.to_ne_bytes());
    k
}

impl KernelFence {
    /// Loads the two LSM programs and their maps, or reuses the ones pinned under
    /// `pin_dir` (created if missing; bpffs is mounted at /sys/fs/bpf if `pin_dir` is
    /// under it and it is not mounted). Processes opening the same `pin_dir` at once end
    /// up sharing one set. Fails if BPF LSM is not active or loading fails.
    pub fn open(pin_dir: &Path) -> Result<Self, KernelFenceError> {
        if !Self::lsm_active() {
            return Err(KernelFenceError::LsmInactive);
        }
        let pinned = pins::open_or_create(pin_dir)?;
        Ok(KernelFence {
            guards: pinned.guards,
            passthrough: pinned.passthrough,
            _links: pinned.links,
        })
    }

    /// Where the plugin pins its fence. Versioned, so that a future incompatible layout of
    /// maps or programs never reuses these pins.
    pub fn default_pin_dir() -> PathBuf {
        PathBuf::from("/sys/fs/bpf/holdfast/v1")
    }

    /// Guards the filesystem whose `stat(mountpoint).st_dev` is `st_dev`: from now on any
    /// access checked by `file_permission` on it fails with `EIO` once boot-time now ≥
    /// `deadline_boot_ns` and, if `fuse`, with `ENOTCONN` once its FUSE connection is gone.
    /// Calling it again replaces the deadline (moved forward on renewal, to 0 to fence).
    pub fn guard(
        &self,
        st_dev: u64,
        deadline_boot_ns: u64,
        fuse: bool,
    ) -> Result<(), KernelFenceError> {
        let dev = kernel_dev(st_dev)?;
        syscall::map_update(
            self.guards.as_fd(),
            &dev.to_ne_bytes(),
            &guard_value(deadline_boot_ns, fuse),
        )
        .map_err(io_err(format!("set the guard of device {st_dev:#x}")))
    }

    /// Removes the guard of `st_dev` from the fence pinned under `pin_dir`, if a fence
    /// is pinned there, opening only its guards map: nothing is loaded or attached, so
    /// this works (and has nothing to say) on kernels that cannot run the fence.
    pub fn unguard_pinned(pin_dir: &Path, st_dev: u64) -> Result<(), KernelFenceError> {
        let dev = kernel_dev(st_dev)?;
        let path = pin_dir.join(pins::GUARDS_PIN);
        let guards = match syscall::obj_get(&path) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(io_err(format!("open the pin {}", path.display()))(e)),
        };
        syscall::map_delete(guards.as_fd(), &dev.to_ne_bytes())
            .map_err(io_err(format!("remove the guard of device {st_dev:#x}")))
    }

    /// Removes the guard of `st_dev` (after the mount is gone). Missing is not an error.
    pub fn unguard(&self, st_dev: u64) -> Result<(), KernelFenceError> {
        let dev = kernel_dev(st_dev)?;
        syscall::map_delete(self.guards.as_fd(), &dev.to_ne_bytes())
            .map_err(io_err(format!("remove the guard of device {st_dev:#x}")))
    }

    /// The `st_dev` of every guarded filesystem, stale guards included (their mount may
    /// be gone): what a restarted plugin compares with its mounts to remove stale guards.
    pub fn guarded_devs(&self) -> Result<Vec<u64>, KernelFenceError> {
        devs_in_guards_map(self.guards.as_fd())
    }

    /// Marks inode `ino` of filesystem `st_dev` as served by passthrough: a shared
    /// mapping of it through a file open for writing is refused with `EACCES` from now
    /// on, since its page faults would write the backing file with no syscall to refuse.
    pub fn mark_passthrough(&self, st_dev: u64, ino: u64) -> Result<(), KernelFenceError> {
        let key = inode_key(kernel_dev(st_dev)?, ino);
        syscall::map_update(self.passthrough.as_fd(), &key, &1u32.to_ne_bytes()).map_err(io_err(
            format!("mark inode {ino} of device {st_dev:#x} as passthrough"),
        ))
    }

    /// Undoes [`KernelFence::mark_passthrough`]. Missing is not an error.
    pub fn unmark_passthrough(&self, st_dev: u64, ino: u64) -> Result<(), KernelFenceError> {
        let key = inode_key(kernel_dev(st_dev)?, ino);
        syscall::map_delete(self.passthrough.as_fd(), &key)
            .map_err(io_err(format!("unmark inode {ino} of device {st_dev:#x}")))
    }

    /// Whether `bpf` is in the kernel's active LSM list (mounts securityfs at
    /// /sys/kernel/security first if the list is not readable).
    pub fn lsm_active() -> bool {
        pins::active_lsms().iter().any(|l| l == "bpf")
    }

    /// The guard of `st_dev` as the kernel sees it: `(deadline_boot_ns, fuse)`.
    #[cfg(test)]
    fn guard_of(&self, st_dev: u64) -> Option<(u64, bool)> {
        let dev = kernel_dev(st_dev).ok()?;
        let mut v = [0u8; 16];
        let found = syscall::map_lookup(self.guards.as_fd(), &dev.to_ne_bytes(), &mut v).ok()?;
        found.then(|| {
            let deadline = u64::from_ne_bytes(v[..8].try_into().unwrap());
            let flags = u32::from_ne_bytes(v[8..12].try_into().unwrap());
            (deadline, flags & program::GUARD_FUSE != 0)
        })
    }
}
