//! The directory-backed volume backend: volumes are directories under a root that every
//! node mounts at the same path (NFS, CephFS, any shared filesystem, or a local
//! directory on one machine).
//!
//! Layout on disk:
//!
//! ```text
//! <root>/volumes/<id>/                  0700  one volume; never handed to a pod
//! <root>/volumes/<id>/data/             0777  the directory the node plugin publishes
//! <root>/volumes/<id>/.holdfast-epoch         fencing epoch (written by the node plugin),
//!                                             outside `data/` so no pod can touch it
//! <root>/meta/<id>.json                 0600  the volume's [`VolumeMeta`]
//! <root>/nodes/node-<hash>.json         0600  a registered node plugin ([`Backend::register_node`])
//! <root>/trash/                               volumes being deleted
//! ```
//!
//! A volume exists when its metadata exists. Ids are `hf-` + 32 hex digits of
//! SHA-256(name) ([`VolumeId`]), so a retried CreateVolume finds its directory even if
//! metadata was lost, and no request can name a path outside `volumes/`. Capacity is
//! recorded and reported but not enforced: a plain directory has no quota.
//!
//! Concurrency: operations on one volume are serialised by a lock stripe inside this
//! process. Only one process may manage a root at a time (the controller runs with
//! leader election); the node plugin only reads metadata and resolves paths.

mod error;
mod fsops;
mod id;
mod meta;
mod nodes;
mod params;
#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

pub use error::BackendError;
pub use id::{VolumeId, VolumeName, MAX_NAME_BYTES, VOLUME_ID_LEN, VOLUME_ID_PREFIX};
pub use meta::{
    canonical_capabilities, AccessMode, Capability, CapacityRange, Publication, VolumeMeta,
    VolumeSpec, DEFAULT_CAPACITY_BYTES, META_FORMAT,
};
pub use nodes::{validate_node_id, MAX_NODE_ID_BYTES};
pub use params::{
    DataPath, FenceAction, OnConflict, ParsedParameters, VolumeParams, CO_PARAM_PREFIX,
    PARAM_DATA_PATH, PARAM_EXCLUSIVE, PARAM_FENCE_ACTION, PARAM_ON_CONFLICT,
};

const VOLUMES_DIR: &str = "volumes";
const META_DIR: &str = "meta";
const TRASH_DIR: &str = "trash";
const NODES_DIR: &str = "nodes";
/// The directory inside a volume that pods see.
pub const DATA_DIR: &str = "data";
/// The fencing epoch file inside a volume's directory, beside (not in) `data/`.
pub const EPOCH_FILE: &str = ".holdfast-epoch";
const LOCK_STRIPES: usize = 64;

/// The result of [`Backend::create_volume`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    pub meta: VolumeMeta,
    /// False when an existing compatible volume was returned (an idempotent retry).
    pub newly_created: bool,
}

/// Size of the backend filesystem, from statvfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// The volume store over one root directory.
#[derive(Debug)]
pub struct Backend {
    root: PathBuf,
    stripes: Vec<Mutex<()>>,
}

/// The root's top-level directories, opened without following symlinks.
struct Dirs {
    volumes: OwnedFd,
    meta: OwnedFd,
    trash: OwnedFd,
    nodes: OwnedFd,
}

