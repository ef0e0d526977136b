//! The CSI Node service: the gRPC boundary over [`Publisher`].
//!
//! Validates every request field (with `holdfast_core::csi::validate`, before any
//! state is touched), takes the volume's lock around publish and unpublish, so that
//! "is it mounted?" and "mount it" of one volume cannot interleave with another call,
//! runs the blocking work off the async workers, and turns results into CSI messages.
//! Failures are [`NodeError`]s, mapped to statuses in `error.rs`. Staging is not
//! advertised, so NodeStage/NodeUnstage (and expansion, which needs nothing on the
//! node) are `UNIMPLEMENTED`.

use std::sync::Arc;

use holdfast_core::backend::{Backend, VolumeId};
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
use crate::published::PublishedTable;
use crate::publisher::{PublishPlan, Publisher, TargetUsage};

pub struct NodeService {
    node_id: String,
    publisher: Arc<Publisher>,
}

impl NodeService {
    /// A Node service for `node_id` over `backend`, with the published table rebuilt
    /// from the current mount table (and the FUSE record in `state_dir`).
    pub fn new(
        node_id: String,
        backend: Arc<Backend>,
        state_dir: &std::path::Path,
    ) -> Result<NodeService, NodeError> {
        Ok(NodeService {
            node_id,
            publisher: Arc::new(Publisher::new(backend, state_dir)?),
        })
    }

    pub fn into_server(self) -> NodeServer<Self> {
        NodeServer::new(self)
    }

    /// A copy of the published-target table.
    pub fn published(&self) -> PublishedTable {
        self.publisher.table().clone()
    }
}

fn stats_response(usage: TargetUsage) -> NodeGetVolumeStatsResponse {
    let usage_of = |st: rustix::fs::StatVfs| {
        let bytes =
            |blocks: u64| i64::try_from(blocks.saturating_mul(st.f_frsize)).unwrap_or(i64::MAX);
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        vec![
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
        ]
    };
    let volume_condition = match usage.problem {
        None => VolumeCondition {
            abnormal: false,
            message: "ok".into(),
        },
        Some(message) => VolumeCondition {
            abnormal: true,
            message,
        },
    };
    NodeGetVolumeStatsResponse {
        usage: usage.stat.map(usage_of).unwrap_or_default(),
        volume_condition: Some(volume_condition),
    }
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
        // A reader-only access mode is mounted read-only whatever `readonly` says: a
        // reader must never be able to write the volume.
        readonly: req.readonly
            || matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly),
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
        let _guard = self.publisher.locks.lock(plan.volume.as_str()).await;
        let publisher = self.publisher.clone();
        blocking(move || publisher.publish(&plan)).await?;
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
        let _guard = self.publisher.locks.lock(&volume).await;
        let publisher = self.publisher.clone();
        blocking(move || publisher.unpublish(&volume, &target)).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.get_ref();
        let volume = validate::require("volume_id", &req.volume_id)?.to_string();
        // Any non-empty path is a valid question; one that is not a published target of
        // the volume (relative ones included) is NOT_FOUND.
        let path = std::path::PathBuf::from(validate::require("volume_path", &req.volume_path)?);
        let publisher = self.publisher.clone();
        let usage = blocking(move || publisher.usage(&volume, &path)).await?;
        Ok(Response::new(stats_response(usage)))
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
            node_id: self.node_id.clone(),
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
