//! Least privilege, proven on a real API server: the node plugins and the controller run
//! with the kubernetes lease store as the chart's own ServiceAccounts, under the chart's
//! RBAC (`manifests/deploy/20-rbac.yaml`, the chart rendered with its defaults), through
//! every path that touches the store — claim, renewals, release, hand-over, takeover
//! after a crash (which deletes the dead session), fence, claims listing, unfence. The API server's audit log then shows:
//! - no call of either identity was refused (403): everything the code does is granted;
//! - every verb and resource the chart grants holdfast's own code (the node plugin's
//!   Role; the controller's `-lease-store` Role, its `-leader` Role for leader election
//!   on its Lease, its `-nodes` ClusterRole for the Node watch of the out-of-service
//!   taint, and its `-events` ClusterRole for the Events on waiting pods and PVCs) was
//!   used: a grant no code path needs fails the test, so the chart cannot drift wider
//!   than the code. The serving controller elects itself leader (get, create, then
//!   patch renewals of its Lease) and lists and watches Nodes, VolumeAttachments, Pods
//!   and PersistentVolumes all along; a refused attach, recorded twice on a
//!   VolumeAttachment as the external-attacher records it, makes it create an Event and
//!   patch its series.
//!
//! The node plugin's `holdfast-node-pods` ClusterRole (pods get/delete, events create: the
//! Events and restarts after a FUSE data path died with a previous plugin) is audited the
//! same way by `driver/tests/data_path_loss.rs`, which plays the restart this suite does not.
//!
//! The sidecars' rules (provisioner, attacher, resizer, leader election) are their
//! upstream projects' and are not checked here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use holdfast_core::testkit::kube::{bins, ControlPlane, Identity};
use holdfast_e2e::cluster::CHART_RBAC;
use holdfast_e2e::Cluster;

/// (API group, resource, verb)
type Grant = (String, String, String);

/// The rules of the Role or ClusterRole `name` in the chart's RBAC.
fn granted(name: &str) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    let mut found = false;
    for doc in CHART_RBAC.split("\n---") {
        let value: serde_json::Value = serde_yaml_ng::from_str(doc).unwrap();
        let kind = value["kind"].as_str().unwrap_or_default();
        if !(kind == "Role" || kind == "ClusterRole") || value["metadata"]["name"] != name {
            continue;
        }
        found = true;
        for rule in value["rules"].as_array().unwrap() {
            let list = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        grants.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    assert!(found, "the chart's RBAC has no Role or ClusterRole {name}");
    grants
}

/// Every role bound to `service_account` (namespace `holdfast`) in the chart's RBAC.
fn roles_bound_to(service_account: &str) -> BTreeSet<String> {
    let mut roles = BTreeSet::new();
    for doc in CHART_RBAC.split("\n---") {
        let value: serde_json::Value = serde_yaml_ng::from_str(doc).unwrap();
        let kind = value["kind"].as_str().unwrap_or_default();
        if !kind.ends_with("Binding") {
            continue;
        }
        let bound = value["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == service_account);
        if bound {
            roles.insert(value["roleRef"]["name"].as_str().unwrap().to_string());
        }
    }
    roles
}

fn kubectl() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kube-tools/kubectl");
    path.is_file().then_some(path)
}

/// `kubectl <args>` as the admin; stdout, or a panic with stderr.
fn kubectl_admin(kubectl: &Path, plane: &ControlPlane, args: &[&str]) -> String {
    let out = Command::new(kubectl)
        .arg(format!(
            "--kubeconfig={}",
            plane.kubeconfig(&Identity::Admin).display()
        ))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Plays the attach/detach controller and the external-attacher for `volume` on
/// `node1`: a pod there waiting on a PVC bound to the volume's PV, its
/// VolumeAttachment, and the gate's `refusal` written into the attachment's status
/// twice, as the attacher's retries do. Returns once the controller's Event on the pod
/// counts both.
async fn refused_attachment(kubectl: &Path, plane: &ControlPlane, volume: &str, refusal: &str) {
    plane
        .apply_yaml(&format!(
            r#"apiVersion: v1
kind: Namespace
metadata: {{name: apps}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: default, namespace: apps}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: data, namespace: apps}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  volumeName: pv-rbac
  resources: {{requests: {{storage: 1Gi}}}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: pv-rbac}}
spec:
  accessModes: [ReadWriteOnce]
  capacity: {{storage: 1Gi}}
  storageClassName: ""
  persistentVolumeReclaimPolicy: Retain
  csi: {{driver: holdfast.csi.dev, volumeHandle: {volume}}}
  claimRef: {{apiVersion: v1, kind: PersistentVolumeClaim, namespace: apps, name: data}}
---
apiVersion: v1
kind: Pod
metadata: {{name: waiting, namespace: apps}}
spec:
  nodeName: node1
  automountServiceAccountToken: false
  containers: [{{name: c, image: writer:test}}]
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: data}}}}]
---
apiVersion: storage.k8s.io/v1
kind: VolumeAttachment
metadata: {{name: csi-rbac-node1}}
spec:
  attacher: holdfast.csi.dev
  nodeName: node1
  source: {{persistentVolumeName: pv-rbac}}
