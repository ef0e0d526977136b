//! The node-local proof that a plugin instance on this boot is dead.
//!
//! Every plugin instance holds an exclusive `flock` on `<state_dir>/sessions/<instance>.lock`
//! for its whole life. The kernel drops a flock only when every descriptor of the open
//! file is closed — for a plugin, when its process is gone. A successor that obtains a
//! predecessor's lock without blocking therefore knows that process is dead; if the lock
//! would block, the predecessor is alive (a rolling update overlaps two instances) and
//! must be left alone.
//!
//! The lock file is created under a temporary name, locked, and only then renamed into
//! place, so a successor can never find a final-named file that is not yet locked by a
//! starting instance and take that as a proof of death.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use crate::lease::session::LockProbe;
use crate::lease::LeaseError;

const SUFFIX: &str = ".lock";

/// This instance's lock, held until dropped (or the process dies).
#[derive(Debug)]
pub struct NodeLock {
    _file: File,
    path: PathBuf,
}

/// A dead predecessor's lock, held by us while we clean up after it.
#[derive(Debug)]
pub struct DeadInstanceLock {
    _file: File,
    path: PathBuf,
}

/// The result of probing a predecessor's lock.
#[derive(Debug)]
pub enum Probe {
    /// We now hold its lock: the instance is dead.
    Dead(DeadInstanceLock),
    /// Its process still holds the lock.
    Alive,
    /// It has no lock file here.
    Missing,
}

impl Probe {
    pub fn as_lock_probe(&self) -> LockProbe {
        match self {
            Probe::Dead(_) => LockProbe::Acquired,
            Probe::Alive => LockProbe::Held,
            Probe::Missing => LockProbe::Missing,
        }
    }
}

/// Instance ids become file names: allow only characters that cannot escape the dir.
pub fn check_instance(instance: &str) -> Result<(), LeaseError> {
    let ok = !instance.is_empty()
        && instance.len() <= 128
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(LeaseError::InvalidInput(format!(
            "instance id {instance:?} must be 1-128 of [A-Za-z0-9_-]"
        )))
    }
}

fn sessions_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("sessions")
}

fn lock_path(state_dir: &Path, instance: &str) -> PathBuf {
    sessions_dir(state_dir).join(format!("{instance}{SUFFIX}"))
}

fn try_lock(file: &File) -> std::io::Result<bool> {
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl NodeLock {
    /// Takes this instance's lock. Fails if the instance id is malformed or its lock
    /// is somehow already held.
    pub fn acquire(state_dir: &Path, instance: &str) -> Result<NodeLock, LeaseError> {
        check_instance(instance)?;
        let dir = sessions_dir(state_dir);
        std::fs::create_dir_all(&dir).map_err(|e| LeaseError::io(&dir, e))?;
        let tmp = dir.join(format!(".{instance}.starting"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)
            .map_err(|e| LeaseError::io(&tmp, e))?;
        if !try_lock(&file).map_err(|e| LeaseError::io(&tmp, e))? {
            return Err(LeaseError::io(
                &tmp,
                std::io::Error::new(ErrorKind::WouldBlock, "lock already held"),
            ));
        }
        let path = lock_path(state_dir, instance);
        std::fs::rename(&tmp, &path).map_err(|e| LeaseError::io(&path, e))?;
        Ok(NodeLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Instance ids of every other instance with a lock file in `state_dir`.
    pub fn other_instances(state_dir: &Path, own: &str) -> Result<Vec<String>, LeaseError> {
        let dir = sessions_dir(state_dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(LeaseError::io(&dir, e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| LeaseError::io(&dir, e))?;
            let name = entry.file_name();
            let Some(instance) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
                continue;
            };
            if instance != own && check_instance(instance).is_ok() {
                found.push(instance.to_string());
            }
        }
        found.sort();
        Ok(found)
    }

    /// Tries, without blocking, to take `instance`'s lock.
    pub fn probe(state_dir: &Path, instance: &str) -> Result<Probe, LeaseError> {
        check_instance(instance)?;
        let path = lock_path(state_dir, instance);
        // Never create: a lock file we made ourselves would prove nothing.
        let file = match OpenOptions::new().read(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Probe::Missing),
            Err(e) => return Err(LeaseError::io(&path, e)),
        };
        if try_lock(&file).map_err(|e| LeaseError::io(&path, e))? {
            Ok(Probe::Dead(DeadInstanceLock { _file: file, path }))
        } else {
            Ok(Probe::Alive)
        }
    }
}

impl DeadInstanceLock {
    /// Removes the dead instance's lock file once its session is cleaned up.
    pub fn remove(self) -> Result<(), LeaseError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LeaseError::io(&self.path, e)),
        }
    }
}

impl NodeLock {
    /// Removes this instance's lock file, for a session whose record is deleted: no
    /// successor needs to prove anything about it. Every other exit leaves the file,
    /// graceful or not: a session record kept past the exit (targets still mounted) is
    /// freed early only by a successor that takes this flock, and it can take only a
    /// file that is there. Files left without a session are removed by the next
    /// instance's recovery once their flock is free.
    pub fn remove_file(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    #[test]
    fn own_lock_is_exclusive_and_found_by_successors() {
        let dir = tempfile::tempdir().unwrap();
        let lock = NodeLock::acquire(dir.path(), "first").unwrap();
        assert!(lock.path().ends_with("sessions/first.lock"));
        assert_eq!(
            NodeLock::other_instances(dir.path(), "second").unwrap(),
            vec!["first".to_string()]
        );
        assert!(NodeLock::other_instances(dir.path(), "first")
            .unwrap()
            .is_empty());
        assert!(matches!(
            NodeLock::probe(dir.path(), "first").unwrap(),
            Probe::Alive
        ));
        assert!(matches!(
            NodeLock::probe(dir.path(), "nobody").unwrap(),
            Probe::Missing
        ));
        // An exit leaves the file, free: a successor proves this instance dead.
        drop(lock);
        assert!(matches!(
            NodeLock::probe(dir.path(), "first").unwrap(),
            Probe::Dead(_)
        ));
        let lock = NodeLock::acquire(dir.path(), "third").unwrap();
        lock.remove_file();
        assert!(matches!(
            NodeLock::probe(dir.path(), "third").unwrap(),
            Probe::Missing
        ));
    }

    #[test]
    fn instance_ids_cannot_escape_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(NodeLock::acquire(dir.path(), bad).is_err(), "{bad:?}");
            assert!(NodeLock::probe(dir.path(), bad).is_err(), "{bad:?}");
        }
    }

    /// A real process holds the lock; it is alive until SIGKILLed, dead after.
    #[test]
    fn a_killed_holder_process_releases_its_lock_to_the_successor() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sessions")).unwrap();
        let path = dir.path().join("sessions/victim.lock");
        // The shell takes the lock on fd 9 and then becomes `sleep`, which keeps it.
        let script = format!("exec 9>'{}' && flock 9 && exec sleep 60", path.display());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        loop {
            if matches!(NodeLock::probe(dir.path(), "victim").unwrap(), Probe::Alive) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "child never took its lock"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Alive: the probe must not take it, however often we try.
        for _ in 0..3 {
            assert!(matches!(
                NodeLock::probe(dir.path(), "victim").unwrap(),
                Probe::Alive
            ));
        }
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
            rustix::process::Signal::KILL,
        )
        .unwrap();
        child.wait().unwrap();
        match NodeLock::probe(dir.path(), "victim").unwrap() {
            Probe::Dead(lock) => lock.remove().unwrap(),
            other => panic!("dead holder's lock not obtained: {other:?}"),
        }
        assert!(!path.exists());
    }
}
