//! The API server's audit log, read back: which identity made which call, and what it
//! was answered. Least-privilege tests compare it with the RBAC rules a chart grants.

use std::path::Path;

/// One request, as the API server recorded it (stage `ResponseComplete`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub user: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, …
    pub verb: String,
    /// API group; empty for the core group.
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The HTTP status code of the answer.
    pub code: u16,
}

/// Every resource request in the log at `path` (non-resource URLs such as `/readyz`
/// are left out). A missing log is empty.
pub fn read(path: &Path) -> Vec<AuditEntry> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["stage"] == "ResponseComplete" && e["objectRef"].is_object())
        .map(|e| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            let r = &e["objectRef"];
            AuditEntry {
                user: s(&e["user"]["username"]),
                verb: s(&e["verb"]),
                group: s(&r["apiGroup"]),
                resource: s(&r["resource"]),
                subresource: s(&r["subresource"]),
                namespace: s(&r["namespace"]),
                name: s(&r["name"]),
                code: e["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
            }
        })
        .collect()
}
