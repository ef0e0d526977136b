//! Telling Kubernetes about the pods whose FUSE data path died with a previous plugin.
//!
//! A FUSE volume is served by the plugin process. When that process dies, the kernel
//! aborts its FUSE connections: every operation on the pod's mount fails with ENOTCONN
//! from then on, yet the pod stays Running. The restarted plugin keeps those dead mounts
//! in place (an unmount would let the pod write into the bare target directory on the
//! node's disk) and NodeGetVolumeStats reports them abnormal, but kubelets before volume
//! health (1.20 and the like) show that nowhere. So at start, for each FUSE target
//! recorded with its pod ([`crate::publish::fuse_targets`]) whose mount answers ENOTCONN:
//!
//! - the pod gets a Warning Event, reason [`REASON_LOST`], naming the volume and the
//!   target (core/v1 Events: what `kubectl describe pod` lists, on every API version the
//!   driver supports);
//! - with `--restart-pods-on-data-path-loss` (the default), a pod with a controller
//!   (an ownerReference with `controller: true`: StatefulSet, ReplicaSet, Job...) is
//!   deleted, so that its controller recreates it and its volume is published again
//!   through the live plugin (as Longhorn does for volumes detached unexpectedly); then
//!   a second Event, reason [`REASON_RESTARTED`]. A bare pod would not come back, so it
//!   is only told.
//!
//! Only the very pod that published is ever touched: the pod is read by namespace/name
//! and its UID compared with the recorded one, and the delete carries the UID as a
//! precondition, so a new pod that took the same name (a StatefulSet's next `db-0`) is
//! neither told nor deleted, even if it replaced the old one between the read and the
//! delete.
//!
//! ENOTCONN is the proof, not the recovery report: a predecessor that stopped gracefully
//! leaves its FUSE mounts just as dead, and a predecessor still alive (a DaemonSet
//! rolling update) still serves its mounts, which then answer and are left alone.
//!
//! Runs once, in a task of its own beside the gRPC server, so that start-up never waits
//! for the API server. Without a Kubernetes configuration (standalone, or etcd outside
//! a cluster) it logs once and does nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use holdfast_core::lease::PodName;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, PostParams, Preconditions};

use crate::pod_event::{pod_event, EventType};
use crate::publish::fuse_targets::FuseTargets;

/// Event reason on a pod whose volume's data path died. Stable: users alert on it.
pub const REASON_LOST: &str = "VolumeDataPathLost";
/// Event reason on a pod deleted so that its controller recreates it.
pub const REASON_RESTARTED: &str = "PodRestartedForDataPath";
/// A mount whose server is gone answers at once; one that does not answer within this
/// is served by a live (maybe paused) process, and is not ours to report.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per pod while the API server is unreachable or overloaded, with the
/// backoff doubling from [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`]: about four minutes.
const ATTEMPTS: u32 = 10;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read pod {pod}: {source}")]
    GetPod {
        pod: PodName,
        #[source]
        source: kube::Error,
    },
    #[error("cannot post the {reason} Event on pod {pod}: {source}")]
    PostEvent {
        pod: PodName,
        reason: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("cannot delete pod {pod}: {source}")]
    DeletePod {
        pod: PodName,
        #[source]
        source: kube::Error,
    },
}

impl ReportError {
    fn source_error(&self) -> &kube::Error {
        match self {
            ReportError::GetPod { source, .. }
            | ReportError::PostEvent { source, .. }
            | ReportError::DeletePod { source, .. } => source,
        }
    }

    /// Worth another attempt: the API server is down, restarting or overloaded. A
    /// refusal (403: the chart's RBAC is missing) or a bad request will not change.
    fn is_transient(&self) -> bool {
        match self.source_error() {
            kube::Error::Api(status) => status.code == 429 || status.code >= 500,
            _ => true,
        }
    }
}

/// A FUSE target whose server died, and the pod it was published for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostTarget {
    pub target: PathBuf,
    pub volume: String,
    pub pod_uid: String,
    pub pod: PodName,
}

