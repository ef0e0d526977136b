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
//! At start the node's lease session begins ([`SessionLease::start_with`], which takes
//! the node-local flock and frees or adopts the claims of predecessors proven dead);
//! without it the plugin refuses to serve. The enforcement task ([`crate::lock::enforcer`]),
//! the queue of releases to retry, and the watch of this node's pods that releases the
//! claims of gone pods kubelet did not unpublish ([`crate::lock::gone_pods`]) run beside
//! the gRPC server.
//!
//! On stop the socket is removed; published mounts stay where they are, because kubelet
//! owns them and a restarted plugin takes them over from the mount table. What that
//! means for the session is argued at the end of [`run_config`].
//!
//! After a crash (SIGKILL) the next instance on this node:
//! - rebuilds the table of targets from the mount table and the FUSE record;
//! - proves the dead instance gone by its flock, then releases its FUSE claims (their
//!   data path died with it: every operation on those targets fails with ENOTCONN) and
//!   adopts its bind claims at a new epoch, written to the storage, each with a gate;
//! - keeps the dead FUSE targets mounted and dead rather than unmounting them (an
//!   unmount would let the pod write into the bare target directory on the node's disk):
//!   NodeGetVolumeStats reports them abnormal, NodeUnpublishVolume removes them, and a
//!   republish of the same target replaces the dead mount after taking the claim again;
//! - tells each pod whose FUSE target died, by a Warning Event, and deletes it if it has
//!   a controller to recreate it ([`crate::publish::data_path_loss`], in a task of its
//!   own: serving never waits for the API server).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use holdfast_core::backend::{Backend, BackendError};
use holdfast_core::csi::identity::{IdentityService, Readiness};
use holdfast_core::csi::serve::{self, CsiCallLog, ServeError};
use holdfast_core::lease::recovery::DataPathSurvives;
use holdfast_core::lease::{DataPaths, LeaseError, NodeIdentity, SessionLease, SessionOptions};
use holdfast_core::logging::{self, LoggingError};
use holdfast_core::metrics_http;
use holdfast_core::store::{self, StoreError};
use tokio::sync::watch;
use tonic::transport::Server;

