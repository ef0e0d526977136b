//! The CSI Node service: publishes a volume's data directory at a pod's target path and
//! takes it away again, and reports usage of published targets.
//!
//! Owns the [`PublishedTable`] (mutated here only, after the mount it describes exists
//! or is gone) and the per-volume [`VolumeLocks`]: publish and unpublish of one volume
//! run one at a time, so "is it mounted?" and "mount it" cannot interleave with another
//! call's unmount. Staging is not advertised, so NodeStage/NodeUnstage (and expansion,
//! which needs nothing on the node) are `UNIMPLEMENTED`.
//!
//! Request fields are checked with `holdfast_core::csi::validate` before any state is
//! touched; every other failure is a [`NodeError`] mapped to a status in `error.rs`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use holdfast_core::backend::{Backend, DataPath, VolumeId};
use holdfast_core::csi::v1::node_server::{Node, NodeServer};
use holdfast_core::csi::v1::{
    node_service_capability, volume_capability, volume_usage, NodeExpandVolumeRequest,
    NodeExpandVolumeResponse, NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse,
    NodeGetInfoRequest, NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability,
    NodeStageVolumeRequest, NodeStageVolumeResponse, NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest, NodeUnstageVolumeResponse,
    VolumeCondition, VolumeUsage,
};
use holdfast_core::csi::validate;
use tonic::{Request, Response, Status};

use crate::error::NodeError;
use crate::mount::{self, DetachPolicy, MountTable};
use crate::published::{DataPathKind, Published, PublishedTable, VolumeLocks};

/// `<root>/volumes`: where every volume directory lives (see `holdfast_core::backend`).
const VOLUMES_DIR: &str = "volumes";
/// How many stacked mounts of one volume unpublish removes from one target at most.
const MAX_STACKED_MOUNTS: usize = 16;

pub struct NodeService {
    state: Arc<NodeState>,
}

struct NodeState {
    node_id: String,
    backend: Arc<Backend>,
    published: Mutex<PublishedTable>,
    locks: VolumeLocks,
}

/// A NodePublishVolume request after field validation.
struct PublishPlan {
    volume: VolumeId,
    target: PathBuf,
    readonly: bool,
    /// SINGLE_NODE_SINGLE_WRITER: at most one target on this node.
    single_target: bool,
}

impl NodeService {
    /// A Node service for `node_id` over `backend`, with the published table rebuilt
    /// from the current mount table.
    pub fn new(node_id: String, backend: Arc<Backend>) -> Result<NodeService, NodeError> {
        let volumes_dir = backend.root().join(VOLUMES_DIR);
        let table = MountTable::read()?;
        let published = match table.locate(&volumes_dir) {
            Some(location) => PublishedTable::recover(&table, &location),
            None => PublishedTable::default(),
        };
        if !published.is_empty() {
            tracing::info!(
                targets = published.len(),
                "recovered published targets from the mount table"
            );
        }
        Ok(NodeService {
            state: Arc::new(NodeState {
                node_id,
                backend,
                published: Mutex::new(published),
                locks: VolumeLocks::default(),
            }),
        })
    }

    pub fn into_server(self) -> NodeServer<Self> {
        NodeServer::new(self)
    }

    /// A copy of the published-target table.
    pub fn published(&self) -> PublishedTable {
        self.state.table().clone()
    }
}

