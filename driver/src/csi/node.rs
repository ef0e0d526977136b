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

use holdfast_core::backend::{OnConflict, VolumeId, VolumeMeta};
use holdfast_core::clock::Mono;
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
use holdfast_core::lease::VolumeGate;
use tonic::{Request, Response, Status};

use crate::csi::error::NodeError;
use crate::lock::claims::{ClaimBook, ClaimRequest};
use crate::lock::lock_request::{check_context, pod_name, pod_uid};
pub use crate::lock::lock_request::{
    grpc_timeout, wait_budget, DEFAULT_WAIT, MAX_WAIT, POD_UID_KEY,
};
use crate::lock::recovery;
use crate::metrics;
use crate::publish::published::{DataPathKind, PublishedTable};
use crate::publish::publisher::{PublishPlan, Publisher, TargetUsage};

pub struct NodeService {
    node_id: String,
    publisher: Arc<Publisher>,
    claims: Arc<ClaimBook>,
    /// Who holds an exclusive volume published without a pod UID; `None` refuses such
    /// a publish (see [`NodeService::claim_without_pod_info`]).
    holder_without_pod_info: Option<String>,
}

impl NodeService {
    /// A Node service for `node_id`: `publisher` makes and removes mounts, `claims`
    /// holds this node's session and the claims taken on publish.
    pub fn new(node_id: String, publisher: Arc<Publisher>, claims: Arc<ClaimBook>) -> NodeService {
        NodeService {
            node_id,
            publisher,
            claims,
            holder_without_pod_info: None,
        }
    }

    /// For COs that send no pod info (`--standalone`: local use, csi-sanity, COs other
    /// than Kubernetes): an exclusive volume published without
    /// `csi.storage.k8s.io/pod.uid` is claimed for "this node's workload" rather than
    /// refused. The lock then keeps other nodes out but lets every target on this node
    /// share the claim. In a cluster the CSIDriver's podInfoOnMount always supplies the
    /// UID, and a missing one is a setup error that must not quietly weaken the lock,
    /// so cluster mode keeps refusing.
    pub fn claim_without_pod_info(mut self) -> Self {
        self.holder_without_pod_info = Some(format!("node:{}", self.node_id));
        self
    }

    pub fn into_server(self) -> NodeServer<Self> {
        NodeServer::new(self)
    }

    async fn volume_meta(&self, volume: &VolumeId) -> Result<VolumeMeta, Status> {
        let publisher = self.publisher.clone();
        let volume = volume.clone();
        blocking(move || {
            publisher
                .backend()
                .volume(&volume)?
                .ok_or_else(|| NodeError::VolumeNotFound(volume.to_string()))
        })
        .await
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
    blocking_node(work).await.map_err(Status::from)
}

/// [`blocking`], keeping the [`NodeError`] (for the refusal reason of a publish).
async fn blocking_node<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => Err(NodeError::Task(e.to_string())),
    }
}

/// A publish that failed: the status kubelet gets, and the reason
/// [`crate::metrics`] counts it under.
struct Refused {
    status: Status,
    reason: &'static str,
}

impl From<NodeError> for Refused {
    fn from(e: NodeError) -> Self {
        Refused {
            reason: metrics::refusal_reason(&e),
            status: Status::from(e),
        }
    }
}

