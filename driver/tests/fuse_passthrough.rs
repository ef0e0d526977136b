//! Kernel passthrough under the kernel fence, with real FUSE mounts, real BPF LSM
//! programs and real processes: read-only and write-only opens bypass the daemon, yet
//! stop at the session deadline even while the daemon is stopped, fail with `ENOTCONN`
//! once it is dead, stop at an explicit fence, keep going across renewals, and can never
//! be mapped shared-writable.
//!
//! Every test needs a kernel that runs BPF LSM programs; where the kernel fence cannot
//! be loaded the data path serves every open through the daemon, and these tests say
//! why and return. `tests/kernel_fence_vm.rs` runs them in a VM on kernels that can,
//! and fails if they skipped there.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use holdfast_core::clock::Mono;
use holdfast_core::lease::{FenceCause, VolumeGate};
use holdfast_driver::datapath::kernel_fence::{KernelFence, KernelFenceError};
use holdfast_driver::datapath::{FenceAction, FuseOptions, FuseVolume};

mod fuse_child;
use fuse_child::{gate_for, ChildServer};

/// The child-process half of the kill and pause tests (see `fuse_child`).
#[test]
fn child_fuse_server() {
    fuse_child::serve_if_child();
}

fn dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    (
        tempfile::tempdir_in("/var/tmp").unwrap(),
        tempfile::tempdir_in("/var/tmp").unwrap(),
    )
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// False (with the reason printed) when this kernel cannot run the kernel fence; panics
/// if it can but the mount did not use passthrough.
fn passthrough_expected(mount_uses_it: bool) -> bool {
    match KernelFence::open(&KernelFence::default_pin_dir()) {
        Ok(_) => {}
        Err(e @ (KernelFenceError::LsmInactive | KernelFenceError::LsmRefused { .. })) => {
            eprintln!("skipped: {e}; no volume uses passthrough on this kernel");
            return false;
        }
        Err(e) => panic!("the kernel fence failed to load: {e}"),
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if kernel_version(&release) < (6, 9) {
        eprintln!(
            "skipped: kernel {} has no FUSE passthrough (6.9 and later); the kernel fence loads",
            release.trim()
        );
        return false;
    }
    assert!(
        mount_uses_it,
        "the kernel fence loads but the mount has no passthrough"
    );
    true
}

/// `(major, minor)` of a kernel release such as `6.12.117+deb13-cloud-amd64`.
fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn with_passthrough(action: FenceAction) -> FuseOptions {
    FuseOptions {
        passthrough: true,
        ..FuseOptions::new(action)
    }
}

/// A volume mounted in this process with passthrough asked for, behind `gate`.
/// `None` (with the reason printed) where the kernel fence cannot run.
struct Mounted {
    backing: tempfile::TempDir,
    target: tempfile::TempDir,
    vol: FuseVolume,
}

fn mount_with_passthrough(gate: &VolumeGate) -> Option<Mounted> {
    let (backing, target) = dirs();
    let opts = with_passthrough(FenceAction::Error);
    let vol = FuseVolume::mount(backing.path(), target.path(), gate.clone(), opts).unwrap();
    passthrough_expected(vol.uses_passthrough()).then_some(Mounted {
        backing,
        target,
        vol,
    })
}

#[test]
fn passthrough_writes_stop_at_the_deadline_while_the_server_is_stopped() {
    let (backing, target) = dirs();
    let deadline = Duration::from_millis(1500);
    let server = ChildServer::start_with(backing.path(), target.path(), deadline, true);
    if !passthrough_expected(server.passthrough) {
        return;
    }
    let mut f = File::create(target.path().join("file")).unwrap();
    f.write_all(b"before").unwrap();
    let mut r = File::open(target.path().join("file")).unwrap();
    let mut buf = [0u8; 6];
    r.read_exact(&mut buf).unwrap();
    // Dropped before `r` (even on a failed assertion): closing a FUSE file waits for
    // the daemon's answer to FLUSH, so the stopped server must be killed first.
    let server = server;
    assert!(server.ready_at.elapsed() < deadline, "setup too slow");

    // With the daemon stopped, only the kernel can stop these writes.
    server.signal(libc::SIGSTOP);
    let ready_at = server.ready_at;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let chunk = [0x42u8; 4096];
        let mut landed = 0usize;
        loop {
            match f.write(&chunk) {
                Ok(n) => landed += n,
                Err(e) => {
                    tx.send((landed, e.raw_os_error(), ready_at.elapsed()))
                        .unwrap();
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let (landed, errno, at) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("passthrough writes must fail at the deadline with the daemon stopped");
    assert_eq!(errno, Some(libc::EIO));
    // The deadline counts from before `ready_at`, so the refusal comes before it here.
    assert!(
        at <= deadline + Duration::from_millis(200),
        "refused at {at:?}"
    );
    assert!(landed > 0, "passthrough wrote nothing before the deadline");
    // Still stopped: nothing in user space had a hand in it.
    let stat = fs::read_to_string(format!("/proc/{}/stat", server.child.id())).unwrap();
    let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
    assert_eq!(state, Some("T"), "the server must still be stopped");
    assert_eq!(
        errno_of(r.read(&mut buf)),
        Some(libc::EIO),
        "reads stop too"
    );
    // Every byte the kernel accepted is in the backing file, and nothing else.
    let on_disk = fs::metadata(backing.path().join("file")).unwrap().len();
    assert_eq!(on_disk as usize, b"before".len() + landed);
}

#[test]
fn passthrough_writer_gets_enotconn_when_the_server_dies() {
    let (backing, target) = dirs();
    let mut server =
        ChildServer::start_with(backing.path(), target.path(), Duration::from_secs(60), true);
    if !passthrough_expected(server.passthrough) {
        return;
    }
    let mut f = File::create(target.path().join("file")).unwrap();
    f.write_all(b"before").unwrap();
    let mut r = File::open(target.path().join("file")).unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    assert_eq!(errno_of(f.write_all(b" after-death")), Some(libc::ENOTCONN));
    let mut buf = [0u8; 16];
    assert_eq!(errno_of(r.read(&mut buf)), Some(libc::ENOTCONN));
    assert_eq!(fs::read(backing.path().join("file")).unwrap(), b"before");
}

#[test]
fn explicit_fence_stops_open_passthrough_files() {
    let gate = gate_for(Duration::from_secs(60));
    let Some(Mounted {
        backing,
        target,
        vol,
    }) = mount_with_passthrough(&gate)
    else {
        return;
    };
    let mut w = File::create(target.path().join("file")).unwrap();
    w.write_all(b"before").unwrap();
    let mut r = File::open(target.path().join("file")).unwrap();
    let mut buf = [0u8; 6];
    r.read_exact(&mut buf).unwrap();

    gate.fence(FenceCause::NodeFenced);
    // The watcher carries the fence to the kernel within its poll (50 ms).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(errno_of(w.write_all(b" after-fence")), Some(libc::EIO));
    assert_eq!(errno_of(r.read(&mut buf)), Some(libc::EIO));
    drop((w, r));
    vol.unmount().unwrap();
    assert_eq!(fs::read(backing.path().join("file")).unwrap(), b"before");
}

#[test]
fn renewals_reach_the_kernel_fence() {
    let gate = gate_for(Duration::from_millis(600));
    let Some(Mounted {
        backing,
        target,
        vol,
    }) = mount_with_passthrough(&gate)
    else {
        return;
    };
    let mut w = File::create(target.path().join("file")).unwrap();
    w.write_all(b"a").unwrap();
    gate.session()
        .extend_to(Mono::now() + Duration::from_secs(60));
    // Well past the first deadline: the renewal must have reached the kernel.
    std::thread::sleep(Duration::from_millis(1000));
    w.write_all(b"b").unwrap();
    drop(w);
    vol.unmount().unwrap();
    assert_eq!(fs::read(backing.path().join("file")).unwrap(), b"ab");
}

fn mmap_errno(f: &File, prot: i32, flags: i32) -> Option<i32> {
    let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, flags, f.as_raw_fd(), 0) };
    if p == libc::MAP_FAILED {
        return Some(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    unsafe { libc::munmap(p, 4096) };
    None
}

#[test]
fn a_passthrough_inode_cannot_be_mapped_shared_writable() {
    let Some(Mounted {
        backing,
        target,
        vol,
    }) = mount_with_passthrough(&gate_for(Duration::from_secs(60)))
    else {
        return;
    };
    let path = target.path().join("file");
    let rw_prot = libc::PROT_READ | libc::PROT_WRITE;

    // First opened write-only: the inode is served by passthrough.
    let mut w = File::create(&path).unwrap();
    w.write_all(&[7u8; 4096]).unwrap();
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    assert_eq!(
        mmap_errno(&rw, rw_prot, libc::MAP_SHARED),
        Some(libc::EACCES)
    );
    assert_eq!(
        mmap_errno(&rw, libc::PROT_READ, libc::MAP_SHARED),
        Some(libc::EACCES),
        "a read-only shared map of a writable fd could be mprotect'ed writable"
    );
    assert_eq!(mmap_errno(&rw, rw_prot, libc::MAP_PRIVATE), None);
    let ro = File::open(&path).unwrap();
    assert_eq!(mmap_errno(&ro, libc::PROT_READ, libc::MAP_SHARED), None);
    drop((w, rw, ro));

    // First opened read-write: served by the daemon, shared writable maps work and
    // their stores reach the backing file through it. (The releases above reach the
    // daemon asynchronously; until they do, the inode is still in passthrough mode.)
    let mut mapped = None;
    for _ in 0..200 {
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                rw_prot,
                libc::MAP_SHARED,
                rw.as_raw_fd(),
                0,
            )
        };
        if p != libc::MAP_FAILED {
            mapped = Some((rw, p));
            break;
        }
        drop(rw);
        std::thread::sleep(Duration::from_millis(10));
    }
    let (rw, p) = mapped.expect("a read-write first open maps shared-writable");
    unsafe {
        *(p as *mut u8) = 9;
        assert_eq!(libc::msync(p, 4096, libc::MS_SYNC), 0);
        libc::munmap(p, 4096);
    }
    drop(rw);
    vol.unmount().unwrap();
    assert_eq!(fs::read(backing.path().join("file")).unwrap()[0], 9);
}

#[test]
fn freeze_volumes_do_not_use_passthrough() {
    let (backing, target) = dirs();
    let vol = FuseVolume::mount(
        backing.path(),
        target.path(),
        gate_for(Duration::from_secs(60)),
        with_passthrough(FenceAction::Freeze),
    )
    .unwrap();
    // The kernel can refuse an access, never park it: freeze needs the daemon.
    assert!(!vol.uses_passthrough());
    let started = Instant::now();
    vol.unmount().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}