/// What became of one lost target's pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Told by an Event; left running (bare pod, restarts off, or already terminating).
    Told,
    /// Told, deleted (UID-conditional), and told why.
    Restarted,
    /// No pod of that name any more: nothing to tell.
    Gone,
    /// A different pod has that name now (its UID; `None` when it replaced the old one
    /// between the read and the delete, which the UID precondition refused): not touched.
    Replaced { uid: Option<String> },
}

/// The orphaned FUSE targets (see `Publisher::orphaned_fuse_targets`) whose pod is known
/// (UID and namespace/name) and whose mount answers ENOTCONN.
pub async fn lost_targets(orphaned: FuseTargets) -> Vec<LostTarget> {
    let mut lost = Vec::new();
    for (target, recorded) in orphaned {
        let (Some(pod_uid), Some(pod)) = (recorded.pod_uid, recorded.pod) else {
            tracing::debug!(target = %target.display(), "dead FUSE target without pod info; not reported");
            continue;
        };
        if probe_is_dead(&target).await {
            lost.push(LostTarget {
                target,
                volume: recorded.volume,
                pod_uid,
                pod,
            });
        }
    }
    lost
}

/// Whether the FUSE mount at `target` lost its server. Probed off the runtime and
/// bounded: a live but stopped server would hold statvfs until it resumes.
async fn probe_is_dead(target: &Path) -> bool {
    let path = target.to_path_buf();
    let probe = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&path));
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(Err(rustix::io::Errno::NOTCONN))) => true,
        Ok(Ok(_)) => false,
        Ok(Err(_)) | Err(_) => {
            tracing::info!(target = %target.display(), "FUSE target did not answer; a live plugin may serve it, not reported");
            false
        }
    }
}

/// Reports every target of `orphaned` that lost its data path (see the module doc).
/// Returns what became of each; logs everything it does.
pub async fn run(
    orphaned: FuseTargets,
    node: String,
    restart_pods: bool,
) -> Vec<(LostTarget, Outcome)> {
    let started = Instant::now();
    let lost = lost_targets(orphaned).await;
    if lost.is_empty() {
        return Vec::new();
    }
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            // Standalone or etcd outside a cluster: nothing to tell, and no reason to
            // fail; NodeGetVolumeStats still says the targets are abnormal.
            tracing::warn!(
                pods = lost.len(),
                error = %e,
                "FUSE targets lost their data path, but no Kubernetes API is configured \
                 (not in a cluster, no KUBECONFIG): their pods are not told"
            );
            return Vec::new();
        }
    };
    let reporter = Reporter {
        client,
        node,
        restart_pods,
    };
    let mut outcomes = Vec::new();
    for target in lost {
        if let Some(outcome) = reporter.report_with_retries(&target).await {
            outcomes.push((target, outcome));
        }
    }
    tracing::info!(
        reported = outcomes.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "data path loss reports done"
    );
    outcomes
}

/// Talks to the API server for [`run`].
pub struct Reporter {
    pub client: kube::Client,
    /// This node's name, the Events' source host.
    pub node: String,
    pub restart_pods: bool,
}

/// How far one target's report got, so that a retry repeats no Event.
#[derive(Default)]
struct Progress {
    told: bool,
    deleted: bool,
}

