//! holdfast's CSI controller.
//!
//! - [`csi`]: the CSI boundary. [`csi::service`] is the Controller service over the
//!   directory [`Backend`] (also served by the node plugin's standalone mode);
//!   [`csi::gate`] is the attach gate — ControllerPublishVolume asks the node plugins'
//!   own acquire decision whether another node's pod still holds the volume.
//! - [`kubernetes`]: Kubernetes itself. [`kubernetes::leader`] is leader election on a Lease (only
//!   the leader acts); [`kubernetes::node_watch`] / [`kubernetes::taint_fence`] are the Node watch
//!   that fences a node for its out-of-service taint, and the rules for when that fence
//!   is lifted; [`kubernetes::attach_watch`] / [`kubernetes::events`] publish the Events
//!   that say why a pod waits for its volume (read from the attach gate's refusal in the
//!   VolumeAttachment's status, [`kubernetes::refusal`]).
//! - [`args`]: the command line (serve by default; `fence`, `unfence`, `claims`,
//!   `status`); [`admin`]: the admin verbs against the lease store, and their output;
//!   [`status`]: the `status` verb, which reports only what it saw itself.
//! - [`expiry`]: the leader's sweep that marks claims whose holder's lease expired;
//!   with the kubernetes store it takes the sessions from [`kubernetes::lease_watch`].
//! - [`ControllerError`]: the crate's errors and their one mapping to gRPC codes.
//! - [`metrics`]: the Prometheus series and the `/metrics` endpoint;
//!   `timed_store` times every lease store call for them.
//! - [`run`]: what the binary does — serve Identity + Controller until SIGTERM, or
//!   run one admin verb and exit.

pub mod admin;
pub mod args;
pub mod csi;
mod error;
pub mod expiry;
pub mod kubernetes;
pub mod metrics;
pub mod status;
mod timed_store;

use std::sync::Arc;

use holdfast_core::backend::{Backend, BackendError};
use holdfast_core::csi::identity::{IdentityService, Readiness};
use holdfast_core::csi::serve::{self, CsiCallLog, Endpoint, EndpointError, ServeError};
use holdfast_core::lease::LeaseError;
use holdfast_core::lease_config::LeaseConfigError;
use holdfast_core::logging::{self, LogFormat, LoggingError};
use holdfast_core::store::{self, StoreConfig, StoreError};

use crate::args::{Command, ServeArgs};
use crate::csi::gate::AttachGate;
use crate::expiry::ExpiryWatch;
use crate::kubernetes::attach_watch::AttachWatch;
use crate::kubernetes::events::Publisher;
use crate::kubernetes::leader::{default_identity, Elector, LeaderConfigError, Leadership};
use crate::kubernetes::lease_watch::{self, SessionCache};
use crate::kubernetes::node_watch::NodeWatch;
use crate::timed_store::TimedStore;
use tokio::sync::watch;

pub use csi::service::{controller_service, ControllerService};
pub use error::ControllerError;

/// Why the controller could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Logging(#[from] LoggingError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot open the backend root: {0}")]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    LeaseConfig(#[from] LeaseConfigError),
    #[error(
        "--lease-store=memory keeps records inside one process, so `{command}` would not \
         see the node plugins' claims: use --lease-store=etcd or --lease-store=kubernetes"
    )]
    MemoryStore { command: &'static str },
    #[error("--backend-root is required to serve")]
    MissingBackendRoot,
    #[error("--node must not be empty")]
    EmptyNode,
    #[error(
        "--reason {reason:?} starts like the fences the controller makes for the \
         out-of-service taint, which it lifts when the taint goes: choose another reason"
    )]
    ReservedReason { reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode the output as JSON: {0}")]
    Json(serde_json::Error),
    #[error(transparent)]
    Leader(#[from] LeaderConfigError),
    #[error("--metrics-address {0}")]
    MetricsAddress(String),
    #[error("cannot serve metrics on {address}: {source}")]
    MetricsBind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "no Kubernetes client configuration (in-cluster or KUBECONFIG), needed for \
         --leader-elect, --watch-nodes and --events (turn them off outside Kubernetes): {0}"
    )]
    Kube(String),
}

