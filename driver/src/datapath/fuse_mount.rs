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
use super::kernel_fence::KernelFence;
use super::passthrough::Passthrough;
use super::{DataPathError, FenceAction, FuseOptions};

/// A mounted FUSE volume. Dropping it unmounts (prefer [`FuseVolume::unmount`], which
/// reports errors).
pub struct FuseVolume {
    target: PathBuf,
    fence: Arc<Fence>,
    passthrough: Arc<Passthrough>,
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
        let passthrough = Arc::new(Passthrough::new());
        let negotiated = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fs = VolumeFs::new(
            fence.clone(),
            inodes.clone(),
            passthrough.clone(),
            negotiated.clone(),
            opts.clone(),
        );
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
        let wanted = opts.passthrough
            && opts.fence_action == FenceAction::Error
            && negotiated.load(std::sync::atomic::Ordering::SeqCst);
        if wanted {
            guard_mount(target, &fence, &passthrough);
            if passthrough.enabled() {
                // Asked here, while this daemon surely runs, so that the kernel has
                // learnt that this mount answers no getxattr before any write needs it
                // (see `getxattr` in fs.rs).
                let _ = rustix::fs::getxattr(target, "security.capability", &mut [0u8; 0]);
            }
        } else {
            clear_stale_guard(target);
        }

        let notifier = session.notifier();
        let (f, p, poll) = (fence.clone(), passthrough.clone(), opts.fence_poll);
        let watcher = std::thread::Builder::new()
            .name("holdfast-fence".into())
            .spawn(move || fence::watch(f, inodes, p, notifier, poll))
            .map_err(DataPathError::Session)?;

