//! [`StoreConfig`] and [`connect`]: how the binaries choose and open their lease store.

use std::sync::Arc;
use std::time::Duration;

use crate::store::etcd::{EtcdStore, EtcdStoreConfig, DEFAULT_PREFIX};
use crate::store::{KubernetesStore, LeaseStore, MemoryStore, StoreError};

/// Which lease store to use, and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process only: every `connect` makes a new, empty store. For one-process
    /// demos and tests; two processes never share it.
    Memory,
    /// An etcd cluster (see [`crate::store::etcd`] for the key layout).
    Etcd {
        endpoints: Vec<String>,
        /// Key prefix, e.g. [`DEFAULT_PREFIX`] (`/holdfast/`).
        prefix: String,
        /// Bound on every store call (e.g. [`crate::store::etcd::DEFAULT_TIMEOUT`]).
        timeout: Duration,
    },
    /// Lease objects in `namespace`, through the in-cluster (or `KUBECONFIG`) client
    /// configuration, with [`crate::store::kubernetes::DEFAULT_TIMEOUT`] per call.
    Kubernetes { namespace: String },
}

impl StoreConfig {
    /// etcd at `endpoints` with the default prefix and timeout.
    pub fn etcd(endpoints: Vec<String>) -> Self {
        StoreConfig::Etcd {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            timeout: crate::store::etcd::DEFAULT_TIMEOUT,
        }
    }
}

/// Opens the store `config` names. etcd connects lazily, so an unreachable etcd shows
/// up as `Unavailable` on the first call, not here; a missing Kubernetes client
/// configuration fails here.
pub async fn connect(config: StoreConfig) -> Result<Arc<dyn LeaseStore>, StoreError> {
    Ok(match config {
        StoreConfig::Memory => Arc::new(MemoryStore::new()),
        StoreConfig::Etcd {
            endpoints,
            prefix,
            timeout,
        } => Arc::new(
            EtcdStore::connect(EtcdStoreConfig {
                endpoints,
                prefix,
                timeout,
            })
            .await?,
        ),
        StoreConfig::Kubernetes { namespace } => {
            Arc::new(KubernetesStore::connect(&namespace).await?)
        }
    })
}
