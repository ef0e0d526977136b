//! Volume names (chosen by the CO) and volume ids (derived by holdfast).
//!
//! The id is the only thing ever joined onto a backend path, and [`VolumeId::parse`]
//! accepts exactly the shape [`VolumeId::for_name`] produces: `hf-` followed by 32
//! lowercase hex digits. No `/`, `.`, NUL or anything longer can pass, so an id from a
//! request can never name a path outside `<root>/volumes/`. The name is only hashed.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::BackendError;

/// Every volume id starts with this.
pub const VOLUME_ID_PREFIX: &str = "hf-";
/// Hex digits of the name's SHA-256 kept in the id (128 bits).
const HASH_HEX_DIGITS: usize = 32;
/// The length of every valid id.
pub const VOLUME_ID_LEN: usize = VOLUME_ID_PREFIX.len() + HASH_HEX_DIGITS;
/// CSI's general limit for string fields.
pub const MAX_NAME_BYTES: usize = 128;

/// A CreateVolume name, validated per CSI: non-empty, at most 128 bytes, none of the
/// control characters the spec bans.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn parse(name: &str) -> Result<VolumeName, BackendError> {
        let invalid = |reason: String| BackendError::InvalidName { reason };
        if name.is_empty() {
            return Err(invalid("name is empty".into()));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(invalid(format!(
                "name is {} bytes, the limit is {MAX_NAME_BYTES}",
                name.len()
            )));
        }
        if let Some(c) = name.chars().find(|c| is_banned_char(*c)) {
            return Err(invalid(format!(
                "name contains the control character U+{:04X}",
                c as u32
            )));
        }
        Ok(VolumeName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The characters CSI bans in names: C0 controls except tab, LF and CR; DEL and C1.
fn is_banned_char(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}'..='\u{9f}')
}

/// A volume id. Only obtainable from a name or by [`VolumeId::parse`], so holding one
/// proves it is a safe single path component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeId(String);

impl VolumeId {
    /// The id of a name: stable across restarts and lost metadata, so CreateVolume
    /// retried by name always lands on the same directory.
    pub fn for_name(name: &VolumeName) -> VolumeId {
        let digest = Sha256::digest(name.as_str().as_bytes());
        let mut id = String::with_capacity(VOLUME_ID_LEN);
        id.push_str(VOLUME_ID_PREFIX);
        for byte in &digest[..HASH_HEX_DIGITS / 2] {
            id.push_str(&format!("{byte:02x}"));
        }
        VolumeId(id)
    }

    pub fn parse(id: &str) -> Result<VolumeId, BackendError> {
        let invalid = |reason| BackendError::InvalidVolumeId {
            id: shorten(id),
            reason,
        };
        if id.len() != VOLUME_ID_LEN {
            return Err(invalid("wrong length"));
        }
        let Some(hash) = id.strip_prefix(VOLUME_ID_PREFIX) else {
            return Err(invalid("missing the hf- prefix"));
        };
        if !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("not lowercase hex after the prefix"));
        }
        Ok(VolumeId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Error messages quote at most this much of a rejected id.
fn shorten(id: &str) -> String {
    id.chars().take(80).collect()
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({})", self.0)
    }
}

impl TryFrom<String> for VolumeId {
    type Error = BackendError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        VolumeId::parse(&s)
    }
}

impl From<VolumeId> for String {
    fn from(id: VolumeId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> VolumeName {
        VolumeName::parse(s).unwrap()
    }

    #[test]
    fn id_is_stable_and_parses_back() {
        let a = VolumeId::for_name(&name("pvc-1234"));
        assert_eq!(a, VolumeId::for_name(&name("pvc-1234")));
        assert_ne!(a, VolumeId::for_name(&name("pvc-1235")));
        assert_eq!(a.as_str().len(), VOLUME_ID_LEN);
        assert_eq!(VolumeId::parse(a.as_str()).unwrap(), a);
    }

    #[test]
    fn hostile_names_still_give_safe_ids() {
        for n in ["../../etc", "/", "a/b", ".", "..", "x\ny"] {
            let id = VolumeId::for_name(&name(n));
            assert!(VolumeId::parse(id.as_str()).is_ok());
            assert!(!id.as_str().contains('/') && !id.as_str().contains(".."));
        }
    }

    #[test]
    fn parse_rejects_every_escape_and_malformation() {
        let good = VolumeId::for_name(&name("x")).0;
        let cases = [
            String::new(),
            "..".into(),
            ".".into(),
            "/".into(),
            "/etc/passwd".into(),
            "../../../../etc".into(),
            format!("hf-../{}", &good[6..]),
            format!("{}/..", &good[..VOLUME_ID_LEN - 3]),
            format!("{}\0", &good[..VOLUME_ID_LEN - 1]),
            format!("{good}0"),
            good[..VOLUME_ID_LEN - 1].to_string(),
            good.to_uppercase(),
            format!("xx-{}", &good[3..]),
            format!("hf-{}g", &good[3..VOLUME_ID_LEN - 1]),
            "hf-".repeat(1000),
            format!("{}é", &good[..VOLUME_ID_LEN - 2]),
        ];
        for case in cases {
            let err = VolumeId::parse(&case).unwrap_err();
            assert!(
                matches!(err, BackendError::InvalidVolumeId { .. }),
                "{case:?}"
            );
        }
    }

    #[test]
    fn ids_deserialize_only_when_valid() {
        let ok: VolumeId =
            serde_json::from_str(&format!("{:?}", VolumeId::for_name(&name("a")).0)).unwrap();
        assert_eq!(ok, VolumeId::for_name(&name("a")));
        assert!(serde_json::from_str::<VolumeId>("\"../x\"").is_err());
    }

    #[test]
    fn names_are_validated() {
        assert!(VolumeName::parse("pvc-0b5e-ok with space\tand tab").is_ok());
        assert!(VolumeName::parse(&"a".repeat(MAX_NAME_BYTES)).is_ok());
        for bad in [
            String::new(),
            "a".repeat(MAX_NAME_BYTES + 1),
            "a\0b".into(),
            "a\u{1b}b".into(),
            "\u{85}".into(),
        ] {
            assert!(
                matches!(
                    VolumeName::parse(&bad),
                    Err(BackendError::InvalidName { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