impl NodeState {
    fn table(&self) -> std::sync::MutexGuard<'_, PublishedTable> {
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the target show the volume, or confirms it already does (idempotent).
    fn publish(&self, plan: &PublishPlan) -> Result<(), NodeError> {
        let id = plan.volume.as_str();
        let meta = self
            .backend
            .volume(&plan.volume)?
            .ok_or_else(|| NodeError::VolumeNotFound(id.to_string()))?;
        if meta.params.data_path == DataPath::Fuse {
            return Err(NodeError::DataPathUnavailable("fuse"));
        }
        // Opened without following symlinks below the root; the bind below goes through
        // this descriptor, so what is mounted is exactly what was checked.
        let data_dir = self.backend.open_data_dir(&plan.volume)?;
        let data_path = PathBuf::from(format!("/proc/self/fd/{}", data_dir.as_raw_fd()));
        let target = create_target(&plan.target)?;

        let table = MountTable::read()?;
        let expected = table
            .locate(
                &std::fs::read_link(&data_path)
                    .map_err(|e| NodeError::io("resolve", &data_path, e))?,
            )
            .ok_or_else(|| {
                NodeError::io("locate", &data_path, std::io::ErrorKind::NotFound.into())
            })?;
        if let Some(existing) = table.mounted_at(&target) {
            if existing.location() != expected {
                return Err(NodeError::TargetInUse {
                    target,
                    reason: format!(
                        "it shows {} of {}",
                        existing.root.display(),
                        existing.source
                    ),
                });
            }
            if existing.is_read_only() != plan.readonly {
                return Err(NodeError::TargetInUse {
                    target,
                    reason: format!(
                        "it shows this volume with readonly={}",
                        existing.is_read_only()
                    ),
                });
            }
            self.record(id, target, plan.readonly);
            return Ok(());
        }
        if plan.single_target {
            if let Some(other) = self.table().targets(id).into_iter().find(|t| *t != target) {
                return Err(NodeError::SingleWriter {
                    volume: id.to_string(),
                    other,
                });
            }
        }
        mount::bind_mount(&data_path, &target, plan.readonly)?;
        tracing::info!(volume = id, target = %target.display(), readonly = plan.readonly, "published");
        self.record(id, target, plan.readonly);
        Ok(())
    }

    fn record(&self, volume: &str, target: PathBuf, readonly: bool) {
        let published = Published {
            readonly,
            kind: DataPathKind::Bind,
        };
        self.table().insert(volume, target, published);
    }

    /// Unmounts the target (every layer showing a holdfast volume) and removes the
    /// directory. A target that does not exist is already unpublished.
    fn unpublish(&self, volume: &str, target: &Path) -> Result<(), NodeError> {
        let target = match target.canonicalize() {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.table().remove(volume, target);
                return Ok(());
            }
            Err(e) => return Err(NodeError::io("resolve target_path", target, e)),
        };
        let volumes_dir = self.backend.root().join(VOLUMES_DIR);
        for _ in 0..MAX_STACKED_MOUNTS {
            let table = MountTable::read()?;
            let Some(mounted) = table.mounted_at(&target) else {
                break;
            };
            // Refuse to take away another volume's mount: the CO named the wrong one.
            if let Some(other) = table
                .locate(&volumes_dir)
                .and_then(|loc| mounted.shows_inside(&loc).map(Path::to_path_buf))
                .and_then(|rest| rest.iter().next().map(|c| c.to_string_lossy().into_owned()))
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
        self.table().remove(volume, &target);
        tracing::info!(volume, target = %target.display(), "unpublished");
        Ok(())
    }

    fn stats(&self, volume: &str, path: &Path) -> Result<NodeGetVolumeStatsResponse, NodeError> {
        let not_published = || NodeError::NotPublished {
            volume: volume.to_string(),
            path: path.to_path_buf(),
        };
        let real = path.canonicalize().map_err(|_| not_published())?;
        if self.table().get(volume, &real).is_none() {
            return Err(not_published());
        }
        let still_mounted = MountTable::read()?.mounted_at(&real).is_some();
        let st =
            rustix::fs::statvfs(&real).map_err(|e| NodeError::io("statvfs", &real, e.into()))?;
        let bytes =
            |blocks: u64| i64::try_from(blocks.saturating_mul(st.f_frsize)).unwrap_or(i64::MAX);
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let usage = vec![
            VolumeUsage {
                total: bytes(st.f_blocks),
                available: bytes(st.f_bavail),
                used: bytes(st.f_blocks.saturating_sub(st.f_bfree)),
                unit: volume_usage::Unit::Bytes as i32,
            },
            VolumeUsage {
                total: count(st.f_files),
                available: count(st.f_favail),
                used: count(st.f_files.saturating_sub(st.f_ffree)),
                unit: volume_usage::Unit::Inodes as i32,
            },
        ];
        let volume_condition = if still_mounted {
            VolumeCondition {
                abnormal: false,
                message: "ok".into(),
            }
        } else {
            VolumeCondition {
                abnormal: true,
                message: format!("{} is no longer mounted", real.display()),
            }
        };
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(volume_condition),
        })
    }
}