/// Runs what the command line asks: serve CSI (no subcommand, or `serve`) or one admin
/// verb, printing its result on stdout.
pub async fn run(args: args::Args) -> Result<(), RunError> {
    let mut stdout = std::io::stdout();
    match args.into_command() {
        Command::Serve(args) => serve(args).await,
        Command::Fence(args) => {
            logging::init("warn", LogFormat::Text)?;
            admin::check_node(&args.node)?;
            let store = admin::open_store(&args.lease, "fence").await?;
            let outcome = admin::fence(store.as_ref(), &args).await?;
            admin::print_fence(&mut stdout, args.output, &outcome)
        }
        Command::Unfence(args) => {
            logging::init("warn", LogFormat::Text)?;
            admin::check_node(&args.node)?;
            let store = admin::open_store(&args.lease, "unfence").await?;
            let outcome = admin::unfence(store.as_ref(), &args).await?;
            admin::print_unfence(&mut stdout, args.output, &outcome)
        }
        Command::Claims(args) => {
            logging::init("warn", LogFormat::Text)?;
            let store = admin::open_store(&args.lease, "claims").await?;
            let rows = admin::claims(store.as_ref(), &args).await?;
            admin::print_claims(&mut stdout, args.output, &rows)
        }
        Command::Status(args) => {
            logging::init("warn", LogFormat::Text)?;
            let store = admin::open_store(&args.lease, "status").await?;
            let params = args.lease.params()?;
            let report = status::status(store.as_ref(), &params, &args).await?;
            status::print_status(&mut stdout, args.output, &report)
        }
    }
}

