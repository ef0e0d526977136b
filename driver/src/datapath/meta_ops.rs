//! Namespace and metadata operations on the backing directory: lookup, attributes,
//! creation of directories/nodes/symlinks/links, removal, rename, xattrs, statfs.
//!
//! Every function here is called after the request passed the gate; functions that
//! change the backing directory pass it again right before their syscall.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::UNIX_EPOCH;

use fuser::{Errno, FileAttr, FileType as FuseKind, RenameFlags, TimeOrNow};
use rustix::fs::{
    chmodat, chownat, fstat, fstatvfs, ftruncate, linkat, mkdirat, mknodat, openat, readlinkat,
    renameat_with, symlinkat, unlinkat, utimensat, AtFlags, FileType, Gid, Mode, OFlags,
    RenameFlags as AtRenameFlags, StatVfs, Timespec, Timestamps, Uid, XattrFlags, CWD, UTIME_NOW,
    UTIME_OMIT,
};

use super::fs::VolumeFs;
use super::sys::{attr_of, check_name, errno, proc_path, reopen};

/// Who asks: the uid and gid of the calling process, from the FUSE request header.
#[derive(Clone, Copy)]
pub(super) struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// The owner a new inode gets, and whether its parent is a set-gid directory.
pub(super) struct NewOwner {
    uid: u32,
    gid: u32,
    parent_sgid: bool,
}

impl VolumeFs {
    pub(super) fn lookup_entry(&self, parent: u64, name: &OsStr) -> Result<(u64, FileAttr), Errno> {
        let name = check_name(name)?;
        let p = self.inodes.get(parent)?;
        self.entry_at(&p.fd, name)
    }

