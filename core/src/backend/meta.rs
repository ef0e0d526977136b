//! What the backend records about each volume (`<root>/meta/<id>.json`), and the pure
//! rules over it: which re-creates are idempotent, which publishes are allowed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{BackendError, VolumeId, VolumeName, VolumeParams};

/// The metadata format written by this version.
pub const META_FORMAT: u32 = 1;
/// Capacity given to a volume whose request names no size.
pub const DEFAULT_CAPACITY_BYTES: u64 = 1 << 30;

/// The access modes holdfast supports. Multi-node writer modes are not among them: a
/// volume has at most one writing node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// May several nodes have the volume published at once in this mode?
    pub fn is_multi_node(self) -> bool {
        matches!(self, AccessMode::MultiNodeReaderOnly)
    }
}

/// One volume capability. Only the mount access type exists here (no block volumes);
/// `fs_type` is recorded but meaningless for a directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Capability {
    pub access_mode: AccessMode,
    #[serde(default)]
    pub fs_type: String,
    #[serde(default)]
    pub mount_flags: Vec<String>,
}

/// A CreateVolume capacity range; 0 means "not given", as in CSI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapacityRange {
    required_bytes: u64,
    limit_bytes: u64,
}

impl CapacityRange {
    pub fn new(required_bytes: u64, limit_bytes: u64) -> Result<Self, BackendError> {
        if limit_bytes != 0 && limit_bytes < required_bytes {
            return Err(BackendError::InvalidCapacityRange {
                required: required_bytes,
                limit: limit_bytes,
            });
        }
        Ok(CapacityRange {
            required_bytes,
            limit_bytes,
        })
    }

    pub fn required_bytes(&self) -> u64 {
        self.required_bytes
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    pub fn contains(&self, bytes: u64) -> bool {
        bytes >= self.required_bytes && (self.limit_bytes == 0 || bytes <= self.limit_bytes)
    }

    /// The capacity a new volume gets: what was required, else the default capped by
    /// the limit.
    pub fn choose(&self) -> u64 {
        if self.required_bytes > 0 {
            self.required_bytes
        } else if self.limit_bytes > 0 {
            self.limit_bytes.min(DEFAULT_CAPACITY_BYTES)
        } else {
            DEFAULT_CAPACITY_BYTES
        }
    }
}

/// How a volume is published to one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub access_mode: AccessMode,
    pub readonly: bool,
}

/// Everything CreateVolume asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: VolumeName,
    pub capacity: CapacityRange,
    pub capabilities: Vec<Capability>,
    pub params: VolumeParams,
    pub co_metadata: BTreeMap<String, String>,
}

/// The stored record of one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub format: u32,
    pub id: VolumeId,
    pub name: String,
    /// Recorded and reported, not enforced: a plain directory has no quota.
    pub capacity_bytes: u64,
    /// Sorted and deduplicated, so comparisons ignore request order.
    pub capabilities: Vec<Capability>,
    pub params: VolumeParams,
    #[serde(default)]
    pub co_metadata: BTreeMap<String, String>,
    /// Node id → how the volume is published there (ControllerPublishVolume).
    #[serde(default)]
    pub published: BTreeMap<String, Publication>,
    pub created_unix_secs: u64,
}

/// Sorted, deduplicated capabilities: the canonical form stored and compared.
pub fn canonical_capabilities(capabilities: &[Capability]) -> Vec<Capability> {
    let mut caps = capabilities.to_vec();
    caps.sort();
    caps.dedup();
    caps
}

/// Capabilities for messages: access modes and fs type. Mount flags are only counted:
/// they may carry secrets, and these messages end up in logs.
fn describe(capabilities: &[Capability]) -> String {
    let one = |c: &Capability| {
        let mut text = format!("{:?}", c.access_mode);
        if !c.fs_type.is_empty() {
            text.push_str(&format!(" fs_type={}", c.fs_type));
        }
        if !c.mount_flags.is_empty() {
            text.push_str(&format!(" with {} mount flag(s)", c.mount_flags.len()));
        }
        text
    };
    capabilities.iter().map(one).collect::<Vec<_>>().join(", ")
}

impl VolumeMeta {
    /// Why an existing volume does not satisfy a repeated CreateVolume, or `None` when
    /// the request is a retry and must succeed with this volume.
    pub fn incompatibility(&self, spec: &VolumeSpec) -> Option<String> {
        if !spec.capacity.contains(self.capacity_bytes) {
            return Some(format!(
                "it has {} bytes, outside the requested range (required {}, limit {})",
                self.capacity_bytes,
                spec.capacity.required_bytes(),
                spec.capacity.limit_bytes()
            ));
        }
        if canonical_capabilities(&spec.capabilities) != self.capabilities {
            return Some(format!(
                "it has capabilities [{}], the request asks for [{}]",
                describe(&self.capabilities),
                describe(&canonical_capabilities(&spec.capabilities))
            ));
        }
        if spec.params != self.params {
            return Some(format!(
                "it has parameters {:?}, the request asks for {:?}",
                self.params.to_context(),
                spec.params.to_context()
            ));
        }
        None
    }

