//! The watches behind the Events: VolumeAttachments of this driver, and the Pods and
//! PersistentVolumes that say whom a VolumeAttachment is for. kube-runtime watchers
//! (list, then watch; re-list with backoff after an error), never polling.
//!
//! - A VolumeAttachment whose `status.attachError` is the attach gate's refusal
//!   ([`crate::kubernetes::refusal`]) gets a `VolumeHeldElsewhere` Event on the pod
//!   waiting for it (the pod on the attachment's node that mounts the PV's claim) and on
//!   the PVC (the PV's `spec.claimRef`). Each new error the attacher writes (it retries
//!   with backoff) is one more occurrence of the same Event series.
//! - When a VolumeAttachment this watch saw refused becomes attached, the volume changed
//!   hands: `VolumeTakenOver` on the new pod and the PVC, saying from whom and, from the
//!   lease store, why the holder lost it (fenced, released, or its lease expired).
//! - The Node watch hands over the claims the out-of-service taint fenced
//!   ([`FencedVolumes`]); each PV's PVC gets `VolumeReleasedByFence`.
//!
//! Leader only: the watches start when this replica becomes leader and are dropped
//! when it stops leading (followers keep no Pod cache). What was refused is kept in
//! this task's memory only: a new leader that never saw a refusal publishes no
//! takeover for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use holdfast_core::csi::identity::DRIVER_NAME;
use holdfast_core::lease::ClaimState;
use holdfast_core::store::LeaseStore;
use k8s_openapi::api::core::v1::{
    ObjectReference, PersistentVolume, PersistentVolumeSpec, Pod, PodSpec, PodStatus,
};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource, ResourceExt};
use tokio::sync::{mpsc, watch};

use crate::kubernetes::events::{self, Freed, Publisher, Reason};
use crate::kubernetes::leader::Leadership;
use crate::kubernetes::refusal::{self, Refusal};
use crate::metrics;

/// Claims the out-of-service taint fenced on one node (sent by the Node watch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FencedVolumes {
    pub node: String,
    pub volumes: Vec<String>,
}

/// Why an Event has nowhere to go (logged at debug level; nothing is retried).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unaddressed {
    #[error("no PersistentVolume {0} in the cache")]
    NoVolume(String),
    #[error("PersistentVolume {0} is bound to no claim")]
    Unbound(String),
    #[error("no PersistentVolume of {DRIVER_NAME} has volume handle {0}")]
    NoVolumeForHandle(String),
}

/// The watches and what they publish.
pub struct AttachWatch {
    client: kube::Client,
    store: Arc<dyn LeaseStore>,
    leadership: Leadership,
    publisher: Publisher,
    /// How long each watch request lasts before it is resumed.
    timeout: Duration,
    fenced: mpsc::UnboundedReceiver<FencedVolumes>,
}

impl AttachWatch {
    pub fn new(
        client: kube::Client,
        store: Arc<dyn LeaseStore>,
        leadership: Leadership,
        publisher: Publisher,
        timeout: Duration,
        fenced: mpsc::UnboundedReceiver<FencedVolumes>,
    ) -> Self {
        AttachWatch {
            client,
            store,
            leadership,
            publisher,
            timeout,
            fenced,
        }
    }

