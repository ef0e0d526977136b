//! Lease object names and label values: how a record's key becomes a stable,
//! DNS-1123-safe object name (see the table in [`super`]).

use sha2::{Digest, Sha256};

use crate::store::codec::RecordKey;

/// The Lease object name of a record: `holdfast-<kind>-<readable>-<hash>`.
pub fn object_name(key: &RecordKey) -> String {
    let readable = match key {
        RecordKey::Session(k) => &k.node,
        RecordKey::Claim(volume) => volume,
        RecordKey::Fence(node) => node,
    };
    let digest = Sha256::digest(key.to_string().as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let readable = readable_part(readable);
    if readable.is_empty() {
        format!("holdfast-{}-{hash}", key.kind())
    } else {
        format!("holdfast-{}-{readable}-{hash}", key.kind())
    }
}

/// Lowercase alphanumerics of `raw`, other runs of characters turned into one `-`, at
/// most 28 characters: names stay below 63 characters.
fn readable_part(raw: &str) -> String {
    let mut out = String::new();
    for c in raw.chars() {
        if out.len() >= 28 {
            break;
        }
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

/// A Kubernetes label value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
pub fn is_label_value(s: &str) -> bool {
    let alnum_ends = s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    s.len() <= 63
        && alnum_ends
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::SessionKey;

    #[test]
    fn names_are_dns_safe_short_stable_and_distinct() {
        let odd = RecordKey::Claim(format!("Ns/PVC_ü {}", "x".repeat(300)));
        let slash = RecordKey::Claim("a/b".into());
        let escaped = RecordKey::Claim("a%2Fb".into());
        for key in [&odd, &slash, &escaped] {
            let name = object_name(key);
            assert!(name.len() <= 63, "{name}");
            assert!(name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            assert!(!name.ends_with('-') && !name.contains("--"), "{name}");
            assert_eq!(name, object_name(key), "stable");
        }
        assert_ne!(object_name(&slash), object_name(&escaped));
        assert!(object_name(&slash).starts_with("holdfast-claim-a-b-"));
        let session = RecordKey::Session(SessionKey {
            node: "node-1".into(),
            instance: "i".into(),
        });
        assert!(object_name(&session).starts_with("holdfast-session-node-1-"));
        assert!(
            object_name(&RecordKey::Fence("node-1".into())).starts_with("holdfast-fence-node-1-")
        );
    }

    #[test]
    fn label_values() {
        assert!(is_label_value("node-1.example"));
        assert!(!is_label_value("a/b"));
        assert!(!is_label_value(""));
        assert!(!is_label_value("-a"));
        assert!(!is_label_value(&"a".repeat(64)));
    }
}
