//! What NodePublish/NodeUnpublish/NodeGetVolumeStats do on the node, free of gRPC: make
//! a target show a volume (bind mount or FUSE), take it away, measure it.
//!
//! Owns the [`PublishedTable`] (changed only after the mount it describes exists or is
//! gone), the live FUSE sessions (one per FUSE target) and the per-volume
//! [`VolumeLocks`] the Node service takes around publish and unpublish.
//!
//! Recognising what a target shows: a bind mount is compared by (device, path inside the
//! filesystem) with the volume's data directory; a FUSE target is this process's only if
//! it is in the session map. A `fuse.holdfast` mount nobody here serves belongs to a
//! dead predecessor: its connection died with it, so it provably carries no I/O and may
//! be unmounted (lazily if busy) and replaced. Which volume such a mount showed is
//! known from the node-local record kept by [`crate::publish::fuse_targets`].

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use holdfast_core::backend::{Backend, DataPath, FenceAction, VolumeId};
use holdfast_core::lease::VolumeGate;

use crate::csi::error::NodeError;
use crate::datapath::{self, FuseOptions, FuseVolume};
use crate::publish::fuse_targets::{FuseTarget, FuseTargets, FuseTargetsFile, TargetPod};
use crate::publish::kernel_mounts::{self as mount, DetachPolicy, MountEntry, MountTable};
use crate::publish::published::{DataPathKind, Published, PublishedTable, VolumeLocks};

/// `<root>/volumes`: where every volume directory lives (see `holdfast_core::backend`).
const VOLUMES_DIR: &str = "volumes";
/// The filesystem type of the FUSE data path's mounts.
pub const FUSE_FS_TYPE: &str = "fuse.holdfast";
/// How many stacked mounts unpublish removes from one target at most.
const MAX_STACKED_MOUNTS: usize = 16;

/// A validated publish request.
#[derive(Clone, Debug)]
pub struct PublishPlan {
    pub volume: VolumeId,
    pub target: PathBuf,
    pub readonly: bool,
    /// SINGLE_NODE_SINGLE_WRITER: at most one target on this node.
    pub single_target: bool,
    /// The pod the request names (kubelet's `podInfoOnMount` context). Recorded with a
    /// FUSE target, so that a restarted plugin can tell that pod its data path died.
    pub pod: TargetPod,
}

/// statvfs of a published target (`None` when it cannot be read), and what is wrong
/// with it, if anything.
pub struct TargetUsage {
    pub stat: Option<rustix::fs::StatVfs>,
    pub problem: Option<String>,
}

pub struct Publisher {
    backend: std::sync::Arc<Backend>,
    published: Mutex<PublishedTable>,
    fuse: Mutex<HashMap<PathBuf, FuseVolume>>,
    fuse_record: FuseTargetsFile,
    /// The pod of each FUSE target, for the record. Lock order: the table first.
    fuse_pods: Mutex<HashMap<PathBuf, TargetPod>>,
    pub locks: VolumeLocks,
    /// Whether FUSE volumes may use kernel passthrough (`--fuse-passthrough`).
    fuse_passthrough: bool,
}

impl Publisher {
    /// Lets FUSE volumes published from now on use kernel passthrough.
    pub fn with_fuse_passthrough(mut self, on: bool) -> Self {
        self.fuse_passthrough = on;
        self
    }

    /// A publisher over `backend`, with the table rebuilt from the mount table: every
    /// bind mount of a volume's data directory, and every FUSE mount recorded in
    /// `state_dir`, is a target published before a restart.
    pub fn new(backend: std::sync::Arc<Backend>, state_dir: &Path) -> Result<Publisher, NodeError> {
        let table = MountTable::read()?;
        let mut published = match table.locate(&backend.root().join(VOLUMES_DIR)) {
            Some(location) => PublishedTable::recover(&table, &location),
            None => PublishedTable::default(),
        };
        let fuse_record = FuseTargetsFile::new(state_dir);
        let mut fuse_pods = HashMap::new();
        for (target, recorded) in fuse_record.load()? {
            let still_mounted = table
                .mounted_at(&target)
                .is_some_and(|m| m.fs_type == FUSE_FS_TYPE);
            if still_mounted {
                let how = Published {
                    readonly: recorded.readonly,
                    kind: DataPathKind::Fuse,
                };
                published.insert(&recorded.volume, target.clone(), how);
                let pod = TargetPod {
                    uid: recorded.pod_uid,
                    name: recorded.pod,
                };
                fuse_pods.insert(target, pod);
            }
        }
        if !published.is_empty() {
            tracing::info!(
                targets = published.len(),
                "recovered published targets from the mount table"
            );
        }
        let publisher = Publisher {
            backend,
            published: Mutex::new(published),
            fuse: Mutex::new(HashMap::new()),
            fuse_passthrough: false,
            fuse_record,
            fuse_pods: Mutex::new(fuse_pods),
            locks: VolumeLocks::default(),
        };
        publisher.store_fuse_record();
        Ok(publisher)
    }

