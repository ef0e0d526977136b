//! [`EtcdStore`]: the lease store on etcd v3, for large clusters and for orchestrators
//! other than Kubernetes.
//!
//! Keys (every component escaped by [`codec::escape_component`], so a `/` in a name
//! can never reach another record's key):
//! - `<prefix>sessions/<node>/<instance>`
//! - `<prefix>claims/<volume>`
//! - `<prefix>fences/<node>`
//!
//! with `<prefix>` = `/holdfast/` by default. Values are the JSON of [`codec`].
//!
//! Every write is one transaction guarded by a compare: a create requires
//! `create_revision(key) == 0` (absent), an update or delete requires
//! `mod_revision(key) == expected`. A record's version is its mod revision in decimal;
//! etcd revisions are global and only increase, so a version is never reused, even
//! when a record is deleted and created again.
//!
//! Every call is bounded by the configured timeout (default 2 s): a partitioned or
//! paused etcd yields [`StoreError::Unavailable`] in bounded time instead of hanging
//! a CSI call. A write that timed out may still have been applied.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

use crate::lease::{ClaimRecord, NodeFence, SessionKey, SessionRecord};
use crate::store::codec::{self, check_key, escape_component, RecordKey, StoredRecord};
use crate::store::{LeaseStore, StoreError, Version, Versioned};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/holdfast/";
/// The default bound on one store call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct EtcdStoreConfig {
    /// e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prepended to every key; should end with `/`.
    pub prefix: String,
    /// Bound on every store call, connection set-up included.
    pub timeout: Duration,
}

impl EtcdStoreConfig {
    /// `endpoints` with the default prefix and timeout.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// A [`LeaseStore`] on etcd. Cheap to clone (the connection is shared).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    timeout: Duration,
}

impl EtcdStore {
    /// Sets up the connection. etcd connects lazily: an unreachable etcd is reported by
    /// the first call, as `Unavailable`, not here.
    pub async fn connect(config: EtcdStoreConfig) -> Result<Self, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoints given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(config.timeout, config.timeout);
        let client = bounded(
            config.timeout,
            "connect",
            Client::connect(&config.endpoints, Some(options)),
        )
        .await?;
        Ok(Self {
            client,
            prefix: config.prefix,
            timeout: config.timeout,
        })
    }

    /// The etcd key of a record.
    pub fn etcd_key(&self, key: &RecordKey) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn get_record<T: StoredRecord>(
        &self,
        key: RecordKey,
    ) -> Result<Option<Versioned<T>>, StoreError> {
        check_key(&key)?;
        let etcd_key = self.etcd_key(&key);
        let mut kv = self.client.kv_client();
        let response = bounded(self.timeout, "get", kv.get(etcd_key.as_str(), None)).await?;
        let Some(found) = response.kvs().first() else {
            return Ok(None);
        };
        let value = codec::decode(found.value(), &key, &etcd_key)?;
        Ok(Some(Versioned {
            value,
            version: Version(found.mod_revision().to_string()),
        }))
    }

    /// Every record under `key_prefix`; one malformed record fails the whole list.
    async fn list_records<T: StoredRecord>(
        &self,
        key_prefix: String,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        let mut kv = self.client.kv_client();
        let options = GetOptions::new().with_prefix();
        let response = bounded(
            self.timeout,
            "list",
            kv.get(key_prefix.as_str(), Some(options)),
        )
        .await?;
        response
            .kvs()
            .iter()
            .map(|found| {
                let etcd_key = String::from_utf8_lossy(found.key()).into_owned();
                let value = codec::decode_listed(found.value(), &etcd_key, |k| self.etcd_key(k))?;
                Ok(Versioned {
                    value,
                    version: Version(found.mod_revision().to_string()),
                })
            })
            .collect()
    }

    async fn put_record<T: StoredRecord>(
        &self,
        record: &T,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        let bytes = codec::encode(record)?;
        let key = record.record_key();
        let etcd_key = self.etcd_key(&key);
        let guard = match expected {
            None => Compare::create_revision(etcd_key.as_str(), CompareOp::Equal, 0),
            Some(v) => {
                Compare::mod_revision(etcd_key.as_str(), CompareOp::Equal, revision(v, &key)?)
            }
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(etcd_key.as_str(), bytes, None)]);
        let mut kv = self.client.kv_client();
        let response = bounded(self.timeout, "put", kv.txn(txn)).await?;
        if !response.succeeded() {
            return Err(conflict(&key));
        }
        // The transaction's revision is the mod revision of the key it wrote.
        let header = response
            .header()
            .ok_or_else(|| StoreError::Backend("etcd txn response without header".into()))?;
        Ok(Version(header.revision().to_string()))
    }

    async fn delete_record(&self, key: RecordKey, expected: &Version) -> Result<(), StoreError> {
        check_key(&key)?;
        let etcd_key = self.etcd_key(&key);
        let guard = Compare::mod_revision(
            etcd_key.as_str(),
            CompareOp::Equal,
            revision(expected, &key)?,
        );
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::delete(etcd_key.as_str(), None)]);
        let mut kv = self.client.kv_client();
        let response = bounded(self.timeout, "delete", kv.txn(txn)).await?;
        if response.succeeded() {
            Ok(())
        } else {
            Err(conflict(&key))
        }
    }
}

fn conflict(key: &RecordKey) -> StoreError {
    StoreError::Conflict {
        key: key.to_string(),
    }
}

/// The mod revision a version names. An absent key has mod revision 0, so a version
/// `0` (or anything not a positive number, e.g. another backend's version) would turn a
/// conditional update into a blind create: it is refused as a conflict instead.
fn revision(version: &Version, key: &RecordKey) -> Result<i64, StoreError> {
    match version.0.parse::<i64>() {
        Ok(r) if r > 0 => Ok(r),
        _ => Err(conflict(key)),
    }
}

/// Runs one etcd call within `timeout`, mapping its failure.
async fn bounded<T>(
    timeout: Duration,
    what: &str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd {what} did not answer within {timeout:?}"
        ))),
        Ok(Err(e)) => Err(map_error(what, e)),
        Ok(Ok(v)) => Ok(v),
    }
}

fn map_error(what: &str, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    match &e {
        E::TransportError(_) | E::IoError(_) => {
            StoreError::Unavailable(format!("etcd {what}: {e}"))
        }
        E::GRpcStatus(status)
            if matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::ResourceExhausted
                    | Code::Unknown
            ) =>
        {
            StoreError::Unavailable(format!("etcd {what}: {e}"))
        }
        _ => StoreError::Backend(format!("etcd {what}: {e}")),
    }
}

#[async_trait]
impl LeaseStore for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn get_session(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Versioned<SessionRecord>>, StoreError> {
        self.get_record(RecordKey::Session(key.clone())).await
    }

    async fn list_sessions(&self, node: &str) -> Result<Vec<Versioned<SessionRecord>>, StoreError> {
        let prefix = format!("{}sessions/{}/", self.prefix, escape_component(node));
        self.list_records(prefix).await
    }

    async fn put_session(
        &self,
        record: &SessionRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        self.put_record(record, expected).await
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
        self.list_records(format!("{}claims/", self.prefix)).await
    }

    async fn put_claim(
        &self,
        record: &ClaimRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        self.put_record(record, expected).await
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
        self.put_record(record, expected).await
    }

    async fn delete_fence(&self, node: &str, expected: &Version) -> Result<(), StoreError> {
        self.delete_record(RecordKey::Fence(node.to_string()), expected)
            .await
    }
}
