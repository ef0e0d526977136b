//! The FUSE data path serves everything a database needs, and it lands in the backing
//! directory: real FUSE mounts, as root.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;

use holdfast_core::lease::VolumeGate;
use holdfast_driver::datapath::{FenceAction, FuseOptions, FuseVolume};

struct Mounted {
    backing: tempfile::TempDir,
    target: tempfile::TempDir,
    volume: Option<FuseVolume>,
}

impl Mounted {
    fn new(opts: FuseOptions) -> Self {
        let backing = tempfile::tempdir_in("/var/tmp").unwrap();
        let target = tempfile::tempdir_in("/var/tmp").unwrap();
        let volume =
            FuseVolume::mount(backing.path(), target.path(), VolumeGate::unclaimed(), opts)
                .expect("mount");
        Mounted {
            backing,
            target,
            volume: Some(volume),
        }
    }
    fn t(&self, rel: &str) -> std::path::PathBuf {
        self.target.path().join(rel)
    }
    fn b(&self, rel: &str) -> std::path::PathBuf {
        self.backing.path().join(rel)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(v) = self.volume.take() {
            v.unmount().expect("unmount");
        }
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn with_writeback(writeback: bool) -> FuseOptions {
    let mut opts = FuseOptions::new(FenceAction::Error);
    opts.writeback_cache = writeback;
    opts
}

#[test]
fn files_data_and_sync_land_in_backing_dir() {
    files_data_and_sync(with_writeback(false));
}

#[test]
fn files_data_and_sync_land_in_backing_dir_with_writeback_cache() {
    files_data_and_sync(with_writeback(true));
}

fn files_data_and_sync(opts: FuseOptions) {
    let m = Mounted::new(opts);
    let mut f = File::create(m.t("data")).unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    for _ in 0..4 {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    f.write_all_at(b"HEAD", 0).unwrap();
    f.sync_data().unwrap();
    drop(f);
    let backing = fs::read(m.b("data")).unwrap();
    assert_eq!(backing.len(), 4 << 20);
    assert_eq!(&backing[..4], b"HEAD");
    assert_eq!(&backing[4..(1 << 20)], &block[4..]);

    // Read back through the mount, from an offset.
    let mut f = File::open(m.t("data")).unwrap();
    f.seek(SeekFrom::Start((1 << 20) + 7)).unwrap();
    let mut buf = vec![0u8; 100];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, block[7..107]);

    // Truncate, fallocate (including punching a hole), O_APPEND.
    let f = OpenOptions::new().write(true).open(m.t("data")).unwrap();
    f.set_len(10).unwrap();
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 16) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 4) }, 0);
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(
        fs::read(m.b("data")).unwrap()[..10],
        [0, 0, 0, 0, 4, 5, 6, 7, 8, 9]
    );
    assert_eq!(fs::metadata(m.b("data")).unwrap().len(), 1 << 16);
    let mut a = OpenOptions::new().append(true).open(m.t("data")).unwrap();
    a.write_all(b"tail").unwrap();
    a.sync_all().unwrap();
    let back = fs::read(m.b("data")).unwrap();
    assert_eq!(&back[back.len() - 4..], b"tail");
}

#[test]
fn shared_writable_mmap_and_msync_reach_backing_file() {
    shared_mmap(with_writeback(false));
}

#[test]
fn shared_writable_mmap_and_msync_reach_backing_file_with_writeback_cache() {
    shared_mmap(with_writeback(true));
}

fn shared_mmap(opts: FuseOptions) {
    let m = Mounted::new(opts);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.t("map"))
        .unwrap();
    f.set_len(8192).unwrap();
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let s = std::slice::from_raw_parts_mut(p as *mut u8, 8192);
        s[..5].copy_from_slice(b"mmap!");
        s[4096..4100].copy_from_slice(b"page");
        assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0);
        libc::munmap(p, 8192);
    }
    let back = fs::read(m.b("map")).unwrap();
    assert_eq!(&back[..5], b"mmap!");
    assert_eq!(&back[4096..4100], b"page");
}

