//! The bytes a record is stored as, and the checks every record passes on its way in
//! and out of a store.
//!
//! Records are JSON. Every backend decodes through here, so the rules are the same
//! everywhere: a record must name a non-empty node / instance / volume, its state must
//! be one the protocol knows, and it must describe the key it was found under (a record
//! copied to the wrong key, or a hash collision in a backend's object names, must not be
//! mistaken for the record that belongs there). Anything else is
//! [`StoreError::Malformed`] — never "absent", because an absent claim is a free one.
//!
//! Writes are checked too: a store refuses to write a record that it would refuse to
//! read back (reported as `Malformed` with a reason starting "refusing to write").
//! Unknown JSON fields are accepted, so that a newer writer's additions do not make an
//! older reader see garbage.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::lease::{ClaimRecord, NodeFence, SessionKey, SessionRecord};
use crate::store::StoreError;

/// The logical key of a record, used in error messages and by backends to derive their
/// physical keys. Its `Display` form is `sessions/<node>/<instance>`, `claims/<volume>`
/// or `fences/<node>` with each component escaped by [`escape_component`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RecordKey {
    Session(SessionKey),
    Claim(String),
    Fence(String),
}

impl RecordKey {
    /// The kind of record: "session", "claim" or "fence".
    pub fn kind(&self) -> &'static str {
        match self {
            RecordKey::Session(_) => "session",
            RecordKey::Claim(_) => "claim",
            RecordKey::Fence(_) => "fence",
        }
    }
}

impl std::fmt::Display for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordKey::Session(k) => write!(
                f,
                "sessions/{}/{}",
                escape_component(&k.node),
                escape_component(&k.instance)
            ),
            RecordKey::Claim(v) => write!(f, "claims/{}", escape_component(v)),
            RecordKey::Fence(n) => write!(f, "fences/{}", escape_component(n)),
        }
    }
}

/// Escapes one key component so that it contains no `/` (and nothing but unreserved
/// ASCII): every byte outside `[A-Za-z0-9._~:@-]` becomes `%XX`. Injective, so two
/// different components never share a key, and `sessions/a/` can never be a prefix of
/// node `a/b`'s keys.
pub fn escape_component(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"._~:@-".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A record the stores know how to check against its key.
pub trait StoredRecord: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The key this record belongs under, derived from its content.
    fn record_key(&self) -> RecordKey;
    /// Content checks beyond what the types enforce. `Err` holds the reason.
    fn check(&self) -> Result<(), String>;
}

fn non_empty(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        Err(format!("{field} is empty"))
    } else {
        Ok(())
    }
}

impl StoredRecord for SessionRecord {
    fn record_key(&self) -> RecordKey {
        RecordKey::Session(self.key())
    }
    fn check(&self) -> Result<(), String> {
        non_empty("node", &self.node)?;
        non_empty("instance", &self.instance)
    }
}

impl StoredRecord for ClaimRecord {
    fn record_key(&self) -> RecordKey {
        RecordKey::Claim(self.volume_id.clone())
    }
    fn check(&self) -> Result<(), String> {
        non_empty("volume_id", &self.volume_id)?;
        non_empty("holder.node", &self.holder.node)?;
        non_empty("holder.instance", &self.holder.instance)
    }
}

impl StoredRecord for NodeFence {
    fn record_key(&self) -> RecordKey {
        RecordKey::Fence(self.node.clone())
    }
    fn check(&self) -> Result<(), String> {
        non_empty("node", &self.node)
    }
}

/// Checks a record a caller wants written; the error names the record's own key.
pub fn check_for_write<T: StoredRecord>(record: &T) -> Result<(), StoreError> {
    record.check().map_err(|reason| StoreError::Malformed {
        key: record.record_key().to_string(),
        reason: format!("refusing to write: {reason}"),
    })
}

/// Checks a key a caller wants to read or delete: empty components name no record.
pub fn check_key(key: &RecordKey) -> Result<(), StoreError> {
    let empty = match key {
        RecordKey::Session(k) => k.node.is_empty() || k.instance.is_empty(),
        RecordKey::Claim(v) => v.is_empty(),
        RecordKey::Fence(n) => n.is_empty(),
    };
    if empty {
        return Err(StoreError::Backend(format!(
            "invalid {} key {key}: empty component",
            key.kind()
        )));
    }
    Ok(())
}

/// Checks and serialises a record for writing.
pub fn encode<T: StoredRecord>(record: &T) -> Result<Vec<u8>, StoreError> {
    check_for_write(record)?;
    serde_json::to_vec(record).map_err(|e| StoreError::Backend(format!("encoding record: {e}")))
}

/// Decodes bytes found under `found_at` (the key the backend reached them by). `where_`
/// is the backend's physical location (etcd key, object name) for the error message.
pub fn decode<T: StoredRecord>(
    bytes: &[u8],
    found_at: &RecordKey,
    where_: &str,
) -> Result<T, StoreError> {
    let malformed = |reason: String| StoreError::Malformed {
        key: where_.to_string(),
        reason,
    };
    let record: T = serde_json::from_slice(bytes).map_err(|e| malformed(format!("{e}")))?;
    record.check().map_err(malformed)?;
    let own = record.record_key();
    if &own != found_at {
        return Err(malformed(format!(
            "record describes {own} but was found under {found_at}"
        )));
    }
    Ok(record)
}