    /// Watches while leading, until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut gained = self.leadership.gained();
        loop {
            // Wait to lead (gained, or a periodic look for the always-leading case).
            while !self.leadership.is_leading() {
                tokio::select! {
                    _ = gained.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            tracing::info!(
                "leading: watching VolumeAttachments, Pods and PersistentVolumes for Events"
            );
            let leadership = self.leadership.clone();
            let lost = async move {
                while leadership.is_leading() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            };
            tokio::select! {
                _ = self.term() => {}
                _ = lost => tracing::info!("no longer leading: the VolumeAttachment, Pod and PersistentVolume watches stop"),
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One leadership term: fresh caches, fresh memory of refusals.
    async fn term(&mut self) {
        let seconds = self.timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
        let config = || watcher::Config::default().timeout(seconds);
        let (pods, pod_writer) = reflector::store();
        let (volumes, volume_writer) = reflector::store();
        // Only pods bound to a node can wait for an attachment.
        let pod_stream = watcher(
            Api::<Pod>::all(self.client.clone()),
            config().fields("spec.nodeName!="),
        )
        .default_backoff()
        .modify(slim_pod)
        .reflect(pod_writer);
        let volume_stream = watcher(Api::<PersistentVolume>::all(self.client.clone()), config())
            .default_backoff()
            .modify(slim_volume)
            .reflect(volume_writer);
        let attachments =
            watcher(Api::<VolumeAttachment>::all(self.client.clone()), config()).default_backoff();
        let handler = Handler {
            store: self.store.clone(),
            publisher: self.publisher.clone(),
            pods,
            volumes,
            refused: HashMap::new(),
        };
        tokio::join!(
            drain(pod_stream, "pods"),
            drain(volume_stream, "persistentvolumes"),
            handler.run(attachments, &mut self.fenced),
        );
    }
}

/// Runs a reflector stream for its cache, logging its errors.
async fn drain<K, S>(stream: S, resource: &'static str)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        if let Err(err) = item {
            metrics::count_watch_restart(resource);
            tracing::warn!(%err, resource, "watch failed; it backs off and re-lists");
        }
    }
}

/// What a pod must keep to be found: its names, node, claim volumes, phase.
fn slim_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.owner_references = None;
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            volumes: spec.volumes.map(|v| {
                v.into_iter()
                    .filter(|v| v.persistent_volume_claim.is_some())
                    .collect()
            }),
            ..PodSpec::default()
        });
    }
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        ..PodStatus::default()
    });
}

/// What a PV must keep: its claim and CSI volume handle.
fn slim_volume(pv: &mut PersistentVolume) {
    pv.metadata.managed_fields = None;
    pv.metadata.annotations = None;
    pv.metadata.labels = None;
    pv.status = None;
    if let Some(spec) = pv.spec.take() {
        pv.spec = Some(PersistentVolumeSpec {
            claim_ref: spec.claim_ref,
            csi: spec.csi,
            ..PersistentVolumeSpec::default()
        });
    }
}

/// A refusal seen on one VolumeAttachment, and which error of the attacher it came from.
struct Seen {
    refusal: Refusal,
    /// `status.attachError.time` and message: a VolumeAttachment update that does not
    /// change them (a finalizer, a re-list) is not another refusal.
    error: (Option<String>, String),
}

struct Handler {
    store: Arc<dyn LeaseStore>,
    publisher: Publisher,
    pods: Store<Pod>,
    volumes: Store<PersistentVolume>,
    /// VolumeAttachment name → its latest refusal, until attached or deleted.
    refused: HashMap<String, Seen>,
}

impl Handler {
    async fn run<S>(mut self, attachments: S, fenced: &mut mpsc::UnboundedReceiver<FencedVolumes>)
    where
        S: Stream<Item = Result<watcher::Event<VolumeAttachment>, watcher::Error>>,
    {
        // An Event needs the pod and the PVC: wait for both caches' first lists.
        if self.pods.wait_until_ready().await.is_err()
            || self.volumes.wait_until_ready().await.is_err()
        {
            return;
        }
        let mut attachments = std::pin::pin!(attachments);
        loop {
            tokio::select! {
                item = attachments.next() => match item {
                    Some(Ok(watcher::Event::Apply(va) | watcher::Event::InitApply(va))) => {
                        self.attachment(&va).await
                    }
                    Some(Ok(watcher::Event::Delete(va))) => {
                        self.refused.remove(&va.name_any());
                    }
                    Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                    Some(Err(err)) => {
                        metrics::count_watch_restart("volumeattachments");
                        tracing::warn!(%err, "VolumeAttachment watch failed; it backs off and re-lists");
                    }
                    None => return,
                },
                Some(fence) = fenced.recv() => self.fenced(&fence).await,
            }
        }
    }