impl Reporter {
    /// [`Reporter::report`], again after a backoff while the error is transient.
    pub async fn report_with_retries(&self, lost: &LostTarget) -> Option<Outcome> {
        let mut progress = Progress::default();
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            match self.report(lost, &mut progress).await {
                Ok(outcome) => return Some(outcome),
                Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, retry_in = ?backoff, "reporting a lost data path");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    tracing::error!(
                        error = %e,
                        volume = %lost.volume,
                        target = %lost.target.display(),
                        "cannot report a lost data path; the pod keeps failing with ENOTCONN \
                         until it is restarted"
                    );
                    return None;
                }
            }
        }
        None
    }

    async fn report(
        &self,
        lost: &LostTarget,
        progress: &mut Progress,
    ) -> Result<Outcome, ReportError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &lost.pod.namespace);
        if !progress.deleted {
            let current =
                pods.get_opt(&lost.pod.name)
                    .await
                    .map_err(|source| ReportError::GetPod {
                        pod: lost.pod.clone(),
                        source,
                    })?;
            let Some(current) = current else {
                tracing::info!(pod = %lost.pod, volume = %lost.volume, "pod of a lost data path is gone");
                return Ok(Outcome::Gone);
            };
            let uid = current.metadata.uid.clone().unwrap_or_default();
            // The name is reused (a StatefulSet's next pod): that pod mounts its own
            // target through the live plugin and must not be touched.
            if uid != lost.pod_uid {
                tracing::info!(pod = %lost.pod, recorded_uid = %lost.pod_uid, uid, "pod of a lost data path was replaced; not touched");
                return Ok(Outcome::Replaced { uid: Some(uid) });
            }
            if !progress.told {
                let message = format!(
                    "volume {} at {} lost its data path: the holdfast node plugin on {} \
                     restarted, and every read and write there fails with ENOTCONN until \
                     the pod is restarted",
                    lost.volume,
                    lost.target.display(),
                    self.node
                );
                self.post_event(lost, REASON_LOST, message).await?;
                progress.told = true;
                tracing::warn!(pod = %lost.pod, volume = %lost.volume, target = %lost.target.display(), "told the pod its volume's data path is lost");
            }
            let terminating = current.metadata.deletion_timestamp.is_some();
            if !self.restart_pods || terminating || !has_controller(&current) {
                return Ok(Outcome::Told);
            }
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(lost.pod_uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match pods.delete(&lost.pod.name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => return Ok(Outcome::Gone),
                // The UID precondition failed: replaced since the read.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    return Ok(Outcome::Replaced { uid: None })
                }
                Err(source) => {
                    return Err(ReportError::DeletePod {
                        pod: lost.pod.clone(),
                        source,
                    })
                }
            }
            progress.deleted = true;
            tracing::warn!(pod = %lost.pod, uid = %lost.pod_uid, volume = %lost.volume, "deleted the pod so that its controller recreates it with a live data path");
        }
        let message = format!(
            "deleted by the holdfast node plugin on {}: volume {} lost its data path when \
             the plugin restarted; the pod's controller recreates it and the volume is \
             mounted again (--restart-pods-on-data-path-loss=false turns this off)",
            self.node, lost.volume
        );
        self.post_event(lost, REASON_RESTARTED, message).await?;
        Ok(Outcome::Restarted)
    }

    async fn post_event(
        &self,
        lost: &LostTarget,
        reason: &'static str,
        message: String,
    ) -> Result<(), ReportError> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &lost.pod.namespace);
        let event = pod_event(
            &lost.pod,
            &lost.pod_uid,
            EventType::Warning,
            reason,
            message,
            &self.node,
        );
        events
            .create(&PostParams::default(), &event)
            .await
            .map_err(|source| ReportError::PostEvent {
                pod: lost.pod.clone(),
                reason,
                source,
            })?;
        Ok(())
    }
}

/// Whether some controller (StatefulSet, ReplicaSet, Job...) owns the pod and would
/// recreate it.
fn has_controller(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|owner| owner.controller == Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    #[test]
    fn only_a_controller_owner_counts() {
        let owner = |controller| OwnerReference {
            api_version: "apps/v1".into(),
            kind: "StatefulSet".into(),
            name: "db".into(),
            uid: "o".into(),
            controller,
            ..OwnerReference::default()
        };
        let mut pod = Pod::default();
        assert!(!has_controller(&pod));
        pod.metadata.owner_references = Some(vec![owner(None), owner(Some(false))]);
        assert!(!has_controller(&pod));
        pod.metadata.owner_references = Some(vec![owner(Some(true))]);
        assert!(has_controller(&pod));
    }
}