    /// Rewrites the FUSE record from the table. A failure is logged, not returned: the
    /// mount it describes is already made or gone, and a stale record only costs a
    /// restarted plugin the knowledge of which volume a dead FUSE target showed.
    fn store_fuse_record(&self) {
        let targets = self.fuse_targets(|_| true);
        if let Err(e) = self.fuse_record.store(&targets) {
            tracing::error!(error = %e, "cannot record FUSE targets");
        }
    }

    /// The FUSE targets of the table that `keep` accepts, with their pods.
    fn fuse_targets(&self, keep: impl Fn(&Path) -> bool) -> FuseTargets {
        let table = self.table();
        let pods = self.pods();
        table
            .entries()
            .filter(|(_, target, how)| how.kind == DataPathKind::Fuse && keep(target))
            .map(|(volume, target, how)| {
                let pod = pods.get(target).cloned().unwrap_or_default();
                let recorded = FuseTarget {
                    volume: volume.to_string(),
                    readonly: how.readonly,
                    pod_uid: pod.uid,
                    pod: pod.name,
                };
                (target.to_path_buf(), recorded)
            })
            .collect()
    }

    /// The FUSE targets in the table that no session of this process serves: at start,
    /// every FUSE target (they were recovered from the record, and their server was a
    /// predecessor). Whether each one is really dead is for the caller to check.
    pub fn orphaned_fuse_targets(&self) -> FuseTargets {
        let served: Vec<PathBuf> = self.sessions().keys().cloned().collect();
        self.fuse_targets(|target| !served.iter().any(|s| s == target))
    }

    fn pods(&self) -> MutexGuard<'_, HashMap<PathBuf, TargetPod>> {
        self.fuse_pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn table(&self) -> MutexGuard<'_, PublishedTable> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<PathBuf, FuseVolume>> {
        self.fuse.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Makes the target show the volume, or confirms it already does (idempotent).
    /// A FUSE target is served behind `gate` (the claim's, or an open one for a volume
    /// without a claim). Call with the volume's lock held.
    pub fn publish(&self, plan: &PublishPlan, gate: VolumeGate) -> Result<(), NodeError> {
        let id = plan.volume.as_str();
        let meta = self
            .backend
            .volume(&plan.volume)?
            .ok_or_else(|| NodeError::VolumeNotFound(id.to_string()))?;
        let kind = match meta.params.data_path {
            DataPath::Bind => DataPathKind::Bind,
            DataPath::Fuse => DataPathKind::Fuse,
        };
        // Opened without following symlinks below the root; the mount goes through this
        // descriptor, so what is mounted is exactly what was checked.
        let data_dir = self.backend.open_data_dir(&plan.volume)?;
        let data_path = PathBuf::from(format!("/proc/self/fd/{}", data_dir.as_raw_fd()));
        let (target, created) = create_target(&plan.target)?;
        let fence_action = match meta.params.fence_action {
            FenceAction::Error => datapath::FenceAction::Error,
            FenceAction::Freeze => datapath::FenceAction::Freeze,
        };
        let result = self.publish_at(plan, kind, fence_action, &data_path, target.clone(), gate);
        if result.is_err() && created {
            // Leave nothing behind that this call made: nothing is mounted on the new
            // directory (a failed mount is undone), so it is empty.
            let _ = std::fs::remove_dir(&target);
        }
        result
    }

    fn publish_at(
        &self,
        plan: &PublishPlan,
        kind: DataPathKind,
        fence_action: datapath::FenceAction,
        data_path: &Path,
        target: PathBuf,
        gate: VolumeGate,
    ) -> Result<(), NodeError> {
        let id = plan.volume.as_str();
        let table = MountTable::read()?;
        if let Some(existing) = table.mounted_at(&target) {
            if existing.fs_type == FUSE_FS_TYPE && !self.sessions().contains_key(&target) {
                tracing::warn!(target = %target.display(), "replacing a dead FUSE mount");
                mount::unmount(&target, DetachPolicy::IfBusy)?;
            } else {
                self.check_existing(&table, existing, data_path, id, kind, plan.readonly)?;
                self.record(plan, target, kind);
                return Ok(());
            }
        }
        if plan.single_target {
            if let Some(other) = self.table().targets(id).into_iter().find(|t| *t != target) {
                return Err(NodeError::SingleWriter {
                    volume: id.to_string(),
                    other,
                });
            }
        }
        match kind {
            DataPathKind::Bind => mount::bind_mount(data_path, &target, plan.readonly)?,
            DataPathKind::Fuse => {
                let opts = FuseOptions {
                    read_only: plan.readonly,
                    passthrough: self.fuse_passthrough,
                    ..FuseOptions::new(fence_action)
                };
                let volume = datapath::mount(data_path, &target, gate, opts)?;
                if let Err(e) = check_read_only(&target, plan.readonly) {
                    let _ = volume.unmount();
                    return Err(e);
                }
                self.sessions().insert(target.clone(), volume);
            }
        }
        tracing::info!(volume = id, target = %target.display(), readonly = plan.readonly, ?kind, "published");
        self.record(plan, target, kind);
        Ok(())
    }

