//! The fence against the real kernel: real BPF LSM programs, real tmpfs mounts, real
//! syscalls, a real paused process. A test that needs the programs attached is skipped,
//! with the reason printed, only when this kernel cannot run BPF LSM programs at all
//! ([`open_or_skip`]); the programs still go through the kernel's verifier
//! ([`both_programs_pass_the_verifier`]). `tests/kernel_fence_vm.rs` runs them in a VM
//! on kernels that run BPF LSM, where none may skip.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use super::test_support::*;
use super::*;

#[test]
fn kernel_dev_is_mkdev_of_major_and_minor() {
    assert_eq!(kernel_dev(libc::makedev(8, 1)).unwrap(), (8 << 20) | 1);
    assert_eq!(kernel_dev(libc::makedev(0, 0x12345)).unwrap(), 0x12345);
    assert_eq!(
        kernel_dev(libc::makedev(259, 0xfff)).unwrap(),
        (259 << 20) | 0xfff
    );
    assert!(matches!(
        kernel_dev(libc::makedev(5000, 0)),
        Err(KernelFenceError::BadDevice { .. })
    ));
    let v = guard_value(0x1122_3344_5566_7788, true);
    assert_eq!(
        u64::from_ne_bytes(v[..8].try_into().unwrap()),
        0x1122_3344_5566_7788
    );
    assert_eq!(u32::from_ne_bytes(v[8..12].try_into().unwrap()), 1);
    assert_eq!(&v[12..], &[0; 4]);
}

#[test]
fn expired_guard_refuses_read_and_write_until_renewed_or_removed() {
    let pins = TestPins::new();
    let Some(fence) = open_or_skip(
        "expired_guard_refuses_read_and_write_until_renewed_or_removed",
        &pins,
    ) else {
        return;
    };
    let (fs, other) = (Tmpfs::new(), Tmpfs::new());
    let (file, other_file) = (open_rw(&fs.path("data")), open_rw(&other.path("data")));

    let deadline = now_ns() + 300_000_000;
    fence.guard(fs.dev(), deadline, false).unwrap();
    assert_eq!(fence.guard_of(fs.dev()), Some((deadline, false)));
    assert_eq!(io_result(&file), Ok(()), "before the deadline");
    sleep_until_boot_ns(deadline + 20_000_000);
    assert_eq!(io_result(&file), Err((EIO, EIO)), "after the deadline");
    assert_eq!(
        io_result(&other_file),
        Ok(()),
        "another filesystem is not guarded"
    );

    fence
        .guard(fs.dev(), now_ns() + 10_000_000_000, false)
        .unwrap();
    assert_eq!(io_result(&file), Ok(()), "renewed");
    fence.guard(fs.dev(), now_ns() - 1, false).unwrap();
    assert_eq!(io_result(&file), Err((EIO, EIO)), "expired again");
    fence.unguard(fs.dev()).unwrap();
    assert_eq!(io_result(&file), Ok(()), "unguarded");
    assert_eq!(fence.guard_of(fs.dev()), None);
    fence.unguard(fs.dev()).expect("unguarding twice is fine");
}

#[test]
fn deadline_zero_fences_every_checked_access_at_once() {
    let pins = TestPins::new();
    let Some(fence) = open_or_skip("deadline_zero_fences_every_checked_access_at_once", &pins)
    else {
        return;
    };
    let fs = Tmpfs::new();
    let mut file = open_rw(&fs.path("data"));
    file.write_all(b"before").unwrap();
    fence.guard(fs.dev(), 0, false).unwrap();

    assert_eq!(errno(file.write(b"x")), EIO);
    assert_eq!(
        errno(File::open(fs.path("data")).unwrap().read(&mut [0u8; 8])),
        EIO
    );
    let listing = std::fs::read_dir(fs.dir.path()).unwrap().next();
    assert_eq!(listing.map(errno), Some(EIO), "readdir");
    // SAFETY: a fresh mapping request; the result is only checked, never dereferenced.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    assert_eq!(map, libc::MAP_FAILED, "mmap on an expired guard");
    assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EIO));
}