#[test]
fn namespace_operations_land_in_backing_dir() {
    let m = Mounted::new(FuseOptions::new(FenceAction::Error));
    fs::create_dir(m.t("d")).unwrap();
    fs::write(m.t("d/a"), b"A").unwrap();
    fs::write(m.t("d/b"), b"B").unwrap();

    // rename, RENAME_NOREPLACE, RENAME_EXCHANGE
    fs::rename(m.t("d/a"), m.t("d/a2")).unwrap();
    assert!(m.b("d/a2").exists() && !m.b("d/a").exists());
    let renameat2 = |from: &str, to: &str, flags: u32| unsafe {
        let (f, t) = (cstr(&m.t(from)), cstr(&m.t(to)));
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    assert_eq!(renameat2("d/a2", "d/b", libc::RENAME_NOREPLACE), -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    assert_eq!(renameat2("d/a2", "d/b", libc::RENAME_EXCHANGE), 0);
    assert_eq!(fs::read(m.b("d/a2")).unwrap(), b"B");
    assert_eq!(fs::read(m.b("d/b")).unwrap(), b"A");

    // hard link: same inode through the mount, nlink 2 in the backing dir
    fs::hard_link(m.t("d/b"), m.t("d/b-link")).unwrap();
    assert_eq!(
        fs::metadata(m.t("d/b")).unwrap().ino(),
        fs::metadata(m.t("d/b-link")).unwrap().ino()
    );
    assert_eq!(fs::metadata(m.b("d/b")).unwrap().nlink(), 2);
    fs::write(m.t("d/b-link"), b"via link").unwrap();
    assert_eq!(fs::read(m.t("d/b")).unwrap(), b"via link");

    // symlink + readlink; the target is stored verbatim
    std::os::unix::fs::symlink("b", m.t("d/sym")).unwrap();
    assert_eq!(fs::read_link(m.b("d/sym")).unwrap(), Path::new("b"));
    assert_eq!(fs::read_link(m.t("d/sym")).unwrap(), Path::new("b"));
    assert_eq!(fs::read(m.t("d/sym")).unwrap(), b"via link");

    // mknod: fifo yes, device node no
    let fifo = cstr(&m.t("d/fifo"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::metadata(m.b("d/fifo")).unwrap().file_type()
    ));
    let dev = cstr(&m.t("d/null"));
    assert_eq!(
        unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) },
        -1
    );

    // readdir sees it all
    let mut names: Vec<String> = fs::read_dir(m.t("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["a2", "b", "b-link", "fifo", "sym"]);

    // unlink, rmdir (non-empty refused)
    assert_eq!(errno_of(fs::remove_dir(m.t("d"))), Some(libc::ENOTEMPTY));
    for n in ["a2", "b", "b-link", "fifo", "sym"] {
        fs::remove_file(m.t(&format!("d/{n}"))).unwrap();
    }
    fs::remove_dir(m.t("d")).unwrap();
    assert!(!m.b("d").exists());
}

#[test]
fn attributes_xattrs_and_statfs_pass_through() {
    let m = Mounted::new(FuseOptions::new(FenceAction::Error));
    fs::write(m.t("f"), b"x").unwrap();
    fs::set_permissions(m.t("f"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.b("f")).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(m.t("f"), Some(1234), Some(4321)).unwrap();
    let md = fs::metadata(m.b("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 4321));

    // utimens
    let times = [
        libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 5,
        },
        libc::timespec {
            tv_sec: 2_000_000,
            tv_nsec: 7,
        },
    ];
    let p = cstr(&m.t("f"));
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) },
        0
    );
    let md = fs::metadata(m.b("f")).unwrap();
    assert_eq!(
        (md.atime(), md.mtime(), md.mtime_nsec()),
        (1_000_000, 2_000_000, 7)
    );

    // xattrs
    let name = CString::new("user.holdfast").unwrap();
    let r = unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), b"v1".as_ptr().cast(), 2, 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    let bp = cstr(&m.b("f"));
    let mut buf = [0u8; 16];
    let n = unsafe { libc::getxattr(bp.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16) };
    assert_eq!(&buf[..n as usize], b"v1");
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(n, 2);
    let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), 16) };
    assert!(buf[..n as usize].starts_with(b"user.holdfast\0"));
    assert_eq!(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }, 0);
    let n = unsafe { libc::getxattr(bp.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 16) };
    assert_eq!(n, -1);

    // access(2) and statfs
    assert_eq!(
        unsafe { libc::access(p.as_ptr(), libc::R_OK | libc::W_OK) },
        0
    );
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    let tp = cstr(m.target.path());
    assert_eq!(unsafe { libc::statvfs(tp.as_ptr(), &mut sv) }, 0);
    assert!(sv.f_blocks > 0 && sv.f_bsize > 0);
}

