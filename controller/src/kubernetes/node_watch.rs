//! The Node watch: a kube-runtime controller (watcher → reflector → reconcile per
//! Node) that turns the `node.kubernetes.io/out-of-service` taint into a node fence and
//! lifts that fence once the taint is gone and the node's plugin has started a new
//! session ([`crate::kubernetes::taint_fence`] decides; [`crate::admin::fence_with_reason`] fences).
//!
//! Every replica runs the watch, so its cache is warm, but only the leader acts: each
//! reconcile asks [`Leadership::is_leading`] right before it writes, and a follower
//! does nothing. When a replica becomes leader every Node is reconciled again, so
//! nothing that happened while it followed is missed. A store error requeues the Node.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use holdfast_core::lease::LeaseError;
use holdfast_core::store::{LeaseStore, StoreError};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use tokio::sync::{mpsc, watch};

use crate::admin::fence_with_reason;
use crate::kubernetes::attach_watch::FencedVolumes;
use crate::kubernetes::leader::Leadership;
use crate::kubernetes::taint_fence::{
    self, FenceCause, Step, OUT_OF_SERVICE_TAINT, TAINT_CAUSE_LABEL,
};
use crate::metrics;
use crate::RunError;

/// Why one Node's reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum NodeWatchError {
    #[error("lease store: {0}")]
    Store(#[from] StoreError),
    #[error("fencing node {node}: {source}")]
    Fence {
        node: String,
        #[source]
        source: Box<RunError>,
    },
    #[error("lifting the fence of node {node}: {source}")]
    Lift {
        node: String,
        #[source]
        source: LeaseError,
    },
}

/// What every reconcile shares.
pub struct NodeWatch {
    store: Arc<dyn LeaseStore>,
    leadership: Leadership,
    /// How often to look again for a new session of an untainted, still fenced node.
    recheck: Duration,
    /// Tainted nodes whose fence this process completed (claims included), so that a
    /// Node's heartbeats do not list every claim again. Cleared when the taint or the
    /// fence goes.
    completed: Mutex<HashSet<String>>,
    /// Untainted nodes whose fence is kept for want of a new session, so that why is
    /// said once at info level, not at every recheck.
    waiting: Mutex<HashSet<String>>,
    /// Where the claims a taint fence freed are told, for their PVCs' Events.
    fenced: Option<mpsc::UnboundedSender<FencedVolumes>>,
}

impl NodeWatch {
    pub fn new(store: Arc<dyn LeaseStore>, leadership: Leadership, recheck: Duration) -> Self {
        NodeWatch {
            store,
            leadership,
            recheck,
            completed: Mutex::new(HashSet::new()),
            waiting: Mutex::new(HashSet::new()),
            fenced: None,
        }
    }

    /// Tells `events` of every claim a taint fence frees (the Events' hook).
    pub fn with_fence_events(mut self, events: mpsc::UnboundedSender<FencedVolumes>) -> Self {
        self.fenced = Some(events);
        self
    }

    /// Watches every Node until `stop` turns true; each watch request lasts `timeout`.
    pub async fn run(self, client: kube::Client, timeout: Duration, stop: watch::Receiver<bool>) {
        let nodes: Api<Node> = Api::all(client);
        let gained = self.leadership.gained();
        let regained = futures::stream::unfold(gained, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        });
        let mut stop_rx = stop;
        let shutdown = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        let seconds = timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
        Controller::new(nodes, watcher::Config::default().timeout(seconds))
            .reconcile_all_on(regained)
            .graceful_shutdown_on(shutdown)
            .run(reconcile, error_policy, Arc::new(self))
            .for_each(|result| async move {
                match result {
                    Ok(_) => {}
                    Err(kube::runtime::controller::Error::QueueError(err)) => {
                        // The watcher backs off and re-lists by itself.
                        metrics::count_watch_restart("nodes");
                        tracing::warn!(%err, "node watch failed; restarting it");
                    }
                    Err(err) => tracing::debug!(%err, "node reconcile"),
                }
            })
            .await;
    }
}

fn is_tainted(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == OUT_OF_SERVICE_TAINT))
}