impl Backend {
    /// Opens (initialising if needed) the backend at `root`, and finishes deletions a
    /// crash interrupted.
    pub fn open(root: impl AsRef<Path>) -> Result<Backend, BackendError> {
        let root = root.as_ref();
        let root = root
            .canonicalize()
            .map_err(|e| BackendError::io("resolve backend root", root, e))?;
        let root_fd = fsops::open_root(&root)?;
        for dir in [VOLUMES_DIR, META_DIR, TRASH_DIR, NODES_DIR] {
            fsops::ensure_dir(&root_fd, dir, 0o700, &root.join(dir))?;
        }
        let backend = Backend {
            root,
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        };
        backend.sweep_trash()?;
        Ok(backend)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the volume `spec` names, or returns it if it already exists and is
    /// compatible (CSI idempotency). An existing incompatible one is
    /// [`BackendError::Incompatible`].
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<Created, BackendError> {
        let id = VolumeId::for_name(&spec.name);
        let _guard = self.lock(&id);
        let dirs = self.dirs()?;
        if let Some(meta) = self.read_meta(&dirs, &id)? {
            if meta.name != spec.name.as_str() {
                return Err(BackendError::IdCollision {
                    id: id.to_string(),
                    name: spec.name.as_str().into(),
                    existing_name: meta.name,
                });
            }
            return match meta.incompatibility(spec) {
                None => Ok(Created {
                    meta,
                    newly_created: false,
                }),
                Some(reason) => Err(BackendError::Incompatible {
                    name: meta.name,
                    id: id.to_string(),
                    reason,
                }),
            };
        }
        let total = self.space()?.total_bytes;
        if spec.capacity.required_bytes() > total {
            return Err(BackendError::CapacityUnsatisfiable {
                requested: spec.capacity.required_bytes(),
                total,
            });
        }
        // Directory first, metadata last: a crash in between leaves an unlisted
        // directory that the retried CreateVolume (same name, same id) adopts.
        let volume_path = self.volume_path(&id);
        let volume = fsops::ensure_dir(&dirs.volumes, id.as_str(), 0o700, &volume_path)?;
        // World-writable like a fresh filesystem's root, so non-root pods can use it;
        // the 0700 parent keeps other users on the node out.
        fsops::ensure_dir(&volume, DATA_DIR, 0o777, &volume_path.join(DATA_DIR))?;
        let meta = VolumeMeta {
            format: META_FORMAT,
            id: id.clone(),
            name: spec.name.as_str().into(),
            capacity_bytes: spec.capacity.choose(),
            capabilities: canonical_capabilities(&spec.capabilities),
            params: spec.params,
            co_metadata: spec.co_metadata.clone(),
            published: Default::default(),
            created_unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        self.write_meta(&dirs, &meta)?;
        Ok(Created {
            meta,
            newly_created: true,
        })
    }

    /// The volume's metadata, `None` if it does not exist.
    pub fn volume(&self, id: &VolumeId) -> Result<Option<VolumeMeta>, BackendError> {
        let dirs = self.dirs()?;
        self.read_meta(&dirs, id)
    }

    /// Every volume, sorted by id. Unreadable metadata files are skipped with a warning
    /// so that one damaged file does not hide every other volume.
    pub fn list_volumes(&self) -> Result<Vec<VolumeMeta>, BackendError> {
        let dirs = self.dirs()?;
        let mut ids: Vec<VolumeId> = fsops::list_names(&dirs.meta, &self.root.join(META_DIR))?
            .iter()
            .filter_map(|name| name.strip_suffix(".json"))
            .filter_map(|stem| VolumeId::parse(stem).ok())
            .collect();
        ids.sort();
        let mut volumes = Vec::with_capacity(ids.len());
        for id in ids {
            match self.read_meta(&dirs, &id) {
                Ok(Some(meta)) => volumes.push(meta),
                Ok(None) => {} // deleted while listing
                Err(e) => {
                    tracing::warn!(volume_id = %id, error = %e, "skipping unreadable volume metadata")
                }
            }
        }
        Ok(volumes)
    }

    /// Deletes a volume and its data. Returns whether anything existed. Refused while the
    /// volume is published to a node.
    pub fn delete_volume(&self, id: &VolumeId) -> Result<bool, BackendError> {
        let _guard = self.lock(id);
        let dirs = self.dirs()?;
        if let Some(meta) = self.read_meta(&dirs, id)? {
            if !meta.published.is_empty() {
                return Err(BackendError::InUse {
                    id: id.to_string(),
                    nodes: meta.published_nodes(),
                });
            }
        }
        // Moving the directory into trash is atomic: nobody sees a half-deleted volume.
        let volume_path = self.volume_path(id);
        let had_dir = fsops::open_dir(&dirs.volumes, id.as_str(), &volume_path)?.is_some();
        let trash_name = format!("{id}.{}", uuid::Uuid::new_v4().simple());
        if had_dir {
            rustix::fs::renameat(&dirs.volumes, id.as_str(), &dirs.trash, trash_name.as_str())
                .map_err(|e| BackendError::io("move to trash", &volume_path, e))?;
            rustix::fs::fsync(&dirs.volumes)
                .map_err(|e| BackendError::io("fsync", self.root.join(VOLUMES_DIR), e))?;
        }
        let had_meta = fsops::remove_file(&dirs.meta, &meta_file(id), &self.meta_path(id))?;
        if had_dir {
            let trash_path = self.root.join(TRASH_DIR).join(&trash_name);
            // std's remove_dir_all does not follow symlinks inside the tree.
            if let Err(e) = std::fs::remove_dir_all(&trash_path) {
                tracing::warn!(path = %trash_path.display(), error = %e, "volume deleted; its data will be removed on the next start");
            }
        }
        Ok(had_dir || had_meta)
    }

    /// Records that the volume is published to `node`, which must have registered
    /// ([`BackendError::UnknownNode`] otherwise). Idempotent for an identical
    /// publication; see [`VolumeMeta::check_publish`] for what is refused.
    pub fn publish(
        &self,
        id: &VolumeId,
        node: &str,
        publication: Publication,
    ) -> Result<VolumeMeta, BackendError> {
        let _guard = self.lock(id);
        let dirs = self.dirs()?;
        let mut meta = self
            .read_meta(&dirs, id)?
            .ok_or_else(|| BackendError::NotFound { id: id.to_string() })?;
        if meta.check_publish(node, publication)? {
            if !self.node_registered(node)? {
                return Err(BackendError::UnknownNode {
                    node_id: node.to_owned(),
                });
            }
            meta.published.insert(node.to_owned(), publication);
            self.write_meta(&dirs, &meta)?;
        }
        Ok(meta)
    }

    /// Forgets the publication to `node`, or to every node if `None`. A missing volume
    /// or publication is already unpublished: `Ok`.
    pub fn unpublish(&self, id: &VolumeId, node: Option<&str>) -> Result<(), BackendError> {
        let _guard = self.lock(id);
        let dirs = self.dirs()?;
        let Some(mut meta) = self.read_meta(&dirs, id)? else {
            return Ok(());
        };
        let changed = match node {
            Some(node) => meta.published.remove(node).is_some(),
            None => !std::mem::take(&mut meta.published).is_empty(),
        };
        if changed {
            self.write_meta(&dirs, &meta)?;
        }
        Ok(())
    }

    /// Grows the recorded capacity to satisfy `range`; returns the new capacity.
    /// Already large enough is success; a limit below the current size is refused.
    pub fn expand_volume(&self, id: &VolumeId, range: CapacityRange) -> Result<u64, BackendError> {
        let _guard = self.lock(id);
        let dirs = self.dirs()?;
        let mut meta = self
            .read_meta(&dirs, id)?
            .ok_or_else(|| BackendError::NotFound { id: id.to_string() })?;
        let target = match range.required_bytes() {
            0 => range.limit_bytes(),
            required => required,
        };
        if range.limit_bytes() != 0 && meta.capacity_bytes > range.limit_bytes() {
            return Err(BackendError::ShrinkUnsupported {
                id: id.to_string(),
                current: meta.capacity_bytes,
                limit: range.limit_bytes(),
            });
        }
        if target <= meta.capacity_bytes {
            return Ok(meta.capacity_bytes);
        }
        let total = self.space()?.total_bytes;
        if target > total {
            return Err(BackendError::CapacityUnsatisfiable {
                requested: target,
                total,
            });
        }
        meta.capacity_bytes = target;
        self.write_meta(&dirs, &meta)?;
        Ok(target)
    }

    /// Total and available bytes of the filesystem holding the root.
    pub fn space(&self) -> Result<Space, BackendError> {
        let root = fsops::open_root(&self.root)?;
        let st =
            rustix::fs::fstatvfs(&root).map_err(|e| BackendError::io("statvfs", &self.root, e))?;
        Ok(Space {
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
            available_bytes: st.f_bavail.saturating_mul(st.f_frsize),
        })
    }

    /// The volume's directory (holding `data/` and the epoch file), checked to be a real
    /// directory reached without symlinks. [`BackendError::NotFound`] if missing.
    pub fn volume_dir(&self, id: &VolumeId) -> Result<PathBuf, BackendError> {
        self.open_volume_dir(id)?;
        Ok(self.volume_path(id))
    }

    /// The directory to publish to pods, checked like [`Backend::volume_dir`].
    pub fn data_dir(&self, id: &VolumeId) -> Result<PathBuf, BackendError> {
        self.open_data_dir(id)?;
        Ok(self.volume_path(id).join(DATA_DIR))
    }

    /// An open descriptor of the data directory, for callers that want to bind-mount or
    /// serve exactly what was checked (via `/proc/self/fd/N`), with no path race.
    pub fn open_data_dir(&self, id: &VolumeId) -> Result<OwnedFd, BackendError> {
        let volume = self.open_volume_dir(id)?;
        let path = self.volume_path(id).join(DATA_DIR);
        fsops::open_dir(&volume, DATA_DIR, &path)?
            .ok_or_else(|| BackendError::NotFound { id: id.to_string() })
    }

    /// The path of the volume's epoch file (which may not exist yet).
    pub fn epoch_file(&self, id: &VolumeId) -> Result<PathBuf, BackendError> {
        Ok(self.volume_dir(id)?.join(EPOCH_FILE))
    }

    fn open_volume_dir(&self, id: &VolumeId) -> Result<OwnedFd, BackendError> {
        let dirs = self.dirs()?;
        fsops::open_dir(&dirs.volumes, id.as_str(), &self.volume_path(id))?
            .ok_or_else(|| BackendError::NotFound { id: id.to_string() })
    }

    fn volume_path(&self, id: &VolumeId) -> PathBuf {
        self.root.join(VOLUMES_DIR).join(id.as_str())
    }

    fn meta_path(&self, id: &VolumeId) -> PathBuf {
        self.root.join(META_DIR).join(meta_file(id))
    }

    fn dirs(&self) -> Result<Dirs, BackendError> {
        let root = fsops::open_root(&self.root)?;
        let open = |name: &str| {
            let path = self.root.join(name);
            fsops::open_dir(&root, name, &path)?.ok_or_else(|| {
                BackendError::io(
                    "open (is the backend filesystem mounted?)",
                    path,
                    std::io::ErrorKind::NotFound,
                )
            })
        };
        Ok(Dirs {
            volumes: open(VOLUMES_DIR)?,
            meta: open(META_DIR)?,
            trash: open(TRASH_DIR)?,
            nodes: open(NODES_DIR)?,
        })
    }

    fn read_meta(&self, dirs: &Dirs, id: &VolumeId) -> Result<Option<VolumeMeta>, BackendError> {
        let path = self.meta_path(id);
        let Some(bytes) = fsops::read_file(&dirs.meta, &meta_file(id), &path)? else {
            return Ok(None);
        };
        let corrupt = |reason: String| BackendError::CorruptMetadata {
            path: path.clone(),
            reason,
        };
        let meta: VolumeMeta =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if meta.format != META_FORMAT {
            return Err(corrupt(format!("unsupported format {}", meta.format)));
        }
        if &meta.id != id {
            return Err(corrupt(format!(
                "records id {} under the name of {id}",
                meta.id
            )));
        }
        Ok(Some(meta))
    }

    fn write_meta(&self, dirs: &Dirs, meta: &VolumeMeta) -> Result<(), BackendError> {
        let bytes = serde_json::to_vec_pretty(meta).expect("volume metadata always serialises");
        fsops::write_atomic(
            &dirs.meta,
            &meta_file(&meta.id),
            &bytes,
            &self.meta_path(&meta.id),
        )
    }

    fn sweep_trash(&self) -> Result<(), BackendError> {
        let dirs = self.dirs()?;
        let trash = self.root.join(TRASH_DIR);
        for name in fsops::list_names(&dirs.trash, &trash)? {
            let path = trash.join(&name);
            if let Err(e) = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path))
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove deleted volume data");
            }
        }
        Ok(())
    }

    fn lock(&self, id: &VolumeId) -> MutexGuard<'_, ()> {
        // Ids are hash output, so their hex digits spread evenly over the stripes.
        let hex = &id.as_str()[VOLUME_ID_PREFIX.len()..VOLUME_ID_PREFIX.len() + 4];
        let stripe = usize::from_str_radix(hex, 16).expect("ids are hex") % LOCK_STRIPES;
        self.stripes[stripe]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn meta_file(id: &VolumeId) -> String {
    format!("{id}.json")
}