/// Runs `script` with `sh -c` as uid/gid 65534 (nobody) with no supplementary groups.
fn as_nobody(script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .expect("setpriv")
}

#[test]
fn ownership_follows_the_caller_and_modes_are_enforced() {
    let m = Mounted::new(FuseOptions::new(FenceAction::Error));
    fs::create_dir(m.t("shared")).unwrap();
    fs::set_permissions(m.t("shared"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(m.t("root-only"), b"secret").unwrap();
    fs::set_permissions(m.t("root-only"), fs::Permissions::from_mode(0o600)).unwrap();
    // Let nobody traverse the temp dirs down to the mount.
    fs::set_permissions(m.target.path(), fs::Permissions::from_mode(0o755)).unwrap();

    let t = m.target.path().display();
    let out = as_nobody(&format!(
        "umask 022 && echo hi > {t}/shared/mine && mkdir {t}/shared/sub && ln -s mine {t}/shared/ln && mkfifo {t}/shared/pipe"
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, mode) in [
        ("mine", Some(0o644)),
        ("sub", Some(0o755)),
        ("ln", None),
        ("pipe", Some(0o644)),
    ] {
        let md = fs::symlink_metadata(m.b(&format!("shared/{name}"))).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534), "{name}");
        if let Some(mode) = mode {
            assert_eq!(md.mode() & 0o7777, mode, "{name}");
        }
    }
    // default_permissions: the kernel refuses what the modes refuse.
    let out = as_nobody(&format!("cat {t}/root-only"));
    assert!(!out.status.success());
    let out = as_nobody(&format!("echo x > {t}/root-only"));
    assert!(!out.status.success());
    assert_eq!(fs::read(m.b("root-only")).unwrap(), b"secret");

    // Set-gid directories hand their group down, as on a local filesystem.
    fs::create_dir(m.t("sgid")).unwrap();
    std::os::unix::fs::chown(m.t("sgid"), None, Some(777)).unwrap();
    fs::set_permissions(m.t("sgid"), fs::Permissions::from_mode(0o2777)).unwrap();
    let out = as_nobody(&format!("echo x > {t}/sgid/f && mkdir {t}/sgid/d"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::metadata(m.b("sgid/f")).unwrap().gid(), 777);
    let d = fs::metadata(m.b("sgid/d")).unwrap();
    assert_eq!((d.gid(), d.mode() & 0o2000), (777, 0o2000));
}

#[test]
fn read_only_volume_refuses_writes() {
    let mut opts = FuseOptions::new(FenceAction::Error);
    opts.read_only = true;
    let m = Mounted::new(opts);
    assert_eq!(errno_of(fs::write(m.t("x"), b"x")), Some(libc::EROFS));
    assert!(!m.b("x").exists());
}

#[test]
fn unmount_is_idempotent_and_leaves_target_empty() {
    let mut m = Mounted::new(FuseOptions::new(FenceAction::Error));
    fs::write(m.t("kept"), b"k").unwrap();
    m.volume.take().unwrap().unmount().unwrap();
    assert!(
        !m.t("kept").exists(),
        "target must no longer show the volume"
    );
    assert_eq!(fs::read(m.b("kept")).unwrap(), b"k");
}

#[test]
fn unmounting_a_busy_volume_detaches_it_and_cuts_off_open_files() {
    let mut m = Mounted::new(FuseOptions::new(FenceAction::Error));
    let mut held = File::create(m.t("held")).unwrap();
    held.write_all(b"ok").unwrap();
    m.volume
        .take()
        .unwrap()
        .unmount()
        .expect("busy unmount succeeds by detaching");
    assert!(!m.t("held").exists(), "target no longer shows the volume");
    let r = held
        .write_all(b" after-unmount")
        .and_then(|()| held.sync_all());
    assert_eq!(errno_of(r), Some(libc::ENOTCONN));
    assert_eq!(fs::read(m.b("held")).unwrap(), b"ok");
}

/// The open flags of every non-`O_PATH` fd this process (the daemon, in these tests)
/// holds on `backing_file`.
fn daemon_fd_flags_on(backing_file: &Path) -> Vec<u32> {
    let mut found = vec![];
    for entry in fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if fs::read_link(entry.path()).ok().as_deref() != Some(backing_file) {
            continue;
        }
        let info = format!("/proc/self/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(info) = fs::read_to_string(info) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        if flags & libc::O_PATH as u32 == 0 {
            found.push(flags);
        }
    }
    found
}

/// Writes through `target` with the file held open, and returns the flags of the
/// daemon's backing fds for it.
fn backing_flags_while_open(target: &Path, backing: &Path) -> Vec<u32> {
    let mut f = File::create(target.join("wt")).unwrap();
    f.write_all(b"x").unwrap();
    let flags = daemon_fd_flags_on(&backing.join("wt"));
    drop(f);
    assert!(!flags.is_empty(), "the daemon holds the backing file open");
    flags
}

/// Write-through: forced on, every backing fd of a written file is `O_DSYNC`; left to
/// the default on a local filesystem (ext4 under /var/tmp) it is off.
#[test]
fn write_through_opens_backing_files_dsync() {
    let dsync = libc::O_DSYNC as u32;
    let mut opts = FuseOptions::new(FenceAction::Error);
    opts.write_through = Some(true);
    let m = Mounted::new(opts);
    let flags = backing_flags_while_open(m.target.path(), m.backing.path());
    assert!(flags.iter().all(|f| f & dsync != 0), "{flags:?}");
    drop(m);

    let m = Mounted::new(FuseOptions::new(FenceAction::Error));
    let flags = backing_flags_while_open(m.target.path(), m.backing.path());
    assert!(flags.iter().all(|f| f & dsync == 0), "{flags:?}");
}

/// The default turns write-through on when the backing directory is not on a known local
/// filesystem: here the backing directory is itself a FUSE mount (a stand-in for a
/// network filesystem's client, which can hold accepted writes and send them later).
#[test]
fn write_through_is_on_by_default_over_a_non_local_backing_filesystem() {
    let lower = Mounted::new(FuseOptions::new(FenceAction::Error));
    let upper_target = tempfile::tempdir_in("/var/tmp").unwrap();
    let upper = FuseVolume::mount(
        lower.target.path(),
        upper_target.path(),
        VolumeGate::unclaimed(),
        FuseOptions::new(FenceAction::Error),
    )
    .unwrap();
    let flags = backing_flags_while_open(upper_target.path(), lower.target.path());
    assert!(
        flags.iter().all(|f| f & libc::O_DSYNC as u32 != 0),
        "{flags:?}"
    );
    upper.unmount().unwrap();
}
