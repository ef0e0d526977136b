//! [`KubernetesStore`]: the lease store on `coordination.k8s.io/v1` Lease objects — the
//! in-cluster default.
//!
//! Objects, all in one namespace (configurable; the chart uses the release namespace):
//!
//! | record  | object name                                  | `holdfast.csi.dev/kind` |
//! |---------|----------------------------------------------|-------------------------|
//! | session | `holdfast-session-<node>-<hash>`              | `session`               |
//! | claim   | `holdfast-claim-<volume>-<hash>`              | `claim`                 |
//! | fence   | `holdfast-fence-<node>-<hash>`                | `fence`                 |
//!
//! `<node>` / `<volume>` is a readable, lowercased, shortened form of the name (only for
//! humans running `kubectl get leases`); `<hash>` is the first 16 hex digits of the
//! SHA-256 of the record's key (see [`RecordKey`]), which makes names stable, unique and
//! DNS-1123-safe whatever characters or length a volume id has. Should two keys ever
//! share a name, the record found there describes the other key and reads back as
//! `Malformed` — refused, never mistaken for the other record.
//!
//! Labels: `app.kubernetes.io/managed-by: holdfast`, `holdfast.csi.dev/kind`, and
//! `holdfast.csi.dev/node: <node>` (the session's or fence's node, the claim holder's
//! node) when the node name is a valid label value. The record itself is the JSON of
//! [`codec`] in the annotation `holdfast.csi.dev/record`; the Lease `spec`
//! (holderIdentity, leaseDurationSeconds, renewTime, leaseTransitions = epoch) is
//! filled for humans only and never read: its times come from another machine's clock.
//!
//! Compare-and-swap, with the object's resourceVersion as the version:
//! - "must not exist": create (409 AlreadyExists → `Conflict`); a create never
//!   overwrites.
//! - "must be at version v": a JSON merge patch that carries
//!   `metadata.resourceVersion: v` (409 → `Conflict`; 404 → `Conflict`). Not a PUT:
//!   Lease objects allow create-on-update, so a PUT naming a resourceVersion re-creates
//!   a Lease that someone deleted — a late renewal would resurrect the session a
//!   timeout takeover deleted. A patch never creates (the API server answers 404 for a
//!   patch of a missing object, whatever the resource), and the resourceVersion inside
//!   it is checked in the same storage transaction as the write. (A JSON patch `test`
//!   op would also be atomic, but its failure is a 422 that cannot be told apart from a
//!   malformed patch.)
//! - delete: `preconditions.resourceVersion` (409 or 404 → `Conflict`), so it never
//!   deletes a newer object.
//!
//! An empty expected version is refused as a `Conflict`: the API server would treat it
//! as "no precondition", a blind write.
//!
//! Errors: 429 and 5xx, connection failures and calls exceeding the timeout (default
//! 2 s) are `Unavailable` (kube's client retries a 429 or 503 with backoff by itself;
//! the timeout bounds the call with its retries); other API errors (e.g. 403) are `Backend`.
//!
//! RBAC the node plugin and controller need, in the store's namespace:
//! `coordination.k8s.io` `leases`: get, list, create, patch, delete (no update: the
//! store never PUTs; no watch — the controller's expiry sweep adds `watch` for its
//! session watch, see [`decode_session`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};

use crate::lease::{ClaimRecord, NodeFence, SessionKey, SessionRecord};
use crate::store::codec::{self, check_key, RecordKey, StoredRecord};
use crate::store::{LeaseStore, StoreError, Version, Versioned};

mod names;

pub use names::{is_label_value, object_name};

pub const RECORD_ANNOTATION: &str = "holdfast.csi.dev/record";
pub const KIND_LABEL: &str = "holdfast.csi.dev/kind";
pub const NODE_LABEL: &str = "holdfast.csi.dev/node";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "holdfast";
/// The default bound on one store call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Objects per page of a list (see [`KubernetesStore::with_page_size`]).
pub const LIST_PAGE_SIZE: u32 = 500;

/// A [`LeaseStore`] on Lease objects in one namespace. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesStore {
    leases: Api<Lease>,
    namespace: String,
    timeout: Duration,
    page_size: u32,
}