    /// Checks a ControllerPublishVolume against the current publications. `Ok(true)`
    /// means it is new and must be recorded, `Ok(false)` that it is already recorded.
    pub fn check_publish(
        &self,
        node: &str,
        publication: Publication,
    ) -> Result<bool, BackendError> {
        if let Some(existing) = self.published.get(node) {
            if *existing == publication {
                return Ok(false);
            }
            return Err(BackendError::PublishedIncompatible {
                id: self.id.to_string(),
                node: node.to_owned(),
            });
        }
        let others: Vec<&String> = self.published.keys().collect();
        // Two nodes may share a volume only if every one of them reads it, never writes.
        let all_multi_node = publication.access_mode.is_multi_node()
            && self
                .published
                .values()
                .all(|p| p.access_mode.is_multi_node());
        if !others.is_empty() && !all_multi_node {
            return Err(BackendError::PublishedElsewhere {
                id: self.id.to_string(),
                nodes: others.into_iter().cloned().collect(),
            });
        }
        Ok(true)
    }

    /// The published node ids, sorted.
    pub fn published_nodes(&self) -> Vec<String> {
        self.published.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(mode: AccessMode) -> Capability {
        Capability {
            access_mode: mode,
            fs_type: String::new(),
            mount_flags: vec![],
        }
    }

    fn spec(required: u64, limit: u64, modes: &[AccessMode]) -> VolumeSpec {
        VolumeSpec {
            name: VolumeName::parse("v").unwrap(),
            capacity: CapacityRange::new(required, limit).unwrap(),
            capabilities: modes.iter().map(|m| cap(*m)).collect(),
            params: VolumeParams::default(),
            co_metadata: BTreeMap::new(),
        }
    }

    fn meta_for(spec: &VolumeSpec) -> VolumeMeta {
        VolumeMeta {
            format: META_FORMAT,
            id: VolumeId::for_name(&spec.name),
            name: spec.name.as_str().into(),
            capacity_bytes: spec.capacity.choose(),
            capabilities: canonical_capabilities(&spec.capabilities),
            params: spec.params,
            co_metadata: BTreeMap::new(),
            published: BTreeMap::new(),
            created_unix_secs: 0,
        }
    }

    #[test]
    fn capacity_choice() {
        assert_eq!(
            CapacityRange::new(0, 0).unwrap().choose(),
            DEFAULT_CAPACITY_BYTES
        );
        assert_eq!(CapacityRange::new(5, 0).unwrap().choose(), 5);
        assert_eq!(CapacityRange::new(0, 7).unwrap().choose(), 7);
        assert_eq!(
            CapacityRange::new(0, 1 << 40).unwrap().choose(),
            DEFAULT_CAPACITY_BYTES
        );
        assert!(matches!(
            CapacityRange::new(8, 7),
            Err(BackendError::InvalidCapacityRange { .. })
        ));
        assert!(CapacityRange::new(7, 7).is_ok());
    }

    #[test]
    fn identical_retry_is_compatible_and_changes_are_not() {
        use AccessMode::*;
        let first = spec(100, 0, &[SingleNodeWriter, MultiNodeReaderOnly]);
        let meta = meta_for(&first);
        assert_eq!(meta.incompatibility(&first), None);
        // Order and duplicates of capabilities do not matter.
        assert_eq!(
            meta.incompatibility(&spec(
                100,
                0,
                &[MultiNodeReaderOnly, SingleNodeWriter, SingleNodeWriter]
            )),
            None
        );
        assert!(meta
            .incompatibility(&spec(200, 0, &[SingleNodeWriter, MultiNodeReaderOnly]))
            .is_some());
        assert!(meta
            .incompatibility(&spec(10, 50, &[SingleNodeWriter, MultiNodeReaderOnly]))
            .is_some());
        assert!(meta
            .incompatibility(&spec(100, 0, &[SingleNodeWriter]))
            .is_some());
        let mut other_params = first.clone();
        other_params.params.exclusive = false;
        assert!(meta.incompatibility(&other_params).is_some());
    }

    #[test]
    fn single_node_volumes_publish_to_one_node_only() {
        use AccessMode::*;
        let mut meta = meta_for(&spec(1, 0, &[SingleNodeWriter]));
        let rw = Publication {
            access_mode: SingleNodeWriter,
            readonly: false,
        };
        assert!(meta.check_publish("a", rw).unwrap());
        meta.published.insert("a".into(), rw);
        assert!(!meta.check_publish("a", rw).unwrap());
        let ro = Publication {
            access_mode: SingleNodeWriter,
            readonly: true,
        };
        assert!(matches!(
            meta.check_publish("a", ro),
            Err(BackendError::PublishedIncompatible { .. })
        ));
        match meta.check_publish("b", rw) {
            Err(BackendError::PublishedElsewhere { nodes, .. }) => {
                assert_eq!(nodes, vec!["a".to_string()])
            }
            other => panic!("{other:?}"),
        }
        // A reader cannot join a node that writes.
        let reader = Publication {
            access_mode: MultiNodeReaderOnly,
            readonly: true,
        };
        assert!(meta.check_publish("b", reader).is_err());
    }

    #[test]
    fn multi_node_readers_may_share() {
        use AccessMode::*;
        let mut meta = meta_for(&spec(1, 0, &[MultiNodeReaderOnly]));
        let reader = Publication {
            access_mode: MultiNodeReaderOnly,
            readonly: true,
        };
        meta.published.insert("a".into(), reader);
        assert!(meta.check_publish("b", reader).unwrap());
        let writer = Publication {
            access_mode: SingleNodeWriter,
            readonly: false,
        };
        assert!(meta.check_publish("c", writer).is_err());
    }
}
