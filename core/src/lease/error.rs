//! The lease protocol's one error type.

use std::path::PathBuf;
use std::time::Duration;

use crate::lease::params::InvalidParams;
use crate::lease::{Epoch, Holder};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone else holds the claim. `expires_in` is how long, on this node's clock,
    /// until the holder's session can be taken over by timeout if it stays silent;
    /// `None` when it cannot be known (the holder is on this node, or not yet timed).
    #[error("volume is held by pod {} on node {}{}", holder.pod_words(), holder.node, fmt_expiry(expires_in))]
    Held {
        /// Boxed: every lease call returns this error type, and the holder is its
        /// largest part.
        holder: Box<Holder>,
        expires_in: Option<Duration>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store shows a lower epoch for a volume than this client has already seen:
    /// the store lost or rolled back data. Never treated as a free claim.
    #[error("epoch of volume {volume} went backwards: seen {seen}, stored {stored}")]
    EpochRegressed {
        volume: String,
        seen: Epoch,
        stored: Epoch,
    },
    #[error(transparent)]
    InvalidParams(#[from] InvalidParams),
    /// This node is fenced (out-of-service taint or an explicit fence).
    #[error("node {node} is fenced: {reason}")]
    NodeFenced { node: String, reason: String },
    /// This instance's session is past its deadline or was lost; it may not take claims.
    #[error("session {instance} is not live")]
    SessionNotLive { instance: String },
    /// The claim changed under us more times than we are willing to retry.
    #[error("claim of volume {volume} kept changing; gave up after {attempts} attempts")]
    Contended { volume: String, attempts: u32 },
    #[error("node-local state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

fn fmt_expiry(expires_in: &Option<Duration>) -> String {
    match expires_in {
        Some(d) => format!(
            " (its session can expire in {:.1}s if not renewed)",
            d.as_secs_f64()
        ),
        None => String::new(),
    }
}

impl LeaseError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LeaseError::Io {
            path: path.into(),
            source,
        }
    }
}
