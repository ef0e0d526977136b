//! The fencing epoch on the volume's backing storage: `<root>/volumes/<id>/.holdfast-epoch`
//! (see `holdfast_core::backend`), the protocol's second channel.
//!
//! A holder writes its epoch here right after its claim is granted, before the volume is
//! mounted; every holder re-reads it on each enforcement tick and stops at once if it
//! finds a higher one. That works while the lease store is unreachable but the storage
//! is not — exactly the partition in which a holder could otherwise keep writing after
//! another node took the volume over.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory), so a reader
//! never sees a torn number, and never lower a higher epoch already there: a higher one
//! means somebody newer holds the volume, and the writer must give its grant up.
//!
//! Residual race, stated honestly: the read-compare-rename is not atomic across nodes.
//! An older holder that read the file just before a newer one renamed its epoch in can
//! still rename its lower epoch over it. That older holder was granted first, so it has
//! already lost its claim in the store and stops by the store channel or its session
//! deadline; the newer holder's own check (never "higher than mine") is unaffected.

use std::io::Write;
use std::path::Path;

use holdfast_core::lease::Epoch;

/// What [`write_epoch`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochWrite {
    /// Our epoch is on the storage now (it was absent, lower or equal).
    Written,
    /// A higher epoch is already there: someone newer holds the volume.
    Higher(Epoch),
}

#[derive(Debug, thiserror::Error)]
pub enum EpochFileError {
    #[error("epoch file {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("epoch file {path} holds {text:?}, not an epoch number")]
    Corrupt {
        path: std::path::PathBuf,
        text: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EpochFileError + '_ {
    move |source| EpochFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The epoch on the storage; `None` if no holder wrote one yet.
pub fn read_epoch(path: &Path) -> Result<Option<Epoch>, EpochFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    text.trim()
        .parse::<Epoch>()
        .map(Some)
        .map_err(|_| EpochFileError::Corrupt {
            path: path.to_path_buf(),
            text: text.chars().take(40).collect(),
        })
}

/// Puts `epoch` on the storage unless a higher one is there.
pub fn write_epoch(path: &Path, epoch: Epoch) -> Result<EpochWrite, EpochFileError> {
    if let Some(found) = read_epoch(path)? {
        if found > epoch {
            return Ok(EpochWrite::Higher(found));
        }
        if found == epoch {
            return Ok(EpochWrite::Written);
        }
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // Unique per writer, so two nodes writing at once never share a temporary file.
    let temp = dir.join(format!(
        "{name}.{}.{}.tmp",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(format!("{epoch}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&temp);
        return Err(io(path)(e));
    }
    Ok(EpochWrite::Written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_raises_and_never_lowers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".holdfast-epoch");
        assert_eq!(read_epoch(&path).unwrap(), None);
        assert_eq!(write_epoch(&path, 3).unwrap(), EpochWrite::Written);
        assert_eq!(read_epoch(&path).unwrap(), Some(3));
        assert_eq!(write_epoch(&path, 3).unwrap(), EpochWrite::Written);
        assert_eq!(write_epoch(&path, 7).unwrap(), EpochWrite::Written);
        assert_eq!(write_epoch(&path, 5).unwrap(), EpochWrite::Higher(7));
        assert_eq!(read_epoch(&path).unwrap(), Some(7));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn garbage_is_an_error_not_a_missing_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".holdfast-epoch");
        std::fs::write(&path, "five").unwrap();
        assert!(matches!(
            read_epoch(&path),
            Err(EpochFileError::Corrupt { .. })
        ));
        assert!(write_epoch(&path, 9).is_err());
    }
}