impl KubernetesStore {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            leases: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            timeout: DEFAULT_TIMEOUT,
            page_size: LIST_PAGE_SIZE,
        }
    }

    /// Bounds every call by `timeout` instead of [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Lists in pages of `size` objects (at least 1) instead of [`LIST_PAGE_SIZE`].
    pub fn with_page_size(mut self, size: u32) -> Self {
        self.page_size = size.max(1);
        self
    }

    /// Connects with the in-cluster (or `KUBECONFIG`) configuration.
    pub async fn connect(namespace: &str) -> Result<Self, StoreError> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| StoreError::Backend(format!("kubernetes client configuration: {e}")))?;
        Ok(Self::new(client, namespace))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn get_record<T: StoredRecord>(
        &self,
        key: RecordKey,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        check_key(&key)?;
        let name = object_name(&key);
        let Some(lease) = self
            .bounded("get", None, self.leases.get_opt(&name))
            .await?
        else {
            return Ok(None);
        };
        let (bytes, version) = record_of(&lease, &name)?;
        let value = codec::decode(bytes.as_bytes(), &key, &name)?;
        Ok(Some(Versioned { value, version }))
    }

    /// Every record of `kind` that also matches `selector` (label selector terms, if
    /// any); one malformed object fails the whole list.
    ///
    /// Read in pages of [`LIST_PAGE_SIZE`] objects with continue tokens, each page
    /// decoded and dropped before the next is asked for, so the list never holds every
    /// object's JSON (and managedFields) at once. The API server answers every page of
    /// one list from the same resourceVersion, so the result is the snapshot one
    /// unpaged list would have read. The whole list, every page, is bounded by the
    /// store's timeout; a continue token that expired (410 Gone, after an etcd
    /// compaction) starts the list again from the first page.
    async fn list_records<T: StoredRecord>(
        &self,
        kind: &str,
        selector: Option<&str>,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        let mut selector_all = kind_selector(kind);
        if let Some(terms) = selector {
            selector_all.push(',');
            selector_all.push_str(terms);
        }
        let selector = selector_all;
        let pages = async {
            let mut restarts = 0;
            'list: loop {
                let mut records = Vec::new();
                let mut token: Option<String> = None;
                loop {
                    let mut params = ListParams::default()
                        .labels(&selector)
                        .limit(self.page_size);
                    if let Some(t) = &token {
                        params = params.continue_token(t);
                    }
                    let page = match self.leases.list(&params).await {
                        Ok(page) => page,
                        Err(kube::Error::Api(status))
                            if status.code == 410 && token.is_some() && restarts < 3 =>
                        {
                            restarts += 1;
                            continue 'list;
                        }
                        Err(e) => return Err(map_error("list", e)),
                    };
                    records.reserve(page.items.len());
                    for lease in &page.items {
                        let name = lease.metadata.name.as_deref().unwrap_or_default();
                        let (bytes, version) = record_of(lease, name)?;
                        let value = codec::decode_listed(bytes.as_bytes(), name, object_name)?;
                        records.push(Versioned { value, version });
                    }
                    token = page.metadata.continue_.filter(|t| !t.is_empty());
                    if token.is_none() {
                        return Ok(records);
                    }
                }
            }
        };
        match tokio::time::timeout(self.timeout, pages).await {
            Err(_) => Err(StoreError::Unavailable(format!(
                "kubernetes list did not answer within {:?}",
                self.timeout
            ))),
            Ok(result) => result,
        }
    }

    async fn put_record<T: StoredRecord>(
        &self,
        record: &T,
        expected: Option<&Version>,
        node: &str,
        spec: LeaseSpec,
    ) -> Result<Version, StoreError> {
        let json = codec::encode(record)?;
        let key = record.record_key();
        let name = object_name(&key);
        let mut labels = BTreeMap::from([
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
            (KIND_LABEL.to_string(), key.kind().to_string()),
        ]);
        if is_label_value(node) {
            labels.insert(NODE_LABEL.to_string(), node.to_string());
        }
        let json = String::from_utf8(json).expect("serde_json writes UTF-8");
        let written = match expected {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(self.namespace.clone()),
                        labels: Some(labels),
                        annotations: Some(BTreeMap::from([(RECORD_ANNOTATION.to_string(), json)])),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                let pp = PostParams::default();
                let call = self.leases.create(&pp, &lease);
                self.bounded("create", Some(&key), call).await?
            }
            Some(v) => {
                let patch = conditional_patch(&non_empty(v, &key)?, labels, node, json, &spec);
                let (pp, patch) = (PatchParams::default(), Patch::Merge(&patch));
                let call = self.leases.patch(&name, &pp, &patch);
                self.bounded("patch", Some(&key), call).await?
            }
        };
        written
            .metadata
            .resource_version
            .map(Version)
            .ok_or_else(|| StoreError::Backend(format!("{name}: written without resourceVersion")))
    }

    async fn delete_record(&self, key: RecordKey, expected: &Version) -> Result<(), StoreError> {
        check_key(&key)?;
        let name = object_name(&key);
        let params = DeleteParams::default().preconditions(Preconditions {
            resource_version: Some(non_empty(expected, &key)?),
            uid: None,
        });
        self.bounded("delete", Some(&key), self.leases.delete(&name, &params))
            .await?;
        Ok(())
    }

    /// Runs one API call within the timeout. `conditional_on` names the record of a
    /// conditional write: for it, 404 and 409 both mean "not at the version the writer
    /// named" and become `Conflict`.
    async fn bounded<T>(
        &self,
        what: &str,
        conditional_on: Option<&RecordKey>,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(StoreError::Unavailable(format!(
                "kubernetes {what} did not answer within {:?}",
                self.timeout
            ))),
            Ok(Err(kube::Error::Api(status)))
                if conditional_on.is_some() && matches!(status.code, 404 | 409) =>
            {
                Err(StoreError::Conflict {
                    key: conditional_on.map(|k| k.to_string()).unwrap_or_default(),
                })
            }
            Ok(Err(e)) => Err(map_error(what, e)),
            Ok(Ok(v)) => Ok(v),
        }
    }
}

