//! [`MemoryStore`]: the lease store of one process — the local demo, unit tests and
//! simulations.
//!
//! All records live in one `Arc<Mutex<..>>`; clones of a `MemoryStore` share them, so
//! several simulated nodes can race on one store. Versions are decimal strings of one
//! counter shared by all records, so a version is never reused: a record that is deleted
//! and created again never gets back a version a stale writer still holds.
//!
//! For fault tests, [`MemoryStore::set_unavailable`] makes every call fail with
//! [`StoreError::Unavailable`] until it is cleared, as a partitioned remote store would.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::lease::{ClaimRecord, NodeFence, SessionKey, SessionRecord};
use crate::store::codec::{check_for_write, check_key, RecordKey, StoredRecord};
use crate::store::{LeaseStore, StoreError, Version, Versioned};

#[derive(Default)]
struct Tables {
    /// The last version handed out; the next write gets `last_version + 1`.
    last_version: u64,
    sessions: BTreeMap<SessionKey, (SessionRecord, u64)>,
    claims: BTreeMap<String, (ClaimRecord, u64)>,
    fences: BTreeMap<String, (NodeFence, u64)>,
}

/// An in-process [`LeaseStore`]. Cheap to clone; clones share their records.
#[derive(Clone, Default)]
pub struct MemoryStore {
    tables: Arc<Mutex<Tables>>,
    unavailable: Arc<AtomicBool>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// While `true`, every call fails with [`StoreError::Unavailable`] and changes
    /// nothing.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Tables>, StoreError> {
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "memory store marked unavailable".into(),
            ));
        }
        // A panic while holding the lock cannot leave a half-written record: every
        // mutation below is a single map insert/remove.
        Ok(self.tables.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn version(v: u64) -> Version {
    Version(v.to_string())
}

fn matches(expected: &Version, current: u64) -> bool {
    expected.0 == current.to_string()
}

fn get<K: Ord, T: Clone>(map: &BTreeMap<K, (T, u64)>, key: &K) -> Option<Versioned<T>> {
    map.get(key).map(|(value, v)| Versioned {
        value: value.clone(),
        version: version(*v),
    })
}

/// The one compare-and-swap every put goes through.
fn put<K: Ord, T: StoredRecord>(
    last_version: &mut u64,
    map: &mut BTreeMap<K, (T, u64)>,
    key: K,
    record: &T,
    expected: Option<&Version>,
) -> Result<Version, StoreError> {
    check_for_write(record)?;
    let current = map.get(&key).map(|(_, v)| *v);
    let allowed = match (expected, current) {
        (None, None) => true,
        (Some(e), Some(c)) => matches(e, c),
        _ => false,
    };
    if !allowed {
        return Err(StoreError::Conflict {
            key: record.record_key().to_string(),
        });
    }
    *last_version += 1;
    map.insert(key, (record.clone(), *last_version));
    Ok(version(*last_version))
}

/// Deleting an absent record is a `Conflict`: the writer expected it at `expected`.
fn delete<K: Ord, T>(
    map: &mut BTreeMap<K, (T, u64)>,
    key: &K,
    record_key: &RecordKey,
    expected: &Version,
) -> Result<(), StoreError> {
    match map.get(key) {
        Some((_, current)) if matches(expected, *current) => {
            map.remove(key);
            Ok(())
        }
        _ => Err(StoreError::Conflict {
            key: record_key.to_string(),
        }),
    }
}

#[async_trait]
impl LeaseStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn get_session(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Versioned<SessionRecord>>, StoreError> {
        check_key(&RecordKey::Session(key.clone()))?;
        Ok(get(&self.lock()?.sessions, key))
    }

    async fn list_sessions(&self, node: &str) -> Result<Vec<Versioned<SessionRecord>>, StoreError> {
        let tables = self.lock()?;
        Ok(tables
            .sessions
            .iter()
            .filter(|(k, _)| k.node == node)
            .map(|(_, (value, v))| Versioned {
                value: value.clone(),
                version: version(*v),
            })
            .collect())
    }

    async fn put_session(
        &self,
        record: &SessionRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let tables = &mut *self.lock()?;
        put(
            &mut tables.last_version,
            &mut tables.sessions,
            record.key(),
            record,
            expected,
        )
    }

    async fn delete_session(&self, key: &SessionKey, expected: &Version) -> Result<(), StoreError> {
        let record_key = RecordKey::Session(key.clone());
        check_key(&record_key)?;
        delete(&mut self.lock()?.sessions, key, &record_key, expected)
    }

    async fn get_claim(
        &self,
        volume_id: &str,
    ) -> Result<Option<Versioned<ClaimRecord>>, StoreError> {
        check_key(&RecordKey::Claim(volume_id.to_string()))?;
        Ok(get(&self.lock()?.claims, &volume_id.to_string()))
    }

    async fn list_claims(&self) -> Result<Vec<Versioned<ClaimRecord>>, StoreError> {
        let tables = self.lock()?;
        Ok(tables
            .claims
            .values()
            .map(|(value, v)| Versioned {
                value: value.clone(),
                version: version(*v),
            })
            .collect())
    }

    async fn put_claim(
        &self,
        record: &ClaimRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let tables = &mut *self.lock()?;
        put(
            &mut tables.last_version,
            &mut tables.claims,
            record.volume_id.clone(),
            record,
            expected,
        )
    }

    async fn delete_claim(&self, volume_id: &str, expected: &Version) -> Result<(), StoreError> {
        let record_key = RecordKey::Claim(volume_id.to_string());
        check_key(&record_key)?;
        delete(
            &mut self.lock()?.claims,
            &volume_id.to_string(),
            &record_key,
            expected,
        )
    }

    async fn get_fence(&self, node: &str) -> Result<Option<Versioned<NodeFence>>, StoreError> {
        check_key(&RecordKey::Fence(node.to_string()))?;
        Ok(get(&self.lock()?.fences, &node.to_string()))
    }

    async fn put_fence(
        &self,
        record: &NodeFence,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let tables = &mut *self.lock()?;
        put(
            &mut tables.last_version,
            &mut tables.fences,
            record.node.clone(),
            record,
            expected,
        )
    }

    async fn delete_fence(&self, node: &str, expected: &Version) -> Result<(), StoreError> {
        let record_key = RecordKey::Fence(node.to_string());
        check_key(&record_key)?;
        delete(
            &mut self.lock()?.fences,
            &node.to_string(),
            &record_key,
            expected,
        )
    }
}