async fn reconcile(node: Arc<Node>, ctx: Arc<NodeWatch>) -> Result<Action, NodeWatchError> {
    // Followers do nothing; becoming leader reconciles every Node again.
    if !ctx.leadership.is_leading() {
        return Ok(Action::await_change());
    }
    let name = node.name_any();
    let tainted = is_tainted(&node);
    let fence = ctx.store.get_fence(&name).await?;
    {
        let mut completed = ctx.completed.lock().unwrap_or_else(|p| p.into_inner());
        // Still tainted and still fenced: done already (a Node's heartbeats land here).
        // A fence lifted by an admin while the taint stays is made again, as after a
        // restart: the taint still says the node is out of service.
        if tainted && fence.is_some() && completed.contains(&name) {
            return Ok(Action::await_change());
        }
        if !tainted || fence.is_none() {
            completed.remove(&name);
        }
    }
    if !tainted && fence.is_none() {
        return Ok(Action::await_change());
    }
    let cause = fence
        .as_ref()
        .map(|f| taint_fence::cause_of(&f.value.reason));
    let sessions: BTreeSet<String> = match (tainted, &cause) {
        (false, Some(FenceCause::Other)) => BTreeSet::new(),
        _ => ctx
            .store
            .list_sessions(&name)
            .await?
            .into_iter()
            .map(|s| s.value.instance)
            .collect(),
    };
    let step = taint_fence::decide(tainted, cause.as_ref(), &sessions);
    // The store reads above may have taken a while: ask again right before writing.
    if !matches!(step, Step::Nothing | Step::KeepUntilNewSession) && !ctx.leadership.is_leading() {
        return Ok(Action::await_change());
    }
    match step {
        Step::Fence | Step::CompleteFence => {
            let reason = taint_fence::taint_reason(&sessions);
            let outcome = fence_with_reason(ctx.store.as_ref(), &name, &reason)
                .await
                .map_err(|e| NodeWatchError::Fence {
                    node: name.clone(),
                    source: Box::new(e),
                })?;
            if !outcome.already_fenced {
                metrics::count_fence(TAINT_CAUSE_LABEL);
                tracing::info!(
                    node = %name,
                    claims = outcome.fenced_claims.len(),
                    reason = %reason,
                    "fenced node for its {OUT_OF_SERVICE_TAINT} taint"
                );
            } else if !outcome.fenced_claims.is_empty() {
                tracing::info!(node = %name, claims = outcome.fenced_claims.len(), "fenced the remaining claims of an already fenced, tainted node");
            }
            if let (Some(events), false) = (&ctx.fenced, outcome.fenced_claims.is_empty()) {
                // The receiver is gone only while the controller stops.
                let _ = events.send(FencedVolumes {
                    node: name.clone(),
                    volumes: outcome
                        .fenced_claims
                        .iter()
                        .map(|c| c.volume.clone())
                        .collect(),
                });
            }
            ctx.completed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name);
            Ok(Action::await_change())
        }
        Step::Lift { new_sessions } => {
            ctx.waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
            let fence = fence.expect("a lift is decided only for a fenced node");
            // Conditional on the version read: a fence rewritten since is not ours to lift.
            match ctx.store.delete_fence(&name, &fence.version).await {
                Ok(()) => {
                    metrics::count_fence_lifted(TAINT_CAUSE_LABEL);
                    tracing::info!(node = %name, ?new_sessions, "lifted the out-of-service fence: the taint is gone and the node's plugin started a new session");
                    Ok(Action::await_change())
                }
                Err(StoreError::Conflict { .. }) => Ok(Action::requeue(Duration::ZERO)),
                Err(e) => Err(NodeWatchError::Lift {
                    node: name,
                    source: e.into(),
                }),
            }
        }
        Step::KeepUntilNewSession => {
            let first = ctx
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone());
            let why = "its out-of-service taint is gone, but its plugin has started no \
                       session since the fence (a plugin that lived through the fence must \
                       restart first)";
            if first {
                tracing::info!(node = %name, "keeping the fence of node {name}: {why}");
            } else {
                tracing::debug!(node = %name, "keeping the fence of node {name}: {why}");
            }
            Ok(Action::requeue(ctx.recheck))
        }
        Step::Nothing => Ok(Action::await_change()),
    }
}

fn error_policy(node: Arc<Node>, error: &NodeWatchError, _ctx: Arc<NodeWatch>) -> Action {
    tracing::warn!(node = %node.name_any(), %error, "node reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}