use crate::args::{Args, ArgsError, Config};
use crate::csi::error::NodeError;
use crate::csi::node::NodeService;
use crate::lock::claims::{self, ClaimBook};
use crate::lock::{enforcer, gone_pods, recovery};
use crate::metrics;
use crate::publish::data_path_loss;
use crate::publish::published::DataPathKind;
use crate::publish::publisher::Publisher;

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
    #[error("cannot open the lease store: {0}")]
    Store(#[from] StoreError),
    /// Without a session no claim can be taken or proven: the plugin refuses to serve.
    #[error("cannot start this node's lease session (is the lease store reachable?): {0}")]
    Session(#[source] LeaseError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// How long a stop waits for a release of a gone pod's claim in progress.
const GONE_PODS_STOP: std::time::Duration = std::time::Duration::from_secs(15);

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
    // The table first: it says which of a dead predecessor's claims still have a live
    // data path on this node (its bind mounts, kept by kubelet), which recovery must
    // adopt rather than release. Its FUSE targets died with it.
    let publisher = Arc::new(
        Publisher::new(backend.clone(), &config.state_dir)?
            .with_fuse_passthrough(config.fuse_passthrough),
    );
    let surviving: BTreeSet<String> = publisher
        .table()
        .entries()
        .filter(|(_, _, how)| how.kind == DataPathKind::Bind)
        .map(|(volume, _, _)| volume.to_string())
        .collect();
    let survives: DataPathSurvives = Arc::new(move |claim| surviving.contains(&claim.volume_id));
    // Before anything is served: every FUSE target in the table now was a predecessor's.
    let orphaned_fuse = publisher.orphaned_fuse_targets();
    // Bound before the session starts, so that a taken port stops the plugin before it
    // holds anything; the claim gauges appear once the book exists.
    let (stop_metrics, metrics_stopped) = watch::channel(false);
    let metrics_book = Arc::new(OnceLock::new());
    let metrics_task = match config.metrics_address {
        Some(address) => Some(
            metrics_http::serve(
                address,
                metrics::renderer(metrics_book.clone()),
                metrics_stopped,
            )
            .await
            .map_err(|source| RunError::Metrics { address, source })?,
        ),
        None => None,
    };
    let lease_store = store::connect(config.store.clone()).await?;
    let identity = NodeIdentity::of_this_machine(&config.node_id).map_err(RunError::Session)?;
    let session = SessionLease::start_with(
        lease_store,
        identity,
        config.lease_params,
        &config.state_dir,
        SessionOptions {
            data_path_survives: Some(survives),
        },
    )
    .await
    .map_err(RunError::Session)?;
    let session = Arc::new(session);
    recovery::log_report(session.recovery());
    let (book, release_queue) = ClaimBook::new(session.clone());
    let _ = metrics_book.set(book.clone());
    recovery::adopt_bind_claims(&book, &publisher, session.recovery()).await;
    // Runs to its end on its own; the process exiting first only cuts it short.
    tokio::spawn(data_path_loss::run(
        orphaned_fuse,
        config.node_id.clone(),
        config.restart_pods_on_data_path_loss,
    ));

    let (stop_enforcer, stopped) = watch::channel(false);
    let enforcer_task = tokio::spawn(enforcer::run(
        book.clone(),
        publisher.clone(),
        config.lease_params.renew_interval(),
        stopped,
    ));
    let retry_task = tokio::spawn(claims::run_release_retries(session.clone(), release_queue));
    // Off in standalone: no pods, no kubelet there.
    let mut gone_pods_task = tokio::spawn(gone_pods::run(
        book.clone(),
        publisher.clone(),
        config.node_id.clone(),
        if config.standalone {
            std::time::Duration::ZERO
        } else {
            config.release_gone_pods_after
        },
        stop_enforcer.subscribe(),
    ));

    let mut node = NodeService::new(config.node_id.clone(), publisher.clone(), book.clone());
    if config.standalone {
        node = node.claim_without_pod_info();
    }
    let readiness = Readiness::new();
    let identity = IdentityService::new(true, readiness.clone());

    tracing::info!(
        node_id = %config.node_id,
        backend_root = %backend.root().display(),
        standalone = config.standalone,
        lease_store = session.client().store().kind(),
        session = %session.key().instance,
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
    let served = serve::serve_unix(&config.endpoint, router, serve::shutdown_signal()).await;

    // Stopping, in this order. The gRPC server is down first (serve_unix has returned),
    // so no publish can take a claim while the session ends. Then the tasks that use
    // the session stop.
    let _ = stop_enforcer.send(true);
    let _ = enforcer_task.await;
    let _ = stop_metrics.send(true);
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    // Stops at its next wake-up; an attempt in progress (bounded API calls, one scan,
    // the unmounts) finishes first, so a release is not cut short between the unmount
    // and the store. Bounded, so that a stuck unmount cannot keep the process alive.
    if tokio::time::timeout(GONE_PODS_STOP, &mut gone_pods_task)
        .await
        .is_err()
    {
        tracing::warn!("the release of a gone pod's claim did not finish; stopping anyway");
        gone_pods_task.abort();
    }
    retry_task.abort();
    let _ = retry_task.await;
    // Every holder of the book holds the session: all must be gone before it can end.
    drop(metrics_book);
    drop(book);
    // Then the session: renewal stops and every gate closes. Its record — and with it
    // every claim of this node — is deleted only if no target is mounted any more.
    // Kubelet owns the targets and keeps them across a plugin restart: bind mounts stay
    // fully live after this process exits, and a FUSE worker may be inside one last
    // syscall right now. Deleting the record would let another node take those volumes
    // at once while this node may still write them. Kept, the claims end either by
    // expiry (D·(1+ε)+margin, never unsafe) or, much sooner, when this node's next
    // plugin instance proves this one dead by its flock, releases the FUSE claims (their
    // data path died with this process) and adopts the bind ones.
    let data_paths = if publisher.table().is_empty() {
        DataPaths::Stopped
    } else {
        DataPaths::MayBeLive
    };
    match Arc::try_unwrap(session) {
        Ok(session) => {
            if let Err(e) = session.shutdown(data_paths).await {
                tracing::warn!(error = %e, "session shutdown incomplete; its record expires by timeout");
            }
        }
        // Still shared: dropping it stops renewal and keeps the record (same as MayBeLive).
        Err(_) => tracing::warn!("session still in use at exit; its record expires by timeout"),
    }
    tracing::info!(?data_paths, "node plugin stopped");
    served?;
    Ok(())
}

/// The kernel's hostname: the default node id of `--standalone`.
fn hostname() -> Result<String, String> {
    let path = Path::new("/proc/sys/kernel/hostname");
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}