/// Decodes bytes found while listing, where the key is known only as the backend saw
/// it: the record must be of kind `kind`, and re-deriving its physical location with
/// `locate` must give back `where_` exactly.
pub fn decode_listed<T: StoredRecord>(
    bytes: &[u8],
    where_: &str,
    locate: impl Fn(&RecordKey) -> String,
) -> Result<T, StoreError> {
    let malformed = |reason: String| StoreError::Malformed {
        key: where_.to_string(),
        reason,
    };
    let record: T = serde_json::from_slice(bytes).map_err(|e| malformed(format!("{e}")))?;
    record.check().map_err(malformed)?;
    let own = record.record_key();
    let expected_at = locate(&own);
    if expected_at != where_ {
        return Err(malformed(format!(
            "record describes {own} (stored at {expected_at}) but was found at {where_}"
        )));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{ClaimState, Holder};

    fn claim(volume: &str) -> ClaimRecord {
        ClaimRecord {
            volume_id: volume.into(),
            holder: Holder {
                node: "n1".into(),
                pod_uid: "p1".into(),
                instance: "i1".into(),
                pod: None,
            },
            state: ClaimState::Held,
            epoch: 3,
            expired: None,
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let c = claim("vol-1");
        let key = c.record_key();
        let bytes = encode(&c).unwrap();
        let back: ClaimRecord = decode(&bytes, &key, "k").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn escaping_keeps_slashes_out_of_components_and_is_injective() {
        assert_eq!(escape_component("a/b"), "a%2Fb");
        assert_eq!(escape_component("a%2Fb"), "a%252Fb");
        assert_eq!(escape_component("pvc-1.x_y"), "pvc-1.x_y");
        let a = RecordKey::Session(SessionKey {
            node: "a/b".into(),
            instance: "c".into(),
        });
        let b = RecordKey::Session(SessionKey {
            node: "a".into(),
            instance: "b/c".into(),
        });
        assert_ne!(a.to_string(), b.to_string());
        assert!(!a.to_string().starts_with("sessions/a/"));
    }

    #[test]
    fn garbage_bytes_are_malformed_with_the_location() {
        let key = RecordKey::Claim("v".into());
        match decode::<ClaimRecord>(b"{not json", &key, "/x/claims/v") {
            Err(StoreError::Malformed { key, .. }) => assert_eq!(key, "/x/claims/v"),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn unknown_state_is_malformed() {
        let key = RecordKey::Claim("v".into());
        let json = br#"{"volume_id":"v","holder":{"node":"n","pod_uid":"p","instance":"i"},"state":"stolen","epoch":1}"#;
        assert!(matches!(
            decode::<ClaimRecord>(json, &key, "k"),
            Err(StoreError::Malformed { .. })
        ));
    }

    #[test]
    fn empty_fields_are_malformed_on_read_and_refused_on_write() {
        let mut c = claim("v");
        c.holder.node.clear();
        let bytes = serde_json::to_vec(&c).unwrap();
        let key = RecordKey::Claim("v".into());
        assert!(matches!(
            decode::<ClaimRecord>(&bytes, &key, "k"),
            Err(StoreError::Malformed { .. })
        ));
        assert!(matches!(encode(&c), Err(StoreError::Malformed { .. })));
        let empty_volume = claim("");
        assert!(matches!(
            encode(&empty_volume),
            Err(StoreError::Malformed { .. })
        ));
    }

    #[test]
    fn record_under_the_wrong_key_is_malformed() {
        let bytes = encode(&claim("other")).unwrap();
        let key = RecordKey::Claim("v".into());
        assert!(matches!(
            decode::<ClaimRecord>(&bytes, &key, "k"),
            Err(StoreError::Malformed { .. })
        ));
        let listed = decode_listed::<ClaimRecord>(&bytes, "/p/claims/v", |k| format!("/p/{k}"));
        assert!(matches!(listed, Err(StoreError::Malformed { .. })));
        let ok = decode_listed::<ClaimRecord>(&bytes, "/p/claims/other", |k| format!("/p/{k}"));
        assert!(ok.is_ok());
    }

    #[test]
    fn the_expired_mark_round_trips_and_is_absent_when_unset() {
        use crate::lease::types::ExpiredMark;
        let plain = claim("v");
        let text = String::from_utf8(encode(&plain).unwrap()).unwrap();
        // Unset, the record is byte for byte what a writer without the field wrote.
        assert!(!text.contains("expired"), "{text}");
        let mut marked = claim("v");
        marked.expired = Some(ExpiredMark {
            at_unix_ms: 1_700_000_000_000,
            observed_by: "controller-0".into(),
            session_renewals: 41,
        });
        let key = marked.record_key();
        let back: ClaimRecord = decode(&encode(&marked).unwrap(), &key, "k").unwrap();
        assert_eq!(back, marked);
        // A record written before the field existed reads with no mark.
        let old = br#"{"volume_id":"v","holder":{"node":"n1","pod_uid":"p1","instance":"i1"},"state":"held","epoch":3}"#;
        let read: ClaimRecord = decode(old, &key, "k").unwrap();
        assert_eq!(read, plain);
    }

    #[test]
    fn unknown_fields_are_accepted() {
        let json = br#"{"node":"n","reason":"r","added_later":true}"#;
        let key = RecordKey::Fence("n".into());
        let f: NodeFence = decode(json, &key, "k").unwrap();
        assert_eq!(f.reason, "r");
    }
}
