//! The one error type of the volume backend.
//!
//! Each variant names a distinct situation a caller must handle differently; the CSI
//! controller maps them to gRPC codes in one place (`holdfast-controller`'s `error.rs`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The string is not a volume id this backend generates. Such an id names no volume,
    /// and is never turned into a path.
    #[error("{id:?} is not a holdfast volume id: {reason}")]
    InvalidVolumeId { id: String, reason: &'static str },

    #[error("invalid node id {node_id:?}: {reason}")]
    InvalidNodeId {
        node_id: String,
        reason: &'static str,
    },

    /// No node plugin registered this node id on the backend (CSI NOT_FOUND).
    #[error("node {node_id:?} is not known: no holdfast node plugin has registered it")]
    UnknownNode { node_id: String },

    #[error("invalid volume name: {reason}")]
    InvalidName { reason: String },

    #[error("invalid value {value:?} for parameter {key:?}: expected {expected}")]
    InvalidParameter {
        key: String,
        value: String,
        expected: &'static str,
    },

    #[error("unknown parameter(s) {}: known keys are exclusive, onConflict, dataPath, fenceAction and csi.storage.k8s.io/*", keys.join(", "))]
    UnknownParameters { keys: Vec<String> },

    #[error("invalid capacity range: limit_bytes {limit} is below required_bytes {required}")]
    InvalidCapacityRange { required: u64, limit: u64 },

    /// The range can never be satisfied here (larger than the whole backend filesystem).
    #[error("capacity of {requested} bytes cannot be provided: the backend filesystem holds {total} bytes in total")]
    CapacityUnsatisfiable { requested: u64, total: u64 },

    /// Volumes only grow: a directory cannot be shrunk below what was promised.
    #[error(
        "volume {id} has {current} bytes; shrinking to at most {limit} bytes is not supported"
    )]
    ShrinkUnsupported {
        id: String,
        current: u64,
        limit: u64,
    },

    #[error("volume {id} does not exist")]
    NotFound { id: String },

    /// A volume with this name exists but with other properties (CSI ALREADY_EXISTS).
    #[error("volume {name:?} already exists as {id} and is incompatible: {reason}")]
    Incompatible {
        name: String,
        id: String,
        reason: String,
    },

    /// Two names hashed to one id. Practically impossible (128 bits), but refused rather
    /// than handing one name's data to the other.
    #[error("volume id {id} of name {name:?} is already used by volume {existing_name:?}")]
    IdCollision {
        id: String,
        name: String,
        existing_name: String,
    },

    #[error("volume {id} is still published to node(s) {}", nodes.join(", "))]
    InUse { id: String, nodes: Vec<String> },

    /// Publishing to one more node would give two nodes a path to a single-node volume.
    #[error("volume {id} is already published to node(s) {} and the requested access is not multi-node read-only", nodes.join(", "))]
    PublishedElsewhere { id: String, nodes: Vec<String> },

    #[error("volume {id} is already published to node {node:?} with a different access mode or readonly flag")]
    PublishedIncompatible { id: String, node: String },

    /// Something inside the backend root is not what holdfast created (a symlink where a
    /// directory belongs, for instance). Refused: following it could leave the root.
    #[error("unsafe path {}: {reason}", path.display())]
    UnsafePath { path: PathBuf, reason: &'static str },

    /// Stored metadata that does not parse. Never treated as a missing volume.
    #[error("corrupt volume metadata {}: {reason}", path.display())]
    CorruptMetadata { path: PathBuf, reason: String },

    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: impl Into<std::io::Error>,
    ) -> Self {
        BackendError::Io {
            op,
            path: path.into(),
            source: source.into(),
        }
    }
}
