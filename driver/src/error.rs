//! The node plugin's one error type, and the one place it becomes a gRPC [`Status`].
//!
//! Codes follow the CSI spec's tables for the Node service: a volume that does not
//! exist (or a path that is not one of its published targets) is `NOT_FOUND`; a target
//! already showing something else is `ALREADY_EXISTS`; a request the node cannot serve
//! in its current state is `FAILED_PRECONDITION`; anything the system failed to do is
//! `INTERNAL` with the underlying error in the message.

use std::path::PathBuf;

use holdfast_core::backend::BackendError;
use tonic::Status;

use crate::datapath::DataPathError;
use crate::mount::MountError;

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
            | NodeError::Mount(MountError::Busy { .. }) => Status::failed_precondition(message),
            NodeError::VolumeContext(_) => Status::invalid_argument(message),
            NodeError::Mount(_)
            | NodeError::DataPath(_)
            | NodeError::Backend(_)
            | NodeError::Io { .. }
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
