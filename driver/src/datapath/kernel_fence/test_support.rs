//! Helpers of the kernel fence tests: private pin directories and tmpfs mounts, the
//! boot-time clock, and errno-level checks of real syscalls.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{KernelFence, KernelFenceError};

/// Opens the fence at `pins`, or prints why this kernel cannot run it and returns None:
/// BPF LSM is not in the active LSM list, or the kernel refuses to load LSM programs at
/// all (some builds forbid trampoline-attached programs; the verifier never runs — the
/// programs themselves are checked by `tests::both_programs_pass_the_verifier`).
/// Any other failure fails the test.
pub(super) fn open_or_skip(test: &str, pins: &TestPins) -> Option<KernelFence> {
    if !KernelFence::lsm_active() {
        eprintln!(
            "SKIP {test}: BPF LSM is not active (`bpf` missing from /sys/kernel/security/lsm)"
        );
        return None;
    }
    match KernelFence::open(&pins.0) {
        Ok(fence) => Some(fence),
        Err(e @ KernelFenceError::LsmRefused { .. }) => {
            eprintln!("SKIP {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: open the kernel fence: {e}"),
    }
}

/// Boot-time now in ns (CLOCK_BOOTTIME, what the programs compare against).
pub(super) fn now_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub(super) fn sleep_until_boot_ns(t: u64) {
    let now = now_ns();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

/// A pin directory of this test alone; its pins are removed on drop, so the programs
/// detach once the fds of the test's `KernelFence`s close too.
pub(super) struct TestPins(pub(super) PathBuf);

impl TestPins {
    pub(super) fn new() -> TestPins {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        TestPins(PathBuf::from(format!(
            "/sys/fs/bpf/holdfast-test-{}-{n}",
            std::process::id()
        )))
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A small tmpfs of its own, mounted on a temporary directory.
pub(super) struct Tmpfs {
    pub(super) dir: tempfile::TempDir,
}

impl Tmpfs {
    pub(super) fn new() -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let target = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated strings for the duration of the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=8m".as_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "mount tmpfs: {}", io::Error::last_os_error());
        Tmpfs { dir }
    }
    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub(super) fn dev(&self) -> u64 {
        std::fs::metadata(self.dir.path()).unwrap().dev()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

pub(super) fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

pub(super) fn errno<T>(r: io::Result<T>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

/// `Ok` if both a write and a read of `f` succeed, else the errnos.
pub(super) fn io_result(f: &File) -> Result<(), (Option<i32>, Option<i32>)> {
    let w = errno(f.write_at(b"data", 0));
    let r = errno(f.read_at(&mut [0u8; 4], 0));
    if w.is_none() && r.is_none() {
        Ok(())
    } else {
        Err((w, r))
    }
}

pub(super) const EIO: Option<i32> = Some(libc::EIO);

pub(super) fn mmap_errno(file: &File, prot: i32, flags: i32) -> Option<i32> {
    // SAFETY: a fresh mapping request at a kernel-chosen address; unmapped at once.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, flags, file.as_raw_fd(), 0) };
    if p == libc::MAP_FAILED {
        return io::Error::last_os_error().raw_os_error();
    }
    // SAFETY: `p` is the 4096-byte mapping just made.
    unsafe { libc::munmap(p, 4096) };
    None
}
