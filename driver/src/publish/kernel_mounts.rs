//! Kernel mounts: the only module of the driver that makes mount syscalls or reads the
//! mount table.
//!
//! - [`bind_mount`] shows a directory at a target path, optionally read-only.
//! - [`unmount`] removes a mount, with an explicit [`DetachPolicy`].
//! - [`MountTable`] is a parsed snapshot of `/proc/self/mountinfo`: "is this path a mount
//!   point, and of what?" and "which mounts show something inside this directory?" (used
//!   to rebuild the published-volume table after a restart).
//!
//! A bind mount's "source" column in mountinfo names the *device* (`/dev/vda`), not the
//! directory that was bound. What identifies the bound directory is the pair (device
//! number, path inside that filesystem) — the `root` column. [`MountTable::locate`] turns
//! a directory into that pair, so "is the target showing volume X?" is an exact
//! comparison, not a guess from path strings.
//!
//! There is no `unsafe` here: rustix wraps every syscall used.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

/// The kernel's mount table as seen by this process.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot read the mount table {path}: {source}")]
    ReadTable { path: String, source: io::Error },
    #[error("malformed mount table line {line:?}: {reason}")]
    Malformed { line: String, reason: &'static str },
    #[error("bind mount of {source_dir} at {target} failed: {errno}")]
    Bind {
        source_dir: PathBuf,
        target: PathBuf,
        errno: io::Error,
    },
    #[error("remounting {target} read-only failed: {errno}")]
    RemountReadOnly { target: PathBuf, errno: io::Error },
    #[error("{target} was mounted read-only but the mount table shows it writable")]
    NotReadOnly { target: PathBuf },
    /// Something still uses the mount; under [`DetachPolicy::Never`] it stays mounted.
    #[error("{target} is busy (files or working directories still open on it)")]
    Busy { target: PathBuf },
    #[error("unmounting {target} failed: {errno}")]
    Unmount { target: PathBuf, errno: io::Error },
}

/// What [`unmount`] may do when the mount is busy.
///
/// A lazy unmount (`MNT_DETACH`) only removes the mount from the namespace: processes
/// that still hold files open on it keep reading and writing the volume. For a bind
/// mount that would let a "released" volume still be written by its old holder, so bind
/// mounts use [`DetachPolicy::Never`] and a busy unmount fails (the CO retries
/// NodeUnpublishVolume). A data path that stops its own I/O when released (FUSE: the
/// server stops answering) may use [`DetachPolicy::IfBusy`], because detaching it cannot
/// leave a writer behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetachPolicy {
    Never,
    IfBusy,
}

/// What [`unmount`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// The mount was removed.
    Unmounted,
    /// The mount was busy and was detached lazily (only under [`DetachPolicy::IfBusy`]).
    Detached,
    /// Nothing was mounted there (or the path does not exist).
    NotMounted,
}

/// Bind-mounts `source` at `target` (an existing directory). With `read_only`, the bind
/// is remounted `MS_REMOUNT|MS_BIND|MS_RDONLY` and the mount table is checked to really
/// show `ro`; on any failure after the bind succeeded the bind is undone, so an error
/// never leaves a half-made (for example writable) mount behind.
pub fn bind_mount(source: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
    rustix::mount::mount_bind(source, target).map_err(|e| MountError::Bind {
        source_dir: source.to_path_buf(),
        target: target.to_path_buf(),
        errno: e.into(),
    })?;
    if !read_only {
        return Ok(());
    }
    let made_read_only = remount_read_only(target);
    if made_read_only.is_err() {
        // Best effort: the error to report is the remount's, not this one's.
        let _ = unmount(target, DetachPolicy::IfBusy);
    }
    made_read_only
}

