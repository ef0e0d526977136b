//! Releasing the claim of a pod that is gone when kubelet does not unpublish it.
//!
//! Normally a pod that ends has its volume unpublished by kubelet (NodeUnpublishVolume),
//! and the claim is released at once. When kubelet itself is gone (stopped, crashed,
//! wedged) while this plugin lives and renews the node's session, nothing unpublishes:
//! the claim would stay held for as long as the session lives, and the volume could
//! never move. So the plugin learns the fate of its holder pods from the API and, once
//! one has been gone for longer than `--release-gone-pods-after`, releases its claim
//! itself, but only if it can prove its own mounts of the volume dead.
//!
//! **How it learns.** One kube-runtime watcher on the Pods of this node (field selector
//! `spec.nodeName=<node>`), not a per-claim `get` on a timer: one watch per node costs
//! the API server the same whatever the number of claims, and a deletion is seen within
//! the watch's latency instead of a polling period. Only (namespace/name → UID, phase)
//! is kept. A pod is *gone* when its object is deleted, re-created under its name with
//! another UID, or its phase is Succeeded or Failed (all its containers terminated and
//! reported so). The timer for a claim starts when the watch first shows its pod gone,
//! on this process's monotonic clock; a pod seen alive again stops it. Absence (deleted,
//! replaced) counts only for a pod that this process's watch has shown on this node
//! while its claim was held: a claim for a pod the API never showed here (a `--node-id`
//! that is not the Node's name, a test harness's made-up pod) is never released this
//! way, while a Succeeded/Failed pod of the claim's UID is positive evidence. Before acting,
//! the pod is read once more (`get`, a quorum read): the watch only triggers, it never
//! decides alone, so a stale watch cache cannot release anything.
//!
//! **Why releasing is safe only with the mounts proven dead.** The lock promises that
//! no two pods have a live data path to the volume at once. Releasing lets another pod
//! take the volume at once, so at the release no process on this node may be able to
//! issue I/O through any of the volume's mounts any more. The pod object being gone
//! proves nothing about that: a force-deleted pod on a node whose kubelet is wedged
//! keeps running (a zombie), and its container keeps writing through its bind of the
//! target. So, with the volume's publish lock held (no publish or unpublish of it can
//! interleave), [`holders::users`] scans every process on the machine (the chart runs
//! the plugin with `hostPID`; outside the initial PID namespace this module refuses to
//! run, since it could not see them): a process with its cwd, root, an open file or a
//! mapping on a target, or whose mount namespace shows the volume at a mount point of
//! its own (a container's bind of the target, e.g. at `/data`), is a user. Any user,
//! and the claim stays, re-checked every few seconds: a zombie container is a holder
//! and the lock stays with it. None: the targets are unmounted exactly as
//! NodeUnpublishVolume would (a busy bind mount is never detached; a busy FUSE mount is
//! detached and its connection aborted), and only then is the claim released, its gate
//! fenced first, so that no FUSE operation passes any more through any copy of the
//! mount. A process that appears between the scan and the unmount finds a bind unmount
//! refused (busy: the claim stays) or a dead FUSE mount; what remains is a process
//! entering the mount through a mount namespace created in that instant, from one
//! already holding the mount, which the scan saw holding nothing.
//!
//! Known limit (the FUSE unmount's, not this module's): a private copy of a FUSE target
//! in another mount namespace that the scan does not count (one at the target's own
//! path, with nothing open) keeps the connection alive after the clean unmount here,
//! and the unmount then waits for the session to end, holding the volume's lock. The
//! claim stays (safe), but this task and that volume's calls wait until the copy goes.
//!
//! Without a Kubernetes API (standalone, etcd outside a cluster), or with
//! `--release-gone-pods-after=0`, it logs once and does nothing: such claims end by
//! NodeUnpublishVolume, or by the session's expiry if the node stops.
//!
//! The task owns only its timers; it mutates the claim book and the published table
//! exactly as NodeUnpublishVolume does, under the same per-volume lock.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use holdfast_core::lease::PodName;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::watch;

