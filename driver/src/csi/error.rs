//! The node plugin's one error type, and the one place it becomes a gRPC [`Status`].
//!
//! Codes follow the CSI spec's tables for the Node service: a volume that does not
//! exist (or a path that is not one of its published targets) is `NOT_FOUND`; a target
//! already showing something else is `ALREADY_EXISTS`; a request the node cannot serve
//! in its current state is `FAILED_PRECONDITION`; anything the system failed to do is
//! `INTERNAL` with the underlying error in the message.
//!
//! The lock's answers on NodePublishVolume:
//! - held by another pod → `FAILED_PRECONDITION`, naming the holder's pod UID and node
//!   and how long until its lease can expire (or that it keeps the volume until it
//!   releases it or its node is fenced, when no expiry can be given);
//! - exclusive volume without `csi.storage.k8s.io/pod.uid` → `FAILED_PRECONDITION`
//!   (the request is valid CSI; the CSIDriver's `podInfoOnMount` is what is missing);
//! - this node fenced, a newer epoch on the storage, or the pod's data path here
//!   fenced → `FAILED_PRECONDITION`;
//! - volume_context contradicting the volume's parameters → `INVALID_ARGUMENT`;
//! - lease store unreachable, or this node's session not provably live → `UNAVAILABLE`
//!   (the CO retries);
//! - the claim changed under us too often → `ABORTED`.

use std::path::PathBuf;

use std::time::Duration;

use holdfast_core::backend::BackendError;
use holdfast_core::lease::{Epoch, LeaseError};
use holdfast_core::store::StoreError;
use tonic::Status;

use crate::datapath::DataPathError;
use crate::lock::epoch_file::EpochFileError;
use crate::publish::kernel_mounts::MountError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    /// The target is a mount point already, showing something other than what was asked.
    #[error("target_path {target} is already mounted, incompatibly: {reason}")]
    TargetInUse { target: PathBuf, reason: String },
    /// A single-node-single-writer volume is already published at another target.
    #[error("volume {volume} is already published at {other} and its access mode allows one target only")]
    SingleWriter { volume: String, other: PathBuf },
    #[error("{path} is not a published target of volume {volume}")]
    NotPublished { volume: String, path: PathBuf },
    #[error("the parent directory of target_path {0} does not exist (the CO creates it)")]
    TargetParentMissing(PathBuf),
    #[error("target_path {0} exists and is not a directory")]
    TargetNotDirectory(PathBuf),
    #[error("target_path {target} shows volume {other}, not {volume}; not unmounting it")]
    TargetShowsOtherVolume {
        target: PathBuf,
        volume: String,
        other: String,
    },
    #[error("invalid volume_context: {0}")]
    VolumeContext(BackendError),
    #[error("FUSE data path: {0}")]
    DataPath(#[from] DataPathError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Backend(BackendError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("internal task failed: {0}")]
    Task(String),
    /// An exclusive volume was published without the pod's UID in volume_context.
    #[error(
        "volume {volume} is exclusive and NodePublishVolume carries no {key} in volume_context: \
         podInfoOnMount must be enabled on the CSIDriver object (spec.podInfoOnMount: true)"
    )]
    MissingPodUid { volume: String, key: &'static str },
    /// volume_context disagrees with the parameters the volume was created with.
    #[error("volume_context {key}={given:?} does not match the volume's {key}={stored:?}")]
    ContextMismatch {
        key: String,
        given: String,
        stored: String,
    },
    /// Another pod holds the volume's claim.
    #[error("volume {volume} is held by pod {pod} on node {node}; {until}")]
    Held {
        volume: String,
        /// `namespace/name (uid U)`, or the UID alone when the name is not on record.
        pod: String,
        node: String,
        until: String,
    },
    /// Another pod on this same node holds the volume's claim. Never waited for here:
    /// kubelet runs one operation per volume at a time, so the holder's
    /// NodeUnpublishVolume (which releases the claim) cannot start while this publish
    /// waits. Failing lets it run; kubelet retries this publish afterwards.
    #[error(
        "volume {volume} is held by pod {pod} on this node ({node}); it is released when \
         that pod's volume is unmounted, and kubelet retries this mount then"
    )]
    HeldOnThisNode {
        volume: String,
        pod: String,
        node: String,
    },
    /// The lease store could not be reached (or this node's session is not live).
    #[error("volume {volume}: cannot take its claim now: {reason}")]
    LeaseUnavailable { volume: String, reason: String },
    /// This node is fenced: it may not take claims.
    #[error("volume {volume}: {reason}")]
    NodeFenced { volume: String, reason: String },
    #[error("volume {volume}: {source}")]
    Lease {
        volume: String,
        #[source]
        source: LeaseError,
    },
    /// A higher epoch than the one just granted is on the storage.
    #[error(
        "volume {volume}: the storage shows epoch {found}, newer than this grant's {ours}: \
         another holder took the volume; claim given up"
    )]
    EpochSuperseded {
        volume: String,
        ours: Epoch,
        found: Epoch,
    },
    #[error("volume fencing epoch: {0}")]
    EpochFile(#[from] EpochFileError),
    /// The pod's data path on this node was fenced; it must be unpublished first.
    #[error(
        "volume {volume} is fenced on this node ({problem}); unpublish it and restart the pod"
    )]
    Fenced { volume: String, problem: String },
}