/// The merge patch of a write conditioned on `version`: every field the store owns is
/// set (or removed, with `null`), so the object reads back exactly as a create would
/// have made it, and `metadata.resourceVersion` makes the write conditional.
fn conditional_patch(
    version: &str,
    mut labels: BTreeMap<String, String>,
    node: &str,
    record_json: String,
    spec: &LeaseSpec,
) -> serde_json::Value {
    let mut label_patch: serde_json::Map<String, serde_json::Value> = labels
        .iter_mut()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(std::mem::take(v))))
        .collect();
    if !is_label_value(node) {
        // The previous holder's node label must not outlive its claim.
        label_patch.insert(NODE_LABEL.to_string(), serde_json::Value::Null);
    }
    let mut spec_patch = serde_json::to_value(spec).expect("a LeaseSpec serializes");
    for field in [
        "acquireTime",
        "holderIdentity",
        "leaseDurationSeconds",
        "leaseTransitions",
        "renewTime",
    ] {
        spec_patch
            .as_object_mut()
            .expect("a LeaseSpec is an object")
            .entry(field)
            .or_insert(serde_json::Value::Null);
    }
    serde_json::json!({
        "metadata": {
            "resourceVersion": version,
            "labels": label_patch,
            "annotations": { RECORD_ANNOTATION: record_json },
        },
        "spec": spec_patch,
    })
}

/// The label selector of every Lease this store writes for records of `kind`
/// (`session`, `claim`, `fence`), as its lists use it (and a watch of them can).
pub fn kind_selector(kind: &str) -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{KIND_LABEL}={kind}")
}

/// The session record a Lease object carries, with its resourceVersion as the version,
/// decoded and checked exactly as a list of sessions decodes it (for a watch of the
/// session Leases).
pub fn decode_session(lease: &Lease) -> Result<Versioned<SessionRecord>, StoreError> {
    let name = lease.metadata.name.as_deref().unwrap_or_default();
    let (bytes, version) = record_of(lease, name)?;
    let value = codec::decode_listed(bytes.as_bytes(), name, object_name)?;
    Ok(Versioned { value, version })
}

fn record_of(lease: &Lease, name: &str) -> Result<(String, Version), StoreError> {
    let json = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RECORD_ANNOTATION))
        .ok_or_else(|| StoreError::Malformed {
            key: name.to_string(),
            reason: format!("no {RECORD_ANNOTATION} annotation"),
        })?;
    let version = lease
        .metadata
        .resource_version
        .clone()
        .ok_or_else(|| StoreError::Backend(format!("{name}: no resourceVersion")))?;
    Ok((json.clone(), Version(version)))
}

fn non_empty(version: &Version, key: &RecordKey) -> Result<String, StoreError> {
    if version.0.is_empty() {
        return Err(StoreError::Conflict {
            key: key.to_string(),
        });
    }
    Ok(version.0.clone())
}