use crate::lock::claims::{ClaimBook, ClaimedVolume};
use crate::lock::holders::{self, HolderProcess, VolumeViews};
use crate::pod_event::{pod_event, EventType};
use crate::publish::kernel_mounts::MountTable;
use crate::publish::publisher::Publisher;

/// Event reason on a pod whose claim the plugin released because the pod is gone and
/// kubelet did not unpublish. Stable: users alert on it.
pub const REASON_RELEASED: &str = "VolumeReleasedForGonePod";
/// Bound on each API call of an attempt (the confirming read, the Event).
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// `/proc/self/ns/pid` in the initial PID namespace (PROC_PID_INIT_INO).
const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";

/// Why a pod counts as gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gone {
    /// No object of that name.
    Deleted,
    /// An object of that name with another UID.
    Replaced { uid: String },
    /// Same UID, phase Succeeded or Failed: every container terminated.
    Finished { phase: String },
}

impl std::fmt::Display for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gone::Deleted => write!(f, "deleted"),
            Gone::Replaced { uid } => write!(f, "replaced by a pod with UID {uid}"),
            Gone::Finished { phase } => write!(f, "terminated (phase {phase})"),
        }
    }
}

/// What the API says of one pod by name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    uid: String,
    phase: Option<String>,
}

impl Seen {
    fn of(pod: &Pod) -> Option<(PodName, Seen)> {
        let name = PodName {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
        };
        let seen = Seen {
            uid: pod.metadata.uid.clone()?,
            phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        };
        Some((name, seen))
    }
}

/// The fate of the pod `uid` named `name`, given what the API shows under that name.
fn fate(seen: Option<&Seen>, uid: &str) -> Option<Gone> {
    match seen {
        None => Some(Gone::Deleted),
        Some(seen) if seen.uid != uid => Some(Gone::Replaced {
            uid: seen.uid.clone(),
        }),
        Some(seen) => match seen.phase.as_deref() {
            Some(phase @ ("Succeeded" | "Failed")) => Some(Gone::Finished {
                phase: phase.to_string(),
            }),
            _ => None,
        },
    }
}

/// This node's pods as the watch shows them, applied event by event (a re-list is
/// buffered and swapped in whole, like kube-runtime's reflector).
#[derive(Default)]
pub struct NodePods {
    pods: HashMap<PodName, Seen>,
    relist: Option<HashMap<PodName, Seen>>,
    /// A first complete list arrived: absence now means something.
    ready: bool,
}

impl NodePods {
    pub fn apply(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Apply(pod) => {
                if let Some((name, seen)) = Seen::of(&pod) {
                    self.pods.insert(name, seen);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some((name, seen)) = Seen::of(&pod) {
                    // Only that very pod: a newer one of the same name stays.
                    if self.pods.get(&name).is_some_and(|s| s.uid == seen.uid) {
                        self.pods.remove(&name);
                    }
                }
            }
            watcher::Event::Init => self.relist = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(relist), Some((name, seen))) = (self.relist.as_mut(), Seen::of(&pod)) {
                    relist.insert(name, seen);
                }
            }
            watcher::Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.pods = relist;
                }
                self.ready = true;
            }
        }
    }

    /// Whether the watch shows the pod `uid` under `name` now.
    pub fn shows(&self, name: &PodName, uid: &str) -> bool {
        self.pods.get(name).is_some_and(|seen| seen.uid == uid)
    }

    /// Whether the pod `uid` named `name` is gone; `None` while alive, or before the
    /// first complete list.
    pub fn gone(&self, name: &PodName, uid: &str) -> Option<Gone> {
        if !self.ready {
            return None;
        }
        fate(self.pods.get(name), uid)
    }
}

/// One claim whose pod the watch shows gone.
struct Timer {
    pod_uid: String,
    epoch: holdfast_core::lease::Epoch,
    gone_since: Instant,
    next_attempt: Instant,
    /// What kept the claim at the last attempt (logged again only when it changes).
    last_kept: Option<String>,
}