    async fn attachment(&mut self, va: &VolumeAttachment) {
        if va.spec.attacher != DRIVER_NAME {
            return;
        }
        let Some(pv) = va.spec.source.persistent_volume_name.as_deref() else {
            return; // An inline volume has no PVC to tell.
        };
        let name = va.name_any();
        let node = va.spec.node_name.as_str();
        let status = va.status.as_ref();
        if status.is_some_and(|s| s.attached) {
            if let Some(seen) = self.refused.remove(&name) {
                self.taken_over(va, pv, node, &seen.refusal).await;
            }
            return;
        }
        let Some(error) = status.and_then(|s| s.attach_error.as_ref()) else {
            return;
        };
        let message = error.message.clone().unwrap_or_default();
        let Some(refusal) = refusal::parse(&message) else {
            return;
        };
        let key = (error.time.as_ref().map(|t| t.0.to_string()), message);
        if self.refused.get(&name).is_some_and(|s| s.error == key) {
            return;
        }
        let note = events::held_note(&refusal);
        self.refused.insert(
            name,
            Seen {
                refusal,
                error: key,
            },
        );
        let related = va.object_ref(&());
        for pod in self.waiting_pods(pv, node) {
            self.publisher
                .publish(Reason::VolumeHeldElsewhere, &note, &pod, Some(&related))
                .await;
        }
        match self.claim_of(pv) {
            Ok(pvc) => {
                self.publisher
                    .publish(Reason::VolumeHeldElsewhere, &note, &pvc, Some(&related))
                    .await
            }
            Err(why) => tracing::debug!(%why, "no PVC to tell of the refused attach"),
        }
    }

    async fn taken_over(&self, va: &VolumeAttachment, pv: &str, node: &str, was: &Refusal) {
        let freed = self.freed(was).await;
        let note = events::taken_over_note(&was.volume, &was.pod, &was.node, &freed);
        let related = va.object_ref(&());
        for pod in self.waiting_pods(pv, node) {
            self.publisher
                .publish(Reason::VolumeTakenOver, &note, &pod, Some(&related))
                .await;
        }
        match self.claim_of(pv) {
            Ok(pvc) => {
                self.publisher
                    .publish(Reason::VolumeTakenOver, &note, &pvc, Some(&related))
                    .await
            }
            Err(why) => tracing::debug!(%why, "no PVC to tell of the takeover"),
        }
    }

    /// Why the holder lost the volume, as the store says now: its node's fence, else its
    /// claim released, else (still held by it, or already taken) its lease expired.
    async fn freed(&self, was: &Refusal) -> Freed {
        match self.store.get_fence(&was.node).await {
            Ok(Some(fence)) => {
                return Freed::Fenced {
                    reason: fence.value.reason,
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(%error, "cannot read the holder's fence; saying its lease expired")
            }
        }
        match self.store.get_claim(&was.volume).await {
            Ok(Some(claim)) if claim.value.holder.node == was.node => match claim.value.state {
                ClaimState::Released => Freed::Released,
                ClaimState::Fenced => Freed::Fenced {
                    reason: "a node fence".to_string(),
                },
                ClaimState::Held => Freed::LeaseExpired,
            },
            _ => Freed::LeaseExpired,
        }
    }

    async fn fenced(&self, fence: &FencedVolumes) {
        let related = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(fence.node.clone()),
            ..ObjectReference::default()
        };
        for volume in &fence.volumes {
            let note = events::fenced_note(&fence.node, volume);
            match self.claim_of_handle(volume) {
                Ok(pvc) => {
                    self.publisher
                        .publish(Reason::VolumeReleasedByFence, &note, &pvc, Some(&related))
                        .await
                }
                Err(why) => tracing::debug!(%why, "no PVC to tell of the fence"),
            }
        }
    }

    /// Pods on `node` that mount the claim PV `pv` is bound to, not finished or deleted.
    fn waiting_pods(&self, pv: &str, node: &str) -> Vec<ObjectReference> {
        let Ok(pvc) = self.claim_of(pv) else {
            return Vec::new();
        };
        waiting_pods(&self.pods.state(), &pvc, node)
    }

