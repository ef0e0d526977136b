//! The FUSE request handlers: each one passes the gate first, then calls the operation
//! in [`super::meta_ops`] or [`super::io_ops`] and turns its result into the reply.
//!
//! `forget`, `release` and `releasedir` only free the daemon's own references (they
//! never touch backing data), so they run on a fenced volume too and never block: the
//! kernel must always be able to clean up.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::Dir;

use super::fence::Fence;
use super::handles::Handles;
use super::inodes::InodeTable;
use super::meta_ops::{Caller, XattrAnswer};
use super::passthrough::Passthrough;
use super::FuseOptions;

pub(super) struct VolumeFs {
    pub(super) fence: Arc<Fence>,
    pub(super) inodes: Arc<InodeTable>,
    pub(super) files: Handles<std::os::fd::OwnedFd>,
    pub(super) dirs: Handles<Mutex<Dir>>,
    pub(super) opts: FuseOptions,
    /// The daemon's umask: bits the backing filesystem strips from new inodes' modes.
    pub(super) umask: u32,
    /// Whether the kernel accepted the writeback cache (set once, in `init`).
    pub(super) writeback: bool,
    /// Which opens the kernel serves straight from the backing file.
    pub(super) passthrough: Arc<Passthrough>,
    /// Whether the kernel accepted passthrough in `init`.
    pub(super) passthrough_negotiated: Arc<std::sync::atomic::AtomicBool>,
}

impl VolumeFs {
    pub(super) fn new(
        fence: Arc<Fence>,
        inodes: Arc<InodeTable>,
        passthrough: Arc<Passthrough>,
        passthrough_negotiated: Arc<std::sync::atomic::AtomicBool>,
        opts: FuseOptions,
    ) -> Self {
        Self {
            fence,
            inodes,
            files: Handles::new(),
            dirs: Handles::new(),
            opts,
            umask: super::sys::process_umask(),
            writeback: false,
            passthrough,
            passthrough_negotiated,
        }
    }

    fn ttl(&self) -> &Duration {
        &self.opts.attr_ttl
    }

    fn open_flags(&self) -> FopenFlags {
        // Keeping the page cache across opens is safe: only this daemon writes the
        // backing directory while it holds the claim.
        FopenFlags::FOPEN_KEEP_CACHE
    }