fn remount_read_only(target: &Path) -> Result<(), MountError> {
    // The remount replaces every per-mount flag; carry over nosuid/nodev/noexec and the
    // atime mode the bind inherited, because dropping a flag that is locked (inherited
    // from a more privileged namespace) makes the kernel refuse the remount with EPERM.
    let table = MountTable::read()?;
    let inherited = table
        .mounted_at(target)
        .map(|m| m.per_mount_flags())
        .unwrap_or_else(MountFlags::empty);
    let flags = MountFlags::BIND | MountFlags::RDONLY | inherited;
    rustix::mount::mount_remount(target, flags, "").map_err(|e| MountError::RemountReadOnly {
        target: target.to_path_buf(),
        errno: e.into(),
    })?;
    let table = MountTable::read()?;
    match table.mounted_at(target) {
        Some(m) if m.is_read_only() => Ok(()),
        _ => Err(MountError::NotReadOnly {
            target: target.to_path_buf(),
        }),
    }
}

/// Unmounts `target` (one layer). `EINVAL` (not a mount point) and `ENOENT` count as
/// already unmounted, so unmounting is idempotent. The last path component is not
/// followed if it is a symlink. See [`DetachPolicy`] for the busy case.
pub fn unmount(target: &Path, policy: DetachPolicy) -> Result<Unmounted, MountError> {
    match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(Unmounted::Unmounted),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(Unmounted::NotMounted),
        Err(rustix::io::Errno::BUSY) if policy == DetachPolicy::IfBusy => {
            rustix::mount::unmount(target, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH)
                .map(|()| Unmounted::Detached)
                .map_err(|e| MountError::Unmount {
                    target: target.to_path_buf(),
                    errno: e.into(),
                })
        }
        Err(rustix::io::Errno::BUSY) => Err(MountError::Busy {
            target: target.to_path_buf(),
        }),
        Err(e) => Err(MountError::Unmount {
            target: target.to_path_buf(),
            errno: e.into(),
        }),
    }
}

/// Where a directory lives inside its filesystem: the device and the path from that
/// filesystem's root. Two mounts showing the same directory have the same location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsLocation {
    pub device: (u32, u32),
    pub root: PathBuf,
}

/// One line of mountinfo (see proc(5)); paths are unescaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub device: (u32, u32),
    /// The directory of the filesystem this mount shows (for a bind mount: the bound one).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, …).
    pub mount_options: Vec<String>,
    pub fs_type: String,
    /// The mount source as the filesystem reports it (a device for a bind mount).
    pub source: String,
}

impl MountEntry {
    pub fn is_read_only(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro")
    }

    /// The location this mount shows at its mount point.
    pub fn location(&self) -> FsLocation {
        FsLocation {
            device: self.device,
            root: self.root.clone(),
        }
    }

    /// `Some(rest)` when this mount shows `dir` or a directory below it.
    pub fn shows_inside<'a>(&'a self, dir: &FsLocation) -> Option<&'a Path> {
        if self.device != dir.device {
            return None;
        }
        self.root.strip_prefix(&dir.root).ok()
    }

    fn per_mount_flags(&self) -> MountFlags {
        let mut flags = MountFlags::empty();
        for option in &self.mount_options {
            flags |= match option.as_str() {
                "nosuid" => MountFlags::NOSUID,
                "nodev" => MountFlags::NODEV,
                "noexec" => MountFlags::NOEXEC,
                "noatime" => MountFlags::NOATIME,
                "nodiratime" => MountFlags::NODIRATIME,
                "relatime" => MountFlags::RELATIME,
                _ => MountFlags::empty(),
            };
        }
        flags
    }
}

/// A snapshot of the mount table, in the kernel's order (parents before children).
#[derive(Clone, Debug, Default)]
pub struct MountTable {
    entries: Vec<MountEntry>,
}

