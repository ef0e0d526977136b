//! [`TimedStore`]: the lease store with every call's latency recorded in
//! `holdfast_controller_store_call_seconds` (by operation and outcome). It passes every
//! call and answer through unchanged.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use holdfast_core::lease::{ClaimRecord, NodeFence, SessionKey, SessionRecord};
use holdfast_core::store::{LeaseStore, StoreError, Version, Versioned};

use crate::metrics::observe_store_call;

pub struct TimedStore {
    inner: Arc<dyn LeaseStore>,
}

impl TimedStore {
    pub fn wrap(inner: Arc<dyn LeaseStore>) -> Arc<dyn LeaseStore> {
        Arc::new(TimedStore { inner })
    }
}

async fn timed<T>(
    op: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let start = Instant::now();
    let result = call.await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(StoreError::Conflict { .. }) => "conflict",
        Err(StoreError::Unavailable(_)) => "unavailable",
        Err(_) => "error",
    };
    observe_store_call(op, outcome, start.elapsed().as_secs_f64());
    result
}

#[async_trait]
impl LeaseStore for TimedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn get_session(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Versioned<SessionRecord>>, StoreError> {
        timed("get_session", self.inner.get_session(key)).await
    }

    async fn list_sessions(&self, node: &str) -> Result<Vec<Versioned<SessionRecord>>, StoreError> {
        timed("list_sessions", self.inner.list_sessions(node)).await
    }

    async fn put_session(
        &self,
        record: &SessionRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        timed("put_session", self.inner.put_session(record, expected)).await
    }

    async fn delete_session(&self, key: &SessionKey, expected: &Version) -> Result<(), StoreError> {
        timed("delete_session", self.inner.delete_session(key, expected)).await
    }

    async fn get_claim(
        &self,
        volume_id: &str,
    ) -> Result<Option<Versioned<ClaimRecord>>, StoreError> {
        timed("get_claim", self.inner.get_claim(volume_id)).await
    }

    async fn list_claims(&self) -> Result<Vec<Versioned<ClaimRecord>>, StoreError> {
        timed("list_claims", self.inner.list_claims()).await
    }

    async fn list_claims_of_node(
        &self,
        node: &str,
    ) -> Result<Vec<Versioned<ClaimRecord>>, StoreError> {
        timed("list_claims_of_node", self.inner.list_claims_of_node(node)).await
    }

    async fn put_claim(
        &self,
        record: &ClaimRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        timed("put_claim", self.inner.put_claim(record, expected)).await
    }

    async fn delete_claim(&self, volume_id: &str, expected: &Version) -> Result<(), StoreError> {
        timed("delete_claim", self.inner.delete_claim(volume_id, expected)).await
    }

    async fn get_fence(&self, node: &str) -> Result<Option<Versioned<NodeFence>>, StoreError> {
        timed("get_fence", self.inner.get_fence(node)).await
    }

    async fn put_fence(
        &self,
        record: &NodeFence,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        timed("put_fence", self.inner.put_fence(record, expected)).await
    }

    async fn delete_fence(&self, node: &str, expected: &Version) -> Result<(), StoreError> {
        timed("delete_fence", self.inner.delete_fence(node, expected)).await
    }
}