#[test]
fn paused_writer_gets_eio_on_its_first_write_after_the_deadline() {
    let pins = TestPins::new();
    let Some(fence) = open_or_skip(
        "paused_writer_gets_eio_on_its_first_write_after_the_deadline",
        &pins,
    ) else {
        return;
    };
    let fs = Tmpfs::new();
    let path = fs.path("log");
    let deadline = now_ns() + 500_000_000;
    fence.guard(fs.dev(), deadline, false).unwrap();

    // Appends fixed-size records until a write fails, then exits 7.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3>>"$1"; i=0; while :; do printf '%08d\n' $i >&3 || exit 7; i=$((i+1)); done"#)
        .arg("sh")
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    while size() < 90 && started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: plain signal and wait on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut status = 0;
    // SAFETY: as above; WUNTRACED reports the stop without reaping the child.
    assert_eq!(
        unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) },
        pid
    );
    assert!(libc::WIFSTOPPED(status), "child stopped");
    let at_stop = size();
    assert!(
        now_ns() < deadline,
        "the writer was stopped before its deadline"
    );
    assert!(at_stop >= 90, "the writer wrote before it was stopped");

    // Nobody in user space acts on the deadline: the kernel alone refuses the next write.
    sleep_until_boot_ns(deadline + 100_000_000);
    // SAFETY: plain signal to our own child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let resumed = Instant::now();
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if resumed.elapsed() > Duration::from_secs(3) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the writer kept writing after its deadline ({} bytes)",
                size()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(exit.code(), Some(7), "the writer's next write failed");
    assert_eq!(
        size(),
        at_stop,
        "no byte written after the deadline reached the file"
    );
    let text = std::fs::read_to_string(&path);
    assert_eq!(errno(text), EIO, "reads are refused too");
    fence.unguard(fs.dev()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.lines()
            .enumerate()
            .all(|(i, l)| l == format!("{i:08}")),
        "whole records only"
    );
}

#[test]
fn pinned_fence_outlives_its_opener_and_is_reused() {
    let pins = TestPins::new();
    let Some(first) = open_or_skip("pinned_fence_outlives_its_opener_and_is_reused", &pins) else {
        return;
    };
    let fs = Tmpfs::new();
    let file = open_rw(&fs.path("data"));
    let deadline = now_ns() + 300_000_000;
    first.guard(fs.dev(), deadline, false).unwrap();
    drop(first); // every fd of the first opener is closed here
    assert_eq!(io_result(&file), Ok(()));
    sleep_until_boot_ns(deadline + 20_000_000);
    assert_eq!(
        io_result(&file),
        Err((EIO, EIO)),
        "the pinned programs still enforce"
    );

    let second = KernelFence::open(&pins.0).unwrap();
    assert_eq!(
        second.guard_of(fs.dev()),
        Some((deadline, false)),
        "same maps reopened"
    );
    second
        .guard(fs.dev(), now_ns() + 10_000_000_000, false)
        .unwrap();
    assert_eq!(
        io_result(&file),
        Ok(()),
        "the attached programs read the reopened maps"
    );
    let third = KernelFence::open(&pins.0).unwrap();
    third.guard(fs.dev(), 0, false).unwrap();
    assert_eq!(io_result(&file), Err((EIO, EIO)));
    assert_eq!(second.guard_of(fs.dev()), Some((0, false)));
}

const CHILD_PINS: &str = "HOLDFAST_FENCE_CHILD_PINS";
const CHILD_DEV: &str = "HOLDFAST_FENCE_CHILD_DEV";
const CHILD_DEADLINE: &str = "HOLDFAST_FENCE_CHILD_DEADLINE_NS";
const CHILD_READY: &str = "HOLDFAST_FENCE_CHILD_READY";