fn map_error(what: &str, e: kube::Error) -> StoreError {
    match &e {
        kube::Error::Api(status) => match status.code {
            429 | 500..=599 => StoreError::Unavailable(format!("kubernetes {what}: {e}")),
            _ => StoreError::Backend(format!("kubernetes {what}: {e}")),
        },
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            StoreError::Unavailable(format!("kubernetes {what}: {e}"))
        }
        _ => StoreError::Backend(format!("kubernetes {what}: {e}")),
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

#[async_trait]
impl LeaseStore for KubernetesStore {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    async fn get_session(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Versioned<SessionRecord>>, StoreError> {
        self.get_record(RecordKey::Session(key.clone())).await
    }

    async fn list_sessions(&self, node: &str) -> Result<Vec<Versioned<SessionRecord>>, StoreError> {
        let selector = is_label_value(node).then(|| format!("{NODE_LABEL}={node}"));
        let all: Vec<Versioned<SessionRecord>> =
            self.list_records("session", selector.as_deref()).await?;
        Ok(all.into_iter().filter(|s| s.value.node == node).collect())
    }

    async fn put_session(
        &self,
        record: &SessionRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let spec = LeaseSpec {
            holder_identity: Some(format!("{}/{}", record.node, record.instance)),
            lease_duration_seconds: Some(
                record.duration_ms.div_ceil(1000).min(i32::MAX as u64) as i32
            ),
            renew_time: Some(now()),
            ..LeaseSpec::default()
        };
        self.put_record(record, expected, &record.node, spec).await
    }

    async fn delete_session(&self, key: &SessionKey, expected: &Version) -> Result<(), StoreError> {
        self.delete_record(RecordKey::Session(key.clone()), expected)
            .await
    }

    async fn get_claim(
        &self,
        volume_id: &str,
    ) -> Result<Option<Versioned<ClaimRecord>>, StoreError> {
        self.get_record(RecordKey::Claim(volume_id.to_string()))
            .await
    }

    async fn list_claims(&self) -> Result<Vec<Versioned<ClaimRecord>>, StoreError> {
        self.list_records("claim", None).await
    }

    /// Selected by the node label, which every claim Lease this store writes carries
    /// when the holder's node name is a label value (from the store's first version on:
    /// a create sets it, every conditional write sets or removes it with the record).
    /// A node name that is no label value selects every unlabelled claim instead. Either
    /// way the Leases without the label are read too and filtered by their record, so a
    /// claim whose label is missing (written by hand, say) is still found.
    async fn list_claims_of_node(
        &self,
        node: &str,
    ) -> Result<Vec<Versioned<ClaimRecord>>, StoreError> {
        let mut claims: Vec<Versioned<ClaimRecord>> = Vec::new();
        if is_label_value(node) {
            let labelled = format!("{NODE_LABEL}={node}");
            claims = self.list_records("claim", Some(&labelled)).await?;
        }
        let unlabelled = format!("!{NODE_LABEL}");
        let more: Vec<Versioned<ClaimRecord>> =
            self.list_records("claim", Some(&unlabelled)).await?;
        claims.retain(|c| c.value.holder.node == node);
        for claim in more.into_iter().filter(|c| c.value.holder.node == node) {
            // Read twice only if its label went between the two lists: keep the later.
            claims.retain(|c| c.value.volume_id != claim.value.volume_id);
            claims.push(claim);
        }
        Ok(claims)
    }

    async fn put_claim(
        &self,
        record: &ClaimRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let spec = LeaseSpec {
            holder_identity: Some(format!(
                "{}/{} ({:?})",
                record.holder.node, record.holder.pod_uid, record.state
            )),
            lease_transitions: Some(record.epoch.min(i32::MAX as u64) as i32),
            renew_time: Some(now()),
            ..LeaseSpec::default()
        };
        self.put_record(record, expected, &record.holder.node, spec)
            .await
    }

    async fn delete_claim(&self, volume_id: &str, expected: &Version) -> Result<(), StoreError> {
        self.delete_record(RecordKey::Claim(volume_id.to_string()), expected)
            .await
    }

    async fn get_fence(&self, node: &str) -> Result<Option<Versioned<NodeFence>>, StoreError> {
        self.get_record(RecordKey::Fence(node.to_string())).await
    }

    async fn put_fence(
        &self,
        record: &NodeFence,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let spec = LeaseSpec {
            holder_identity: Some(format!("fenced: {}", record.reason)),
            renew_time: Some(now()),
            ..LeaseSpec::default()
        };
        self.put_record(record, expected, &record.node, spec).await
    }

    async fn delete_fence(&self, node: &str, expected: &Version) -> Result<(), StoreError> {
        self.delete_record(RecordKey::Fence(node.to_string()), expected)
            .await
    }
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testkit::conformance;
    use crate::testkit::kube::{ControlPlane, ControlPlaneOptions};

    /// Every list of the suite spans pages of two objects: the continue tokens are
    /// followed to the end and the pages add up to the one snapshot.
    #[tokio::test]
    async fn conforms_on_a_real_api_server_with_lists_in_pages_of_two() {
        let options = ControlPlaneOptions::default();
        let Some(plane) = ControlPlane::start_or_skip("paged lists", options).await else {
            return;
        };
        plane.ensure_namespace("holdfast").await;
        let store = KubernetesStore::new(plane.admin().await, "holdfast")
            .with_timeout(Duration::from_secs(10))
            .with_page_size(2);
        conformance::run(Arc::new(store.clone())).await;
        assert!(
            store.list_claims().await.unwrap().len() > 2,
            "several pages"
        );
    }
}
