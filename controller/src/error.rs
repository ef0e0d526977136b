//! The controller's errors and their one mapping to gRPC status codes.
//!
//! The codes follow the CSI spec's per-RPC error tables. Two choices are worth
//! stating: an id that is not of holdfast's form names no volume, so it maps to
//! NOT_FOUND like any other missing volume (and DeleteVolume / ControllerUnpublish
//! answer OK for it before reaching here, as the spec requires for missing volumes);
//! and damaged state inside the backend root (a planted symlink, unreadable metadata)
//! is INTERNAL, because no change to the request can fix it.
//!
//! The attach gate adds two: a refused attach is FAILED_PRECONDITION (the spec's code
//! for "volume published to another node"; the attacher retries it with backoff), and
//! an unreachable lease store is UNAVAILABLE — the gate never grants what it could not
//! read. A store that shows an epoch below one already seen is INTERNAL.

use holdfast_core::backend::BackendError;
use holdfast_core::lease::LeaseError;
use holdfast_core::store::StoreError;
use tonic::{Code, Status};

use crate::csi::gate::AttachRefused;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A request field is missing or malformed.
    #[error("{field} {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// ListVolumes was given a `starting_token` it did not hand out.
    #[error("invalid starting_token {token:?}: start listing again without a token")]
    InvalidToken { token: String },

    #[error(transparent)]
    Backend(#[from] BackendError),

    /// The attach gate refused: another node's pod holds the volume. (Boxed: it is by
    /// far the largest variant.)
    #[error(transparent)]
    AttachRefused(Box<AttachRefused>),

    /// DeleteVolume of a volume whose claim a pod may still be using.
    #[error(
        "cannot delete the volume yet: {0} DeleteVolume succeeds once the claim is \
         released, its lease expires or its node is fenced"
    )]
    DeleteHeld(Box<AttachRefused>),

    /// The claim record changed between reading and deleting it.
    #[error("the claim {key} changed while the volume was being deleted; retry")]
    ClaimChanged { key: String },

    /// The attach gate could not read (or trust) the lease store.
    #[error("attach gate: {0}")]
    Lease(#[from] LeaseError),

    /// A blocking backend task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ControllerError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ControllerError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ControllerError::InvalidArgument { .. } => Code::InvalidArgument,
            ControllerError::InvalidToken { .. } => Code::Aborted,
            ControllerError::Internal(_) => Code::Internal,
            ControllerError::Backend(e) => backend_code(e),
            ControllerError::AttachRefused(_) | ControllerError::DeleteHeld(_) => {
                Code::FailedPrecondition
            }
            ControllerError::ClaimChanged { .. } => Code::Aborted,
            ControllerError::Lease(LeaseError::Store(StoreError::Unavailable(_))) => {
                Code::Unavailable
            }
            ControllerError::Lease(_) => Code::Internal,
        }
    }
}

fn backend_code(error: &BackendError) -> Code {
    match error {
        BackendError::InvalidVolumeId { .. }
        | BackendError::NotFound { .. }
        | BackendError::UnknownNode { .. } => Code::NotFound,
        BackendError::InvalidName { .. }
        | BackendError::InvalidNodeId { .. }
        | BackendError::InvalidParameter { .. }
        | BackendError::UnknownParameters { .. }
        | BackendError::InvalidCapacityRange { .. } => Code::InvalidArgument,
        BackendError::CapacityUnsatisfiable { .. } | BackendError::ShrinkUnsupported { .. } => {
            Code::OutOfRange
        }
        BackendError::Incompatible { .. }
        | BackendError::IdCollision { .. }
        | BackendError::PublishedIncompatible { .. } => Code::AlreadyExists,
        BackendError::InUse { .. } | BackendError::PublishedElsewhere { .. } => {
            Code::FailedPrecondition
        }
        BackendError::UnsafePath { .. }
        | BackendError::CorruptMetadata { .. }
        | BackendError::Io { .. } => Code::Internal,
    }
}

impl From<AttachRefused> for ControllerError {
    fn from(refused: AttachRefused) -> Self {
        ControllerError::AttachRefused(Box::new(refused))
    }
}

impl From<ControllerError> for Status {
    fn from(error: ControllerError) -> Status {
        Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_codes() {
        let id = || "hf-0".to_string();
        let cases = [
            (BackendError::NotFound { id: id() }, Code::NotFound),
            (
                BackendError::UnknownNode {
                    node_id: "n".into(),
                },
                Code::NotFound,
            ),
            (
                BackendError::InvalidVolumeId {
                    id: id(),
                    reason: "x",
                },
                Code::NotFound,
            ),
            (
                BackendError::UnknownParameters {
                    keys: vec!["k".into()],
                },
                Code::InvalidArgument,
            ),
            (
                BackendError::InvalidCapacityRange {
                    required: 2,
                    limit: 1,
                },
                Code::InvalidArgument,
            ),
            (
                BackendError::CapacityUnsatisfiable {
                    requested: 2,
                    total: 1,
                },
                Code::OutOfRange,
            ),
            (
                BackendError::ShrinkUnsupported {
                    id: id(),
                    current: 2,
                    limit: 1,
                },
                Code::OutOfRange,
            ),
            (
                BackendError::Incompatible {
                    name: "n".into(),
                    id: id(),
                    reason: "r".into(),
                },
                Code::AlreadyExists,
            ),
            (
                BackendError::PublishedIncompatible {
                    id: id(),
                    node: "n".into(),
                },
                Code::AlreadyExists,
            ),
            (
                BackendError::InUse {
                    id: id(),
                    nodes: vec![],
                },
                Code::FailedPrecondition,
            ),
            (
                BackendError::PublishedElsewhere {
                    id: id(),
                    nodes: vec![],
                },
                Code::FailedPrecondition,
            ),
        ];
        for (error, code) in cases {
            let status = Status::from(ControllerError::from(error));
            assert_eq!(status.code(), code, "{}", status.message());
        }
        let status = Status::from(ControllerError::InvalidToken { token: "t".into() });
        assert_eq!(status.code(), Code::Aborted);
    }

    #[test]
    fn attach_gate_codes() {
        let refused = AttachRefused {
            volume: "hf-1".into(),
            holder: holdfast_core::lease::Holder {
                node: "n1".into(),
                pod_uid: "uid".into(),
                instance: "i".into(),
                pod: None,
            },
            epoch: 1,
            unrenewed_for: std::time::Duration::ZERO,
            expires_in: None,
        };
        let cases = [
            (ControllerError::from(refused), Code::FailedPrecondition),
            (
                LeaseError::Store(StoreError::Unavailable("down".into())).into(),
                Code::Unavailable,
            ),
            (
                LeaseError::EpochRegressed {
                    volume: "hf-1".into(),
                    seen: 5,
                    stored: 3,
                }
                .into(),
                Code::Internal,
            ),
        ];
        for (error, code) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{}", status.message());
        }
    }
}
