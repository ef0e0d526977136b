//! Mounting and unmounting one FUSE volume: `/dev/fuse`, mount(2), the fuser session
//! threads, the fence watcher, and the mount's readahead.
//!
//! The mount is made directly with mount(2) (we are root): no fusermount, no
//! auto-unmount helper that could keep the mount serving or hide the daemon's death.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{BackgroundSession, Config, Session, SessionACL};
use holdfast_core::lease::VolumeGate;
use rustix::fs::{fstat, major, minor, openat, stat, FileType, Mode, OFlags, CWD};
use rustix::mount::{MountFlags, UnmountFlags};

use super::fence::{self, Fence};
use super::fs::VolumeFs;
use super::inodes::InodeTable;
use super::{DataPathError, FuseOptions};

/// A mounted FUSE volume. Dropping it unmounts (prefer [`FuseVolume::unmount`], which
/// reports errors).
pub struct FuseVolume {
    target: PathBuf,
    fence: Arc<Fence>,
    session: Option<BackgroundSession>,
    watcher: Option<JoinHandle<()>>,
}

impl FuseVolume {
    /// Serves `backing_dir` at `target` through FUSE; every operation first checks `gate`.
    pub fn mount(
        backing_dir: &Path,
        target: &Path,
        gate: VolumeGate,
        opts: FuseOptions,
    ) -> Result<FuseVolume, DataPathError> {
        if opts.threads == 0 || opts.max_write < 4096 {
            return Err(DataPathError::Options(
                "threads ≥ 1 and max_write ≥ 4096 required",
            ));
        }
        let backing_err = |source| DataPathError::Backing {
            path: backing_dir.to_owned(),
            source,
        };
        let root_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let root_fd = openat(CWD, backing_dir, root_flags, Mode::empty())
            .map_err(|e| backing_err(e.into()))?;
        let root_st = fstat(&root_fd).map_err(|e| backing_err(e.into()))?;
        let target_st = stat(target).map_err(|e| DataPathError::Target {
            path: target.to_owned(),
            source: e.into(),
        })?;
        if FileType::from_raw_mode(target_st.st_mode) != FileType::Directory {
            return Err(DataPathError::Target {
                path: target.to_owned(),
                source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }

        let dev_fuse = open_dev_fuse().map_err(|source| DataPathError::Mount {
            path: target.to_owned(),
            source,
        })?;
        mount_fuse(&dev_fuse, target, &opts).map_err(|source| DataPathError::Mount {
            path: target.to_owned(),
            source,
        })?;

        let mut opts = opts;
        opts.write_through = Some(
            opts.write_through
                .unwrap_or_else(|| !super::sys::is_local_fs(&root_fd)),
        );
        let fence = Arc::new(Fence::new(gate, opts.fence_action));
        let inodes = Arc::new(InodeTable::new(root_fd, &root_st));
        let fs = VolumeFs::new(fence.clone(), inodes.clone(), opts.clone());
        let mut config = Config::default();
        config.n_threads = Some(opts.threads);
        config.clone_fd = opts.threads > 1;
        // The kernel checks modes (default_permissions); fuser must not filter by uid.
        let session = Session::from_fd(fs, dev_fuse, SessionACL::All, config)
            .and_then(Session::spawn)
            .map_err(|e| {
                let _ = rustix::mount::unmount(target, UnmountFlags::DETACH);
                DataPathError::Session(e)
            })?;

        tune_bdi(target, &opts);

        let notifier = session.notifier();
        let (f, poll) = (fence.clone(), opts.fence_poll);
        let watcher = std::thread::Builder::new()
            .name("holdfast-fence".into())
            .spawn(move || fence::watch(f, inodes, notifier, poll))
            .map_err(DataPathError::Session)?;

        Ok(FuseVolume {
            target: target.to_owned(),
            fence,
            session: Some(session),
            watcher: Some(watcher),
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts: releases parked (frozen) requests with `EIO`, unmounts, and waits for
    /// the session threads. If the mount is busy it is detached and its connection
    /// aborted, so that no further I/O can go through it. Unmounting a target that is no
    /// longer mounted succeeds.
    pub fn unmount(mut self) -> Result<(), DataPathError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), DataPathError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        self.fence.close();
        let result = unmount_target(&self.target);
        if result.is_ok() {
            let _ = session.join();
        }
        // On failure the session threads are left to end with the connection.
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        result
    }
}

impl Drop for FuseVolume {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn open_dev_fuse() -> std::io::Result<OwnedFd> {
    let flags = OFlags::RDWR | OFlags::CLOEXEC;
    Ok(openat(CWD, "/dev/fuse", flags, Mode::empty())?)
}

fn mount_fuse(dev_fuse: &OwnedFd, target: &Path, opts: &FuseOptions) -> std::io::Result<()> {
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
        dev_fuse.as_raw_fd(),
        opts.max_write
    );
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    if opts.read_only {
        flags |= MountFlags::RDONLY;
    }
    let data = std::ffi::CString::new(data).map_err(std::io::Error::other)?;
    rustix::mount::mount("holdfast", target, "fuse.holdfast", flags, data.as_c_str())?;
    Ok(())
}

/// Tunes the mount's BDI. The kernel caps FUSE readahead at its own default in INIT and
/// gives a FUSE mount a strict 1% share of the dirty-page limit, which throttles a
/// writer to the daemon's measured bandwidth long before memory is short; with the
/// writeback cache that halves sequential write speed. Lifting the strict limit only
/// lets more un-fsync'd data sit in the FUSE page cache, and that data is refused at a
/// fence like any other. Best effort: a failure only costs speed.
fn tune_bdi(target: &Path, opts: &FuseOptions) {
    let Ok(st) = stat(target) else { return };
    let dir = format!("/sys/class/bdi/{}:{}", major(st.st_dev), minor(st.st_dev));
    let dir = Path::new(&dir);
    let _ = std::fs::write(dir.join("read_ahead_kb"), opts.readahead_kb.to_string());
    if opts.dirty_max_ratio > 0 {
        let _ = std::fs::write(dir.join("max_ratio"), opts.dirty_max_ratio.to_string());
        let _ = std::fs::write(dir.join("strict_limit"), "0");
    }
}

fn unmount_target(target: &Path) -> Result<(), DataPathError> {
    let err = |e: rustix::io::Errno| DataPathError::Unmount {
        path: target.to_owned(),
        source: e.into(),
    };
    let dev = stat(target).ok().map(|st| st.st_dev);
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        // Not mounted (any more): nothing to do.
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::BUSY) => {
            rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(err)?;
            if let Some(dev) = dev {
                abort_connection(minor(dev)).map_err(|source| DataPathError::Unmount {
                    path: target.to_owned(),
                    source,
                })?;
            }
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

/// Aborts a FUSE connection through fusectl, mounting fusectl if needed: every pending
/// and later request on it fails with `ENOTCONN`, and the session threads end.
pub(super) fn abort_connection(conn: u32) -> std::io::Result<()> {
    let dir = Path::new("/sys/fs/fuse/connections");
    let abort = dir.join(conn.to_string()).join("abort");
    if !abort.exists() {
        let _ = rustix::mount::mount("fusectl", dir, "fusectl", MountFlags::empty(), None);
    }
    std::fs::write(abort, "1")
}