/// Timers per volume, started when its pod is first seen gone.
struct Timers {
    after: Duration,
    recheck: Duration,
    by_volume: HashMap<String, Timer>,
    /// Volume → the claim's pod UID, for each claim whose pod the watch has shown.
    witnessed: HashMap<String, String>,
}

impl Timers {
    fn new(after: Duration) -> Timers {
        Timers {
            after,
            recheck: after.clamp(Duration::from_secs(1), Duration::from_secs(10)),
            by_volume: HashMap::new(),
            witnessed: HashMap::new(),
        }
    }

    /// Updates the timers from the watch and returns the claims due for an attempt:
    /// gone for at least `after`, still published here, not attempted within `recheck`.
    fn due(
        &mut self,
        pods: &NodePods,
        claims: Vec<Arc<ClaimedVolume>>,
        published: impl Fn(&str) -> bool,
        now: Instant,
    ) -> Vec<(Arc<ClaimedVolume>, Gone)> {
        let mut due = Vec::new();
        let mut live = HashMap::new();
        let mut witnessed = HashMap::new();
        for claim in claims {
            let Some(pod) = claim.pod.clone() else {
                continue;
            };
            let seen_here = pods.shows(&pod, &claim.pod_uid)
                || self.witnessed.get(&claim.volume_id) == Some(&claim.pod_uid);
            if seen_here {
                witnessed.insert(claim.volume_id.clone(), claim.pod_uid.clone());
            }
            let Some(gone) = pods.gone(&pod, &claim.pod_uid) else {
                continue;
            };
            // Absence counts only for a pod this watch has shown on this node while
            // its claim was held (see the module doc).
            if !seen_here && !matches!(gone, Gone::Finished { .. }) {
                continue;
            }
            if !published(&claim.volume_id) {
                continue;
            }
            let timer = match self.by_volume.remove(&claim.volume_id) {
                Some(t) if t.pod_uid == claim.pod_uid && t.epoch == claim.epoch => t,
                _ => {
                    tracing::info!(volume = %claim.volume_id, %pod, uid = %claim.pod_uid, %gone,
                        release_after = ?self.after, "holder pod gone; its claim is released if \
                        NodeUnpublishVolume does not come and nothing uses its mounts");
                    Timer {
                        pod_uid: claim.pod_uid.clone(),
                        epoch: claim.epoch,
                        gone_since: now,
                        next_attempt: now + self.after,
                        last_kept: None,
                    }
                }
            };
            if now >= timer.next_attempt {
                due.push((claim.clone(), gone));
            }
            live.insert(claim.volume_id.clone(), timer);
        }
        // Claims released, or whose pod is alive again, lose their timers.
        self.by_volume = live;
        self.witnessed = witnessed;
        due
    }

    fn attempted(&mut self, volume: &str, now: Instant, kept: Option<String>) -> bool {
        let Some(timer) = self.by_volume.get_mut(volume) else {
            return false;
        };
        timer.next_attempt = now + self.recheck;
        let changed = timer.last_kept != kept;
        timer.last_kept = kept;
        changed
    }

    fn gone_for(&self, volume: &str, now: Instant) -> Option<Duration> {
        self.by_volume
            .get(volume)
            .map(|t| now.saturating_duration_since(t.gone_since))
    }
}

/// How an attempt ended.
#[derive(Debug)]
enum Attempt {
    /// Unmounted and released; `told`: the pod object still exists and got the Event.
    Released { gone: Gone, pod_exists: bool },
    /// The confirming read shows the pod alive.
    Alive,
    /// Something still uses the mounts: the claim stays.
    InUse(Vec<HolderProcess>),
    /// Kept for another reason (API unreachable, unmount refused, claim moved on).
    Kept(String),
}

