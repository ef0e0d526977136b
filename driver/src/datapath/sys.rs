//! Small helpers around the backing-directory syscalls: errno conversion, request-name
//! validation, `/proc/self/fd` reopening and stat → FUSE attribute conversion.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};
use rustix::fs::{openat, Mode, OFlags, Stat, CWD};

pub(super) fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

/// A name from a request must be exactly one path component: the kernel never sends
/// anything else, and refusing it here means no request can walk out of its parent.
pub(super) fn check_name(name: &OsStr) -> Result<&OsStr, Errno> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(Errno::EINVAL);
    }
    if b.len() > 255 {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(name)
}

/// `/proc/self/fd/N`: names the inode `fd` refers to, whatever its current path.
pub(super) fn proc_path(fd: impl AsFd) -> String {
    format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd())
}

/// Opens the inode behind an `O_PATH` fd with real access flags.
pub(super) fn reopen(fd: impl AsFd, flags: OFlags) -> Result<OwnedFd, Errno> {
    openat(CWD, proc_path(fd), flags | OFlags::CLOEXEC, Mode::empty()).map_err(errno)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = nsecs.clamp(0, 999_999_999) as u32;
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos as u64)
    }
}

pub(super) fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The FUSE attributes of a backing inode known to the kernel as node `id`. fuser sends
/// `attr.ino` as the node id, so `stat` shows node ids as inode numbers (unique within
/// the mount, stable while the kernel holds the inode).
pub(super) fn attr_of(st: &Stat, id: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(id),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec as i64),
        mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// Whether `fd` lives on a filesystem known to keep its dirty pages in this node's
/// own page cache only, written to a disk no other node mounts (ext2/3/4, xfs, btrfs,
/// tmpfs, overlayfs, zfs, f2fs). Anything else (NFS, CephFS, SMB, 9p, a FUSE client, a
/// cluster filesystem, or a type we do not know) may hold accepted writes in a client
/// cache and send them to shared storage later, so it counts as not local.
pub(super) fn is_local_fs(fd: impl AsFd) -> bool {
    rustix::fs::fstatfs(fd).is_ok_and(|s| is_local_magic(s.f_type as u64))
}

fn is_local_magic(magic: u64) -> bool {
    const LOCAL: [u64; 8] = [
        0xEF53,      // ext2/3/4
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x0102_1994, // tmpfs
        0x794C_7630, // overlayfs
        0x2FC1_2FC1, // zfs
        0xF2F5_2010, // f2fs
        0x8584_58F6, // ramfs
    ];
    LOCAL.contains(&magic)
}

/// The attributes sent with a negative entry: node id 0 tells the kernel "no such
/// name" while letting it cache that answer for the entry TTL; the rest is ignored.
pub(super) fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

/// The daemon process's umask, read without changing it (umask(2) would race with
/// other threads creating files).
pub(super) fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_parent_are_refused() {
        for bad in ["", ".", "..", "a/b", "/", "../x", "a\0b"] {
            assert_eq!(
                check_name(OsStr::new(bad)).err(),
                Some(Errno::EINVAL),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_name(OsStr::new(&"x".repeat(256))).err(),
            Some(Errno::ENAMETOOLONG)
        );
        assert!(check_name(OsStr::new("..a")).is_ok());
        assert!(check_name(OsStr::new("ok.txt")).is_ok());
    }

    #[test]
    fn only_known_local_filesystems_skip_write_through() {
        assert!(is_local_magic(0xEF53), "ext4");
        assert!(is_local_magic(0x5846_5342), "xfs");
        for shared in [
            0x6969,
            0x00C3_6400,
            0xFE53_4D42,
            0xFF53_4D42,
            0x6573_5546,
            0x0116_1970,
            0,
        ] {
            assert!(!is_local_magic(shared), "{shared:#x}");
        }
    }

    #[test]
    fn umask_is_read_from_proc() {
        assert!(process_umask() <= 0o777);
    }
}