    fn entry(&self, result: Result<(u64, fuser::FileAttr), Errno>, reply: ReplyEntry) {
        match result {
            Ok((_id, attr)) => reply.entry(self.ttl(), &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn empty(result: Result<(), Errno>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn xattr(result: Result<XattrAnswer, Errno>, reply: ReplyXattr) {
    match result {
        Ok(XattrAnswer::Size(n)) => reply.size(n),
        Ok(XattrAnswer::Data(d)) => reply.data(&d),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(self.opts.max_write);
        if let Err(max) = config.set_max_readahead(self.opts.max_write) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for wanted in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(wanted);
        }
        if self.opts.writeback_cache {
            self.writeback = config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_ok();
        } else if self.opts.passthrough {
            // Depth 2: the backing directory may itself be on a stacked filesystem
            // (overlayfs); nothing is ever stacked on this mount. The kernel does not
            // combine passthrough with the writeback cache.
            let ok = config.set_max_stack_depth(2).is_ok()
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok();
            self.passthrough_negotiated
                .store(ok, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self
            .fence
            .pass()
            .and_then(|()| self.lookup_entry(parent.0, name));
        match r {
            // A miss cached for the entry TTL (node id 0): repeated lookups of a missing
            // name (search paths, lock-file probes) and the lookup before creating a
            // name looked up earlier cost no round trip. Safe to cache while this daemon
            // is the only writer. At the fence the watcher invalidates the attributes of
            // every directory the kernel knows, and with `default_permissions` every
            // path walk checks search permission on each directory it passes, which now
            // asks the daemon and fails: the cached miss is never reached.
            Err(Errno::ENOENT) => {
                let none = super::sys::negative_attr();
                reply.entry(self.ttl(), &none, Generation(0))
            }
            r => self.entry(r, reply),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fence.pass().and_then(|()| self.attr(ino.0)) {
            Ok(attr) => reply.attr(self.ttl(), &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.fence.pass().and_then(|()| {
            self.set_attr(ino.0, mode, uid, gid, size, atime, mtime, fh.map(|f| f.0))
        });
        match r {
            Ok(attr) => reply.attr(self.ttl(), &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fence.pass().and_then(|()| self.read_link(ino.0)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .fence
            .pass()
            .and_then(|()| self.make_node(caller(req), parent.0, name, mode));
        self.entry(r, reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .fence
            .pass()
            .and_then(|()| self.make_dir(caller(req), parent.0, name, mode));
        self.entry(r, reply)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            self.fence
                .pass()
                .and_then(|()| self.remove(parent.0, name, false)),
            reply,
        )
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            self.fence
                .pass()
                .and_then(|()| self.remove(parent.0, name, true)),
            reply,
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self
            .fence
            .pass()
            .and_then(|()| self.make_symlink(caller(req), parent.0, link_name, target));
        self.entry(r, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self
            .fence
            .pass()
            .and_then(|()| self.rename(parent.0, name, newparent.0, newname, flags));
        empty(r, reply)
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self
            .fence
            .pass()
            .and_then(|()| self.make_link(ino.0, newparent.0, newname));
        self.entry(r, reply)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self
            .fence
            .pass()
            .and_then(|()| self.open_file(ino.0, flags.0))
        {
            Ok(fh) => {
                let backing = self.passthrough.open(ino.0, fh, flags.0, || {
                    reply.open_backing(self.passthrough_file(ino.0)?)
                });
                match backing {
                    // The kernel takes no page-cache flags with passthrough.
                    Some(b) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b),
                    None => reply.opened(FileHandle(fh), self.open_flags()),
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Err(e) = self.fence.pass() {
            return reply.error(e);
        }
        self.read_file(fh.0, offset, size, |r| match r {
            Ok(data) => reply.data(data),
            Err(e) => reply.error(e),
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self
            .fence
            .pass()
            .and_then(|()| self.write_file(fh.0, offset, data))
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is buffered in the daemon, so there is nothing to flush: ENOSYS tells
        // the kernel to stop sending FLUSH (one round trip less per close). Dirty pages
        // are still written back, through the gate, before close(2) returns. A FLUSH
        // that arrives on a stopped volume gets the gate's answer, so that close(2)
        // reports it.
        let r = self
            .fence
            .pass()
            .and_then(|()| self.files.get(fh.0))
            .and(Err(Errno::ENOSYS));
        empty(r, reply)
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_file(fh.0);
        self.passthrough.release(fh.0);
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(
            self.fence
                .pass()
                .and_then(|()| self.sync_file(fh.0, datasync)),
            reply,
        )
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fence.pass().and_then(|()| self.open_dir(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        match self.fence.pass() {
            Ok(()) => self.read_dir(ino.0, fh.0, offset, reply),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        match self.fence.pass() {
            Ok(()) => self.read_dir_plus(ino.0, fh.0, offset, reply),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.release_dir(fh.0);
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(
            self.fence
                .pass()
                .and_then(|()| self.sync_dir(fh.0, datasync)),
            reply,
        )
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fence.pass().and_then(|()| self.stat_fs()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(
            self.fence
                .pass()
                .and_then(|()| self.set_xattr(ino.0, name, value, flags)),
            reply,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Every passthrough write first asks this daemon for the file's
        // `security.capability` (the kernel's check whether the write must strip
        // privileges), so a paused daemon would hold each write, past the kernel fence's
        // check, until it resumes, and the write would then land after the deadline.
        // ENOSYS tells the kernel never to ask again on this mount: a passthrough mount
        // has no readable xattrs, and writes need this daemon for nothing.
        if self.passthrough.enabled() {
            return reply.error(Errno::ENOSYS);
        }
        xattr(
            self.fence
                .pass()
                .and_then(|()| self.get_xattr(ino.0, name, size)),
            reply,
        )
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr(
            self.fence
                .pass()
                .and_then(|()| self.list_xattr(ino.0, size)),
            reply,
        )
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            self.fence
                .pass()
                .and_then(|()| self.remove_xattr(ino.0, name)),
            reply,
        )
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = self
            .fence
            .pass()
            .and_then(|()| self.check_access(caller(req), ino.0, mask.bits()));
        empty(r, reply)
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self
            .fence
            .pass()
            .and_then(|()| self.create_file(caller(req), parent.0, name, mode, flags));
        match r {
            Ok((id, attr, fh)) => {
                let backing = self.passthrough.open(id, fh, flags, || {
                    reply.open_backing(self.passthrough_file(id)?)
                });
                let (ttl, fh, flags) = (self.ttl(), FileHandle(fh), self.open_flags());
                match backing {
                    Some(b) => {
                        let none = FopenFlags::empty();
                        reply.created_passthrough(ttl, &attr, Generation(0), fh, none, &b)
                    }
                    None => reply.created(ttl, &attr, Generation(0), fh, flags),
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(
            self.fence
                .pass()
                .and_then(|()| self.allocate(fh.0, offset, length, mode)),
            reply,
        )
    }
}
