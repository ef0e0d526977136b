//! The node registry: which node ids have a node plugin on this backend.
//!
//! Every node plugin records its node id under `<root>/nodes/` when it starts (the
//! root is shared, so the controller sees every node). ControllerPublishVolume to a
//! node that never registered is refused with NOT_FOUND, as CSI requires: a mistyped
//! or stale node id must not be recorded as holding a volume. Node ids are arbitrary
//! CO strings, so the file name is a hash of the id, never the id itself.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{fsops, Backend, BackendError, NODES_DIR};

/// CSI's limit for `node_id`.
pub const MAX_NODE_ID_BYTES: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct NodeRecord {
    node_id: String,
    registered_unix_secs: u64,
}

/// Checks a node id as CSI bounds it: non-empty, at most 256 bytes, no NUL.
pub fn validate_node_id(node_id: &str) -> Result<(), BackendError> {
    let reason = if node_id.is_empty() {
        "is empty"
    } else if node_id.len() > MAX_NODE_ID_BYTES {
        "is longer than 256 bytes"
    } else if node_id.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(BackendError::InvalidNodeId {
        node_id: node_id.chars().take(80).collect(),
        reason,
    })
}

fn node_file(node_id: &str) -> String {
    let digest = Sha256::digest(node_id.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("node-{hex}.json")
}

impl Backend {
    /// Records that a node plugin serves `node_id`. Idempotent; called by the node
    /// plugin at start.
    pub fn register_node(&self, node_id: &str) -> Result<(), BackendError> {
        validate_node_id(node_id)?;
        let dirs = self.dirs()?;
        let record = NodeRecord {
            node_id: node_id.to_owned(),
            registered_unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let name = node_file(node_id);
        let bytes = serde_json::to_vec(&record).expect("node records always serialise");
        fsops::write_atomic(
            &dirs.nodes,
            &name,
            &bytes,
            &self.root.join(NODES_DIR).join(&name),
        )
    }

    /// Whether a node plugin has registered `node_id`.
    pub fn node_registered(&self, node_id: &str) -> Result<bool, BackendError> {
        validate_node_id(node_id)?;
        let dirs = self.dirs()?;
        let name = node_file(node_id);
        let path = self.root.join(NODES_DIR).join(&name);
        let Some(bytes) = fsops::read_file(&dirs.nodes, &name, &path)? else {
            return Ok(false);
        };
        let record: NodeRecord =
            serde_json::from_slice(&bytes).map_err(|e| BackendError::CorruptMetadata {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        Ok(record.node_id == node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_persists_and_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Backend::open(dir.path()).unwrap();
        assert!(!backend.node_registered("node-a").unwrap());
        backend.register_node("node-a").unwrap();
        backend.register_node("node-a").unwrap();
        assert!(backend.node_registered("node-a").unwrap());
        assert!(!backend.node_registered("node-A").unwrap());
        // Hostile ids are only ever hashed.
        backend.register_node("../../etc/passwd").unwrap();
        assert!(!dir.path().join("etc").exists());
        let reopened = Backend::open(dir.path()).unwrap();
        assert!(reopened.node_registered("node-a").unwrap());
        assert!(reopened.node_registered("../../etc/passwd").unwrap());
    }

    #[test]
    fn node_ids_are_bounded() {
        assert!(validate_node_id("n").is_ok());
        assert!(validate_node_id(&"n".repeat(MAX_NODE_ID_BYTES)).is_ok());
        for bad in [
            String::new(),
            "n".repeat(MAX_NODE_ID_BYTES + 1),
            "a\0b".into(),
        ] {
            assert!(matches!(
                validate_node_id(&bad),
                Err(BackendError::InvalidNodeId { .. })
            ));
        }
    }
}
