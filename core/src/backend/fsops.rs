//! Directory-relative file operations that never follow a symlink inside the root.
//!
//! Every path below the backend root is reached one component at a time with
//! `openat(O_NOFOLLOW)`, so a symlink planted inside the root (by a compromised pod
//! writing to a bind-mounted volume's parent, or by hand) is refused instead of
//! followed out of the root. Writes are atomic: temp file, fsync, rename, fsync dir.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::BackendError;

const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::RDONLY);

/// Opens the root itself. The root path may contain symlinks (it is configuration,
/// e.g. a link to an NFS mount); nothing below it may.
pub fn open_root(root: &Path) -> Result<OwnedFd, BackendError> {
    rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::RDONLY,
        Mode::empty(),
    )
    .map_err(|e| BackendError::io("open backend root", root, e))
}

/// Opens the directory `name` inside `parent`, refusing symlinks and non-directories.
/// `Ok(None)` if it does not exist.
pub fn open_dir(
    parent: impl AsFd,
    name: &str,
    shown: &Path,
) -> Result<Option<OwnedFd>, BackendError> {
    match rustix::fs::openat(&parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::LOOP | Errno::NOTDIR) => Err(not_a_dir(&parent, name, shown)),
        Err(e) => Err(BackendError::io("open directory", shown, e)),
    }
}

/// Opens `name` inside `parent`, creating it with `mode` first if missing.
pub fn ensure_dir(
    parent: impl AsFd,
    name: &str,
    mode: u32,
    shown: &Path,
) -> Result<OwnedFd, BackendError> {
    match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(mode)) {
        Ok(()) => {
            let fd = open_dir(&parent, name, shown)?
                .ok_or_else(|| BackendError::io("open directory", shown, Errno::NOENT))?;
            // mkdir's mode is filtered by the umask; set the intended one explicitly.
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))
                .map_err(|e| BackendError::io("chmod directory", shown, e))?;
            rustix::fs::fsync(&parent)
                .map_err(|e| BackendError::io("fsync parent of", shown, e))?;
            Ok(fd)
        }
        Err(Errno::EXIST) => open_dir(&parent, name, shown)?
            .ok_or_else(|| BackendError::io("open directory", shown, Errno::NOENT)),
        Err(e) => Err(BackendError::io("create directory", shown, e)),
    }
}

fn not_a_dir(parent: impl AsFd, name: &str, shown: &Path) -> BackendError {
    let reason = match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => "is a symbolic link",
        _ => "is not a directory",
    };
    BackendError::UnsafePath {
        path: shown.to_path_buf(),
        reason,
    }
}

/// Reads the regular file `name` in `dir`; `Ok(None)` if it does not exist.
pub fn read_file(
    dir: impl AsFd,
    name: &str,
    shown: &Path,
) -> Result<Option<Vec<u8>>, BackendError> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = match rustix::fs::openat(&dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => {
            return Err(BackendError::UnsafePath {
                path: shown.to_path_buf(),
                reason: "is a symbolic link",
            })
        }
        Err(e) => return Err(BackendError::io("open", shown, e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| BackendError::io("stat", shown, e))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(BackendError::UnsafePath {
            path: shown.to_path_buf(),
            reason: "is not a regular file",
        });
    }
    let mut bytes = Vec::new();
    File::from(fd)
        .read_to_end(&mut bytes)
        .map_err(|e| BackendError::io("read", shown, e))?;
    Ok(Some(bytes))
}

/// Replaces `name` in `dir` with `bytes` atomically and durably: a crash leaves either
/// the old or the new content, never a torn file.
pub fn write_atomic(
    dir: impl AsFd,
    name: &str,
    bytes: &[u8],
    shown: &Path,
) -> Result<(), BackendError> {
    let tmp = format!(".{name}.tmp-{}", uuid::Uuid::new_v4().simple());
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(&dir, tmp.as_str(), flags, Mode::from_raw_mode(0o600))
        .map_err(|e| BackendError::io("create temporary file for", shown, e))?;
    let mut file = File::from(fd);
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| BackendError::io("write", shown, e))
        .and_then(|()| {
            rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)
                .map_err(|e| BackendError::io("rename into place", shown, e))
        });
    if let Err(e) = written {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        return Err(e);
    }
    rustix::fs::fsync(&dir).map_err(|e| BackendError::io("fsync directory of", shown, e))
}

/// Removes the file `name` from `dir` durably. `Ok(false)` if it did not exist.
pub fn remove_file(dir: impl AsFd, name: &str, shown: &Path) -> Result<bool, BackendError> {
    match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
        Ok(()) => {
            rustix::fs::fsync(&dir)
                .map_err(|e| BackendError::io("fsync directory of", shown, e))?;
            Ok(true)
        }
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(BackendError::io("remove", shown, e)),
    }
}

/// Names in a directory, without `.` and `..`.
pub fn list_names(dir: impl AsFd, shown: &Path) -> Result<Vec<String>, BackendError> {
    let entries =
        rustix::fs::Dir::read_from(&dir).map_err(|e| BackendError::io("list", shown, e))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| BackendError::io("list", shown, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    Ok(names)
}
