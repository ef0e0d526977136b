//! The inode table: FUSE node ids ↔ backing inodes.
//!
//! Keyed by the backing file's `(st_dev, st_ino)`; each entry holds an `O_PATH` fd to the
//! backing inode, so an entry stays valid across renames and names every hard link of the
//! same file with one node id. Node ids are never reused (a counter), so the FUSE
//! generation is always 0. Entries live while the kernel holds lookups on them
//! (`nlookup`), and die on `forget`. Mutated by lookups, creations and forgets on any
//! worker thread, under one mutex.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use fuser::Errno;
use rustix::fs::{FileType, Stat};

pub(super) const ROOT_ID: u64 = 1;

pub(super) struct Inode {
    /// `O_PATH` fd of the backing inode.
    pub fd: OwnedFd,
    pub kind: FileType,
    key: (u64, u64),
}

struct Entry {
    inode: Arc<Inode>,
    nlookup: u64,
}

#[derive(Default)]
struct Tables {
    by_id: HashMap<u64, Entry>,
    by_key: HashMap<(u64, u64), u64>,
    next_id: u64,
}

pub(super) struct InodeTable {
    tables: Mutex<Tables>,
}

impl InodeTable {
    /// A table holding only the root, which is never forgotten.
    pub fn new(root_fd: OwnedFd, root: &Stat) -> Self {
        let mut tables = Tables {
            next_id: ROOT_ID + 1,
            ..Tables::default()
        };
        let key = key_of(root);
        let inode = Arc::new(Inode {
            fd: root_fd,
            kind: FileType::Directory,
            key,
        });
        tables.by_id.insert(
            ROOT_ID,
            Entry {
                inode,
                nlookup: u64::MAX / 2,
            },
        );
        tables.by_key.insert(key, ROOT_ID);
        Self {
            tables: Mutex::new(tables),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The inode with node id `id`. `ESTALE` if the kernel names one it already forgot.
    pub fn get(&self, id: u64) -> Result<Arc<Inode>, Errno> {
        self.lock()
            .by_id
            .get(&id)
            .map(|e| e.inode.clone())
            .ok_or(Errno::ESTALE)
    }

    /// Records one kernel lookup of the backing inode `fd` (whose stat is `st`) and
    /// returns its node id. An inode already known keeps its id and `fd` is dropped.
    pub fn remember(&self, fd: OwnedFd, st: &Stat) -> u64 {
        let key = key_of(st);
        let mut t = self.lock();
        if let Some(&id) = t.by_key.get(&key) {
            if let Some(entry) = t.by_id.get_mut(&id) {
                entry.nlookup += 1;
                return id;
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let inode = Arc::new(Inode {
            fd,
            kind: FileType::from_raw_mode(st.st_mode),
            key,
        });
        t.by_id.insert(id, Entry { inode, nlookup: 1 });
        t.by_key.insert(key, id);
        id
    }

    /// Drops `n` kernel lookups of `id`; the entry (and its fd) go at zero.
    pub fn forget(&self, id: u64, n: u64) {
        let mut t = self.lock();
        let Some(entry) = t.by_id.get_mut(&id) else {
            return;
        };
        entry.nlookup = entry.nlookup.saturating_sub(n);
        if entry.nlookup == 0 {
            let key = entry.inode.key;
            t.by_id.remove(&id);
            if t.by_key.get(&key) == Some(&id) {
                t.by_key.remove(&key);
            }
        }
    }

    /// The node id of a backing inode, if the kernel holds it.
    pub fn id_of(&self, dev: u64, ino: u64) -> Option<u64> {
        self.lock().by_key.get(&(dev, ino)).copied()
    }

    /// Every node id the kernel currently holds.
    pub fn all(&self) -> Vec<u64> {
        self.lock().by_id.keys().copied().collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().by_id.len()
    }
}

fn key_of(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{openat, statat, AtFlags, Mode, OFlags, CWD};

    fn open_path(p: &std::path::Path) -> (OwnedFd, Stat) {
        let fd = openat(CWD, p, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty()).unwrap();
        let st = statat(CWD, p, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        (fd, st)
    }

    #[test]
    fn hard_links_share_an_id_and_forget_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let (root_fd, root_st) = open_path(dir.path());
        let table = InodeTable::new(root_fd, &root_st);
        std::fs::write(dir.path().join("a"), b"x").unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();

        let (fd_a, st_a) = open_path(&dir.path().join("a"));
        let (fd_b, st_b) = open_path(&dir.path().join("b"));
        let id_a = table.remember(fd_a, &st_a);
        let id_b = table.remember(fd_b, &st_b);
        assert_eq!(id_a, id_b);
        assert_ne!(id_a, ROOT_ID);
        assert_eq!(table.len(), 2);

        table.forget(id_a, 1);
        assert!(table.get(id_a).is_ok(), "one lookup is still held");
        table.forget(id_a, 1);
        assert_eq!(table.get(id_a).err(), Some(Errno::ESTALE));

        // A new lookup after the forget gets a fresh id: ids are never reused.
        let (fd_a2, st_a2) = open_path(&dir.path().join("a"));
        let id_again = table.remember(fd_a2, &st_a2);
        assert!(id_again > id_a);
    }

    #[test]
    fn root_is_never_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (root_fd, root_st) = open_path(dir.path());
        let table = InodeTable::new(root_fd, &root_st);
        table.forget(ROOT_ID, 1_000_000);
        assert!(table.get(ROOT_ID).is_ok());
    }
}
