//! The node's table of published targets (volume → target → how), and the per-volume
//! locks that serialise NodePublish/NodeUnpublish of one volume.
//!
//! The table is mutated only by the Node service, after the kernel mount it describes
//! has been made or removed, and is rebuilt at start from the mount table
//! ([`PublishedTable::recover`]), so a restarted plugin still knows every target it had
//! published (kubelet owns those mounts and keeps them across plugin restarts).

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use holdfast_core::backend::{VolumeId, DATA_DIR};

use crate::publish::kernel_mounts::{FsLocation, MountTable};

/// How a target shows its volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPathKind {
    /// A kernel bind mount of the volume's data directory.
    Bind,
    /// Served by this process through FUSE.
    Fuse,
}

/// One published target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub readonly: bool,
    pub kind: DataPathKind,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishedTable {
    volumes: BTreeMap<String, BTreeMap<PathBuf, Published>>,
}

impl PublishedTable {
    pub fn insert(&mut self, volume: &str, target: PathBuf, published: Published) {
        self.volumes
            .entry(volume.to_string())
            .or_default()
            .insert(target, published);
    }

    pub fn remove(&mut self, volume: &str, target: &Path) -> Option<Published> {
        let targets = self.volumes.get_mut(volume)?;
        let removed = targets.remove(target);
        if targets.is_empty() {
            self.volumes.remove(volume);
        }
        removed
    }

    pub fn get(&self, volume: &str, target: &Path) -> Option<Published> {
        self.volumes.get(volume)?.get(target).copied()
    }

    /// The volume published at `target`, if any.
    pub fn volume_at(&self, target: &Path) -> Option<&str> {
        self.volumes
            .iter()
            .find(|(_, targets)| targets.contains_key(target))
            .map(|(volume, _)| volume.as_str())
    }

    /// Every target of `volume`, sorted.
    pub fn targets(&self, volume: &str) -> Vec<PathBuf> {
        self.volumes
            .get(volume)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every (volume, target, how) triple, by volume then target.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Path, Published)> + '_ {
        self.volumes.iter().flat_map(|(volume, targets)| {
            targets
                .iter()
                .map(move |(target, p)| (volume.as_str(), target.as_path(), *p))
        })
    }

    /// Number of (volume, target) pairs.
    pub fn len(&self) -> usize {
        self.volumes.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty()
    }

    /// The bind mounts in `table` that show exactly `<volumes_dir>/<id>/data` for a
    /// valid volume id. Anything else that happens to live inside the volumes
    /// directory (the directory itself, a subdirectory of a volume) was not made by
    /// this plugin and is left out.
    pub fn recover(table: &MountTable, volumes_dir: &FsLocation) -> PublishedTable {
        let mut published = PublishedTable::default();
        for (mount, rest) in table.showing_inside(volumes_dir) {
            let parts: Vec<Component> = rest.components().collect();
            let [Component::Normal(id), Component::Normal(data)] = parts[..] else {
                continue;
            };
            let Some(id) = id.to_str().and_then(|id| VolumeId::parse(id).ok()) else {
                continue;
            };
            if data != DATA_DIR {
                continue;
            }
            published.insert(
                id.as_str(),
                mount.mount_point.clone(),
                Published {
                    readonly: mount.is_read_only(),
                    kind: DataPathKind::Bind,
                },
            );
        }
        published
    }
}

/// One async mutex per volume id, created on demand and dropped when unused.
#[derive(Default)]
pub struct VolumeLocks {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl VolumeLocks {
    /// Waits for exclusive use of `volume`; released when the guard drops.
    pub async fn lock(&self, volume: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.retain(|_, weak| weak.strong_count() > 0);
            match locks.get(volume).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(volume.to_string(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "hf-0123456789abcdef0123456789abcdef";

    #[test]
    fn recover_keeps_only_binds_of_volume_data_dirs() {
        let text = format!(
            "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
             60 27 254:0 /srv/volumes/{ID}/data /pods/a/vol rw - ext4 /dev/vda rw\n\
             61 27 254:0 /srv/volumes/{ID}/data /pods/b/vol ro - ext4 /dev/vda rw\n\
             62 27 254:0 /srv/volumes/{ID}/data/sub /pods/c/vol rw - ext4 /dev/vda rw\n\
             63 27 254:0 /srv/volumes/not-an-id/data /pods/d/vol rw - ext4 /dev/vda rw\n\
             64 27 254:0 /srv/volumes /pods/e/vol rw - ext4 /dev/vda rw\n\
             65 27 0:50 /srv/volumes/{ID}/data /pods/f/vol rw - tmpfs t rw\n"
        );
        let table = MountTable::parse(text.as_bytes()).unwrap();
        let volumes = FsLocation {
            device: (254, 0),
            root: PathBuf::from("/srv/volumes"),
        };
        let recovered = PublishedTable::recover(&table, &volumes);
        assert_eq!(recovered.len(), 2);
        assert_eq!(
            recovered.get(ID, Path::new("/pods/a/vol")),
            Some(Published {
                readonly: false,
                kind: DataPathKind::Bind
            })
        );
        assert!(
            recovered
                .get(ID, Path::new("/pods/b/vol"))
                .unwrap()
                .readonly
        );
    }

    #[test]
    fn remove_drops_empty_volumes() {
        let mut table = PublishedTable::default();
        let p = Published {
            readonly: false,
            kind: DataPathKind::Bind,
        };
        table.insert("v", "/a".into(), p);
        table.insert("v", "/b".into(), p);
        assert_eq!(
            table.targets("v"),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(table.volume_at(Path::new("/b")), Some("v"));
        assert_eq!(table.volume_at(Path::new("/c")), None);
        assert_eq!(table.remove("v", Path::new("/a")), Some(p));
        assert_eq!(table.remove("v", Path::new("/a")), None);
        table.remove("v", Path::new("/b"));
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn volume_locks_serialise_one_volume_only() {
        let locks = Arc::new(VolumeLocks::default());
        let held = locks.lock("v").await;
        // Another volume is not blocked.
        let _other = locks.lock("w").await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock("v").await;
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "second lock of v must wait");
        drop(held);
        waiter.await.unwrap();
    }
}
