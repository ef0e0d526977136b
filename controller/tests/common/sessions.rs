//! Node sessions on a real etcd, for the tests of the admin verbs (`fence`, `status`...):
//! real `SessionLease`s hold, release and lose the claims the binary reads and changes.

use std::sync::Arc;
use std::time::Duration;

use holdfast_core::lease::{LeaseParams, NodeIdentity, SessionLease};
use holdfast_core::store::LeaseStore;
use holdfast_core::testkit::etcd::EtcdServer;
use tempfile::TempDir;

/// D = 600 ms, ε = 1 %, margin = 150 ms: renewals (and fence checks) every 200 ms,
/// W = 756 ms.
pub fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_millis(600), 0.01, Duration::from_millis(150)).unwrap()
}

/// One etcd, its store under `prefix`, and a dir for the sessions' node-local state.
pub struct SessionCluster {
    pub etcd: EtcdServer,
    pub store: Arc<dyn LeaseStore>,
    pub dir: TempDir,
}

impl SessionCluster {
    pub async fn start(prefix: &str) -> SessionCluster {
        let etcd = EtcdServer::start();
        let store: Arc<dyn LeaseStore> = Arc::new(etcd.store(prefix).await);
        SessionCluster {
            etcd,
            store,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A node plugin's session for `node`, with its own state dir.
    pub async fn session(&self, node: &str) -> SessionLease {
        let state_dir = self.dir.path().join(node);
        std::fs::create_dir_all(&state_dir).unwrap();
        let identity = NodeIdentity::of_this_machine(node).unwrap();
        SessionLease::start(self.store.clone(), identity, params(), &state_dir)
            .await
            .unwrap()
    }
}
