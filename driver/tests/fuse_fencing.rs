//! Fencing of the FUSE data path, with real mounts and real processes: after a fence or
//! a missed session deadline not one byte reaches the backing directory; a killed
//! server leaves `ENOTCONN`; a paused server that wakes past its deadline refuses the
//! write queued while it slept.
//!
//! The kill and pause tests serve the volume from a child process: this test binary
//! re-executed with `HOLDFAST_FUSE_CHILD_*` set, running only [`child_fuse_server`].

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use holdfast_core::lease::FenceCause;
use holdfast_driver::datapath::{FenceAction, FuseOptions, FuseVolume};

mod fuse_child;
use fuse_child::{gate_for, ChildServer};

fn dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    (
        tempfile::tempdir_in("/var/tmp").unwrap(),
        tempfile::tempdir_in("/var/tmp").unwrap(),
    )
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Writes `before` durably, then `unsynced` into the page cache only.
fn write_before(path: &Path, before: &[u8], unsynced: &[u8]) -> File {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(before).unwrap();
    f.sync_all().unwrap();
    f.write_all(unsynced).unwrap();
    f
}

#[test]
fn fence_with_error_fails_every_operation_and_writes_nothing() {
    fence_with_error(false);
}

/// With the writeback cache, un-fsync'd data sits in the kernel when the fence comes;
/// its write-back is refused like any write.
#[test]
fn fence_with_error_writes_nothing_with_writeback_cache() {
    fence_with_error(true);
}

fn fence_with_error(writeback: bool) {
    let (backing, target) = dirs();
    let gate = gate_for(Duration::from_secs(60));
    let mut opts = FuseOptions::new(FenceAction::Error);
    opts.writeback_cache = writeback;
    let vol = FuseVolume::mount(backing.path(), target.path(), gate.clone(), opts).unwrap();
    let t = |p: &str| target.path().join(p);
    fs::create_dir(t("dir")).unwrap();
    let mut f = write_before(&t("file"), b"before", b" unsynced");

    gate.fence(FenceCause::NodeFenced);
    // Let the fence watcher drop the kernel's cached pages and attributes.
    std::thread::sleep(Duration::from_millis(300));

    // With the writeback cache a write may still land in the page cache; it can never
    // be made durable. Without it, the write itself fails.
    let w = f.write_all(b" after-fence");
    if !writeback {
        assert_eq!(errno_of(w), Some(libc::EIO), "write after fence");
    }
    assert_eq!(errno_of(f.sync_all()), Some(libc::EIO), "fsync after fence");
    assert_eq!(errno_of(fs::metadata(t("file"))), Some(libc::EIO), "stat");
    assert_eq!(errno_of(File::open(t("file"))), Some(libc::EIO), "open");
    assert_eq!(errno_of(fs::read_dir(t("dir"))), Some(libc::EIO), "opendir");
    assert_eq!(
        errno_of(fs::create_dir(t("new-dir"))),
        Some(libc::EIO),
        "mkdir"
    );
    assert_eq!(
        errno_of(fs::write(t("new-file"), b"x")),
        Some(libc::EIO),
        "create"
    );
    assert_eq!(errno_of(fs::remove_dir(t("dir"))), Some(libc::EIO), "rmdir");
    drop(f);

    // Without the writeback cache the un-fsync'd write went through the gate before the
    // fence and is in the backing file; with it, it was still in the kernel and is lost.
    // Nothing written after the fence is there in either case.
    let expected: &[u8] = if writeback {
        b"before"
    } else {
        b"before unsynced"
    };
    assert_eq!(fs::read(backing.path().join("file")).unwrap(), expected);
    assert!(backing.path().join("dir").exists());
    assert!(!backing.path().join("new-dir").exists());
    assert!(!backing.path().join("new-file").exists());
    vol.unmount().unwrap();
}

#[test]
fn fence_with_freeze_parks_operations_until_unmount() {
    let (backing, target) = dirs();
    let gate = gate_for(Duration::from_secs(60));
    let vol = FuseVolume::mount(
        backing.path(),
        target.path(),
        gate.clone(),
        FuseOptions::new(FenceAction::Freeze),
    )
    .unwrap();
    let mut f = write_before(&target.path().join("file"), b"before", b"");
    gate.fence(FenceCause::ClaimLost);

    let (tx, rx) = mpsc::channel();
    let dir = target.path().join("frozen-dir");
    let tx2 = tx.clone();
    std::thread::spawn(move || tx2.send(("mkdir", errno_of(fs::create_dir(dir)))).unwrap());
    std::thread::spawn(move || {
        let r = f.write_all(b" frozen").and_then(|()| f.sync_all());
        tx.send(("write+fsync", errno_of(r))).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(800)).is_err(),
        "a frozen volume must not answer"
    );

    vol.unmount().unwrap();
    for _ in 0..2 {
        let (op, err) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("released by unmount");
        assert!(err.is_some(), "{op} must fail once released, not succeed");
    }
    assert_eq!(fs::read(backing.path().join("file")).unwrap(), b"before");
    assert!(!backing.path().join("frozen-dir").exists());
}