    /// `Ok` when the mount already at the target is this volume, same data path and
    /// same readonly-ness; `ALREADY_EXISTS` otherwise.
    fn check_existing(
        &self,
        table: &MountTable,
        existing: &MountEntry,
        data_path: &Path,
        volume: &str,
        kind: DataPathKind,
        readonly: bool,
    ) -> Result<(), NodeError> {
        let shows_volume = match kind {
            DataPathKind::Bind => {
                let real = std::fs::read_link(data_path)
                    .map_err(|e| NodeError::io("resolve", data_path, e))?;
                table.locate(&real) == Some(existing.location())
            }
            DataPathKind::Fuse => {
                existing.fs_type == FUSE_FS_TYPE
                    && self.sessions().contains_key(&existing.mount_point)
                    && self.table().get(volume, &existing.mount_point).is_some()
            }
        };
        let in_use = |reason: String| NodeError::TargetInUse {
            target: existing.mount_point.clone(),
            reason,
        };
        if !shows_volume {
            return Err(in_use(format!(
                "it shows {} of {} ({})",
                existing.root.display(),
                existing.source,
                existing.fs_type
            )));
        }
        if existing.is_read_only() != readonly {
            return Err(in_use(format!(
                "it shows this volume with readonly={}",
                existing.is_read_only()
            )));
        }
        Ok(())
    }

    fn record(&self, plan: &PublishPlan, target: PathBuf, kind: DataPathKind) {
        if kind == DataPathKind::Fuse {
            self.pods().insert(target.clone(), plan.pod.clone());
        }
        let how = Published {
            readonly: plan.readonly,
            kind,
        };
        self.table().insert(plan.volume.as_str(), target, how);
        if kind == DataPathKind::Fuse {
            self.store_fuse_record();
        }
    }

    /// Unmounts the target and removes the directory. A target that does not exist is
    /// already unpublished. Call with the volume's lock held.
    pub fn unpublish(&self, volume: &str, target: &Path) -> Result<(), NodeError> {
        let Some(target) = resolve_target(target)? else {
            self.table().remove(volume, target);
            return Ok(());
        };
        // Refuse to take away another volume's target: the CO named the wrong one.
        let recorded = self.table().volume_at(&target).map(str::to_string);
        if let Some(other) = recorded.filter(|other| other != volume) {
            return Err(NodeError::TargetShowsOtherVolume {
                target,
                volume: volume.to_string(),
                other,
            });
        }
        let session = self.sessions().remove(&target);
        if let Some(session) = session {
            // Busy: detached and its connection aborted, so no I/O can pass any more.
            session.unmount()?;
        }
        let volumes_dir = self.backend.root().join(VOLUMES_DIR);
        for _ in 0..MAX_STACKED_MOUNTS {
            let table = MountTable::read()?;
            let Some(mounted) = table.mounted_at(&target) else {
                break;
            };
            if mounted.fs_type == FUSE_FS_TYPE {
                // Not ours (checked above): its server is dead, no I/O can pass.
                mount::unmount(&target, DetachPolicy::IfBusy)?;
                continue;
            }
            // Checked again against the mount itself: the table may not know the target.
            let shown = table
                .locate(&volumes_dir)
                .and_then(|loc| mounted.shows_inside(&loc).map(Path::to_path_buf));
            if let Some(other) =
                shown.and_then(|rest| rest.iter().next().map(|c| c.to_string_lossy().into_owned()))
            {
                if other != volume {
                    return Err(NodeError::TargetShowsOtherVolume {
                        target,
                        volume: volume.to_string(),
                        other,
                    });
                }
            }
            // A bind mount may not be detached while busy: the old holder would keep
            // writing a volume the node believes released.
            mount::unmount(&target, DetachPolicy::Never)?;
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(NodeError::io("remove target_path", &target, e)),
        }
        let removed = self.table().remove(volume, &target);
        if removed.is_some_and(|how| how.kind == DataPathKind::Fuse) {
            self.pods().remove(&target);
            self.store_fuse_record();
        }
        tracing::info!(volume, target = %target.display(), "unpublished");
        Ok(())
    }

