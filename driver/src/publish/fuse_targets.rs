//! The node-local record of FUSE targets: which volume each FUSE mount shows.
//!
//! A bind mount names its volume in the mount table (its root is the volume's data
//! directory); a FUSE mount does not (every one is `holdfast` of type `fuse.holdfast`).
//! So that a restarted plugin still knows which volume a dead predecessor's FUSE target
//! showed, every FUSE publish and unpublish rewrites this file (`<state-dir>/
//! fuse-targets.json`, atomically: temp file, fsync, rename). At start only the entries
//! whose target still carries a `fuse.holdfast` mount are believed; the rest are stale.
//!
//! Each entry also names the pod the target was published for (its UID and, with
//! `podInfoOnMount`, its namespace/name), so that the restarted plugin can tell that pod
//! its data path died ([`crate::publish::data_path_loss`]). Records written before these
//! fields existed still load: the pod is then unknown and nothing is reported.
//!
//! Written by the publisher only, under its table lock.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use holdfast_core::lease::PodName;
use serde::{Deserialize, Serialize};

use crate::csi::error::NodeError;
use crate::lock::lock_request::{pod_name, POD_UID_KEY};

const FILE_NAME: &str = "fuse-targets.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FuseTarget {
    pub volume: String,
    pub readonly: bool,
    /// The UID of the pod the target was published for; `None` when the request carried
    /// none (a CO without pod info, or a record from an older plugin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's namespace and name, when kubelet sent them (`podInfoOnMount`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodName>,
}

/// The pod a FUSE target was published for, as the publish request named it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetPod {
    pub uid: Option<String>,
    pub name: Option<PodName>,
}

impl TargetPod {
    /// The pod kubelet names in a publish request's volume_context (`podInfoOnMount`).
    pub fn from_context(context: &HashMap<String, String>) -> Self {
        let uid = context
            .get(POD_UID_KEY)
            .filter(|uid| !uid.trim().is_empty())
            .cloned();
        TargetPod {
            uid,
            name: pod_name(context),
        }
    }
}

/// Target path → what it shows.
pub type FuseTargets = BTreeMap<PathBuf, FuseTarget>;

pub struct FuseTargetsFile {
    path: PathBuf,
}

impl FuseTargetsFile {
    pub fn new(state_dir: &Path) -> Self {
        FuseTargetsFile {
            path: state_dir.join(FILE_NAME),
        }
    }

    /// The recorded targets; a missing file is an empty record. A file that does not
    /// parse is reported, not silently dropped: it would hide which volumes were served.
    pub fn load(&self) -> Result<FuseTargets, NodeError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                NodeError::io(
                    "parse",
                    &self.path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FuseTargets::new()),
            Err(e) => Err(NodeError::io("read", &self.path, e)),
        }
    }

    /// Replaces the record atomically.
    pub fn store(&self, targets: &FuseTargets) -> Result<(), NodeError> {
        let bytes = serde_json::to_vec_pretty(targets)
            .map_err(|e| NodeError::io("encode", &self.path, std::io::Error::other(e)))?;
        let temp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| NodeError::io("write", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = FuseTargetsFile::new(dir.path());
        assert!(file.load().unwrap().is_empty());
        let mut targets = FuseTargets::new();
        targets.insert(
            PathBuf::from("/pods/a b/vol"),
            FuseTarget {
                volume: "hf-0123456789abcdef0123456789abcdef".into(),
                readonly: true,
                pod_uid: Some("0d6c1e4e-uid".into()),
                pod: Some(PodName {
                    namespace: "apps".into(),
                    name: "db-0".into(),
                }),
            },
        );
        file.store(&targets).unwrap();
        assert_eq!(file.load().unwrap(), targets);
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        assert!(file.load().is_err());
    }

    #[test]
    fn records_without_a_pod_still_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            br#"{"/pods/x/vol": {"volume": "hf-0123456789abcdef0123456789abcdef", "readonly": false}}"#,
        )
        .unwrap();
        let loaded = FuseTargetsFile::new(dir.path()).load().unwrap();
        let target = &loaded[Path::new("/pods/x/vol")];
        assert_eq!(target.pod_uid, None);
        assert_eq!(target.pod, None);
    }
}