/// Runs for the plugin's life (until `stop`): watches this node's pods and releases
/// the claims of gone ones as the module doc says. `after` zero: does nothing.
pub async fn run(
    book: Arc<ClaimBook>,
    publisher: Arc<Publisher>,
    node: String,
    after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    if after.is_zero() {
        tracing::info!("releasing the claims of gone pods is off (--release-gone-pods-after=0, or --standalone): \
            they are released only by NodeUnpublishVolume or expiry");
        return;
    }
    if !in_initial_pid_namespace() {
        tracing::warn!(
            "not in the host's PID namespace (hostPID): the processes using a volume \
             cannot all be seen, so the claims of gone pods are released only by \
             NodeUnpublishVolume or expiry"
        );
        return;
    }
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            tracing::info!(error = %e, "no Kubernetes API is configured (not in a cluster, no KUBECONFIG): \
                the claims of gone pods are released only by NodeUnpublishVolume or expiry");
            return;
        }
    };
    let all: Api<Pod> = Api::all(client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    // The watcher re-lists and re-watches by itself, with backoff, after any error.
    let mut events = watcher(all, config).default_backoff().boxed();
    let mut pods = NodePods::default();
    let mut timers = Timers::new(after);
    let mut tick = tokio::time::interval(
        (after / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let releaser = Releaser {
        client,
        book: book.clone(),
        publisher: publisher.clone(),
        node,
        after,
    };
    tracing::info!(release_after = ?after, node = %releaser.node, "watching this node's pods for gone holders");
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            event = events.next() => match event {
                Some(Ok(event)) => pods.apply(event),
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                None => return,
            },
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let due = timers.due(
            &pods,
            book.snapshot(),
            |volume| !publisher.table().targets(volume).is_empty(),
            now,
        );
        for (claim, gone) in due {
            let outcome = releaser.attempt(&claim, gone).await;
            let now = Instant::now();
            let gone_for = timers.gone_for(&claim.volume_id, now).unwrap_or_default();
            let pod = claim
                .pod
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            match outcome {
                Attempt::Released { gone, pod_exists } => {
                    tracing::info!(volume = %claim.volume_id, %pod, uid = %claim.pod_uid, %gone,
                        epoch = claim.epoch, gone_for_ms = gone_for.as_millis() as u64,
                        "released the claim of a gone pod: NodeUnpublishVolume did not come and no process used its mounts");
                    if pod_exists {
                        releaser.tell(&claim, &gone).await;
                    }
                    timers.by_volume.remove(&claim.volume_id);
                }
                Attempt::Alive => {
                    tracing::info!(volume = %claim.volume_id, %pod, "holder pod is alive after all; claim kept");
                    timers.by_volume.remove(&claim.volume_id);
                }
                Attempt::InUse(users) => {
                    let why = users
                        .iter()
                        .map(|u| format!("pid {} ({}): {}", u.pid, u.command, u.uses))
                        .collect::<Vec<_>>()
                        .join("; ");
                    let pids: Vec<i32> = users.iter().map(|u| u.pid).collect();
                    if timers.attempted(&claim.volume_id, now, Some(format!("{pids:?}"))) {
                        tracing::warn!(volume = %claim.volume_id, %pod, uid = %claim.pod_uid,
                            gone_for_ms = gone_for.as_millis() as u64, users = %why,
                            "holder pod is gone but processes still use its volume: the claim stays (re-checked)");
                    } else {
                        tracing::debug!(volume = %claim.volume_id, users = %why, "gone pod's volume still in use");
                    }
                }
                Attempt::Kept(why) => {
                    if timers.attempted(&claim.volume_id, now, Some(why.clone())) {
                        tracing::warn!(volume = %claim.volume_id, %pod, %why, "claim of a gone pod kept for now (re-checked)");
                    }
                }
            }
        }
    }
}

/// Whether this process sees every process of the machine (the chart's `hostPID`).
fn in_initial_pid_namespace() -> bool {
    std::fs::read_link("/proc/self/ns/pid").is_ok_and(|ns| ns == Path::new(INITIAL_PID_NAMESPACE))
}

struct Releaser {
    client: kube::Client,
    book: Arc<ClaimBook>,
    publisher: Arc<Publisher>,
    node: String,
    after: Duration,
}

impl Releaser {
    async fn attempt(&self, claim: &Arc<ClaimedVolume>, _watched: Gone) -> Attempt {
        let Some(pod) = claim.pod.as_ref() else {
            return Attempt::Kept("no pod name".into());
        };
        // The watch triggers; a quorum read decides.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let current = match tokio::time::timeout(API_TIMEOUT, pods.get_opt(&pod.name)).await {
            Ok(Ok(current)) => current,
            Ok(Err(e)) => return Attempt::Kept(format!("cannot read pod {pod}: {e}")),
            Err(_) => return Attempt::Kept(format!("reading pod {pod} timed out")),
        };
        let seen = current
            .as_ref()
            .and_then(|p| Seen::of(p).map(|(_, seen)| seen));
        let Some(gone) = fate(seen.as_ref(), &claim.pod_uid) else {
            return Attempt::Alive;
        };
        let pod_exists = seen.is_some_and(|s| s.uid == claim.pod_uid);

        let volume = claim.volume_id.clone();
        let _guard = self.publisher.locks.lock(&volume).await;
        // Under the lock: still this very claim, still published (else kubelet's
        // unpublish or a new publish got here first).
        match self.book.get(&volume) {
            Some(now) if Arc::ptr_eq(&now, claim) => {}
            _ => return Attempt::Kept("the claim changed meanwhile".into()),
        }
        let targets = self.publisher.table().targets(&volume);
        if targets.is_empty() {
            return Attempt::Kept("no target left: unpublished meanwhile".into());
        }
        let publisher = self.publisher.clone();
        let id = volume.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<Vec<HolderProcess>, String> {
            let users = users_of(&targets).map_err(|e| format!("cannot scan for users: {e}"))?;
            if !users.is_empty() {
                return Ok(users);
            }
            for target in &targets {
                publisher
                    .unpublish(&id, target)
                    .map_err(|e| format!("cannot unmount {}: {e}", target.display()))?;
            }
            Ok(Vec::new())
        })
        .await;
        match done {
            Ok(Ok(users)) if !users.is_empty() => return Attempt::InUse(users),
            Ok(Ok(_)) => {}
            Ok(Err(why)) => return Attempt::Kept(why),
            Err(e) => return Attempt::Kept(format!("scan task failed: {e}")),
        }
        // Unmounted first, released after, as NodeUnpublishVolume does.
        if !self.publisher.table().targets(&volume).is_empty() {
            return Attempt::Kept("a target is still published".into());
        }
        self.book.release(&volume).await;
        Attempt::Released { gone, pod_exists }
    }

    /// A Normal Event on the pod (it still exists with the claim's UID).
    async fn tell(&self, claim: &ClaimedVolume, gone: &Gone) {
        let Some(pod) = claim.pod.as_ref() else {
            return;
        };
        let message = format!(
            "volume {} released by the holdfast node plugin on {}: the pod is {gone}, \
             NodeUnpublishVolume did not come within {:?}, and no process on the node used \
             its mounts any more; they were unmounted",
            claim.volume_id, self.node, self.after
        );
        let event = pod_event(
            pod,
            &claim.pod_uid,
            EventType::Normal,
            REASON_RELEASED,
            message,
            &self.node,
        );
        let events: Api<Event> = Api::namespaced(self.client.clone(), &pod.namespace);
        match tokio::time::timeout(API_TIMEOUT, events.create(&PostParams::default(), &event)).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(%pod, error = %e, "cannot post the {REASON_RELEASED} Event")
            }
            Err(_) => tracing::warn!(%pod, "posting the {REASON_RELEASED} Event timed out"),
        }
    }
}