/// A failure already turned into a status (request validation, volume lookup).
impl From<Status> for Refused {
    fn from(status: Status) -> Self {
        let reason = match status.code() {
            tonic::Code::InvalidArgument => "invalid",
            _ => "error",
        };
        Refused { status, reason }
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
        pod: crate::publish::fuse_targets::TargetPod::from_context(&req.volume_context),
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

/// How long a publish keeps asking while the lease store or this node's session is
/// unavailable, whatever `onConflict` says (within the call's deadline).
const UNAVAILABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often an `onConflict: wait` publish asks for the claim again.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// One try at a publish: done (either way), or refused because another pod holds the
/// volume while the caller may still wait.
enum PublishAttempt {
    Done(Result<(), Refused>),
    HeldRetryAfter(std::time::Duration),
}

impl NodeService {
    /// Publishes under the volume's lock, asking for the claim without waiting. A
    /// waiting publish (`onConflict: wait`) retries from [`NodeService::publish`]
    /// with the lock released in between: the holder may be a pod on this very node,
    /// whose NodeUnpublishVolume needs the same lock to release the claim. The lease
    /// client keeps its observations of the holder's session across tries, so a
    /// takeover by timeout is timed from the first try.
    async fn try_publish(
        &self,
        req: &NodePublishVolumeRequest,
        plan: &PublishPlan,
        wait_until: Mono,
        unavailable_until: Mono,
    ) -> PublishAttempt {
        let id = plan.volume.as_str().to_string();
        let _guard = self.publisher.locks.lock(&id).await;
        let meta = match self.volume_meta(&plan.volume).await {
            Ok(meta) => meta,
            Err(status) => return PublishAttempt::Done(Err(status.into())),
        };
        if let Err(e) = check_context(&meta.params, &req.volume_context) {
            return PublishAttempt::Done(Err(e.into()));
        }
        let (gate, claim_taken) = if meta.params.exclusive {
            let pod_uid = match (
                pod_uid(&id, &req.volume_context),
                &self.holder_without_pod_info,
            ) {
                (Ok(uid), _) => uid,
                (Err(_), Some(holder)) => holder.clone(),
                (Err(e), None) => return PublishAttempt::Done(Err(e.into())),
            };
            let publisher = self.publisher.clone();
            let volume = plan.volume.clone();
            let paths = blocking(move || {
                let backend = publisher.backend();
                Ok((backend.epoch_file(&volume)?, backend.data_dir(&volume)?))
            })
            .await;
            let (epoch_file, data_dir) = match paths {
                Ok(paths) => paths,
                Err(status) => return PublishAttempt::Done(Err(status.into())),
            };
            let kind = match meta.params.data_path {
                holdfast_core::backend::DataPath::Bind => DataPathKind::Bind,
                holdfast_core::backend::DataPath::Fuse => DataPathKind::Fuse,
            };
            let acquired = self
                .claims
                .acquire(ClaimRequest {
                    volume_id: id.clone(),
                    pod_uid,
                    pod: pod_name(&req.volume_context),
                    kind,
                    epoch_file,
                    data_dir,
                })
                .await;
            match acquired {
                Ok((claim, taken)) => (claim.gate.clone(), taken),
                Err(NodeError::Held {
                    volume, pod, node, ..
                }) if node == self.node_id => {
                    // The holder may be an instance of this plugin that has died since
                    // this one started: proven dead now, its claim is freed at once.
                    match recovery::recover_again(&self.claims, &self.publisher).await {
                        Ok(true) => {
                            return PublishAttempt::HeldRetryAfter(std::time::Duration::ZERO)
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "recovery of this node's earlier instances failed")
                        }
                    }
                    return PublishAttempt::Done(Err(NodeError::HeldOnThisNode {
                        volume,
                        pod,
                        node,
                    }
                    .into()));
                }
                Err(NodeError::Held { .. })
                    if meta.params.on_conflict == OnConflict::Wait
                        && Mono::now() + WAIT_POLL < wait_until =>
                {
                    return PublishAttempt::HeldRetryAfter(WAIT_POLL);
                }
                // The store is slow or this node's session is not yet (or no longer)
                // live: ask again for a little while rather than answer at once.
                // kubelet doubles its retry pause after every failed mount, so a
                // plugin that just started would otherwise leave its first pods
                // waiting up to a minute after its session is up.
                Err(NodeError::LeaseUnavailable { .. })
                    if Mono::now() + WAIT_POLL < unavailable_until =>
                {
                    return PublishAttempt::HeldRetryAfter(WAIT_POLL);
                }
                Err(e) => return PublishAttempt::Done(Err(e.into())),
            }
        } else {
            (VolumeGate::unclaimed(), false)
        };
        let publisher = self.publisher.clone();
        let plan = plan.clone();
        let result = blocking_node(move || publisher.publish(&plan, gate)).await;
        // A claim this call took is given back if nothing of the volume got mounted; one
        // the pod already held for another target stays with that target.
        if result.is_err() && claim_taken && self.publisher.table().targets(&id).is_empty() {
            self.claims.release(&id).await;
        }
        PublishAttempt::Done(result.map_err(Refused::from))
    }

    /// A whole publish: its tries, until one is done or the caller may wait no more.
    async fn publish(&self, request: &Request<NodePublishVolumeRequest>) -> Result<(), Refused> {
        let budget = wait_budget(grpc_timeout(request.metadata()));
        let wait_until = Mono::now() + budget;
        let unavailable_until = Mono::now() + budget.min(UNAVAILABLE_WAIT);
        let req = request.get_ref();
        let plan = validate_publish(req)?;
        loop {
            match self
                .try_publish(req, &plan, wait_until, unavailable_until)
                .await
            {
                PublishAttempt::Done(result) => return result,
                PublishAttempt::HeldRetryAfter(pause) => tokio::time::sleep(pause).await,
            }
        }
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        // Counted here, once per call: a waiting publish's retries are not refusals.
        let result = self.publish(&request).await;
        metrics::count_publish(result.as_ref().err().map(|refused| refused.reason));
        result
            .map(|()| Response::new(NodePublishVolumeResponse {}))
            .map_err(|refused| refused.status)
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
        let id = volume.clone();
        blocking(move || publisher.unpublish(&id, &target)).await?;
        // Unmounted first, released after: once no target of the volume is left on this
        // node, no I/O of this node can reach it. A store that cannot be reached does not
        // fail the call (the release is queued and retried).
        if self.publisher.table().targets(&volume).is_empty() {
            self.claims.release(&volume).await;
        }
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
        let id = volume.clone();
        // A stopped gate is the first thing to report: the pod's I/O fails because of it.
        let stopped = self.claims.get(&volume).and_then(|c| c.problem());
        let usage = blocking(move || publisher.usage(&id, &path, stopped)).await?;
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
