//! StorageClass parameters and the volume context that carries them to the node.
//!
//! The controller parses a CreateVolume's `parameters` into [`VolumeParams`] (rejecting
//! unknown keys so a typo never silently weakens locking), stores them with the volume,
//! and returns [`VolumeParams::to_context`] as `volume_context`; the node plugin reads
//! them back with [`VolumeParams::from_context`] on NodePublishVolume.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::BackendError;

pub const PARAM_EXCLUSIVE: &str = "exclusive";
pub const PARAM_ON_CONFLICT: &str = "onConflict";
pub const PARAM_DATA_PATH: &str = "dataPath";
pub const PARAM_FENCE_ACTION: &str = "fenceAction";
/// Keys the Kubernetes external-provisioner adds (PVC/PV names with
/// `--extra-create-metadata`). Accepted and kept as informational metadata only.
pub const CO_PARAM_PREFIX: &str = "csi.storage.k8s.io/";

/// What a second pod gets while the volume is held elsewhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// NodePublishVolume fails at once (the CO retries with backoff).
    #[default]
    Fail,
    /// NodePublishVolume waits for the claim within the call's deadline.
    Wait,
}

/// How the node plugin exposes the volume's directory to the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// Served through FUSE: I/O stops when the plugin dies or the claim is fenced.
    #[default]
    Fuse,
    /// A plain bind mount: native speed, fenced by killing the processes using it.
    Bind,
}

/// What I/O on a fenced volume does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FenceAction {
    /// Operations fail with EIO.
    #[default]
    Error,
    /// Operations block.
    Freeze,
}

/// The effective holdfast parameters of a volume (defaults filled in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeParams {
    pub exclusive: bool,
    pub on_conflict: OnConflict,
    pub data_path: DataPath,
    pub fence_action: FenceAction,
}

impl Default for VolumeParams {
    fn default() -> Self {
        VolumeParams {
            exclusive: true,
            on_conflict: OnConflict::Fail,
            data_path: DataPath::Fuse,
            fence_action: FenceAction::Error,
        }
    }
}

/// Parameters split into holdfast's own and the CO's informational ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedParameters {
    pub params: VolumeParams,
    /// The `csi.storage.k8s.io/*` entries, kept for humans (which PVC a volume serves).
    pub co_metadata: BTreeMap<String, String>,
}

impl VolumeParams {
    /// Parses StorageClass parameters. Every unknown key is reported at once.
    pub fn from_parameters<'a>(
        parameters: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<ParsedParameters, BackendError> {
        let mut parsed = ParsedParameters::default();
        let mut unknown = Vec::new();
        for (key, value) in parameters {
            if key.starts_with(CO_PARAM_PREFIX) {
                parsed.co_metadata.insert(key.clone(), value.clone());
            } else if !parsed.params.set(key, value)? {
                unknown.push(key.clone());
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(BackendError::UnknownParameters { keys: unknown });
        }
        Ok(parsed)
    }

    /// Reads a volume context produced by [`VolumeParams::to_context`]. Missing keys take
    /// their defaults; keys other than holdfast's are ignored (the CO may add its own,
    /// e.g. pod info on NodePublishVolume).
    pub fn from_context<'a>(
        context: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<VolumeParams, BackendError> {
        let mut params = VolumeParams::default();
        for (key, value) in context {
            params.set(key, value)?;
        }
        Ok(params)
    }

    /// The volume context: every holdfast key with its effective value.
    pub fn to_context(&self) -> BTreeMap<String, String> {
        let entries = [
            (
                PARAM_EXCLUSIVE,
                if self.exclusive { "true" } else { "false" },
            ),
            (
                PARAM_ON_CONFLICT,
                match self.on_conflict {
                    OnConflict::Fail => "fail",
                    OnConflict::Wait => "wait",
                },
            ),
            (
                PARAM_DATA_PATH,
                match self.data_path {
                    DataPath::Fuse => "fuse",
                    DataPath::Bind => "bind",
                },
            ),
            (
                PARAM_FENCE_ACTION,
                match self.fence_action {
                    FenceAction::Error => "error",
                    FenceAction::Freeze => "freeze",
                },
            ),
        ];
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// Sets one known key; `Ok(false)` if the key is not holdfast's.
    fn set(&mut self, key: &str, value: &str) -> Result<bool, BackendError> {
        let invalid = |expected| BackendError::InvalidParameter {
            key: key.to_owned(),
            value: value.to_owned(),
            expected,
        };
        match key {
            PARAM_EXCLUSIVE => {
                self.exclusive = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(invalid("\"true\" or \"false\"")),
                }
            }
            PARAM_ON_CONFLICT => {
                self.on_conflict = match value {
                    "fail" => OnConflict::Fail,
                    "wait" => OnConflict::Wait,
                    _ => return Err(invalid("\"fail\" or \"wait\"")),
                }
            }
            PARAM_DATA_PATH => {
                self.data_path = match value {
                    "fuse" => DataPath::Fuse,
                    "bind" => DataPath::Bind,
                    _ => return Err(invalid("\"fuse\" or \"bind\"")),
                }
            }
            PARAM_FENCE_ACTION => {
                self.fence_action = match value {
                    "error" => FenceAction::Error,
                    "freeze" => FenceAction::Freeze,
                    _ => return Err(invalid("\"error\" or \"freeze\"")),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_safe_ones() {
        let parsed = VolumeParams::from_parameters(&map(&[])).unwrap();
        assert_eq!(parsed.params, VolumeParams::default());
        assert!(parsed.params.exclusive);
        assert_eq!(parsed.params.data_path, DataPath::Fuse);
    }

    #[test]
    fn all_keys_parse_and_round_trip_through_the_context() {
        let given = map(&[
            ("exclusive", "false"),
            ("onConflict", "wait"),
            ("dataPath", "bind"),
            ("fenceAction", "freeze"),
            ("csi.storage.k8s.io/pvc/name", "data-db-0"),
        ]);
        let parsed = VolumeParams::from_parameters(&given).unwrap();
        assert!(!parsed.params.exclusive);
        assert_eq!(parsed.params.on_conflict, OnConflict::Wait);
        assert_eq!(
            parsed.co_metadata,
            map(&[("csi.storage.k8s.io/pvc/name", "data-db-0")])
        );
        let context = parsed.params.to_context();
        assert_eq!(context.len(), 4);
        assert_eq!(VolumeParams::from_context(&context).unwrap(), parsed.params);
    }

    #[test]
    fn unknown_keys_are_all_named() {
        let err = VolumeParams::from_parameters(&map(&[
            ("exclusiv", "true"),
            ("zzz", "1"),
            ("dataPath", "fuse"),
        ]))
        .unwrap_err();
        match &err {
            BackendError::UnknownParameters { keys } => assert_eq!(keys, &["exclusiv", "zzz"]),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("exclusiv, zzz"));
    }

    #[test]
    fn bad_values_are_refused() {
        for (k, v) in [
            ("exclusive", "yes"),
            ("onConflict", "retry"),
            ("dataPath", "nfs"),
            ("fenceAction", ""),
            ("exclusive", "TRUE"),
        ] {
            let err = VolumeParams::from_parameters(&map(&[(k, v)])).unwrap_err();
            assert!(
                matches!(err, BackendError::InvalidParameter { .. }),
                "{k}={v}"
            );
        }
    }
}
