//! A holder pod that is gone while its node's plugin lives: released by
//! NodeUnpublishVolume at once, or, when kubelet never unpublishes, by the plugin itself
//! once the pod has been gone for `--release-gone-pods-after` and nothing on the node
//! uses the volume's mounts any more.
//!
//! Real parts: a real API server (`testkit::kube::ControlPlane`, with audit), the chart's
//! RBAC as rendered in `manifests/deploy/20-rbac.yaml`, and the real `holdfast-driver`
//! binary acting as the chart's node ServiceAccount (KUBECONFIG) on the kubernetes lease
//! store, watching the Pods of its node. Pods are plain API objects bound to the node by
//! `spec.nodeName`; nothing runs them (no kubelet: it is the part that is "gone"), and
//! the test plays kubelet's NodePublish/NodeUnpublish calls. The processes that use a
//! volume are real: a shell in a private mount namespace with its cwd in a target, and
//! one whose mount namespace holds a bind of a target elsewhere (what a container does).
//!
//! 1. Normal path: the pod is deleted and NodeUnpublishVolume comes: the claim is free
//!    at once (another pod's publish succeeds right after).
//! 2. Kubelet gone: the pod is deleted and nothing unpublishes; nothing uses the mount:
//!    the plugin unmounts and releases within the bound plus a tick, and another pod
//!    takes the volume.
//! 3. Kubelet gone, and processes still use the mounts (pods Failed, objects kept): the
//!    claims stay for as long as they live (fails if the check of the mounts is
//!    removed); once they are killed, released, and each pod gets a Normal Event
//!    `VolumeReleasedForGonePod`.
//!
//! Then the node identity was refused nothing and used the pods list and watch the
//! chart grants it for this.
//!
//! Skips without the Kubernetes binaries unless `HOLDFAST_REQUIRE_KUBE=1`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pods_plane;
use common::{create_volume_in, publish_for_pod, unpublish_request, Plugin, PluginOptions};
use holdfast_core::csi::v1::node_client::NodeClient;
use holdfast_core::testkit::kube::Identity;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

const APPS: &str = "apps";
const NODE: &str = "node-g";
/// `--release-gone-pods-after` here.
const BOUND: Duration = Duration::from_secs(2);
/// What the release may take beyond the bound: the watch's latency, the tick, a scan.
const SLACK: Duration = Duration::from_secs(5);
const REASON: &str = "VolumeReleasedForGonePod";
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": APPS},
        "spec": {
            "nodeName": NODE,
            "automountServiceAccountToken": false,
            "containers": [{"name": "writer", "image": "none"}]
        }
    }))
    .unwrap()
}

async fn create_pod(pods: &Api<Pod>, name: &str) -> String {
    pods.create(&PostParams::default(), &pod(name))
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"))
        .metadata
        .uid
        .unwrap()
}

/// Deletes the pod at once: a pod bound to a node is otherwise only marked for
/// deletion until that node's kubelet confirms, and here there is none (what an admin
/// does with `kubectl delete --force --grace-period=0` when a node's kubelet is gone).
async fn delete_pod(pods: &Api<Pod>, name: &str) {
    pods.delete(name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pods.get_opt(name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "{name} was not deleted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What kubelet reports when every container of the pod terminated with an error.
async fn mark_failed(pods: &Api<Pod>, name: &str) {
    let status = serde_json::json!({"status": {"phase": "Failed"}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("mark {name} Failed: {e}"));
}

/// (reason, type, involvedObject.uid) of every Event on the pod named `name`.
async fn events_of(events: &Api<Event>, name: &str) -> Vec<(String, String, String)> {
    let params = ListParams::default().fields(&format!("involvedObject.name={name}"));
    events
        .list(&params)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.type_.unwrap_or_default(),
                e.involved_object.uid.unwrap_or_default(),
            )
        })
        .collect()
}

/// Publishes `volume` for the pod `name` (UID `uid`) at a new target, as kubelet would.
async fn publish(
    plugin: &Plugin,
    volume: &str,
    name: &str,
    uid: &str,
) -> Result<std::path::PathBuf, tonic::Status> {
    let target = plugin.target();
    let mut node = NodeClient::new(plugin.channel().await);
    let call = node.node_publish_volume(publish_for_pod(volume, &target, uid, APPS, name));
    // Bounded: a plugin stuck in an unmount (holding the volume's lock) fails the test.
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result.map(|_| target),
        Err(_) => panic!(
            "publish of {volume} for {name} did not answer within {CALL_TIMEOUT:?}:\n{}",
            plugin.logs()
        ),
    }
}

