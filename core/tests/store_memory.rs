//! The in-memory store passes the store conformance suite, and its fault switch makes
//! it behave like an unreachable remote store.

use std::sync::Arc;

use holdfast_core::lease::ClaimState;
use holdfast_core::store::{LeaseStore, MemoryStore, StoreError};
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
