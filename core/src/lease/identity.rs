//! Who this node plugin instance is: node name, boot id and machine id.
//!
//! The boot id changes at every boot; the machine id identifies the installation. Same
//! machine id with a different boot id proves that every process of the earlier boot is
//! dead; a different machine id under the same node name proves nothing.

use std::path::Path;

use crate::lease::LeaseError;

pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";
pub const MACHINE_ID_PATH: &str = "/etc/machine-id";

/// This node as the lease protocol sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node: String,
    pub boot_id: String,
    pub machine_id: String,
}

impl NodeIdentity {
    /// Reads the boot id and machine id of the running machine.
    pub fn of_this_machine(node: &str) -> Result<Self, LeaseError> {
        Self::from_files(node, Path::new(BOOT_ID_PATH), Path::new(MACHINE_ID_PATH))
    }

    pub fn from_files(node: &str, boot_id: &Path, machine_id: &Path) -> Result<Self, LeaseError> {
        if node.is_empty() {
            return Err(LeaseError::InvalidInput("node name is empty".into()));
        }
        let read = |path: &Path| -> Result<String, LeaseError> {
            let text = std::fs::read_to_string(path).map_err(|e| LeaseError::io(path, e))?;
            let id = text.trim().to_string();
            if id.is_empty() {
                return Err(LeaseError::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "empty id"),
                ));
            }
            Ok(id)
        };
        Ok(NodeIdentity {
            node: node.to_string(),
            boot_id: read(boot_id)?,
            machine_id: read(machine_id)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let id = NodeIdentity::of_this_machine("n1").unwrap();
        assert_eq!(id.boot_id.len(), 36, "boot id is a uuid: {}", id.boot_id);
        assert!(!id.machine_id.is_empty());
    }

    #[test]
    fn empty_or_missing_ids_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let missing = dir.path().join("missing");
        assert!(NodeIdentity::from_files("n1", &empty, &empty).is_err());
        assert!(NodeIdentity::from_files("n1", &missing, &missing).is_err());
        assert!(
            NodeIdentity::from_files("", Path::new(BOOT_ID_PATH), Path::new(BOOT_ID_PATH)).is_err()
        );
    }
}