/// Serves Identity (advertising CONTROLLER_SERVICE) and Controller on the endpoint
/// until SIGTERM or SIGINT, then removes the socket. Beside it: the metrics endpoint,
/// and, when Kubernetes is there, leader election and the Node watch (which acts only
/// while this replica leads).
pub async fn serve(args: ServeArgs) -> Result<(), RunError> {
    logging::init(&args.log_level, args.log_format)?;
    // The same lease settings as the node plugins (the chart hands both the same ones):
    // the gate judges their sessions' expiry by the same D, ε and margin.
    let config = args.lease.store_config()?;
    let params = args.lease.params()?;
    let endpoint = Endpoint::parse(&args.endpoint)?;
    let metrics_address =
        metrics::parse_address(&args.metrics_address).map_err(RunError::MetricsAddress)?;
    let leader_elect = args.leader_elect();
    let watch_nodes = args.watch_nodes();
    let events = args.events();
    let leader_config = if leader_elect {
        Some(args.leader.config()?)
    } else {
        None
    };
    let root = args
        .backend_root
        .clone()
        .ok_or(RunError::MissingBackendRoot)?;
    let backend = Arc::new(Backend::open(&root)?);
    tracing::info!(backend_root = %backend.root().display(), "backend opened");
    if config == StoreConfig::Memory {
        tracing::warn!(
            "--lease-store=memory: no node plugin shares this store, so the attach gate \
             sees no claims and grants every attach (for tests and one-process demos only)"
        );
    }
    tracing::info!(store = ?config, ?params, "lease settings checked");
    let store = TimedStore::wrap(store::connect(config.clone()).await?);

    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = Vec::new();
    if let Some(address) = metrics_address {
        let server = metrics::serve(address, stop.clone())
            .await
            .map_err(|source| RunError::MetricsBind { address, source })?;
        tasks.push(server);
    }
    let kube = if leader_elect || watch_nodes || events {
        Some(
            kube::Client::try_default()
                .await
                .map_err(|e| RunError::Kube(e.to_string()))?,
        )
    } else {
        None
    };
    // The Events name this replica as the leader election does.
    let identity = leader_config
        .as_ref()
        .map(|c| c.identity.clone())
        .unwrap_or_else(default_identity);
    // The expired marks name this replica as the leader election does.
    let observed_by = leader_config
        .as_ref()
        .map(|c| c.identity.clone())
        .unwrap_or_else(crate::kubernetes::leader::default_identity);
    let leadership = match (&kube, leader_config) {
        (Some(client), Some(config)) => {
            tracing::info!(identity = %config.identity, namespace = %config.namespace, lease = %config.name, "leader election on: acting only while leading");
            let leadership = Leadership::follower();
            let elector = Elector::new(client.clone(), config, leadership.clone());
            tasks.push(tokio::spawn(elector.run(stop.clone())));
            leadership
        }
        _ => {
            tracing::info!("leader election off: this replica acts alone");
            metrics::set_leader(true);
            Leadership::always()
        }
    };
    // The leader marks claims whose holder's lease expired, and counts claims by state.
    let every = args
        .expiry_interval
        .unwrap_or_else(|| params.renew_interval());
    if every.is_zero() {
        tracing::info!("--expiry-interval=0: no expired marks, no claims gauge");
    } else {
        let mut expiry = ExpiryWatch::new(store.clone(), params, observed_by, leadership.clone());
        // Kubernetes store: sessions from a watch of their Leases. etcd keeps polling
        // (its records are no Lease objects; an etcd watch would be the analogue).
        if let StoreConfig::Kubernetes { namespace } = &config {
            let client = match &kube {
                Some(client) => client.clone(),
                None => kube::Client::try_default()
                    .await
                    .map_err(|e| RunError::Kube(e.to_string()))?,
            };
            let cache = SessionCache::new();
            tasks.push(tokio::spawn(lease_watch::run(
                client,
                namespace.clone(),
                cache.clone(),
                args.node_watch_timeout,
                stop.clone(),
            )));
            tracing::info!(full_every = args.expiry_full_every, "expiry sweep: sessions from a watch of their Leases; every claim read every {} sweeps", args.expiry_full_every);
            expiry = expiry.with_session_watch(cache, args.expiry_full_every);
        }
        tasks.push(tokio::spawn(expiry.run(every, stop.clone())));
    }
    // The taint fence tells the Event watch which claims it freed.
    let (fenced_tx, fenced_rx) = tokio::sync::mpsc::unbounded_channel();
    if let (Some(client), true) = (&kube, events) {
        let publisher = Publisher::new(client.clone(), identity, leadership.clone());
        let attach_watch = AttachWatch::new(
            client.clone(),
            store.clone(),
            leadership.clone(),
            publisher,
            args.events_watch_timeout,
            fenced_rx,
        );
        tasks.push(tokio::spawn(attach_watch.run(stop.clone())));
    }
    if let (Some(client), true) = (&kube, watch_nodes) {
        let recheck = params.renew_interval();
        let mut node_watch = NodeWatch::new(store.clone(), leadership, recheck);
        if events {
            node_watch = node_watch.with_fence_events(fenced_tx);
        }
        let timeout = args.node_watch_timeout;
        tasks.push(tokio::spawn(node_watch.run(
            client.clone(),
            timeout,
            stop.clone(),
        )));
    }

    let gate = Arc::new(AttachGate::new(store, params));
    let controller = ControllerService::new(backend).with_attach_gate(gate);
    let readiness = Readiness::new();
    let router = tonic::transport::Server::builder()
        .layer(CsiCallLog)
        .add_service(IdentityService::new(true, readiness.clone()).into_server())
        .add_service(controller.into_server());
    // The controller keeps no session of its own: it can serve as soon as it listens.
    readiness.set(true);
    let served = serve::serve_unix(&endpoint, router, serve::shutdown_signal()).await;
    // Stop acting (and release the leader Lease) before exiting.
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    served?;
    Ok(())
}