fn is_mounted(target: &Path) -> bool {
    !common::mounts_at(target).is_empty()
}

/// Tries to publish `volume` for another pod every 100 ms until it succeeds; returns
/// how long that took from `since`.
async fn taken_over(
    plugin: &Plugin,
    volume: &str,
    name: &str,
    uid: &str,
    since: Instant,
    within: Duration,
) -> Duration {
    loop {
        match publish(plugin, volume, name, uid).await {
            Ok(target) => {
                let took = since.elapsed();
                std::fs::write(target.join("taken"), name).expect("write as the new holder");
                return took;
            }
            Err(status) => assert!(
                since.elapsed() < within,
                "{volume} not free for {name} after {:?}: {status}\n{}",
                since.elapsed(),
                plugin.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A process in a private mount namespace (a copy of this one's mounts) running
/// `script` with `sh`; killed on drop.
struct Holder(Child);

impl Holder {
    fn start(script: &str) -> Holder {
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script])
            .stdin(Stdio::null())
            .spawn()
            .expect("run unshare");
        Holder(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_pods_are_released_by_unpublish_or_once_their_mounts_are_dead() {
    let test = "gone_pods_are_released_by_unpublish_or_once_their_mounts_are_dead";
    let Some(plane) = pods_plane::start(test, APPS).await else {
        return;
    };
    let admin = plane.admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), APPS);
    let events: Api<Event> = Api::namespaced(admin.clone(), APPS);
    // The plugin inherits it: the chart's node identity. The only test in this binary.
    std::env::set_var("KUBECONFIG", plane.kubeconfig(&Identity::node_plugin()));
    let bound = format!("{}ms", BOUND.as_millis());
    let plugin = Plugin::start_with(PluginOptions::node_on_kubernetes(
        NODE,
        &["--release-gone-pods-after", &bound],
    ))
    .await;
    let watching = Instant::now();
    while !plugin.logs().contains("watching this node's pods") {
        assert!(
            watching.elapsed() < Duration::from_secs(30),
            "{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // --- 1. Normal path: deleted, unpublished by kubelet: free at once.
    let volume = create_volume_in(&plugin.root, "normal", &[("dataPath", "fuse")]);
    let uid = create_pod(&pods, "normal-0").await;
    let target = publish(&plugin, &volume, "normal-0", &uid).await.unwrap();
    std::fs::write(target.join("a"), "a").unwrap();
    let next_uid = create_pod(&pods, "normal-1").await;
    assert!(
        publish(&plugin, &volume, "normal-1", &next_uid)
            .await
            .is_err(),
        "held by normal-0"
    );
    delete_pod(&pods, "normal-0").await;
    let unpublished = Instant::now();
    let mut node = NodeClient::new(plugin.channel().await);
    node.node_unpublish_volume(unpublish_request(&volume, &target))
        .await
        .unwrap();
    let normal = taken_over(
        &plugin,
        &volume,
        "normal-1",
        &next_uid,
        unpublished,
        Duration::from_secs(1),
    )
    .await;
    println!("1. normal path: claim free {normal:?} after NodeUnpublishVolume");
    assert!(!target.exists());

    // --- 2. Kubelet gone: deleted, never unpublished, nothing uses the mount.
    let volume = create_volume_in(&plugin.root, "orphan", &[("dataPath", "bind")]);
    let old_uid = create_pod(&pods, "orphan-0").await;
    let old_target = publish(&plugin, &volume, "orphan-0", &old_uid)
        .await
        .unwrap();
    std::fs::write(old_target.join("a"), "a").unwrap();
    delete_pod(&pods, "orphan-0").await;
    let deleted = Instant::now();
    // Its StatefulSet re-creates it under the same name, with a new UID.
    let new_uid = create_pod(&pods, "orphan-0").await;
    let released = taken_over(
        &plugin,
        &volume,
        "orphan-0",
        &new_uid,
        deleted,
        BOUND + SLACK,
    )
    .await;
    println!("2. kubelet gone, nothing uses the mount: claim free {released:?} after the pod's deletion (bound {BOUND:?})");
    assert!(
        released >= BOUND - Duration::from_millis(200),
        "released before the bound: {released:?}"
    );
    assert!(!is_mounted(&old_target), "the old target is still mounted");
    assert!(!old_target.exists());
    let logs = plugin.logs();
    assert!(logs.contains("released the claim of a gone pod"), "{logs}");
    // No object of the old pod: no Event, and none on the new pod of that name.
    let orphan_events = events_of(&events, "orphan-0").await;
    assert!(
        !orphan_events.iter().any(|(r, _, _)| r == REASON),
        "{orphan_events:?}"
    );

    // --- 3. Kubelet gone, pods Failed, processes still use the mounts.
    let by_cwd = create_volume_in(&plugin.root, "cwd", &[("dataPath", "fuse")]);
    let cwd_uid = create_pod(&pods, "cwd-0").await;
    let cwd_target = publish(&plugin, &by_cwd, "cwd-0", &cwd_uid).await.unwrap();
    let in_ns = create_volume_in(&plugin.root, "container", &[("dataPath", "bind")]);
    let ns_uid = create_pod(&pods, "container-0").await;
    let ns_target = publish(&plugin, &in_ns, "container-0", &ns_uid)
        .await
        .unwrap();
    let container_root = plugin.tmp.path().join("container-data");
    std::fs::create_dir_all(&container_root).unwrap();
    // A shell whose cwd is in the FUSE target (its own mount namespace's copy).
    let mut cwd_holder = Holder::start(&format!("cd '{}' && exec sleep 600", cwd_target.display()));
    // A "container": its namespace binds the target at its own /data-like path; its
    // process has nothing open there.
    let mut ns_holder = Holder::start(&format!(
        "mount --bind '{}' '{}' && cd / && exec sleep 600",
        ns_target.display(),
        container_root.display()
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    mark_failed(&pods, "cwd-0").await;
    mark_failed(&pods, "container-0").await;
    let failed = Instant::now();
    let cwd_next = create_pod(&pods, "cwd-1").await;
    let ns_next = create_pod(&pods, "container-1").await;
    // Well past the bound and several re-checks: still held, still mounted.
    while failed.elapsed() < 3 * BOUND + SLACK {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            publish(&plugin, &by_cwd, "cwd-1", &cwd_next).await.is_err(),
            "cwd-0's volume was released while a process had its cwd in it:\n{}",
            plugin.logs()
        );
        assert!(
            publish(&plugin, &in_ns, "container-1", &ns_next)
                .await
                .is_err(),
            "container-0's volume was released while a mount namespace showed it:\n{}",
            plugin.logs()
        );
    }
    assert!(is_mounted(&cwd_target) && is_mounted(&ns_target));
    let logs = plugin.logs();
    assert!(logs.contains("processes still use its volume"), "{logs}");
    assert!(
        logs.contains("its mount namespace shows the volume at"),
        "{logs}"
    );
    assert!(logs.contains("cwd "), "{logs}");

    cwd_holder.kill();
    ns_holder.kill();
    let killed = Instant::now();
    // At most one re-check period (the bound, at least 1 s) plus slack.
    let cwd_free = taken_over(&plugin, &by_cwd, "cwd-1", &cwd_next, killed, BOUND + SLACK).await;
    let ns_free = taken_over(
        &plugin,
        &in_ns,
        "container-1",
        &ns_next,
        killed,
        BOUND + SLACK,
    )
    .await;
    println!("3. processes used the mounts: kept {:?} past the pods' failure; free {cwd_free:?} (cwd) and {ns_free:?} (mount namespace) after the processes were killed", killed.duration_since(failed));
    assert!(!is_mounted(&cwd_target) && !is_mounted(&ns_target));
    // The pods still exist: each got the Normal Event, on its own UID.
    for (name, uid) in [("cwd-0", &cwd_uid), ("container-0", &ns_uid)] {
        let seen = events_of(&events, name).await;
        assert!(
            seen.iter()
                .any(|(r, t, u)| r == REASON && t == "Normal" && u == uid),
            "{name}: {seen:?}"
        );
    }
    drop(plugin);

    // --- Least privilege: nothing refused; the pod watch used what it is granted.
    let user = Identity::node_plugin().user();
    let calls: Vec<_> = plane
        .audit_log()
        .into_iter()
        .filter(|e| e.user == user)
        .collect();
    let refused: Vec<_> = calls.iter().filter(|e| e.code == 403).collect();
    assert!(
        refused.is_empty(),
        "refused by the chart's RBAC: {refused:#?}"
    );
    let used: BTreeSet<(String, String)> = calls
        .iter()
        .filter(|e| e.group.is_empty())
        .map(|e| (e.resource.clone(), e.verb.clone()))
        .collect();
    for (resource, verb) in [
        ("pods", "list"),
        ("pods", "watch"),
        ("pods", "get"),
        ("events", "create"),
    ] {
        assert!(
            used.contains(&(resource.to_string(), verb.to_string())),
            "never used: {resource} {verb}; used: {used:?}"
        );
    }
}
