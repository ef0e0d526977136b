//! File and directory I/O on the backing directory: open/create, read/write, fsync,
//! fallocate, and directory streams.
//!
//! Called after the request passed the gate; every syscall that changes backing data
//! passes it again immediately before it runs, to keep the residual window (see the
//! module doc of [`super`]) as short as a user-space check can make it.

use std::cell::RefCell;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

use fuser::Generation;
use fuser::{Errno, FileAttr, FileType as FuseKind, INodeNo, ReplyDirectory, ReplyDirectoryPlus};
use rustix::fs::{
    fallocate, fdatasync, fstat, fsync, openat, Dir, FallocateFlags, FileType, Mode, OFlags,
};
use rustix::io::{pread, pwrite};

use super::fs::VolumeFs;
use super::meta_ops::Caller;
use super::sys::{check_name, errno, kind_of, reopen};

thread_local! {
    /// One read buffer per worker thread: a fresh 1 MiB allocation per READ would be
    /// mmap'd and page-faulted every time.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl VolumeFs {
    /// The flags the backing file is opened with for a FUSE open with `flags`.
    fn backing_flags(&self, flags: i32) -> OFlags {
        let strip = OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY | OFlags::DIRECT;
        let mut f = OFlags::from_bits_retain(flags as u32) & !strip;
        if self.writeback {
            // With the writeback cache the kernel reads pages of write-only files and
            // positions appends itself.
            if f.contains(OFlags::WRONLY) {
                f.remove(OFlags::WRONLY);
                f.insert(OFlags::RDWR);
            }
            f.remove(OFlags::APPEND);
        }
        if self.opts.write_through == Some(true) {
            f.insert(OFlags::DSYNC);
        }
        f | OFlags::CLOEXEC
    }

    pub(super) fn open_file(&self, ino: u64, flags: i32) -> Result<u64, Errno> {
        let inode = self.inodes.get(ino)?;
        if inode.kind == FileType::Symlink {
            return Err(Errno::ELOOP);
        }
        let fd = reopen(&inode.fd, self.backing_flags(flags))?;
        Ok(self.files.insert(fd))
    }

    /// Creates (or, without `O_EXCL`, opens an existing) `name`. Ownership is changed
    /// only on a file this call created.
    pub(super) fn create_file(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(u64, FileAttr, u64), Errno> {
        let name = check_name(name)?;
        let p = self.inodes.get(parent)?;
        let owner = self.new_owner(&p.fd, caller)?;
        let open_flags = self.backing_flags(flags) | OFlags::NOFOLLOW;
        let perm = mode & 0o7777;
        self.fence.pass()?;
        let create_flags = open_flags | OFlags::CREATE | OFlags::EXCL;
        let fd = match openat(&p.fd, name, create_flags, Mode::from_raw_mode(perm)) {
            Ok(fd) => {
                self.settle_new(&p.fd, name, &owner, Some(perm))?;
                fd
            }
            Err(rustix::io::Errno::EXIST) if flags & libc::O_EXCL == 0 => {
                openat(&p.fd, name, open_flags, Mode::empty()).map_err(errno)?
            }
            Err(e) => return Err(errno(e)),
        };
        // The kernel holds the parent's lock across CREATE, so the name still names the
        // inode just opened.
        let path_flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let path_fd = openat(&p.fd, name, path_flags, Mode::empty()).map_err(errno)?;
        let (id, attr) = self.remember(path_fd)?;
        Ok((id, attr, self.files.insert(fd)))
    }

    /// Sends `size` bytes at `offset` (fewer at end of file) to `send`.
    pub(super) fn read_file(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        send: impl FnOnce(Result<&[u8], Errno>),
    ) {
        let fd = match self.files.get(fh) {
            Ok(fd) => fd,
            Err(e) => return send(Err(e)),
        };
        let size = size as usize;
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < size {
                buf.resize(size, 0);
            }
            let mut done = 0;
            while done < size {
                match pread(&*fd, &mut buf[done..size], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return send(Err(errno(e))),
                }
            }
            send(Ok(&buf[..done]))
        })
    }

    pub(super) fn write_file(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let fd = self.files.get(fh)?;
        let mut done = 0;
        while done < data.len() {
            // Re-checked before every syscall: the gate may have closed while this
            // request waited in the queue or while the previous chunk was written.
            self.fence.pass()?;
            match pwrite(&*fd, &data[done..], offset + done as u64) {
                Ok(0) => return Err(Errno::EIO),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(errno(e)),
            }
        }
        Ok(done as u32)
    }

    pub(super) fn sync_file(&self, fh: u64, datasync: bool) -> Result<(), Errno> {
        let fd = self.files.get(fh)?;
        self.fence.pass()?;
        if datasync {
            fdatasync(&*fd).map_err(errno)
        } else {
            fsync(&*fd).map_err(errno)
        }
    }

    pub(super) fn allocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        let fd = self.files.get(fh)?;
        self.fence.pass()?;
        let flags = FallocateFlags::from_bits_retain(mode as u32);
        fallocate(&*fd, flags, offset, len).map_err(errno)
    }

    /// The backing file registered with the kernel for passthrough. Opened read-write
    /// (read-only on a read-only mount) whatever the first open asked for: every later
    /// passthrough open of the inode shares this one file, and the kernel still checks
    /// each open's own mode. `O_DSYNC` with write-through, as for the daemon's own fds.
    pub(super) fn passthrough_file(&self, ino: u64) -> std::io::Result<std::os::fd::OwnedFd> {
        let os = |e: Errno| std::io::Error::from_raw_os_error(e.code());
        let inode = self.inodes.get(ino).map_err(os)?;
        if inode.kind != FileType::RegularFile {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut flags = if self.opts.read_only {
            OFlags::RDONLY
        } else {
            OFlags::RDWR
        };
        if self.opts.write_through == Some(true) {
            flags |= OFlags::DSYNC;
        }
        reopen(&inode.fd, flags).map_err(os)
    }

    pub(super) fn release_file(&self, fh: u64) {
        // Closing our fd changes no data; it is done even on a fenced volume so that
        // the kernel can always clean up.
        self.files.remove(fh);
    }

    pub(super) fn open_dir(&self, ino: u64) -> Result<u64, Errno> {
        let inode = self.inodes.get(ino)?;
        let fd = reopen(&inode.fd, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let dir = Dir::new(fd).map_err(errno)?;
        Ok(self.dirs.insert(Mutex::new(dir)))
    }

    pub(super) fn release_dir(&self, fh: u64) {
        self.dirs.remove(fh);
    }

    pub(super) fn sync_dir(&self, fh: u64, datasync: bool) -> Result<(), Errno> {
        let dir = self.dirs.get(fh)?;
        let dir = dir.lock().unwrap_or_else(|e| e.into_inner());
        let fd = dir.fd().map_err(errno)?;
        self.fence.pass()?;
        if datasync {
            fdatasync(fd).map_err(errno)
        } else {
            fsync(fd).map_err(errno)
        }
    }

    /// Entries from the backing `getdents` cookie `offset` on; each carries the cookie
    /// of the entry after it, so the kernel's next call resumes exactly there.
    /// `d_ino` is the entry's node id when the kernel knows the inode (so it matches
    /// `st_ino`), else the backing inode number.
    pub(super) fn read_dir(&self, ino: u64, fh: u64, offset: u64, mut reply: ReplyDirectory) {
        let dev = match self
            .inodes
            .get(ino)
            .and_then(|d| fstat(&d.fd).map_err(errno))
        {
            Ok(st) => st.st_dev,
            Err(e) => return reply.error(e),
        };
        let result = self.walk_dir(fh, offset, |name, d_ino, next, kind| {
            let shown = self.inodes.id_of(dev, d_ino).unwrap_or(d_ino);
            reply.add(INodeNo(shown), next, kind_of_dirent(kind), name)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Like [`Self::read_dir`], with a lookup (and its attributes) for every entry.
    pub(super) fn read_dir_plus(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.opts.attr_ttl;
        let dir_attr = match self.attr(ino) {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        let result = self.walk_dir(fh, offset, |name, _ino, next, _kind| {
            let b = name.as_bytes();
            if b == b"." || b == b".." {
                // The kernel takes no reference for these; the attributes are not used.
                return reply.add(INodeNo(ino), next, name, &ttl, &dir_attr, Generation(0));
            }
            match self.lookup_entry(ino, name) {
                Ok((id, attr)) => {
                    let full = reply.add(INodeNo(id), next, name, &ttl, &attr, Generation(0));
                    if full {
                        // Not sent: the kernel never saw this lookup.
                        self.inodes.forget(id, 1);
                    }
                    full
                }
                // Removed between getdents and the lookup: skip it.
                Err(_) => false,
            }
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// Calls `add(name, d_ino, next_cookie, type)` for entries from `offset` until it
    /// returns true (buffer full) or the directory ends.
    fn walk_dir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&OsStr, u64, u64, FileType) -> bool,
    ) -> Result<(), Errno> {
        let dir = self.dirs.get(fh)?;
        let mut dir = dir.lock().unwrap_or_else(|e| e.into_inner());
        if offset == 0 {
            dir.rewind();
        } else {
            dir.seek(offset as i64).map_err(errno)?;
        }
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(errno)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if add(name, entry.ino(), entry.offset() as u64, entry.file_type()) {
                break;
            }
        }
        Ok(())
    }
}

fn kind_of_dirent(kind: FileType) -> FuseKind {
    kind_of(kind.as_raw_mode())
}
