//! The StatefulSet's pod moved to another node while its old node is a zombie: the old
//! node's kubelet is stopped (Kubernetes hears nothing from it) but its pods, the node
//! plugin and the writer among them, carry on. Kubernetes then believes what an admin's
//! force delete and a stale node status tell it, and attaches the volume to the other
//! node; holdfast's attach gate is what refuses, until the old node is fenced.
//!
//! The other node is a Node object whose heartbeats this file drives (status and its
//! `kube-node-lease` Lease), with a CSINode naming the driver: the scheduler places the
//! pod there and the attach/detach controller and the real external-attacher act on it.
//! No kubelet runs there, so the pod never starts: this covers the attach path, not a
//! mount on the second node (the e2e suite covers takeovers by real node plugins).
//!
//! Kubernetes v1.20 keeps a ReadWriteOnce volume attached to an unreachable node for 6
//! minutes before it force-detaches (1.24+ does it at once for a node with the
//! `out-of-service` taint); the test stands in for that by removing the volume from the
//! old node's reported `volumesInUse`, which is what the attach/detach controller reads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use holdfast_core::testkit::kube::KubeletNode;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::lock::Kubectl;

/// A Node object kept Ready by this process.
pub struct HeartbeatNode {
    pub name: String,
    client: kube::Client,
    beats: tokio::task::JoinHandle<()>,
}

impl HeartbeatNode {
    pub async fn start(client: kube::Client, name: &str, driver: &str) -> HeartbeatNode {
        let nodes: kube::Api<Node> = kube::Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
                "annotations": {
                    "csi.volume.kubernetes.io/nodeid": format!("{{\"{driver}\":\"{name}\"}}")
                }
            }
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
        let csinodes: kube::Api<CSINode> = kube::Api::all(client.clone());
        let csinode: CSINode = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"drivers": [{"name": driver, "nodeID": name}]}
        }))
        .unwrap();
        csinodes.create(&PostParams::default(), &csinode).await.unwrap();
        beat(&client, name).await;
        let beats = {
            let (client, name) = (client.clone(), name.to_string());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    beat(&client, &name).await;
                }
            })
        };
        HeartbeatNode {
            name: name.to_string(),
            client,
            beats,
        }
    }

    pub async fn remove(self) {
        self.beats.abort();
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        let _ = nodes.delete(&self.name, &DeleteParams::default()).await;
        let csinodes: kube::Api<CSINode> = kube::Api::all(self.client.clone());
        let _ = csinodes.delete(&self.name, &DeleteParams::default()).await;
    }
}

/// One heartbeat, as a kubelet sends it: the Ready condition and the node's Lease.
async fn beat(client: &kube::Client, name: &str) {
    // RFC 3339 in UTC, whole seconds for the conditions, microseconds for the Lease.
    let now = k8s_openapi::jiff::Timestamp::now();
    let micros = format!("{now:.6}");
    let now = format!("{now:.0}");
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let status = json!({"status": {
        "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "heartbeats driven by the test",
            "lastHeartbeatTime": now, "lastTransitionTime": now
        }]
    }});
    let _ = nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await;
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                 "renewTime": micros}
    });
    let _ = leases
        .patch(
            name,
            &PatchParams::apply("holdfast-test").force(),
            &Patch::Apply(&lease),
        )
        .await;
}

fn lines(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().count()
}

/// The figures of the scenario, for the caller to print.
pub struct Moved {
    pub refused_message: String,
    pub granted_after_fence: Duration,
}

pub async fn moved_to_another_node(
    kubectl: &Kubectl,
    client: kube::Client,
    node: &KubeletNode,
    controller_bin: &Path,
    log: &Path,
) -> Moved {
    let driver = "holdfast.csi.dev";
    let other = HeartbeatNode::start(client.clone(), "holdfast-other", driver).await;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), "default");
    let vas: kube::Api<VolumeAttachment> = kube::Api::all(client.clone());
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let pv = pods
        .get("db-0")
        .await
        .unwrap()
        .spec
        .unwrap()
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find_map(|v| v.persistent_volume_claim.map(|c| c.claim_name))
        .expect("db-0's claim");
    let pvcs: kube::Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        kube::Api::namespaced(client.clone(), "default");
    let pv = pvcs
        .get(&pv)
        .await
        .unwrap()
        .spec
        .unwrap()
        .volume_name
        .expect("bound");

    // The zombie: kubelet silent, pods running; Kubernetes is told the pod is gone.
    kubectl.run(&["cordon", node.name()]);
    node.pause_kubelet();
    let growing_from = lines(log);
    kubectl.run(&["delete", "pod", "db-0", "--force", "--grace-period=0"]);
    // As the attach/detach controller believes after its 6-minute wait on v1.20.
    let unmounted = json!({"status": {"volumesInUse": []}});
    nodes
        .patch_status(node.name(), &PatchParams::default(), &Patch::Merge(&unmounted))
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    let refused = loop {
        let va = vas
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|va| va.spec.node_name == other.name && va.spec.source.persistent_volume_name.as_deref() == Some(&pv));
        let error = va
            .and_then(|va| va.status)
            .and_then(|s| s.attach_error)
            .and_then(|e| e.message);
        if let Some(message) = error.filter(|m| m.contains("is held by pod")) {
            break message;
        }
        assert!(
            Instant::now() < deadline,
            "no refused VolumeAttachment for {} within 120 s",
            other.name
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(refused.contains("default/db-0"), "{refused}");
    assert!(refused.contains(node.name()), "{refused}");
    assert!(
        lines(log) > growing_from,
        "the zombie's writer should still be writing while refused"
    );
    kubectl.show(&["describe", "volumeattachment"]);
    let events: kube::Api<Event> = kube::Api::namespaced(client.clone(), "default");
    let new_pod = pods.get("db-0").await.unwrap();
    assert_eq!(
        new_pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(other.name.as_str())
    );
    let uid = new_pod.metadata.uid.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attach_events: Vec<String> = events
            .list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("FailedAttachVolume"))
            .filter_map(|e| e.message)
            .collect();
        if attach_events.iter().any(|m| m.contains("is held by pod")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the moved pod's events never named the holder: {attach_events:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    kubectl.show(&["describe", "pod", "db-0"]);

    // The admin fences the zombie: the attach goes through, its writer stops.
    let fenced = Instant::now();
    controller_cli(controller_bin, kubectl, &["fence", "--node", node.name()]);
    let deadline = fenced + Duration::from_secs(180);
    let granted_after_fence = loop {
        let attached = vas
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .any(|va| {
                va.spec.node_name == other.name
                    && va.status.is_some_and(|s| s.attached)
            });
        if attached {
            break fenced.elapsed();
        }
        assert!(Instant::now() < deadline, "not attached within 180 s of the fence");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = lines(log);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lines(log), after, "the fenced zombie's writer still lands writes");

    // Back to one healthy node: the moved pod goes, the old node wakes and is unfenced.
    pods.delete("db-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    other.remove().await;
    node.resume_kubelet();
    controller_cli(controller_bin, kubectl, &["unfence", "--node", node.name()]);
    kubectl.run(&["uncordon", node.name()]);
    Moved {
        refused_message: refused,
        granted_after_fence,
    }
}

fn controller_cli(bin: &Path, kubectl: &Kubectl, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .args(["--lease-store", "kubernetes", "--lease-namespace", "holdfast"])
        .env("KUBECONFIG", &kubectl.kubeconfig)
        .output()
        .expect("running holdfast-controller");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "holdfast-controller {args:?}: {text}");
    println!("holdfast-controller {}:\n{text}", args.join(" "));
    text
}

pub fn controller_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("holdfast-controller")
}
