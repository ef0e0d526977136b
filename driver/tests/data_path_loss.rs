//! A pod whose FUSE data path died with the node plugin is not left Running silently.
//!
//! Real parts: a real API server (`testkit::kube::ControlPlane`, with audit), the chart's
//! RBAC as rendered in `manifests/deploy/20-rbac.yaml`, and the real `holdfast-driver`
//! binary acting as the chart's node ServiceAccount (KUBECONFIG), on the kubernetes lease
//! store. Pods are plain API objects: nothing runs them, and with no controller-manager
//! no garbage collector removes a pod whose owner does not exist. Each pod's FUSE volume
//! is published with kubelet's `podInfoOnMount` context; the plugin is SIGKILLed (its
//! FUSE mounts die: ENOTCONN) and started again. Then:
//! - the pod owned by a controller (ownerReference `controller: true`) is deleted, and
//!   gets the Warning Events `VolumeDataPathLost` and `PodRestartedForDataPath`;
//! - the bare pod gets `VolumeDataPathLost` and still exists;
//! - a pod deleted and re-created under the same name while the plugin was down (a new
//!   UID) is neither told nor deleted (this fails if the UID comparison is removed);
//! - with `--restart-pods-on-data-path-loss=false`, an owned pod is told, not deleted;
//! - the node identity was refused nothing, and used every verb of its `holdfast-node-pods`
//!   ClusterRole (least privilege for the grant this feature adds; pods list and watch
//!   are the plugins' watch of their node's pods, `src/lock/gone_pods.rs`).
//!
//! Skips without the Kubernetes binaries unless `HOLDFAST_REQUIRE_KUBE=1`.
//!
//! Without any Kubernetes API (standalone, etcd outside a cluster) the restarted plugin
//! says once that it cannot tell the pods, and serves as before.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::pods_plane::{self, CHART_RBAC};
use common::{create_volume_in, publish_for_pod, Plugin, PluginOptions};
use holdfast_core::csi::v1::node_client::NodeClient;
use holdfast_core::testkit::kube::Identity;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};

/// The pods' namespace (the plugin's lease store lives in `holdfast`).
const APPS: &str = "apps";
/// How long the restarted plugin may take to report, at most.
const REPORT_WITHIN: Duration = Duration::from_secs(60);
/// The plugins inherit KUBECONFIG from this process: one test at a time sets it.
static KUBECONFIG_ENV: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pod(name: &str, owned: bool) -> Pod {
    let mut value = serde_json::json!({
        "metadata": {"name": name, "namespace": APPS},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "writer", "image": "none"}]
        }
    });
    if owned {
        // A StatefulSet that does not exist: no garbage collector runs here.
        value["metadata"]["ownerReferences"] = serde_json::json!([{
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "name": "db",
            "uid": "00000000-0000-0000-0000-00000000d00d",
            "controller": true,
            "blockOwnerDeletion": true
        }]);
    }
    serde_json::from_value(value).unwrap()
}

async fn create_pod(pods: &Api<Pod>, name: &str, owned: bool) -> String {
    let created = pods
        .create(&PostParams::default(), &pod(name, owned))
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    created.metadata.uid.unwrap()
}

/// (reason, involvedObject.uid) of every Event on the pod named `name`.
async fn events_of(events: &Api<Event>, name: &str) -> Vec<(String, String)> {
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
                e.involved_object.uid.unwrap_or_default(),
            )
        })
        .collect()
}

fn has(events: &[(String, String)], reason: &str, uid: &str) -> bool {
    events.iter().any(|(r, u)| r == reason && u == uid)
}

/// A node-only plugin named `node` on the kubernetes lease store, plus `extra` flags.
async fn start_plugin(node: &str, extra: &[&str]) -> Plugin {
    Plugin::start_with(PluginOptions::node_on_kubernetes(node, extra)).await
}

/// Publishes a new FUSE volume for the pod `name` (UID `uid`); returns the target.
async fn publish(plugin: &Plugin, name: &str, uid: &str) -> (String, std::path::PathBuf) {
    let volume = create_volume_in(&plugin.root, name, &[("dataPath", "fuse")]);
    let target = plugin.target();
    let mut node = NodeClient::new(plugin.channel().await);
    node.node_publish_volume(publish_for_pod(&volume, &target, uid, APPS, name))
        .await
        .unwrap_or_else(|e| panic!("publish for {name}: {e}\n{}", plugin.logs()));
    std::fs::write(target.join("written"), name).expect("write through the live data path");
    (volume, target)
}

