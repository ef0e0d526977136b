//! The StatefulSet's pod moved to another node while its old node is a zombie: the old
//! node's kubelet is stopped (Kubernetes hears nothing from it) but its pods, the node
//! plugin and the writer among them, carry on. Kubernetes then believes what an admin's
//! force delete and a stale node status tell it, and attaches the volume to the other
//! node; holdfast's attach gate is what refuses, until the old node is fenced: here by
//! the `node.kubernetes.io/out-of-service` taint, which the installed controller turns
//! into a fence; the zombie's writes then fail with EIO.
//!
//! The other node is a Node object whose heartbeats this file drives (status and its
//! `kube-node-lease` Lease), with a CSINode naming the driver, served by a real node
//! plugin process (`holdfast-driver` on the host, the same lease store and backend as the
//! chart's): the scheduler places the pod there, and the attach/detach controller and
//! the real external-attacher act on it. No kubelet runs there, so the test plays the
//! kubelet's part after the attach: NodePublishVolume for the moved pod, and a write
//! through the FUSE mount it gets. Not covered: containerd running the pod there.
//!
//! Kubernetes v1.20 keeps a ReadWriteOnce volume attached to an unreachable node for 6
//! minutes before it force-detaches (1.24+ does it at once for a node with the
//! `out-of-service` taint); the test stands in for that by removing the volume from the
//! old node's reported `volumesInUse`, which is what the attach/detach controller reads.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
                    "csi.volume.kubernetes.io/nodeid": format!("{{\"{driver}\":\"{name}\"}}"),
                    // What a kubelet sets at registration: without it the attach/detach
                    // controller leaves the node's volumes to the kubelet.
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true"
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
        csinodes
            .create(&PostParams::default(), &csinode)
            .await
            .unwrap();
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

