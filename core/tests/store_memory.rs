//! The in-memory store passes the store conformance suite, and its fault switch makes
//! it behave like an unreachable remote store.

use std::sync::Arc;

use async_trait::async_trait;
use holdfast_core::lease::{ClaimRecord, ClaimState, NodeFence, SessionKey, SessionRecord};
use holdfast_core::store::{LeaseStore, MemoryStore, StoreError, Version, Versioned};
use holdfast_core::testkit::conformance;

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn clones_share_records() {
    let a = MemoryStore::new();
    let b = a.clone();
    let c = conformance::claim("v", "n1", ClaimState::Held, 1);
    let v = a.put_claim(&c, None).await.unwrap();
    assert_eq!(b.get_claim("v").await.unwrap().unwrap().version, v);
}

#[tokio::test]
async fn unavailable_store_fails_every_call_and_changes_nothing() {
    let store = MemoryStore::new();
    let c = conformance::claim("v", "n1", ClaimState::Held, 1);
    store.set_unavailable(true);
    assert!(matches!(
        store.put_claim(&c, None).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.list_claims().await,
        Err(StoreError::Unavailable(_))
    ));
    store.set_unavailable(false);
    assert!(store.get_claim("v").await.unwrap().is_none());
}

/// A store that ignores the expected version of claim updates: the lost-update bug the
/// suite exists to catch. If the suite passed it, it would prove nothing.
struct BlindClaimUpdates(MemoryStore);

#[async_trait]
impl LeaseStore for BlindClaimUpdates {
    fn kind(&self) -> &'static str {
        "blind"
    }
    async fn get_session(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Versioned<SessionRecord>>, StoreError> {
        self.0.get_session(key).await
    }
    async fn list_sessions(&self, node: &str) -> Result<Vec<Versioned<SessionRecord>>, StoreError> {
        self.0.list_sessions(node).await
    }
    async fn put_session(
        &self,
        record: &SessionRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        self.0.put_session(record, expected).await
    }
    async fn delete_session(&self, key: &SessionKey, expected: &Version) -> Result<(), StoreError> {
        self.0.delete_session(key, expected).await
    }
    async fn get_claim(
        &self,
        volume_id: &str,
    ) -> Result<Option<Versioned<ClaimRecord>>, StoreError> {
        self.0.get_claim(volume_id).await
    }
    async fn list_claims(&self) -> Result<Vec<Versioned<ClaimRecord>>, StoreError> {
        self.0.list_claims().await
    }
    async fn put_claim(
        &self,
        record: &ClaimRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let current = self
            .0
            .get_claim(&record.volume_id)
            .await?
            .map(|c| c.version);
        match (expected, current) {
            (Some(_), Some(current)) => self.0.put_claim(record, Some(&current)).await,
            _ => self.0.put_claim(record, expected).await,
        }
    }
    async fn delete_claim(&self, volume_id: &str, expected: &Version) -> Result<(), StoreError> {
        self.0.delete_claim(volume_id, expected).await
    }
    async fn get_fence(&self, node: &str) -> Result<Option<Versioned<NodeFence>>, StoreError> {
        self.0.get_fence(node).await
    }
    async fn put_fence(
        &self,
        record: &NodeFence,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        self.0.put_fence(record, expected).await
    }
    async fn delete_fence(&self, node: &str, expected: &Version) -> Result<(), StoreError> {
        self.0.delete_fence(node, expected).await
    }
}

#[tokio::test]
#[should_panic(expected = "put_claim with stale version")]
async fn conformance_suite_catches_blind_claim_updates() {
    conformance::run(Arc::new(BlindClaimUpdates(MemoryStore::new()))).await;
}