    fn claim_of(&self, pv: &str) -> Result<ObjectReference, Unaddressed> {
        let volume = self
            .volumes
            .get(&ObjectRef::new(pv))
            .ok_or_else(|| Unaddressed::NoVolume(pv.to_string()))?;
        claim_ref(&volume).ok_or_else(|| Unaddressed::Unbound(pv.to_string()))
    }

    fn claim_of_handle(&self, handle: &str) -> Result<ObjectReference, Unaddressed> {
        let volume = self
            .volumes
            .find(|pv| {
                pv.spec
                    .as_ref()
                    .and_then(|s| s.csi.as_ref())
                    .is_some_and(|csi| csi.driver == DRIVER_NAME && csi.volume_handle == handle)
            })
            .ok_or_else(|| Unaddressed::NoVolumeForHandle(handle.to_string()))?;
        claim_ref(&volume).ok_or_else(|| Unaddressed::Unbound(volume.name_any()))
    }
}

/// The PVC a PV is bound to, as an Event's `regarding` (its UID is what `kubectl
/// describe pvc` matches on).
fn claim_ref(pv: &PersistentVolume) -> Option<ObjectReference> {
    let claim = pv.spec.as_ref()?.claim_ref.as_ref()?;
    Some(ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: claim.namespace.clone(),
        name: Some(claim.name.clone()?),
        uid: claim.uid.clone(),
        ..ObjectReference::default()
    })
}

/// Of `pods`, those on `node` that mount `pvc` and may still run.
fn waiting_pods(pods: &[Arc<Pod>], pvc: &ObjectReference, node: &str) -> Vec<ObjectReference> {
    pods.iter()
        .filter(|pod| pod.namespace() == pvc.namespace && pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .filter(|pod| {
            let Some(spec) = pod.spec.as_ref() else {
                return false;
            };
            spec.node_name.as_deref() == Some(node)
                && spec.volumes.iter().flatten().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| Some(&c.claim_name) == pvc.name.as_ref())
                })
        })
        .map(|pod| pod.object_ref(&()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str, name: &str, node: &str, claim: &str, phase: &str) -> Arc<Pod> {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": namespace, "name": name, "uid": format!("{name}-uid"),
                         "annotations": {"a": "b"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}],
                     "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}},
                                 {"name": "tmp", "emptyDir": {}}]},
            "status": {"phase": phase, "hostIP": "10.0.0.1"},
        }))
        .unwrap();
        slim_pod(&mut pod);
        Arc::new(pod)
    }

    #[test]
    fn finds_the_pod_on_the_node_that_mounts_the_claim() {
        let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pv-1"},
            "spec": {"claimRef": {"namespace": "db", "name": "data-db-0", "uid": "pvc-uid"},
                     "csi": {"driver": DRIVER_NAME, "volumeHandle": "hf-1"}},
        }))
        .unwrap();
        let pvc = claim_ref(&pv).unwrap();
        assert_eq!(pvc.kind.as_deref(), Some("PersistentVolumeClaim"));
        assert_eq!(pvc.uid.as_deref(), Some("pvc-uid"));
        let pods = vec![
            pod("db", "db-0", "n2", "data-db-0", "Pending"),
            pod("db", "old", "n1", "data-db-0", "Running"),
            pod("db", "done", "n2", "data-db-0", "Succeeded"),
            pod("db", "other", "n2", "data-db-1", "Pending"),
            pod("web", "same-claim-name", "n2", "data-db-0", "Pending"),
        ];
        let found = waiting_pods(&pods, &pvc, "n2");
        let names: Vec<_> = found.iter().filter_map(|r| r.name.as_deref()).collect();
        assert_eq!(names, ["db-0"]);
        assert_eq!(found[0].uid.as_deref(), Some("db-0-uid"));
        // The cache keeps what the search needs only.
        assert!(pods[0].metadata.annotations.is_none());
        assert!(pods[0].spec.as_ref().unwrap().containers.is_empty());
        assert_eq!(
            pods[0]
                .spec
                .as_ref()
                .unwrap()
                .volumes
                .as_ref()
                .unwrap()
                .len(),
            1
        );
    }
}