/// The other node's node plugin: the real binary on the host, as the chart runs it.
pub struct OtherPlugin {
    child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl OtherPlugin {
    pub async fn start(node: &str, backend: &Path, kubeconfig: &Path) -> OtherPlugin {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        let bin = controller_binary().with_file_name("holdfast-driver");
        let log = std::fs::File::create(dir.path().join("driver.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!("--node-id={node}"))
            .arg(format!("--backend-root={}", backend.display()))
            .arg(format!(
                "--state-dir={}",
                dir.path().join("state").display()
            ))
            .args([
                "--lease-store",
                "kubernetes",
                "--lease-namespace",
                "holdfast",
            ])
            .args(["--log-format", "text", "--metrics-address=0"])
            .env("KUBECONFIG", kubeconfig)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting holdfast-driver");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "no socket: {}",
                std::fs::read_to_string(dir.path().join("driver.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        OtherPlugin { child, socket, dir }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default()
    }
}

impl Drop for OtherPlugin {
    fn drop(&mut self) {
        // SIGTERM: the plugin stops gracefully (its session lease is deleted).
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
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
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .count()
}

/// The figures of the scenario, for the caller to print.
pub struct Moved {
    pub refused_message: String,
    pub granted_after_taint: Duration,
    pub eio_after_taint: Duration,
}

pub async fn moved_to_another_node(
    kubectl: &Kubectl,
    client: kube::Client,
    node: &KubeletNode,
    controller_bin: &Path,
    backend: &Path,
    log: &Path,
) -> Moved {
    let driver = "holdfast.csi.dev";
    let other = HeartbeatNode::start(client.clone(), "holdfast-other", driver).await;
    let plugin = OtherPlugin::start(&other.name, backend, &kubectl.kubeconfig).await;
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

    // The controller pod runs on the node about to go silent, and a silent kubelet
    // restarts none of its containers: start only once its attacher is up and leading
    // (its leader Lease renewed within the last 5 s).
    controller_settled(&client).await;

    // The zombie: kubelet silent, pods running; Kubernetes is told the pod is gone.
    kubectl.run(&["cordon", node.name()]);
    let zombie = pods.get("db-0").await.unwrap().metadata.uid.unwrap();
    node.pause_kubelet();
    let growing_from = lines(log);
    kubectl.run(&["delete", "pod", "db-0", "--force", "--grace-period=0"]);
    // As the attach/detach controller believes after its 6-minute wait on v1.20.
    let unmounted = json!({"status": {"volumesInUse": []}});
    nodes
        .patch_status(
            node.name(),
            &PatchParams::default(),
            &Patch::Merge(&unmounted),
        )
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    let refused = loop {
        // A status update the kubelet sent just before it stopped can land after the
        // patch above: say it again until the node shows nothing in use.
        let in_use = nodes
            .get_status(node.name())
            .await
            .unwrap()
            .status
            .and_then(|s| s.volumes_in_use)
            .unwrap_or_default();
        if !in_use.is_empty() {
            nodes
                .patch_status(
                    node.name(),
                    &PatchParams::default(),
                    &Patch::Merge(&unmounted),
                )
                .await
                .unwrap();
        }
        let va = vas
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|va| {
                va.spec.node_name == other.name
                    && va.spec.source.persistent_volume_name.as_deref() == Some(&pv)
            });
        let error = va
            .and_then(|va| va.status)
            .and_then(|s| s.attach_error)
            .and_then(|e| e.message);
        if let Some(message) = error.filter(|m| m.contains("is held by pod")) {
            break message;
        }
        if Instant::now() > deadline {
            panic!(
                "no refused VolumeAttachment for {} within 120 s\n{}\n{}",
                other.name,
                plugin.log(),
                kubectl.run(&["get", "volumeattachments,nodes,pods", "-A", "-o", "wide"])
                    + &kubectl.run(&["describe", "pod", "db-0"])
                    + &kubectl.run(&["describe", "volumeattachments"])
                    + &controller_pod_logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(refused.contains("default/db-0"), "{refused}");
    assert!(refused.contains(node.name()), "{refused}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines(log) <= growing_from {
        assert!(
            Instant::now() < deadline,
            "the zombie's writer should still be writing while refused"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

    // The admin marks the zombie out of service (NoSchedule: no evictions, so nothing
    // but the taint itself is tested); the controller fences it, the attach goes
    // through, and the zombie's writer gets EIO.
    let taint = "node.kubernetes.io/out-of-service=nodeshutdown:NoSchedule";
    let fenced = Instant::now();
    kubectl.run(&["taint", "nodes", node.name(), taint]);
    let zombie_logs = PathBuf::from(format!("/var/log/pods/default_db-0_{zombie}"));
    let mut eio_after_taint = None;
    let deadline = fenced + Duration::from_secs(180);
    let granted_after_taint = loop {
        if eio_after_taint.is_none()
            && super::lock::container_logs(&zombie_logs).contains("Input/output error")
        {
            eio_after_taint = Some(fenced.elapsed());
        }
        let attached = vas
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .any(|va| va.spec.node_name == other.name && va.status.is_some_and(|s| s.attached));
        if attached {
            break fenced.elapsed();
        }
        if Instant::now() > deadline {
            panic!(
                "not attached within 180 s of the taint\n{}\n{}",
                kubectl.run(&["describe", "volumeattachments"]),
                plugin.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let deadline = fenced + Duration::from_secs(30);
    let eio_after_taint = loop {
        if let Some(at) = eio_after_taint {
            break at;
        }
        if super::lock::container_logs(&zombie_logs).contains("Input/output error") {
            break fenced.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the zombie's writer saw no EIO within 30 s of the taint: {}",
            super::lock::container_logs(&zombie_logs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = lines(log);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lines(log),
        after,
        "the fenced zombie's writer still lands writes"
    );

    // The kubelet's part on the other node: mount for the moved pod, and write.
    let moved = pods.get("db-0").await.unwrap();
    let target = plugin.dir.path().join("pods/db-0/mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    node_publish(
        &plugin.socket,
        &pv_object(&client, &pv).await,
        &moved,
        &target,
    )
    .await;
    std::fs::OpenOptions::new()
        .append(true)
        .open(target.join("log"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"0 db-0-on-holdfast-other moved\n"))
        .expect("the moved pod writes through its FUSE mount");
    let text = std::fs::read_to_string(log).unwrap();
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.contains("db-0-on-holdfast-other")),
        "the moved pod's write is the last line: {:?}",
        text.lines().rev().take(3).collect::<Vec<_>>()
    );
    unpublish(&plugin.socket, &pv_object(&client, &pv).await, &target).await;

    // Back to one healthy node: the old node wakes and is unfenced, then the moved pod
    // goes and the StatefulSet's next one lands there (the other node is cordoned). The
    // other node is removed only once its attachment is gone: its detach needs it and
    // its plugin, and a PV with an attachment left is never deleted.
    node.resume_kubelet();
    kubectl.run(&[
        "taint",
        "nodes",
        node.name(),
        "node.kubernetes.io/out-of-service-",
    ]);
    // The plugin on the old node kept its session, so the taint's fence stays until it
    // starts a new one (or an admin lifts it, as here).
    controller_cli(controller_bin, kubectl, &["unfence", "--node", node.name()]);
    kubectl.run(&["uncordon", node.name()]);
    kubectl.run(&["cordon", &other.name]);
    pods.delete("db-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = vas
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .any(|va| va.spec.node_name == other.name);
        if !left {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other node's attachment is not gone 120 s after its pod\n{}{}\n{}",
            kubectl.run(&["get", "volumeattachments,nodes,pods", "-A", "-o", "wide"]),
            kubectl.run(&["describe", "volumeattachments"]),
            controller_pod_logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    other.remove().await;
    // The StatefulSet's pod writes again on the old node.
    let moved_line = lines(log);
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines(log) <= moved_line {
        assert!(
            Instant::now() < deadline,
            "db-0 not writing again on {} within 120 s\n{}",
            node.name(),
            kubectl.run(&["get", "volumeattachments,nodes,pods", "-A", "-o", "wide"])
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Moved {
        refused_message: refused,
        granted_after_taint,
        eio_after_taint,
    }
}

/// Waits (up to 120 s) until every container of the controller pod is ready and the
/// attacher's leader Lease was renewed within the last 5 s.
async fn controller_settled(client: &kube::Client) {
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), "holdfast");
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), "holdfast");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
            .await
            .unwrap()
            .items
            .iter()
            .any(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|c| c.iter().all(|c| c.ready))
            });
        let renewed = leases
            .get_opt("external-attacher-leader-holdfast-csi-dev")
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.renew_time)
            .is_some_and(|t| {
                let age = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
                age.as_secs() < 5
            });
        if ready && renewed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the controller pod did not settle within 120 s\n{}",
            controller_pod_logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn pv_object(
    client: &kube::Client,
    name: &str,
) -> k8s_openapi::api::core::v1::PersistentVolume {
    kube::Api::all(client.clone()).get(name).await.unwrap()
}

/// NodePublishVolume as kubelet sends it for `pod` (podInfoOnMount).
async fn node_publish(
    socket: &Path,
    pv: &k8s_openapi::api::core::v1::PersistentVolume,
    pod: &Pod,
    target: &Path,
) {
    use holdfast_core::csi::v1::{
        node_client::NodeClient, volume_capability, NodePublishVolumeRequest, VolumeCapability,
    };
    let csi = pv.spec.as_ref().unwrap().csi.as_ref().unwrap();
    let mut context = csi.volume_attributes.clone().unwrap_or_default();
    context.extend([
        (
            "csi.storage.k8s.io/pod.uid".to_string(),
            pod.metadata.uid.clone().unwrap(),
        ),
        (
            "csi.storage.k8s.io/pod.name".to_string(),
            "db-0".to_string(),
        ),
        (
            "csi.storage.k8s.io/pod.namespace".to_string(),
            "default".to_string(),
        ),
    ]);
    let channel = holdfast_core::csi::serve::connect_unix(socket)
        .await
        .unwrap();
    let request = NodePublishVolumeRequest {
        volume_id: csi.volume_handle.clone(),
        target_path: target.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        volume_context: context.into_iter().collect(),
        ..Default::default()
    };
    NodeClient::new(channel)
        .node_publish_volume(request)
        .await
        .expect("NodePublishVolume on the other node after the fence");
}

async fn unpublish(
    socket: &Path,
    pv: &k8s_openapi::api::core::v1::PersistentVolume,
    target: &Path,
) {
    use holdfast_core::csi::v1::{node_client::NodeClient, NodeUnpublishVolumeRequest};
    let csi = pv.spec.as_ref().unwrap().csi.as_ref().unwrap();
    let channel = holdfast_core::csi::serve::connect_unix(socket)
        .await
        .unwrap();
    NodeClient::new(channel)
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: csi.volume_handle.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("NodeUnpublishVolume on the other node");
}

/// The last lines of every container log (all restarts) of the chart's controller pods
/// on the kubelet node: why a VolumeAttachment is not acted on shows there.
pub fn controller_pod_logs() -> String {
    let mut text = String::new();
    let Ok(pods) = std::fs::read_dir("/var/log/pods") else {
        return text;
    };
    for pod in pods.flatten() {
        if !pod
            .file_name()
            .to_string_lossy()
            .starts_with("holdfast_holdfast-controller")
        {
            continue;
        }
        for container in std::fs::read_dir(pod.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for file in std::fs::read_dir(container.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let log = std::fs::read_to_string(file.path()).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                text.push_str(&format!("--- {}\n", file.path().display()));
                for line in &lines[lines.len().saturating_sub(25)..] {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    }
    text
}

fn controller_cli(bin: &Path, kubectl: &Kubectl, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .args([
            "--lease-store",
            "kubernetes",
            "--lease-namespace",
            "holdfast",
        ])
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
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("holdfast-controller")
}