"#
        ))
        .await;
    for second in ["01", "02"] {
        let status = serde_json::json!({"status": {"attached": false, "attachError": {
            "message": format!("rpc error: code = FailedPrecondition desc = {refusal}"),
            "time": format!("2026-01-01T00:00:{second}Z"),
        }}});
        kubectl_admin(
            kubectl,
            plane,
            &[
                "patch",
                "volumeattachment",
                "csi-rbac-node1",
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ],
        );
        // The second error must land after the first Event, or the two are one.
        let start = Instant::now();
        loop {
            let listed = kubectl_admin(
                kubectl,
                plane,
                &["get", "events.v1.events.k8s.io", "-n", "apps", "-o", "json"],
            );
            let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
            let count = listed["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| {
                    e["reason"] == "VolumeHeldElsewhere" && e["regarding"]["name"] == "waiting"
                })
                .map(|e| e["series"]["count"].as_i64().unwrap_or(1))
                .max();
            let want = if second == "01" { 1 } else { 2 };
            if count.is_some_and(|c| c >= want) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no VolumeHeldElsewhere Event counting {want} on apps/waiting: {listed:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_grants_exactly_what_the_code_uses() {
    let test = "chart_rbac_grants_exactly_what_the_code_uses";
    // The audit log records a watch when it ends: the controller's Node watch requests
    // last 3 s here (290 s by default), so its watches show within the test.
    std::env::set_var("HOLDFAST_NODE_WATCH_TIMEOUT", "3s");
    std::env::set_var("HOLDFAST_EVENTS_WATCH_TIMEOUT", "3s");
    let Some(kubectl) = kubectl() else {
        assert!(
            !bins::required(),
            "{test}: no kubectl in target/kube-tools (scripts/setup.sh fetches it)"
        );
        eprintln!("SKIPPED {test}: no kubectl in target/kube-tools");
        return;
    };
    let Some(mut cluster) = Cluster::start_kubernetes(test, 2).await else {
        return;
    };
    let timing = cluster.timing;
    let volume = cluster.create_volume("rbac", &[]).await;

    // Claim, release, hand over to the other node.
    let target = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.logs()));
    cluster.unpublish(1, &volume, &target).await.unwrap();
    cluster
        .publish(2, &volume, "pod-b")
        .await
        .unwrap_or_else(|e| panic!("publish node2: {e}\n{}", cluster.logs()));
    // Renewals run for a while (D/3 each).
    tokio::time::sleep(timing.duration).await;

    // An attach to node1 is refused while node2's pod holds the volume; the attacher
    // would record it on the VolumeAttachment, and the controller tells the pod.
    let refused = cluster
        .attach(&volume, 1)
        .await
        .expect_err("an attach to node1 while node2 holds the volume");
    let plane = cluster.control_plane().expect("a kubernetes cluster");
    refused_attachment(&kubectl, plane, &volume.id, refused.message()).await;

    // node2 crashes for good: node1 takes over once its session expired, deleting it.
    cluster.kill(2);
    cluster
        .publish_until_ok(1, &volume, "pod-c", timing.takeover_after() * 3)
        .await
        .unwrap_or_else(|e| panic!("takeover: {e}\n{}", cluster.logs()));

    // The admin's verbs, as the controller's identity.
    let fenced = cluster.fence(1).unwrap_or_else(|e| panic!("fence: {e}"));
    let claims = cluster
        .controller_cli("claims", &[])
        .unwrap_or_else(|e| panic!("claims: {e}"));
    let unfenced = cluster
        .controller_cli("unfence", &["--node=node1".to_string()])
        .unwrap_or_else(|e| panic!("unfence: {e}"));
    println!(
        "fence: {}\nclaims:\n{claims}unfence: {}",
        fenced.trim(),
        unfenced.trim()
    );
    // Let node1 see its fence lifted and renew again.
    tokio::time::sleep(timing.duration).await;

    let plane = cluster.control_plane().expect("a kubernetes cluster");
    let log = plane.audit_log();
    for (identity, own_roles) in [
        (Identity::node_plugin(), vec!["holdfast-node"]),
        (
            Identity::controller(),
            vec![
                "holdfast-controller-lease-store",
                "holdfast-controller-leader",
                "holdfast-controller-nodes",
                "holdfast-controller-events",
            ],
        ),
    ] {
        let user = identity.user();
        let calls: Vec<_> = log.iter().filter(|e| e.user == user).collect();
        assert!(!calls.is_empty(), "{user} made no call at all");
        let refused: Vec<_> = calls.iter().filter(|e| e.code == 403).collect();
        assert!(
            refused.is_empty(),
            "{user}: calls refused by the chart's RBAC: {refused:#?}"
        );
        let used: BTreeSet<Grant> = calls
            .iter()
            .map(|e| {
                let resource = match e.subresource.as_str() {
                    "" => e.resource.clone(),
                    sub => format!("{}/{sub}", e.resource),
                };
                (e.group.clone(), resource, e.verb.clone())
            })
            .collect();
        let bound = roles_bound_to(identity.user().rsplit(':').next().unwrap());
        let mut grants = BTreeSet::new();
        for role in &own_roles {
            assert!(
                bound.contains(*role),
                "{role} is not bound to {user}: {bound:?}"
            );
            grants.extend(granted(role));
        }
        let unused: Vec<_> = grants.difference(&used).collect();
        println!(
            "{user}: {} calls, verbs used {:?}, roles bound {bound:?}",
            calls.len(),
            used.iter().map(|g| &g.2).collect::<BTreeSet<_>>()
        );
        assert!(
            unused.is_empty(),
            "{user}: the chart grants what no code path used (remove it, or add the path to \
             this test): {unused:?}"
        );
    }
    // The calls went on while the test ran, not only at start-up.
    assert!(log.len() > 20, "only {} audited calls", log.len());
}