/// Creates the target directory if missing (the CO creates its parent, the plugin the
/// target) and returns its resolved path, as the mount table prints it.
fn create_target(target: &Path) -> Result<PathBuf, NodeError> {
    match std::fs::create_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NodeError::TargetParentMissing(target.to_path_buf()))
        }
        Err(e) => return Err(NodeError::io("create target_path", target, e)),
    }
    let real = target
        .canonicalize()
        .map_err(|e| NodeError::io("resolve target_path", target, e))?;
    if !real.is_dir() {
        return Err(NodeError::TargetNotDirectory(real));
    }
    Ok(real)
}

/// Runs blocking filesystem/mount work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(Status::from),
        Err(e) => Err(NodeError::Task(e.to_string()).into()),
    }
}

fn validate_publish(req: &NodePublishVolumeRequest) -> Result<PublishPlan, Status> {
    let volume_id = validate::require("volume_id", &req.volume_id)?;
    let target = validate::require_absolute_path("target_path", &req.target_path)?;
    let capability = validate::require_some("volume_capability", req.volume_capability.as_ref())?;
    match capability.access_type {
        Some(volume_capability::AccessType::Mount(_)) => {}
        Some(volume_capability::AccessType::Block(_)) => {
            return Err(validate::invalid(
                "volume_capability.access_type",
                "block is not supported: holdfast volumes are directories (use mount)",
            ))
        }
        None => {
            return Err(validate::invalid(
                "volume_capability.access_type",
                "is required",
            ))
        }
    }
    use volume_capability::access_mode::Mode;
    let mode = capability
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    let single_target = match mode {
        Mode::SingleNodeSingleWriter => true,
        Mode::SingleNodeWriter
        | Mode::SingleNodeMultiWriter
        | Mode::SingleNodeReaderOnly
        | Mode::MultiNodeReaderOnly => false,
        Mode::Unknown => {
            return Err(validate::invalid(
                "volume_capability.access_mode",
                "is required",
            ))
        }
        other => {
            return Err(validate::invalid(
                "volume_capability.access_mode",
                format!(
                    "{} is not supported: a volume has at most one writing node",
                    other.as_str_name()
                ),
            ))
        }
    };
    if !req.staging_target_path.is_empty() {
        return Err(validate::invalid(
            "staging_target_path",
            "must be empty: this plugin does not advertise STAGE_UNSTAGE_VOLUME",
        ));
    }
    // Every id of the wrong shape names no volume: NOT_FOUND, like a missing one.
    let volume = VolumeId::parse(volume_id).map_err(|e| Status::from(NodeError::from(e)))?;
    Ok(PublishPlan {
        volume,
        target: target.to_path_buf(),
        readonly: req.readonly,
        single_target,
    })
}

fn rpc_capability(kind: node_service_capability::rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let plan = validate_publish(request.get_ref())?;
        let _guard = self.state.locks.lock(plan.volume.as_str()).await;
        let state = self.state.clone();
        blocking(move || state.publish(&plan)).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.get_ref();
        let volume = validate::require("volume_id", &req.volume_id)?.to_string();
        let target =
            validate::require_absolute_path("target_path", &req.target_path)?.to_path_buf();
        let _guard = self.state.locks.lock(&volume).await;
        let state = self.state.clone();
        blocking(move || state.unpublish(&volume, &target)).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.get_ref();
        let volume = validate::require("volume_id", &req.volume_id)?.to_string();
        let path = validate::require_absolute_path("volume_path", &req.volume_path)?.to_path_buf();
        let state = self.state.clone();
        Ok(Response::new(
            blocking(move || state.stats(&volume, &path)).await?,
        ))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc_capability(Type::GetVolumeStats),
                rpc_capability(Type::VolumeCondition),
                rpc_capability(Type::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.state.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }

    async fn node_stage_volume(
        &self,
        _request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "NodeStageVolume: STAGE_UNSTAGE_VOLUME is not advertised",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "NodeUnstageVolume: STAGE_UNSTAGE_VOLUME is not advertised",
        ))
    }

    async fn node_expand_volume(
        &self,
        _request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "NodeExpandVolume: a directory needs no node-side expansion",
        ))
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
