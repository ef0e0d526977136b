//! Translation between CSI messages and the backend's types, validating as it goes.
//!
//! Everything a request carries is checked here before the backend sees it, so the
//! backend only ever receives well-formed, supported values.

use std::collections::HashMap;

use holdfast_core::backend::{self, AccessMode, Capability, VolumeMeta};
use holdfast_core::csi::v1::{
    volume_capability::{self, access_mode::Mode},
    CapacityRange, Volume, VolumeCapability,
};

use crate::ControllerError;

/// A supported capability from its CSI form. Block volumes and multi-node writer modes
/// are refused: a holdfast volume is a directory with at most one writing node.
pub fn capability(
    field: &'static str,
    cap: &VolumeCapability,
) -> Result<Capability, ControllerError> {
    let (fs_type, mount_flags) = match &cap.access_type {
        Some(volume_capability::AccessType::Mount(mount)) => {
            (mount.fs_type.clone(), mount.mount_flags.clone())
        }
        Some(volume_capability::AccessType::Block(_)) => return Err(ControllerError::invalid(
            field,
            "asks for a block volume; holdfast volumes are directories (mount access type only)",
        )),
        None => {
            return Err(ControllerError::invalid(
                field,
                "has no access_type (mount is required)",
            ))
        }
    };
    let Some(mode) = &cap.access_mode else {
        return Err(ControllerError::invalid(field, "has no access_mode"));
    };
    let access_mode = match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(m @ (Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter)) => {
            return Err(ControllerError::invalid(
                field,
                format!(
                    "access mode {} is not supported: a holdfast volume is written from one node at a time",
                    m.as_str_name()
                ),
            ))
        }
        Ok(Mode::Unknown) | Err(_) => {
            return Err(ControllerError::invalid(field, format!("has an unknown access mode {}", mode.mode)))
        }
    };
    Ok(Capability {
        access_mode,
        fs_type,
        mount_flags,
    })
}

/// A REQUIRED, non-empty list of capabilities, all supported.
pub fn capabilities(
    field: &'static str,
    caps: &[VolumeCapability],
) -> Result<Vec<Capability>, ControllerError> {
    if caps.is_empty() {
        return Err(ControllerError::invalid(field, "is required"));
    }
    caps.iter().map(|c| capability(field, c)).collect()
}

/// A capacity range; absent means "no constraint".
pub fn capacity_range(
    range: Option<&CapacityRange>,
) -> Result<backend::CapacityRange, ControllerError> {
    let Some(range) = range else {
        return Ok(backend::CapacityRange::default());
    };
    let non_negative = |field: &'static str, v: i64| {
        u64::try_from(v)
            .map_err(|_| ControllerError::invalid(field, format!("must not be negative (got {v})")))
    };
    let required = non_negative("capacity_range.required_bytes", range.required_bytes)?;
    let limit = non_negative("capacity_range.limit_bytes", range.limit_bytes)?;
    Ok(backend::CapacityRange::new(required, limit)?)
}

/// A volume id from a request: REQUIRED. A non-empty id that holdfast could not have
/// generated is returned as `Err(BackendError::InvalidVolumeId)`, which callers treat
/// as "no such volume".
pub fn volume_id(
    id: &str,
) -> Result<Result<backend::VolumeId, backend::BackendError>, ControllerError> {
    if id.is_empty() {
        return Err(ControllerError::invalid("volume_id", "is required"));
    }
    Ok(backend::VolumeId::parse(id))
}

pub fn bytes_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// The CSI view of a stored volume; `volume_context` carries the effective parameters.
pub fn volume(meta: &VolumeMeta) -> Volume {
    Volume {
        capacity_bytes: bytes_i64(meta.capacity_bytes),
        volume_id: meta.id.to_string(),
        volume_context: meta
            .params
            .to_context()
            .into_iter()
            .collect::<HashMap<_, _>>(),
        content_source: None,
        accessible_topology: Vec::new(),
    }
}
