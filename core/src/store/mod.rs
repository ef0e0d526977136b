//! Where the lease protocol keeps its records.
//!
//! The [`LeaseStore`] trait is deliberately dumb: get, list, and compare-and-swap puts
//! and deletes. Every write names the version it expects (or `None` for "must not
//! exist yet"); there are no blind writes, so two writers racing on one record can never
//! both win. Stores decode and validate what they read: a record that does not parse is
//! a [`StoreError::Malformed`], never a missing (free) one.
//!
//! Semantics every backend shares (checked by the conformance suite in
//! `testkit::conformance`):
//! - put with `None` on a present record, or with `Some(v)` on an absent record or one
//!   whose version is not `v` → [`StoreError::Conflict`];
//! - delete of an absent record → [`StoreError::Conflict`] (the writer expected it at a
//!   version; callers wanting idempotent deletes re-read and treat "absent" as done);
//! - every successful write returns a version never returned before for that record,
//!   even across delete and re-create;
//! - a write that fails with [`StoreError::Unavailable`] (timeout, lost connection) may
//!   or may not have been applied: re-read before deciding anything from it;
//! - a list that meets a malformed record fails with `Malformed`; it never skips it.
//! - a record that would not read back valid (empty node / instance / volume) is refused
//!   with `Malformed` ("refusing to write") and nothing is written; a key with an empty
//!   component is a `Backend` error.
//!
//! Backends: [`memory`], [`etcd`], [`kubernetes`]; [`codec`] holds the record encoding
//! and validation they share.

use async_trait::async_trait;

use crate::lease::{ClaimRecord, NodeFence, SessionKey, SessionRecord};

pub mod codec;
pub mod config;
pub mod etcd;
pub mod kubernetes;
pub mod memory;

pub use config::{connect, StoreConfig};
pub use etcd::{EtcdStore, EtcdStoreConfig};
pub use kubernetes::KubernetesStore;
pub use memory::MemoryStore;

/// A store's version of one record (etcd mod revision, Kubernetes resourceVersion, a
/// counter in memory). Opaque: only compared for equality.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(pub String);

/// A record as read, with the version a conditional write must name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: Version,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record changed (or exists, or is gone) since the version the writer named.
    #[error("conflict on {key}: the record changed since it was read")]
    Conflict { key: String },
    /// The store could not be reached or did not answer in time.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
    /// The stored bytes are not a valid record. Never treated as a free claim.
    #[error("malformed record at {key}: {reason}")]
    Malformed { key: String, reason: String },
    /// Anything else the backend reported.
    #[error("lease store error: {0}")]
    Backend(String),
}

/// Compare-and-swap storage for sessions, claims and node fences.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// A short name for logs and metrics: "memory", "etcd", "kubernetes".
    fn kind(&self) -> &'static str;

    async fn get_session(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Versioned<SessionRecord>>, StoreError>;
    /// Every session of one node (all instances).
    async fn list_sessions(&self, node: &str) -> Result<Vec<Versioned<SessionRecord>>, StoreError>;
    /// Creates (`expected == None`) or replaces (`expected == Some(v)`) a session.
    async fn put_session(
        &self,
        record: &SessionRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError>;
    async fn delete_session(&self, key: &SessionKey, expected: &Version) -> Result<(), StoreError>;

    async fn get_claim(
        &self,
        volume_id: &str,
    ) -> Result<Option<Versioned<ClaimRecord>>, StoreError>;
    async fn list_claims(&self) -> Result<Vec<Versioned<ClaimRecord>>, StoreError>;
    /// Every claim whose holder is on `node`, in any state: exactly the claims of
    /// [`list_claims`](Self::list_claims) with `holder.node == node`. Fencing relies on
    /// it missing none. The default filters `list_claims`; a backend that can select
    /// by node reads less.
    async fn list_claims_of_node(
        &self,
        node: &str,
    ) -> Result<Vec<Versioned<ClaimRecord>>, StoreError> {
        let all = self.list_claims().await?;
        Ok(all
            .into_iter()
            .filter(|c| c.value.holder.node == node)
            .collect())
    }
    async fn put_claim(
        &self,
        record: &ClaimRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError>;
    async fn delete_claim(&self, volume_id: &str, expected: &Version) -> Result<(), StoreError>;

    async fn get_fence(&self, node: &str) -> Result<Option<Versioned<NodeFence>>, StoreError>;
    async fn put_fence(
        &self,
        record: &NodeFence,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError>;
    async fn delete_fence(&self, node: &str, expected: &Version) -> Result<(), StoreError>;
}