/// The plugin of [`the_fence_outlives_the_process_that_loaded_it`]: this binary run
/// again with the `HOLDFAST_FENCE_CHILD_*` variables set; otherwise it does nothing.
#[test]
fn fence_loading_child() {
    let (Some(pins), Some(dev), Some(deadline)) = (
        std::env::var_os(CHILD_PINS),
        std::env::var(CHILD_DEV).ok(),
        std::env::var(CHILD_DEADLINE).ok(),
    ) else {
        return;
    };
    let fence = KernelFence::open(std::path::Path::new(&pins)).unwrap();
    fence
        .guard(dev.parse().unwrap(), deadline.parse().unwrap(), false)
        .unwrap();
    println!("{CHILD_READY}");
    io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A process loads the fence, guards a filesystem and is killed: nothing in user space
/// holds the programs or maps any more, yet the guard holds at its deadline, through
/// the pins alone. This process never opens that fence itself.
#[test]
fn the_fence_outlives_the_process_that_loaded_it() {
    {
        let probe = TestPins::new();
        if open_or_skip("the_fence_outlives_the_process_that_loaded_it", &probe).is_none() {
            return;
        }
    }
    let pins = TestPins::new();
    let fs = Tmpfs::new();
    let file = open_rw(&fs.path("data"));
    let deadline = now_ns() + 1_500_000_000;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "datapath::kernel_fence::tests::fence_loading_child",
        ])
        .args(["--nocapture", "--test-threads", "1"])
        .env(CHILD_PINS, &pins.0)
        .env(CHILD_DEV, fs.dev().to_string())
        .env(CHILD_DEADLINE, deadline.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ready = io::BufRead::lines(io::BufReader::new(child.stdout.take().unwrap()))
        .map_while(Result::ok)
        .any(|l| l.contains(CHILD_READY));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ready, "the child loaded the fence");
    assert!(now_ns() < deadline, "too slow to test before the deadline");
    assert_eq!(io_result(&file), Ok(()), "before the deadline");
    sleep_until_boot_ns(deadline + 20_000_000);
    assert_eq!(
        io_result(&file),
        Err((EIO, EIO)),
        "the pinned programs and guard outlive their loader"
    );
}

#[test]
fn shared_writable_mmap_of_a_passthrough_inode_is_refused() {
    let pins = TestPins::new();
    let Some(fence) = open_or_skip(
        "shared_writable_mmap_of_a_passthrough_inode_is_refused",
        &pins,
    ) else {
        return;
    };
    let fs = Tmpfs::new();
    let rw = open_rw(&fs.path("data"));
    rw.set_len(4096).unwrap();
    let ro = File::open(fs.path("data")).unwrap();
    let unmarked = open_rw(&fs.path("other"));
    unmarked.set_len(4096).unwrap();
    let ino = rw.metadata().unwrap().ino();
    let (read_write, shared) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);

    assert_eq!(mmap_errno(&rw, read_write, shared), None, "not marked yet");
    fence.mark_passthrough(fs.dev(), ino).unwrap();
    assert_eq!(mmap_errno(&rw, read_write, shared), Some(libc::EACCES));
    assert_eq!(
        mmap_errno(&rw, libc::PROT_READ, shared),
        Some(libc::EACCES),
        "mprotect could add write"
    );
    assert_eq!(
        mmap_errno(&rw, read_write, libc::MAP_SHARED_VALIDATE),
        Some(libc::EACCES)
    );
    assert_eq!(
        mmap_errno(&ro, libc::PROT_READ, shared),
        None,
        "read-only file"
    );
    assert_eq!(
        mmap_errno(&rw, read_write, libc::MAP_PRIVATE),
        None,
        "private copy"
    );
    assert_eq!(
        mmap_errno(&unmarked, read_write, shared),
        None,
        "other inode"
    );
    fence.unmark_passthrough(fs.dev(), ino).unwrap();
    assert_eq!(mmap_errno(&rw, read_write, shared), None, "unmarked");
}