/// Every process using any of `targets` (see [`holders::users`]). Each target's mount,
/// as this process sees it, is what other mount namespaces are searched for: a bind
/// mount shows the volume's data directory, a FUSE mount its own connection.
fn users_of(targets: &[PathBuf]) -> Result<Vec<HolderProcess>, String> {
    let table = MountTable::read().map_err(|e| e.to_string())?;
    let mut users: Vec<HolderProcess> = Vec::new();
    for target in targets {
        let views = VolumeViews {
            paths: vec![target.clone()],
            location: table.mounted_at(target).map(|m| m.location()),
        };
        for user in holders::users(&views) {
            if !users.iter().any(|u| u.pid == user.pid) {
                users.push(user);
            }
        }
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, uid: &str, phase: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "apps", "uid": uid},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn name(name: &str) -> PodName {
        PodName {
            namespace: "apps".into(),
            name: name.into(),
        }
    }

    #[test]
    fn fate_of_a_pod() {
        let seen = |uid: &str, phase: Option<&str>| Seen {
            uid: uid.into(),
            phase: phase.map(str::to_string),
        };
        assert_eq!(fate(None, "u1"), Some(Gone::Deleted));
        assert_eq!(
            fate(Some(&seen("u2", Some("Running"))), "u1"),
            Some(Gone::Replaced { uid: "u2".into() })
        );
        for alive in [None, Some("Pending"), Some("Running"), Some("Unknown")] {
            assert_eq!(fate(Some(&seen("u1", alive)), "u1"), None, "{alive:?}");
        }
        for phase in ["Succeeded", "Failed"] {
            assert_eq!(
                fate(Some(&seen("u1", Some(phase))), "u1"),
                Some(Gone::Finished {
                    phase: phase.into()
                })
            );
        }
    }

    #[test]
    fn nothing_is_gone_before_the_first_complete_list() {
        let mut pods = NodePods::default();
        assert_eq!(pods.gone(&name("db-0"), "u1"), None);
        pods.apply(watcher::Event::Init);
        pods.apply(watcher::Event::InitApply(pod(
            "db-0",
            "u1",
            Some("Running"),
        )));
        assert_eq!(pods.gone(&name("db-0"), "u1"), None);
        assert_eq!(pods.gone(&name("web-0"), "u9"), None, "not ready yet");
        pods.apply(watcher::Event::InitDone);
        assert_eq!(pods.gone(&name("db-0"), "u1"), None);
        assert_eq!(pods.gone(&name("web-0"), "u9"), Some(Gone::Deleted));
    }

    #[test]
    fn watch_events_move_a_pod_through_its_life() {
        let mut pods = NodePods::default();
        pods.apply(watcher::Event::Init);
        pods.apply(watcher::Event::InitDone);
        assert!(!pods.shows(&name("db-0"), "u1"));
        pods.apply(watcher::Event::Apply(pod("db-0", "u1", Some("Running"))));
        assert_eq!(pods.gone(&name("db-0"), "u1"), None);
        assert!(pods.shows(&name("db-0"), "u1"));
        assert!(!pods.shows(&name("db-0"), "u2"));
        pods.apply(watcher::Event::Apply(pod("db-0", "u1", Some("Failed"))));
        assert!(matches!(
            pods.gone(&name("db-0"), "u1"),
            Some(Gone::Finished { .. })
        ));
        // Re-created under its name before the old one's delete event arrived: the
        // late delete must not remove the new pod.
        pods.apply(watcher::Event::Apply(pod("db-0", "u2", Some("Pending"))));
        pods.apply(watcher::Event::Delete(pod("db-0", "u1", Some("Failed"))));
        assert_eq!(pods.gone(&name("db-0"), "u2"), None);
        assert!(matches!(
            pods.gone(&name("db-0"), "u1"),
            Some(Gone::Replaced { .. })
        ));
        pods.apply(watcher::Event::Delete(pod("db-0", "u2", None)));
        assert_eq!(pods.gone(&name("db-0"), "u2"), Some(Gone::Deleted));
        // A re-list replaces everything at its end.
        pods.apply(watcher::Event::Init);
        pods.apply(watcher::Event::InitApply(pod("db-0", "u3", None)));
        assert_eq!(pods.gone(&name("db-0"), "u3"), Some(Gone::Deleted));
        pods.apply(watcher::Event::InitDone);
        assert_eq!(pods.gone(&name("db-0"), "u3"), None);
    }

    #[test]
    fn only_the_initial_pid_namespace_sees_every_process() {
        // Whatever this test runs in, the check reads the same link as the kernel shows.
        let link = std::fs::read_link("/proc/self/ns/pid").unwrap();
        assert_eq!(
            in_initial_pid_namespace(),
            link == Path::new(INITIAL_PID_NAMESPACE)
        );
    }
}