    /// Usage of `path` if it is a published target of `volume` (`NOT_FOUND` otherwise).
    /// With `stopped` (the volume's gate is closed) the target itself is never touched:
    /// a fenced volume with `fenceAction: freeze` would block the call for good.
    pub fn usage(
        &self,
        volume: &str,
        path: &Path,
        stopped: Option<String>,
    ) -> Result<TargetUsage, NodeError> {
        let not_published = || NodeError::NotPublished {
            volume: volume.to_string(),
            path: path.to_path_buf(),
        };
        if !path.is_absolute() {
            return Err(not_published());
        }
        if let Some(problem) = stopped {
            let real = resolve_target(path)?.ok_or_else(not_published)?;
            if self.table().get(volume, &real).is_none() {
                return Err(not_published());
            }
            return Ok(TargetUsage {
                stat: None,
                problem: Some(problem),
            });
        }
        let real = path.canonicalize().map_err(|_| not_published())?;
        if self.table().get(volume, &real).is_none() {
            return Err(not_published());
        }
        if MountTable::read()?.mounted_at(&real).is_none() {
            let problem = format!("{} is no longer mounted", real.display());
            return Ok(TargetUsage {
                stat: None,
                problem: Some(problem),
            });
        }
        match rustix::fs::statvfs(&real) {
            Ok(stat) => Ok(TargetUsage {
                stat: Some(stat),
                problem: None,
            }),
            // The FUSE server that served this target died with a previous plugin.
            Err(rustix::io::Errno::NOTCONN) => Ok(TargetUsage {
                stat: None,
                problem: Some(format!(
                    "{} lost its data path server (the plugin restarted); the pod \
                     must be restarted to use the volume again",
                    real.display()
                )),
            }),
            // A fenced FUSE volume answers EIO (the caller adds the fence's reason).
            Err(rustix::io::Errno::IO) => Ok(TargetUsage {
                stat: None,
                problem: Some(format!("{} answers I/O errors", real.display())),
            }),
            Err(e) => Err(NodeError::io("statvfs", &real, e.into())),
        }
    }
}

impl Drop for Publisher {
    /// On process stop the FUSE mounts are left in place, not unmounted: kubelet owns
    /// them, and a mount whose server is gone fails every operation (ENOTCONN). An
    /// unmount would instead let the pod write into the bare target directory on the
    /// node's own disk. The sessions' threads end with the process.
    fn drop(&mut self) {
        let sessions = std::mem::take(self.fuse.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (_, session) in sessions {
            std::mem::forget(session);
        }
    }
}

/// The mount table must show the target `ro` exactly when asked.
fn check_read_only(target: &Path, readonly: bool) -> Result<(), NodeError> {
    let shown = MountTable::read()?
        .mounted_at(target)
        .map(MountEntry::is_read_only);
    if readonly && shown != Some(true) {
        return Err(mount::MountError::NotReadOnly {
            target: target.to_path_buf(),
        }
        .into());
    }
    Ok(())
}

/// The target as the mount table prints it: its parent resolved (the CO's path may run
/// through symlinks), its last component kept as is, so that resolving never touches
/// the target itself (which may be a dead FUSE mount). `None` if the parent is missing.
fn resolve_target(target: &Path) -> Result<Option<PathBuf>, NodeError> {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(NodeError::TargetNotDirectory(target.to_path_buf()));
    };
    match parent.canonicalize() {
        Ok(parent) => Ok(Some(parent.join(name))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NodeError::io(
            "resolve the parent of target_path",
            parent,
            e,
        )),
    }
}

/// Creates the target directory if missing (the CO creates its parent, the plugin the
/// target) and returns its resolved path, and whether this call created it. A symlink
/// or file there is refused; a dead FUSE mount (`ENOTCONN`) is accepted, for the
/// caller to replace.
fn create_target(target: &Path) -> Result<(PathBuf, bool), NodeError> {
    let real = resolve_target(target)?
        .ok_or_else(|| NodeError::TargetParentMissing(target.to_path_buf()))?;
    let created = match std::fs::create_dir(&real) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(NodeError::io("create target_path", &real, e)),
    };
    match std::fs::symlink_metadata(&real) {
        Ok(meta) if meta.is_dir() => Ok((real, created)),
        Ok(_) => Err(NodeError::TargetNotDirectory(real)),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok((real, created)),
        Err(e) => Err(NodeError::io("inspect target_path", &real, e)),
    }
}