fn assert_dead(target: &Path) {
    let err = std::fs::read_dir(target).map(|_| ()).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTCONN),
        "{}: {err}",
        target.display()
    );
}

/// Waits for the plugin's log line that says every lost target was handled.
async fn wait_reports_done(plugin: &Plugin, since: Instant) -> Duration {
    loop {
        if plugin.logs().contains("data path loss reports done") {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < REPORT_WITHIN,
            "no report within {REPORT_WITHIN:?}:\n{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_dead_fuse_data_path_are_told_and_owned_ones_restarted() {
    let test = "pods_of_a_dead_fuse_data_path_are_told_and_owned_ones_restarted";
    let Some(plane) = pods_plane::start(test, APPS).await else {
        return;
    };
    let admin = plane.admin().await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), APPS);
    let events: Api<Event> = Api::namespaced(admin.clone(), APPS);
    // Every plugin process of this test inherits it: it is the chart's node identity.
    let _env = KUBECONFIG_ENV.lock().await;
    std::env::set_var("KUBECONFIG", plane.kubeconfig(&Identity::node_plugin()));

    // --- Default: restart owned pods.
    let owned_uid = create_pod(&pods, "db-0", true).await;
    let bare_uid = create_pod(&pods, "bare", false).await;
    let renamed_old_uid = create_pod(&pods, "web-0", true).await;
    let mut plugin = start_plugin("node-a", &[]).await;
    let (owned_volume, owned_target) = publish(&plugin, "db-0", &owned_uid).await;
    let (_, bare_target) = publish(&plugin, "bare", &bare_uid).await;
    let (_, renamed_target) = publish(&plugin, "web-0", &renamed_old_uid).await;

    plugin.kill();
    for target in [&owned_target, &bare_target, &renamed_target] {
        assert_dead(target);
    }
    // While the plugin is down, web-0 is replaced by a new pod of the same name, which
    // mounts its own volume elsewhere: the old target's record still names web-0.
    pods.delete("web-0", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pods.get_opt("web-0").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "web-0 was not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renamed_new_uid = create_pod(&pods, "web-0", true).await;
    assert_ne!(renamed_new_uid, renamed_old_uid);

    let restarted = Instant::now();
    plugin.restart().await;
    let serving_after = restarted.elapsed();
    let mut told_after = None;
    let mut deleted_after = None;
    while told_after.is_none() || deleted_after.is_none() {
        if told_after.is_none()
            && has(
                &events_of(&events, "bare").await,
                "VolumeDataPathLost",
                &bare_uid,
            )
        {
            told_after = Some(restarted.elapsed());
        }
        if deleted_after.is_none() && pods.get_opt("db-0").await.unwrap().is_none() {
            deleted_after = Some(restarted.elapsed());
        }
        assert!(
            restarted.elapsed() < REPORT_WITHIN,
            "told after {told_after:?}, db-0 deleted after {deleted_after:?}; plugin log:\n{}",
            plugin.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done_after = wait_reports_done(&plugin, restarted).await;
    println!(
        "after the restart: serving {serving_after:?}, bare pod's Event seen {:?}, owned pod \
         deleted {:?}, every report done {done_after:?}",
        told_after.unwrap(),
        deleted_after.unwrap()
    );

    let db_events = events_of(&events, "db-0").await;
    assert!(
        has(&db_events, "VolumeDataPathLost", &owned_uid),
        "{db_events:?}"
    );
    assert!(
        has(&db_events, "PodRestartedForDataPath", &owned_uid),
        "{db_events:?}"
    );
    let bare_events = events_of(&events, "bare").await;
    assert!(
        !has(&bare_events, "PodRestartedForDataPath", &bare_uid),
        "{bare_events:?}"
    );
    let bare = pods
        .get_opt("bare")
        .await
        .unwrap()
        .expect("the bare pod is only told");
    assert_eq!(bare.metadata.uid.as_deref(), Some(bare_uid.as_str()));
    bare_target.read_dir().map(|_| ()).unwrap_err();
    // The new web-0 is untouched: not deleted, not told (the name matched, the UID did not).
    let web = pods
        .get_opt("web-0")
        .await
        .unwrap()
        .expect("the new web-0 must not be deleted");
    assert_eq!(web.metadata.uid.as_deref(), Some(renamed_new_uid.as_str()));
    let web_events = events_of(&events, "web-0").await;
    assert!(
        web_events.is_empty(),
        "the new web-0 was told: {web_events:?}"
    );
    let logs = plugin.logs();
    assert!(logs.contains("was replaced; not touched"), "{logs}");
    assert!(logs.contains(&owned_volume), "{logs}");

    // What a user sees, with the kubectl of the install tests when it is there.
    let kubectl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kube-tools/kubectl");
    if kubectl.exists() {
        let out = std::process::Command::new(&kubectl)
            .args(["describe", "pod", "bare", "-n", APPS])
            .env("KUBECONFIG", plane.kubeconfig(&Identity::Admin))
            .output()
            .expect("run kubectl");
        let text = String::from_utf8_lossy(&out.stdout);
        println!("kubectl describe pod bare:\n{text}");
        assert!(
            text.contains("VolumeDataPathLost"),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(plugin);

    // --- Opted out: the owned pod is told, never deleted.
    let kept_uid = create_pod(&pods, "kept-0", true).await;
    let mut plugin = start_plugin("node-b", &["--restart-pods-on-data-path-loss=false"]).await;
    let (_, kept_target) = publish(&plugin, "kept-0", &kept_uid).await;
    plugin.kill();
    assert_dead(&kept_target);
    let restarted = Instant::now();
    plugin.restart().await;
    wait_reports_done(&plugin, restarted).await;
    let kept_events = events_of(&events, "kept-0").await;
    assert!(
        has(&kept_events, "VolumeDataPathLost", &kept_uid),
        "{kept_events:?}"
    );
    assert!(
        !has(&kept_events, "PodRestartedForDataPath", &kept_uid),
        "{kept_events:?}"
    );
    let kept = pods
        .get_opt("kept-0")
        .await
        .unwrap()
        .expect("restarts are off");
    assert_eq!(kept.metadata.uid.as_deref(), Some(kept_uid.as_str()));
    drop(plugin);

    // --- Least privilege for what this added: nothing refused, every verb used.
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
    let used: BTreeSet<(String, String, String)> = calls
        .iter()
        .map(|e| (e.group.clone(), e.resource.clone(), e.verb.clone()))
        .collect();
    // list and watch: the plugin's watch of its node's pods (driver/src/lock/gone_pods.rs,
    // tested in tests/gone_pods.rs), which runs in every plugin of this test.
    for grant in [
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "pods", "delete"),
        ("", "events", "create"),
    ] {
        let grant = (
            grant.0.to_string(),
            grant.1.to_string(),
            grant.2.to_string(),
        );
        assert!(used.contains(&grant), "granted, never used: {grant:?}");
    }
    let granted = pods_role_grants();
    let expected: BTreeSet<_> = [
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "pods", "delete"),
        ("", "events", "create"),
    ]
    .iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(
        granted, expected,
        "the chart's holdfast-node-pods ClusterRole changed"
    );
}

/// The rules of the chart's `holdfast-node-pods` ClusterRole, as (group, resource, verb).
fn pods_role_grants() -> BTreeSet<(String, String, String)> {
    let mut grants = BTreeSet::new();
    for doc in CHART_RBAC.split("\n---") {
        let Ok(value) = serde_yaml_ng::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        if value["kind"] != "ClusterRole" || value["metadata"]["name"] != "holdfast-node-pods" {
            continue;
        }
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
    grants
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_kubernetes_api_the_loss_is_logged_and_the_plugin_serves() {
    let _env = KUBECONFIG_ENV.lock().await;
    // No in-cluster service account here; a KUBECONFIG that does not exist.
    std::env::set_var("KUBECONFIG", "/nonexistent/holdfast-test-kubeconfig");
    let mut plugin = Plugin::start_with(PluginOptions {
        standalone: false,
        node_id: "node-c".to_string(),
        root: None,
        extra_args: vec!["--lease-store".into(), "memory".into()],
    })
    .await;
    let (_, target) = publish(&plugin, "solo-0", "uid-solo").await;
    plugin.kill();
    assert_dead(&target);
    plugin.restart().await;
    let deadline = Instant::now() + REPORT_WITHIN;
    while !plugin.logs().contains("no Kubernetes API is configured") {
        assert!(Instant::now() < deadline, "{}", plugin.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still serving: a new volume publishes and takes writes.
    publish(&plugin, "solo-1", "uid-solo-1").await;
}