/// Guards are keyed by device number and device numbers are reused, so a FUSE guard on
/// a superblock that is not a `fuse.holdfast` mount (here a tmpfs that got the number) is
/// stale: even expired it refuses no access and no mapping. The same guard without the
/// FUSE flag (what the tests use on tmpfs) still refuses.
#[test]
fn fuse_guard_on_a_filesystem_that_is_not_ours_refuses_nothing() {
    let pins = TestPins::new();
    let Some(fence) = open_or_skip(
        "fuse_guard_on_a_filesystem_that_is_not_ours_refuses_nothing",
        &pins,
    ) else {
        return;
    };
    let fs = Tmpfs::new();
    let file = open_rw(&fs.path("data"));
    file.set_len(4096).unwrap();
    fence.guard(fs.dev(), 0, true).unwrap();
    assert_eq!(fence.guard_of(fs.dev()), Some((0, true)));
    assert_eq!(io_result(&file), Ok(()), "read and write");
    assert_eq!(
        mmap_errno(&file, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED),
        None,
        "mmap"
    );
    fence.guard(fs.dev(), 0, false).unwrap();
    assert_eq!(io_result(&file), Err((EIO, EIO)), "not a FUSE guard");
}

/// A FUSE guard on one of our live mounts: the programs reach the mount's connection
/// through `struct fuse_mount` and `struct fuse_conn` (found in the fuse module's BTF
/// where fuse is a module) and read it as connected, so only the deadline refuses. An
/// offset read wrong would refuse a live mount with `ENOTCONN`, or let a dead one pass.
#[test]
fn fuse_guard_on_our_live_mount_refuses_only_past_its_deadline() {
    use crate::datapath::{FenceAction, FuseOptions, FuseVolume};
    use holdfast_core::clock::Mono;
    use holdfast_core::lease::{SessionDeadline, VolumeGate};

    let pins = TestPins::new();
    let Some(fence) = open_or_skip(
        "fuse_guard_on_our_live_mount_refuses_only_past_its_deadline",
        &pins,
    ) else {
        return;
    };
    let backing = tempfile::tempdir_in("/var/tmp").unwrap();
    let target = tempfile::tempdir_in("/var/tmp").unwrap();
    // The daemon's own gate stays open throughout: every refusal below is the kernel's.
    let session = SessionDeadline::new();
    session.extend_to(Mono::now() + Duration::from_secs(600));
    let opts = FuseOptions::new(FenceAction::Error);
    let vol = FuseVolume::mount(
        backing.path(),
        target.path(),
        VolumeGate::new(session),
        opts,
    )
    .unwrap();
    let file = open_rw(&target.path().join("data"));
    let dev = std::fs::metadata(target.path()).unwrap().dev();

    fence.guard(dev, now_ns() + 10_000_000_000, true).unwrap();
    assert_eq!(io_result(&file), Ok(()), "connected, before the deadline");
    fence.guard(dev, 0, true).unwrap();
    assert_eq!(
        io_result(&file),
        Err((EIO, EIO)),
        "fenced: EIO, not ENOTCONN"
    );
    fence.unguard(dev).unwrap();
    assert_eq!(io_result(&file), Ok(()), "unguarded");
    drop(file);
    vol.unmount().unwrap();
}

#[test]
fn st_dev_of_inverts_kernel_dev() {
    for st_dev in [
        libc::makedev(0, 0),
        libc::makedev(8, 1),
        libc::makedev(0, 0x4_5678),
        libc::makedev(0xfff, 0xf_ffff),
    ] {
        assert_eq!(st_dev_of(kernel_dev(st_dev).unwrap()), st_dev);
    }
}