impl MountTable {
    pub fn read() -> Result<Self, MountError> {
        let text = std::fs::read(MOUNTINFO).map_err(|source| MountError::ReadTable {
            path: MOUNTINFO.to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &[u8]) -> Result<Self, MountError> {
        let entries = text
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(parse_line)
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    pub fn entries(&self) -> &[MountEntry] {
        &self.entries
    }

    /// The topmost mount whose mount point is exactly `path` (a path as the kernel
    /// prints it: absolute, symlinks resolved).
    pub fn mounted_at(&self, path: &Path) -> Option<&MountEntry> {
        let at_path: Vec<&MountEntry> = self
            .entries
            .iter()
            .filter(|m| m.mount_point == path)
            .collect();
        // Stacked mounts: the top one is not the parent of another mount at this path.
        at_path
            .iter()
            .find(|m| !at_path.iter().any(|other| other.parent_id == m.mount_id))
            .copied()
    }

    /// The mount that `path` (absolute, symlinks resolved) is on: the topmost mount with
    /// the longest mount point that is a prefix of `path`.
    pub fn containing(&self, path: &Path) -> Option<&MountEntry> {
        let longest = self
            .entries
            .iter()
            .filter(|m| path.starts_with(&m.mount_point))
            .map(|m| m.mount_point.as_os_str().len())
            .max()?;
        let mount_point = self
            .entries
            .iter()
            .find(|m| {
                path.starts_with(&m.mount_point) && m.mount_point.as_os_str().len() == longest
            })?
            .mount_point
            .clone();
        self.mounted_at(&mount_point)
    }

    /// Where the directory `path` (absolute, symlinks resolved) lives in its filesystem.
    pub fn locate(&self, path: &Path) -> Option<FsLocation> {
        let mount = self.containing(path)?;
        let rest = path.strip_prefix(&mount.mount_point).ok()?;
        Some(FsLocation {
            device: mount.device,
            root: mount.root.join(rest),
        })
    }

    /// Every mount showing `dir` or something inside it, with the path below `dir`.
    /// Mounts at `dir`'s own location in the tree are not excluded: callers filter.
    pub fn showing_inside<'a>(
        &'a self,
        dir: &'a FsLocation,
    ) -> impl Iterator<Item = (&'a MountEntry, &'a Path)> + 'a {
        self.entries
            .iter()
            .filter_map(move |m| m.shows_inside(dir).map(|rest| (m, rest)))
    }

    /// Every mount whose mount point is strictly below `prefix`.
    pub fn under<'a>(&'a self, prefix: &'a Path) -> impl Iterator<Item = &'a MountEntry> + 'a {
        self.entries
            .iter()
            .filter(move |m| m.mount_point != prefix && m.mount_point.starts_with(prefix))
    }
}

fn parse_line(line: &[u8]) -> Result<MountEntry, MountError> {
    let malformed = |reason| MountError::Malformed {
        line: String::from_utf8_lossy(line).into_owned(),
        reason,
    };
    let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    // The optional fields end at a lone "-"; the three fields after it are fixed.
    let dash = fields
        .iter()
        .position(|f| *f == b"-")
        .ok_or_else(|| malformed("no ' - ' separator"))?;
    if dash < 6 || fields.len() < dash + 3 {
        return Err(malformed("too few fields"));
    }
    let text = |f: &[u8]| String::from_utf8_lossy(&unescape(f)).into_owned();
    let number = |f: &[u8]| -> Result<u32, MountError> {
        std::str::from_utf8(f)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| malformed("bad number"))
    };
    let (major, minor) = {
        let mut parts = fields[2].splitn(2, |b| *b == b':');
        let major = number(parts.next().unwrap_or_default())?;
        let minor = number(parts.next().ok_or_else(|| malformed("bad major:minor"))?)?;
        (major, minor)
    };
    Ok(MountEntry {
        mount_id: number(fields[0])?,
        parent_id: number(fields[1])?,
        device: (major, minor),
        root: PathBuf::from(OsString::from_vec(unescape(fields[3]))),
        mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
        mount_options: text(fields[5]).split(',').map(str::to_string).collect(),
        fs_type: text(fields[dash + 1]),
        source: text(fields[dash + 2]),
    })
}

/// Undoes the kernel's mountinfo escaping: space, tab, newline and backslash are written
/// as a backslash and three octal digits (`\040`). Anything else is kept as is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).filter(|d| {
            field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// True when `path` is absolute and has no `.`/`..` components (so it names exactly one
/// place without resolving anything).
pub fn is_plain_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path.as_os_str().as_bytes().first() == Some(&b'/')
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

#[cfg(test)]
#[path = "kernel_mounts_tests.rs"]
mod tests;
