//! Assembling and running the node plugin process: logging, the backend, the CSI
//! services on one unix socket, and a graceful stop on SIGTERM/SIGINT.
//!
//! Normal mode serves Identity + Node. `--standalone` adds the Controller service over
//! the same backend root and an in-process memory lease store, so one process is a
//! complete single-machine CSI driver (demos, tests, csi-sanity).
//!
//! Identity advertises CONTROLLER_SERVICE in both modes: the spec asks every instance of
//! one plugin to report the same capabilities, and the holdfast controller (a separate
//! Deployment in a cluster) does serve it.
//!
//! On stop the socket is removed; published mounts stay where they are, because kubelet
//! owns them and a restarted plugin takes them over from the mount table.

use std::path::Path;
use std::sync::Arc;

use holdfast_core::backend::{Backend, BackendError};
use holdfast_core::csi::identity::{IdentityService, Readiness};
use holdfast_core::csi::serve::{self, CsiCallLog, ServeError};
use holdfast_core::logging::{self, LoggingError};
use holdfast_core::store::MemoryStore;
use tonic::transport::Server;

use crate::args::{Args, ArgsError, Config, LeaseStoreKind};
use crate::error::NodeError;
use crate::node::NodeService;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error(transparent)]
    Logging(#[from] LoggingError),
    #[error("cannot create state dir {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("backend root: {0}")]
    Backend(#[from] BackendError),
    #[error("node service: {0}")]
    Node(#[from] NodeError),
    #[error("--standalone runs the memory lease store only, not --lease-store {0}")]
    LeaseStoreUnavailable(String),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Parses nothing itself: resolves `args` against the environment, then runs until
/// SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<(), RunError> {
    let kube_node_name = std::env::var("KUBE_NODE_NAME")
        .ok()
        .filter(|s| !s.is_empty());
    let config = args.resolve(kube_node_name, hostname)?;
    logging::init(&config.log_level, config.log_format)?;
    run_config(config).await
}

/// Runs with an already checked configuration.
pub async fn run_config(config: Config) -> Result<(), RunError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| RunError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let backend = Arc::new(Backend::open(&config.backend_root)?);
    // Makes this node known to the controller (ControllerPublishVolume refuses others).
    backend.register_node(&config.node_id)?;
    // Claims are not taken on publish yet; the store is built here so the process
    // holds it for its whole life once they are. Standalone runs only the memory store.
    let _lease_store = match (config.standalone, config.lease_store) {
        (_, LeaseStoreKind::Memory) => Some(Arc::new(MemoryStore::new())),
        (true, other) => {
            let name = clap::ValueEnum::to_possible_value(&other)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            return Err(RunError::LeaseStoreUnavailable(name));
        }
        (false, _) => None,
    };
    let node = NodeService::new(config.node_id.clone(), backend.clone(), &config.state_dir)?;
    let readiness = Readiness::new();
    let identity = IdentityService::new(true, readiness.clone());

    tracing::info!(
        node_id = %config.node_id,
        backend_root = %backend.root().display(),
        standalone = config.standalone,
        lease_store = ?config.lease_store,
        "starting holdfast node plugin"
    );
    let router = Server::builder()
        .layer(CsiCallLog)
        .add_service(identity.into_server())
        .add_service(node.into_server());
    // The Controller of --standalone shares the node's Backend: one process, one
    // owner of the root.
    let router = if config.standalone {
        router.add_service(holdfast_controller::controller_service(backend.clone()))
    } else {
        router
    };
    readiness.set(true);
    serve::serve_unix(&config.endpoint, router, serve::shutdown_signal()).await?;
    Ok(())
}

/// The kernel's hostname: the default node id of `--standalone`.
fn hostname() -> Result<String, String> {
    let path = Path::new("/proc/sys/kernel/hostname");
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}