    /// Opens `name` under `dir` as `O_PATH` without following a symlink and records one
    /// kernel lookup of it.
    fn entry_at(&self, dir: impl AsFd, name: &OsStr) -> Result<(u64, FileAttr), Errno> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = openat(dir, name, flags, Mode::empty()).map_err(errno)?;
        self.remember(fd)
    }

    pub(super) fn remember(&self, fd: OwnedFd) -> Result<(u64, FileAttr), Errno> {
        let st = fstat(&fd).map_err(errno)?;
        let id = self.inodes.remember(fd, &st);
        Ok((id, attr_of(&st, id)))
    }

    pub(super) fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let inode = self.inodes.get(ino)?;
        Ok(attr_of(&fstat(&inode.fd).map_err(errno)?, ino))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn set_attr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<u64>,
    ) -> Result<FileAttr, Errno> {
        let inode = self.inodes.get(ino)?;
        self.fence.pass()?;
        if uid.is_some() || gid.is_some() {
            let flags = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
            let (u, g) = (uid.map(Uid::from_raw), gid.map(Gid::from_raw));
            chownat(&inode.fd, "", u, g, flags).map_err(errno)?;
        }
        if let Some(mode) = mode {
            if inode.kind == FileType::Symlink {
                return Err(Errno::EOPNOTSUPP);
            }
            chmodat(
                CWD,
                proc_path(&inode.fd),
                Mode::from_raw_mode(mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno)?;
        }
        if let Some(size) = size {
            match fh {
                Some(fh) => ftruncate(&*self.files.get(fh)?, size).map_err(errno)?,
                None => ftruncate(reopen(&inode.fd, OFlags::WRONLY)?, size).map_err(errno)?,
            }
        }
        if atime.is_some() || mtime.is_some() {
            let times = Timestamps {
                last_access: timespec(atime),
                last_modification: timespec(mtime),
            };
            utimensat(CWD, proc_path(&inode.fd), &times, AtFlags::empty()).map_err(errno)?;
        }
        Ok(attr_of(&fstat(&inode.fd).map_err(errno)?, ino))
    }

    pub(super) fn new_owner(&self, parent: impl AsFd, caller: Caller) -> Result<NewOwner, Errno> {
        let pst = fstat(parent).map_err(errno)?;
        let parent_sgid = pst.st_mode & libc::S_ISGID != 0;
        let gid = if parent_sgid { pst.st_gid } else { caller.gid };
        Ok(NewOwner {
            uid: caller.uid,
            gid,
            parent_sgid,
        })
    }

    /// Gives a just-created `name` under `dir` its caller's ownership and mode. The
    /// daemon creates as root with its own umask; `mode` is what the caller asked for
    /// (the kernel already applied the caller's umask).
    pub(super) fn settle_new(
        &self,
        dir: impl AsFd,
        name: &OsStr,
        owner: &NewOwner,
        mode: Option<u32>,
    ) -> Result<(), Errno> {
        let (euid, egid) = (rustix::process::geteuid(), rustix::process::getegid());
        let created_gid = if owner.parent_sgid {
            owner.gid
        } else {
            egid.as_raw()
        };
        let chown = owner.uid != euid.as_raw() || owner.gid != created_gid;
        if chown {
            let (u, g) = (Uid::from_raw(owner.uid), Gid::from_raw(owner.gid));
            chownat(&dir, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        }
        if let Some(mode) = mode {
            // chown clears set-id bits, and the daemon's umask may have removed others.
            if mode & self.umask != 0 || (chown && mode & 0o6000 != 0) {
                chmodat(&dir, name, Mode::from_raw_mode(mode), AtFlags::empty()).map_err(errno)?;
            }
        }
        Ok(())
    }

    pub(super) fn make_dir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Result<(u64, FileAttr), Errno> {
        let name = check_name(name)?;
        let p = self.inodes.get(parent)?;
        let owner = self.new_owner(&p.fd, caller)?;
        let mut mode = mode & 0o7777;
        if owner.parent_sgid {
            mode |= libc::S_ISGID;
        }
        self.fence.pass()?;
        mkdirat(&p.fd, name, Mode::from_raw_mode(mode)).map_err(errno)?;
        self.settle_new(&p.fd, name, &owner, Some(mode))?;
        self.entry_at(&p.fd, name)
    }

    /// Regular files, fifos and sockets. Device nodes are refused: a pod must not be
    /// able to plant one on shared storage (the mount is `nodev` as well).
    pub(super) fn make_node(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Result<(u64, FileAttr), Errno> {
        let name = check_name(name)?;
        let kind = FileType::from_raw_mode(mode);
        if !matches!(
            kind,
            FileType::RegularFile | FileType::Fifo | FileType::Socket
        ) {
            return Err(Errno::EPERM);
        }
        let p = self.inodes.get(parent)?;
        let owner = self.new_owner(&p.fd, caller)?;
        let perm = mode & 0o7777;
        self.fence.pass()?;
        mknodat(&p.fd, name, kind, Mode::from_raw_mode(perm), 0).map_err(errno)?;
        self.settle_new(&p.fd, name, &owner, Some(perm))?;
        self.entry_at(&p.fd, name)
    }

    pub(super) fn make_symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &std::path::Path,
    ) -> Result<(u64, FileAttr), Errno> {
        let name = check_name(name)?;
        let p = self.inodes.get(parent)?;
        let owner = self.new_owner(&p.fd, caller)?;
        self.fence.pass()?;
        // The target is stored verbatim; it is resolved by the kernel inside the FUSE
        // mount, never by the daemon (every daemon lookup uses O_NOFOLLOW).
        symlinkat(target, &p.fd, name).map_err(errno)?;
        self.settle_new(&p.fd, name, &owner, None)?;
        self.entry_at(&p.fd, name)
    }

    pub(super) fn make_link(
        &self,
        ino: u64,
        new_parent: u64,
        new_name: &OsStr,
    ) -> Result<(u64, FileAttr), Errno> {
        let new_name = check_name(new_name)?;
        let inode = self.inodes.get(ino)?;
        let p = self.inodes.get(new_parent)?;
        self.fence.pass()?;
        linkat(&inode.fd, "", &p.fd, new_name, AtFlags::EMPTY_PATH).map_err(errno)?;
        self.entry_at(&p.fd, new_name)
    }

    pub(super) fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let name = check_name(name)?;
        let p = self.inodes.get(parent)?;
        let flags = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        self.fence.pass()?;
        unlinkat(&p.fd, name, flags).map_err(errno)
    }

    pub(super) fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let (name, new_name) = (check_name(name)?, check_name(new_name)?);
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let at_flags = AtRenameFlags::from_bits(flags.bits()).ok_or(Errno::EINVAL)?;
        let p = self.inodes.get(parent)?;
        let np = self.inodes.get(new_parent)?;
        self.fence.pass()?;
        renameat_with(&p.fd, name, &np.fd, new_name, at_flags).map_err(errno)
    }

    pub(super) fn read_link(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        let inode = self.inodes.get(ino)?;
        let target = readlinkat(&inode.fd, "", Vec::new()).map_err(errno)?;
        Ok(target.into_bytes())
    }

    pub(super) fn stat_fs(&self) -> Result<StatVfs, Errno> {
        let root = self.inodes.get(super::inodes::ROOT_ID)?;
        fstatvfs(&root.fd).map_err(errno)
    }

    pub(super) fn set_xattr(
        &self,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<(), Errno> {
        let inode = self.inodes.get(ino)?;
        let flags = XattrFlags::from_bits(flags as u32).ok_or(Errno::EINVAL)?;
        self.fence.pass()?;
        rustix::fs::setxattr(proc_path(&inode.fd), name, value, flags).map_err(errno)
    }

    /// `size == 0` asks for the value's length only.
    pub(super) fn get_xattr(
        &self,
        ino: u64,
        name: &OsStr,
        size: u32,
    ) -> Result<XattrAnswer, Errno> {
        let inode = self.inodes.get(ino)?;
        let path = proc_path(&inode.fd);
        if size == 0 {
            let len = rustix::fs::getxattr_query(&path, name).map_err(errno)?;
            return Ok(XattrAnswer::Size(len as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let len = rustix::fs::getxattr(&path, name, &mut buf[..]).map_err(errno)?;
        buf.truncate(len);
        Ok(XattrAnswer::Data(buf))
    }

    pub(super) fn list_xattr(&self, ino: u64, size: u32) -> Result<XattrAnswer, Errno> {
        let inode = self.inodes.get(ino)?;
        let path = proc_path(&inode.fd);
        if size == 0 {
            let len = rustix::fs::listxattr_query(&path).map_err(errno)?;
            return Ok(XattrAnswer::Size(len as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let len = rustix::fs::listxattr(&path, &mut buf[..]).map_err(errno)?;
        buf.truncate(len);
        Ok(XattrAnswer::Data(buf))
    }

    pub(super) fn remove_xattr(&self, ino: u64, name: &OsStr) -> Result<(), Errno> {
        let inode = self.inodes.get(ino)?;
        self.fence.pass()?;
        rustix::fs::removexattr(proc_path(&inode.fd), name).map_err(errno)
    }

    /// `access(2)` by mode bits, as the kernel would with `default_permissions` (which
    /// normally means this is never asked). Root may do anything but execute a file
    /// nobody may execute.
    pub(super) fn check_access(&self, caller: Caller, ino: u64, mask: i32) -> Result<(), Errno> {
        let attr = self.attr(ino)?;
        let perm = attr.perm as i32;
        let bits = if caller.uid == 0 {
            if mask & libc::X_OK != 0 && perm & 0o111 == 0 && attr.kind != FuseKind::Directory {
                return Err(Errno::EACCES);
            }
            return Ok(());
        } else if caller.uid == attr.uid {
            (perm >> 6) & 7
        } else if caller.gid == attr.gid {
            (perm >> 3) & 7
        } else {
            perm & 7
        };
        if mask & bits == mask & 7 {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }
}

pub(super) enum XattrAnswer {
    Size(u32),
    Data(Vec<u8>),
}

fn timespec(t: Option<TimeOrNow>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as _,
            },
            Err(e) => {
                let d = e.duration();
                let (mut secs, mut nanos) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if nanos < 0 {
                    secs -= 1;
                    nanos += 1_000_000_000;
                }
                Timespec {
                    tv_sec: secs,
                    tv_nsec: nanos as _,
                }
            }
        },
    }
}