fn expiry_words(expires_in: Option<Duration>) -> String {
    match expires_in {
        Some(d) => format!(
            "its lease can expire in {:.1}s if its node stops renewing it",
            d.as_secs_f64()
        ),
        None => "it keeps the volume until it releases it or its node is fenced".to_string(),
    }
}

impl NodeError {
    /// The one translation of lease errors into the node's terms.
    pub fn from_lease(volume: &str, e: LeaseError) -> NodeError {
        let volume = volume.to_string();
        match e {
            LeaseError::Held { holder, expires_in } => NodeError::Held {
                volume,
                pod: holder.pod_words(),
                node: holder.node,
                until: expiry_words(expires_in),
            },
            LeaseError::Store(StoreError::Unavailable(reason)) => {
                NodeError::LeaseUnavailable { volume, reason }
            }
            e @ LeaseError::SessionNotLive { .. } => NodeError::LeaseUnavailable {
                volume,
                reason: format!("{e} (this node cannot prove its session renewed)"),
            },
            e @ LeaseError::NodeFenced { .. } => NodeError::NodeFenced {
                volume,
                reason: e.to_string(),
            },
            source => NodeError::Lease { volume, source },
        }
    }
}

impl NodeError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NodeError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

impl From<BackendError> for NodeError {
    fn from(e: BackendError) -> Self {
        match e {
            // An id of the wrong shape names no volume at all.
            BackendError::NotFound { id } | BackendError::InvalidVolumeId { id, .. } => {
                NodeError::VolumeNotFound(id)
            }
            other => NodeError::Backend(other),
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let message = e.to_string();
        match e {
            NodeError::VolumeNotFound(_) | NodeError::NotPublished { .. } => {
                Status::not_found(message)
            }
            NodeError::TargetInUse { .. } => Status::already_exists(message),
            NodeError::SingleWriter { .. }
            | NodeError::TargetParentMissing(_)
            | NodeError::TargetNotDirectory(_)
            | NodeError::TargetShowsOtherVolume { .. }
            | NodeError::Mount(MountError::Busy { .. })
            | NodeError::MissingPodUid { .. }
            | NodeError::Held { .. }
            | NodeError::HeldOnThisNode { .. }
            | NodeError::NodeFenced { .. }
            | NodeError::EpochSuperseded { .. }
            | NodeError::Fenced { .. } => Status::failed_precondition(message),
            NodeError::LeaseUnavailable { .. } => Status::unavailable(message),
            NodeError::Lease {
                source: LeaseError::Contended { .. },
                ..
            } => Status::aborted(message),
            NodeError::VolumeContext(_) | NodeError::ContextMismatch { .. } => {
                Status::invalid_argument(message)
            }
            NodeError::Mount(_)
            | NodeError::DataPath(_)
            | NodeError::Backend(_)
            | NodeError::Io { .. }
            | NodeError::Lease { .. }
            | NodeError::EpochFile(_)
            | NodeError::Task(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes_follow_the_csi_node_tables() {
        let code = |e: NodeError| Status::from(e).code();
        assert_eq!(code(NodeError::VolumeNotFound("v".into())), Code::NotFound);
        assert_eq!(
            code(
                BackendError::InvalidVolumeId {
                    id: "../x".into(),
                    reason: "shape"
                }
                .into()
            ),
            Code::NotFound
        );
        assert_eq!(
            code(NodeError::TargetInUse {
                target: "/t".into(),
                reason: "r".into()
            }),
            Code::AlreadyExists
        );
        assert_eq!(
            code(NodeError::Mount(MountError::Busy {
                target: "/t".into()
            })),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(NodeError::io(
                "mkdir",
                "/t",
                std::io::ErrorKind::Other.into()
            )),
            Code::Internal
        );
    }
}