/// The key walk behind [`KernelFence::guarded_devs`], on a guards map of the same layout
/// (this works on kernels that refuse to attach the programs).
#[test]
fn guards_map_lists_every_guarded_dev_as_st_dev() {
    let guards = syscall::map_create("t_guards", 4, 16, 16).unwrap();
    assert_eq!(
        devs_in_guards_map(guards.as_fd()).unwrap(),
        Vec::<u64>::new()
    );
    let (a, b) = (libc::makedev(0, 0x3f), libc::makedev(259, 0x1_0002));
    for st_dev in [a, b] {
        let key = kernel_dev(st_dev).unwrap().to_ne_bytes();
        syscall::map_update(guards.as_fd(), &key, &guard_value(0, true)).unwrap();
    }
    let mut devs = devs_in_guards_map(guards.as_fd()).unwrap();
    devs.sort_unstable();
    assert_eq!(devs, vec![a, b]);
    syscall::map_delete(guards.as_fd(), &kernel_dev(a).unwrap().to_ne_bytes()).unwrap();
    assert_eq!(devs_in_guards_map(guards.as_fd()).unwrap(), vec![b]);
}

#[test]
fn fence_lists_its_guards() {
    let pins = TestPins::new();
    let Some(fence) = open_or_skip("fence_lists_its_guards", &pins) else {
        return;
    };
    let (a, b) = (Tmpfs::new(), Tmpfs::new());
    assert_eq!(fence.guarded_devs().unwrap(), Vec::<u64>::new());
    fence
        .guard(a.dev(), now_ns() + 10_000_000_000, false)
        .unwrap();
    fence.guard(b.dev(), 0, true).unwrap();
    let mut devs = fence.guarded_devs().unwrap();
    devs.sort_unstable();
    let mut want = vec![a.dev(), b.dev()];
    want.sort_unstable();
    assert_eq!(devs, want);
    fence.unguard(a.dev()).unwrap();
    assert_eq!(fence.guarded_devs().unwrap(), vec![b.dev()]);
}

/// The verifier checks both programs against the running kernel's BTF. They are
/// loaded as BTF tracepoint programs on a tracepoint whose first argument is also a
/// `struct file *`: the same typed context, pointer walks, map and helper calls,
/// without needing the kernel to allow LSM attachment (some builds refuse it).
#[test]
fn both_programs_pass_the_verifier() {
    const TRACEPOINT: &str = "btf_trace_file_check_and_advance_wb_err";
    const BPF_PROG_TYPE_TRACING: u32 = 26;
    const BPF_TRACE_RAW_TP: u32 = 23;
    if btf::Btf::load_vmlinux().is_err() {
        eprintln!("SKIP: no kernel BTF");
        return;
    }
    let btf = btf::Btf::load_kernel().expect("kernel BTF with FUSE's types");
    let layout = program::KernelLayout::from_btf(&btf).expect("kernel layout");
    let Some(btf_id) = btf.typedef(TRACEPOINT) else {
        eprintln!("SKIP: this kernel has no tracepoint {TRACEPOINT}");
        return;
    };
    let guards = syscall::map_create("t_guards", 4, 16, 16).unwrap();
    let passthrough = syscall::map_create("t_passthrough", 16, 4, 16).unwrap();
    let maps = program::Maps {
        guards: guards.as_raw_fd(),
        passthrough: passthrough.as_raw_fd(),
    };
    let target = syscall::Target {
        prog_type: BPF_PROG_TYPE_TRACING,
        attach_type: BPF_TRACE_RAW_TP,
        btf_id,
    };
    for (name, insns) in [
        ("file_permission", program::file_permission(&layout, &maps)),
        // The tracepoint has two arguments: read the flags from the second.
        (
            "mmap_file",
            program::mmap_file_with_flags_at(&layout, &maps, 1),
        ),
    ] {
        if let Err((e, log)) = syscall::prog_load(name, &insns, target) {
            panic!("verifier rejected {name}: {e}\n{log}");
        }
    }
}