        Ok(FuseVolume {
            target: target.to_owned(),
            fence,
            passthrough,
            session: Some(session),
            watcher: Some(watcher),
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Whether read-only and write-only opens are served by kernel passthrough (the
    /// kernel fence guards this mount).
    pub fn uses_passthrough(&self) -> bool {
        self.passthrough.enabled()
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
        // Passthrough I/O stops before anything else: from here on no access to a file
        // of this mount succeeds, whoever still holds it open.
        self.passthrough.set_deadline(0);
        let result = unmount_target(&self.target);
        match &result {
            Ok(Unmounted::Clean) => {
                let _ = session.join();
                self.passthrough.unguard();
            }
            // Files of the mount are still open somewhere: the guard stays (stopped)
            // until the superblock is gone.
            Ok(Unmounted::Detached) => {
                if let Some(dev) = self.passthrough.dev() {
                    unguard_when_gone(self.passthrough.clone(), minor(dev));
                }
            }
            Err(_) => {}
        }
        let result = result.map(|_| ());
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

/// How an unmount went.
enum Unmounted {
    /// The mount is gone and nothing of it is open.
    Clean,
    /// It was busy: detached and its connection aborted; open files linger.
    Detached,
}

fn unmount_target(target: &Path) -> Result<Unmounted, DataPathError> {
    let err = |e: rustix::io::Errno| DataPathError::Unmount {
        path: target.to_owned(),
        source: e.into(),
    };
    let dev = stat(target).ok().map(|st| st.st_dev);
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(Unmounted::Clean),
        // Not mounted (any more): nothing to do.
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(Unmounted::Clean),
        Err(rustix::io::Errno::BUSY) => {
            rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(err)?;
            if let Some(dev) = dev {
                abort_connection(minor(dev)).map_err(|source| DataPathError::Unmount {
                    path: target.to_owned(),
                    source,
                })?;
            }
            Ok(Unmounted::Detached)
        }
        Err(e) => Err(err(e)),
    }
}

/// Aborts a FUSE connection through fusectl, mounting fusectl if needed: every pending
/// and later request on it fails with `ENOTCONN`, and the session threads end. A
/// connection that is gone already (a detached mount nobody used any more goes at
/// once) has nothing left to abort.
pub(super) fn abort_connection(conn: u32) -> std::io::Result<()> {
    let dir = Path::new("/sys/fs/fuse/connections");
    let abort = dir.join(conn.to_string()).join("abort");
    if !abort.exists() {
        let _ = rustix::mount::mount("fusectl", dir, "fusectl", MountFlags::empty(), None);
    }
    match std::fs::write(abort, "1") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The kernel fence shared by every volume of this process (and, through its pins, by
/// every plugin process on the node). `None` when BPF LSM is not available: volumes are
/// then served without passthrough. Opened once; the outcome is logged once.
fn kernel_fence() -> Option<Arc<KernelFence>> {
    static FENCE: std::sync::OnceLock<Option<Arc<KernelFence>>> = std::sync::OnceLock::new();
    FENCE
        .get_or_init(|| match KernelFence::open(&KernelFence::default_pin_dir()) {
            Ok(k) => {
                tracing::info!("kernel fence loaded: FUSE volumes use passthrough");
                sweep_stale_guards(&k);
                Some(Arc::new(k))
            }
            Err(e) => {
                tracing::warn!(
                    reason = %e.headline(),
                    "kernel fence unavailable: FUSE volumes are served through the daemon, without passthrough"
                );
                tracing::debug!(error = %e, "kernel fence: the whole error");
                None
            }
        })
        .clone()
}

/// Removes the guards a dead plugin left for mounts whose FUSE connection is gone (their
/// superblock is gone, so no file of them is open). Guards of live connections, this
/// node's other plugin processes' included, stay.
fn sweep_stale_guards(kf: &KernelFence) {
    let Ok(devs) = kf.guarded_devs() else { return };
    let conns = Path::new("/sys/fs/fuse/connections");
    // Without fusectl every connection would look gone: mount it, or sweep nothing.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split(' ').nth(2) == Some("fusectl"))
        && rustix::mount::mount("fusectl", conns, "fusectl", MountFlags::empty(), None).is_err()
    {
        return;
    }
    for dev in devs {
        if !conns.join(minor(dev).to_string()).exists() {
            let _ = kf.unguard(dev);
        }
    }
}

/// Puts the mount under the kernel fence with the gate's current deadline, then allows
/// passthrough. Any failure leaves passthrough off (every request goes through the gate).
fn guard_mount(target: &Path, fence: &Fence, passthrough: &Passthrough) {
    #[cfg(test)]
    if tests::UNFENCED.load(std::sync::atomic::Ordering::SeqCst) {
        let _ = fence;
        passthrough.enable_unfenced(stat(target).map_or(0, |st| st.st_dev));
        return;
    }
    let Some(kf) = kernel_fence() else { return };
    let Ok(st) = stat(target) else { return };
    match kf.guard(st.st_dev, fence.kernel_deadline_ns(), true) {
        Ok(()) => passthrough.enable(kf, st.st_dev),
        Err(e) => {
            tracing::warn!(target = %target.display(), error = %e, "kernel fence refused the mount; no passthrough")
        }
    }
}

/// A mount served without passthrough must not inherit the stopped guard a dead mount
/// of ours left on the same device number. Only the pinned guards map is opened: the
/// fence itself (and what is logged about it) is the business of passthrough mounts.
fn clear_stale_guard(target: &Path) {
    if let Ok(st) = stat(target) {
        let _ = KernelFence::unguard_pinned(&KernelFence::default_pin_dir(), st.st_dev);
    }
}

/// Removes the (stopped) guard of a detached mount once its FUSE connection, and so its
/// superblock, is gone: until then a file of it may still be open. If this process ends
/// first the stopped guard simply stays; it names a device number no live mount of ours
/// uses, and a later mount that gets the number overwrites it.
fn unguard_when_gone(passthrough: Arc<Passthrough>, conn: u32) {
    let dir = Path::new("/sys/fs/fuse/connections").join(conn.to_string());
    let _ = std::thread::Builder::new()
        .name("holdfast-unguard".into())
        .spawn(move || {
            while dir.exists() {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            passthrough.unguard();
        });
}

#[cfg(test)]
mod tests {
    //! The passthrough plumbing against the real kernel, without the kernel fence (which
    //! some kernels refuse to run): which opens the kernel serves by passthrough, and that
    //! it accepts every mode this daemon answers with.
    use std::fs::{self, File, OpenOptions};
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;
    use holdfast_core::lease::VolumeGate;

    /// Set by these tests only: mounts enable passthrough with no kernel fence.
    pub(super) static UNFENCED: AtomicBool = AtomicBool::new(false);

    fn node_id(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn passthrough_serves_read_only_and_write_only_opens_and_the_kernel_accepts_every_mode() {
        UNFENCED.store(true, std::sync::atomic::Ordering::SeqCst);
        let backing = tempfile::tempdir_in("/var/tmp").unwrap();
        let target = tempfile::tempdir_in("/var/tmp").unwrap();
        let opts = FuseOptions {
            passthrough: true,
            ..FuseOptions::new(FenceAction::Error)
        };
        let vol = FuseVolume::mount(backing.path(), target.path(), VolumeGate::unclaimed(), opts)
            .unwrap();
        assert!(vol.uses_passthrough());
        let t = |n: &str| target.path().join(n);

        // Created write-only: passthrough; data lands; a read-write open of the same
        // inode is accepted by the kernel (it must be passthrough too).
        let mut w = File::create(t("a")).unwrap();
        w.write_all(b"passthrough").unwrap();
        let id = node_id(&t("a"));
        assert!(vol.passthrough.is_passthrough(id));
        let mut rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(t("a"))
            .unwrap();
        let mut got = String::new();
        rw.read_to_string(&mut got).unwrap();
        assert_eq!(got, "passthrough");
        let mut ro = File::open(t("a")).unwrap();
        got.clear();
        ro.read_to_string(&mut got).unwrap();
        assert_eq!(got, "passthrough");
        w.sync_all().unwrap();
        drop((w, rw, ro));
        assert_eq!(fs::read(backing.path().join("a")).unwrap(), b"passthrough");

        // Created read-write: served by the daemon, and so are later read-only opens.
        let mut rw = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(t("b"))
            .unwrap();
        rw.write_all(b"daemon").unwrap();
        let id_b = node_id(&t("b"));
        assert!(!vol.passthrough.is_passthrough(id_b));
        assert_eq!(fs::read(t("b")).unwrap(), b"daemon");
        drop(rw);

        // Once every open of "a" is released the inode leaves passthrough, and a
        // read-write first open then goes to the daemon. Releases arrive asynchronously.
        let mut left = false;
        for _ in 0..200 {
            if !vol.passthrough.is_passthrough(id) {
                left = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            left,
            "the inode stays in passthrough after its last release"
        );
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(t("a"))
            .unwrap();
        assert!(!vol.passthrough.is_passthrough(id));
        drop(rw);
        vol.unmount().unwrap();
    }

    #[test]
    fn aborting_a_connection_that_is_gone_is_not_an_error() {
        // No FUSE connection has this number: the kernel counts minors from a few.
        assert!(!Path::new("/sys/fs/fuse/connections/4000000000").exists());
        abort_connection(4_000_000_000).unwrap();
    }
}