#[test]
fn session_deadline_passing_without_renewal_stops_writes() {
    let (backing, target) = dirs();
    let gate = gate_for(Duration::from_millis(300));
    let vol = FuseVolume::mount(
        backing.path(),
        target.path(),
        gate,
        FuseOptions::new(FenceAction::Error),
    )
    .unwrap();
    let mut f = write_before(&target.path().join("file"), b"before", b"");
    std::thread::sleep(Duration::from_millis(450));
    let r = f.write_all(b" late").and_then(|()| f.sync_all());
    assert_eq!(errno_of(r), Some(libc::EIO));
    assert_eq!(
        errno_of(fs::metadata(target.path().join("file"))),
        Some(libc::EIO)
    );
    drop(f);
    assert_eq!(fs::read(backing.path().join("file")).unwrap(), b"before");
    vol.unmount().unwrap();
}

/// The child-process half of the kill and pause tests, not a test of its own: it does
/// nothing unless started by [`ChildServer::start`].
#[test]
fn child_fuse_server() {
    fuse_child::serve_if_child();
}

#[test]
fn killed_server_leaves_enotconn() {
    let (backing, target) = dirs();
    let mut server = ChildServer::start(backing.path(), target.path(), Duration::from_secs(60));
    let mut f = write_before(&target.path().join("file"), b"before", b"");
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    let r = f.write_all(b" after-death").and_then(|()| f.sync_all());
    assert_eq!(errno_of(r), Some(libc::ENOTCONN));
    assert_eq!(
        errno_of(fs::metadata(target.path().join("file"))),
        Some(libc::ENOTCONN)
    );
    assert_eq!(
        errno_of(fs::write(target.path().join("new"), b"x")),
        Some(libc::ENOTCONN)
    );
    assert_eq!(fs::read(backing.path().join("file")).unwrap(), b"before");
}

#[test]
fn paused_server_waking_past_its_deadline_refuses_the_queued_write() {
    let (backing, target) = dirs();
    let deadline = Duration::from_millis(1500);
    let server = ChildServer::start(backing.path(), target.path(), deadline);
    let mut f = write_before(&target.path().join("file"), b"before", b"");
    assert!(
        server.ready_at.elapsed() < deadline,
        "setup too slow for the deadline"
    );

    server.signal(libc::SIGSTOP);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = f
            .write_all(b" queued-while-paused")
            .and_then(|()| f.sync_all());
        tx.send(errno_of(r)).unwrap();
    });
    // The write is queued to a stopped daemon: it cannot complete.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    let wake_at = server.ready_at + deadline + Duration::from_millis(500);
    std::thread::sleep(wake_at.saturating_duration_since(Instant::now()));
    server.signal(libc::SIGCONT);

    let err = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("write completes after wake");
    assert_eq!(err, Some(libc::EIO));
    assert_eq!(fs::read(backing.path().join("file")).unwrap(), b"before");
}

/// Pages kept in the kernel across opens (`FOPEN_KEEP_CACHE`) and cached attributes are
/// dropped at the fence: a read through a descriptor opened and read before the fence,
/// of pages already cached, fails instead of being answered from the page cache.
#[test]
fn cached_pages_are_not_served_after_a_fence() {
    use std::os::unix::fs::FileExt;
    let (backing, target) = dirs();
    let gate = gate_for(Duration::from_secs(60));
    let opts = FuseOptions::new(FenceAction::Error);
    let vol = FuseVolume::mount(backing.path(), target.path(), gate.clone(), opts).unwrap();
    let path = target.path().join("cached");
    fs::write(&path, vec![7u8; 64 << 10]).unwrap();
    let f = File::open(&path).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    f.read_exact_at(&mut buf, 0).unwrap();
    // A second open keeps the cache: this read is served from the kernel's pages.
    let again = File::open(&path).unwrap();
    again.read_exact_at(&mut buf, 0).unwrap();

    gate.fence(FenceCause::NodeFenced);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(errno_of(f.read_at(&mut buf, 0)), Some(libc::EIO), "read");
    assert_eq!(errno_of(again.read_at(&mut buf, 4096)), Some(libc::EIO));
    assert_eq!(errno_of(f.metadata()), Some(libc::EIO), "fstat");
    drop((f, again));
    vol.unmount().unwrap();
}

/// A lookup miss is cached (a negative entry) while the volume is held; at the fence
/// every cached entry is dropped, so the cached miss is not answered after it: the
/// lookup goes to the daemon and fails with `EIO` like everything else.
#[test]
fn cached_lookup_misses_are_not_served_after_a_fence() {
    let (backing, target) = dirs();
    let gate = gate_for(Duration::from_secs(60));
    let opts = FuseOptions::new(FenceAction::Error);
    let vol = FuseVolume::mount(backing.path(), target.path(), gate.clone(), opts).unwrap();
    let missing = target.path().join("missing");
    assert_eq!(errno_of(fs::metadata(&missing)), Some(libc::ENOENT));
    // Created behind the daemon's back: the kernel still answers from its cached miss,
    // which shows the cache is live (the next assertions are not vacuous).
    fs::write(backing.path().join("missing"), b"x").unwrap();
    assert_eq!(errno_of(fs::metadata(&missing)), Some(libc::ENOENT));

    gate.fence(FenceCause::NodeFenced);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(errno_of(fs::metadata(&missing)), Some(libc::EIO), "stat");
    assert_eq!(errno_of(File::open(&missing)), Some(libc::EIO), "open");
    assert_eq!(
        errno_of(fs::write(target.path().join("missing"), b"y")),
        Some(libc::EIO),
        "create"
    );
    assert_eq!(fs::read(backing.path().join("missing")).unwrap(), b"x");
    vol.unmount().unwrap();
}
