//! Request-field checks shared by the CSI services.
//!
//! The CSI spec answers a missing or malformed field with `INVALID_ARGUMENT` and a
//! message naming the field, and the CO must not retry such a call unchanged. Every
//! helper here returns exactly that, so services validate each field in one line
//! before touching any state: bad input is refused before anything can be lost.

use std::path::Path;

use tonic::Status;

/// An `INVALID_ARGUMENT` status for `field`, saying why it was refused.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field} {reason}"))
}

/// A REQUIRED string field: non-empty, returned as given.
pub fn require<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    Ok(value)
}

/// A REQUIRED message field (proto3 messages arrive as `Option`).
pub fn require_some<'a, T>(field: &str, value: Option<&'a T>) -> Result<&'a T, Status> {
    value.ok_or_else(|| invalid(field, "is required"))
}

/// A REQUIRED repeated field: at least one element.
pub fn require_non_empty<'a, T>(field: &str, values: &'a [T]) -> Result<&'a [T], Status> {
    if values.is_empty() {
        return Err(invalid(field, "must have at least one element"));
    }
    Ok(values)
}

/// A REQUIRED host path (`target_path`, `staging_target_path`, `volume_path`):
/// absolute and made only of normal components, so it names exactly one place and
/// no `..` can walk the driver's mount or unmount somewhere the CO did not mean.
pub fn require_absolute_path<'a>(field: &str, value: &'a str) -> Result<&'a Path, Status> {
    let value = require(field, value)?;
    if value.contains('\0') {
        return Err(invalid(field, "must not contain NUL bytes"));
    }
    let path = Path::new(value);
    if !path.is_absolute() {
        return Err(invalid(
            field,
            format!("must be an absolute path, got {value:?}"),
        ));
    }
    // Checked on the string: `Path::components` silently drops inner `.` parts.
    if value.split('/').any(|part| part == "." || part == "..") {
        return Err(invalid(
            field,
            format!("must not contain '.' or '..', got {value:?}"),
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn require_rejects_empty_with_field_name() {
        let err = require("volume_id", "").unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "volume_id is required");
        assert_eq!(require("volume_id", "v1").unwrap(), "v1");
    }

    #[test]
    fn require_some_and_non_empty() {
        let missing: Option<&u8> = None;
        let err = require_some("volume_capability", missing).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "volume_capability is required");
        assert_eq!(*require_some("x", Some(&7u8)).unwrap(), 7);

        let none: [u8; 0] = [];
        let err = require_non_empty("volume_capabilities", &none).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("volume_capabilities "));
        assert_eq!(require_non_empty("x", &[1u8, 2]).unwrap().len(), 2);
    }

    #[test]
    fn absolute_path_rules() {
        assert_eq!(
            require_absolute_path("target_path", "/var/lib/kubelet/pods/x/mount").unwrap(),
            Path::new("/var/lib/kubelet/pods/x/mount")
        );
        for bad in ["", "relative/dir", "/a/../etc", "/a/./b", "/a/\0b"] {
            let err = require_absolute_path("target_path", bad).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
            assert!(err.message().starts_with("target_path "), "{bad:?}");
        }
    }
}
