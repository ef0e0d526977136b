//! The lock as a Kubernetes user meets it, on the installed chart and the examples'
//! StatefulSet (`db-0` writing a line a second into its volume's `log`):
//!
//! - a second pod on the same PVC is refused its mount, and `kubectl describe pod` says
//!   which pod holds the volume;
//! - scaling the StatefulSet to zero hands the volume to that pod, and deleting that pod
//!   hands it back, each within seconds (kubelet runs one operation per volume at a
//!   time, so the node plugin never makes a publish wait for a holder on its own node);
//! - killing the node plugin's pod kills the FUSE data path: the writer gets ENOTCONN,
//!   and the restarted plugin restarts the StatefulSet's pod, which writes again.
//!
//! The `kubectl` outputs printed between `--- kubectl ... ---` markers are the ones the
//! README quotes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use holdfast_core::testkit::kube::KubeletNode;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{DeleteParams, ListParams};

/// kubectl v1.34 (from `scripts/setup.sh`) against the test control plane, as admin.
pub struct Kubectl {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    pub fn run(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("running kubectl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubectl {args:?}: {text}");
        text
    }

    /// Runs and prints the command and its output for the README.
    pub fn show(&self, args: &[&str]) -> String {
        let text = self.run(args);
        println!("--- kubectl {} ---\n{}--- end ---", args.join(" "), text);
        text
    }
}

/// A pod of the user's own that mounts the StatefulSet's claim, on the same node.
const SECOND_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: reader
  namespace: default
spec:
  terminationGracePeriodSeconds: 5
  containers:
    - name: writer
      image: holdfast.test/busybox:1
      imagePullPolicy: Never
      command:
        - sh
        - -c
        - |
          trap 'exit 0' TERM
          while true; do
            echo "x $(hostname) $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> /data/log
            sync
            sleep 1
          done
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: data-db-0
"#;

fn lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until the log has a line by `host` after its first `skip` lines; returns when.
async fn first_line_by(
    node: &KubeletNode,
    log: &Path,
    skip: usize,
    host: &str,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let needle = format!(" {host} ");
    loop {
        if lines(log).iter().skip(skip).any(|l| l.contains(&needle)) {
            return started.elapsed();
        }
        if started.elapsed() > within {
            let volume_lines = node.log_lines_matching("kubelet", "kubernetes.io/csi");
            let start = volume_lines.len().saturating_sub(40);
            panic!(
                "no line by {host} within {within:?}; log tail: {:?}\nkubelet on the volume:\n{}",
                lines(log).iter().rev().take(5).collect::<Vec<_>>(),
                volume_lines[start..].join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn pod_uid(pods: &kube::Api<Pod>, name: &str) -> Option<String> {
    pods.get_opt(name)
        .await
        .unwrap()
        .and_then(|p| p.metadata.uid)
}

pub async fn lock_through_kubernetes(
    kubectl: &Kubectl,
    client: kube::Client,
    node: &KubeletNode,
    log: &Path,
) {
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), "default");
    let events: kube::Api<Event> = kube::Api::namespaced(client.clone(), "default");
    kubectl.show(&["get", "pods", "-n", "holdfast"]);
    kubectl.show(&["get", "pvc", "-n", "default"]);

    // A second pod on the same claim: refused by the node plugin, the holder named.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("reader.yaml");
    std::fs::write(&manifest, SECOND_POD).unwrap();
    kubectl.run(&["apply", "-f", manifest.to_str().unwrap()]);
    let db0 = pod_uid(&pods, "db-0").await.expect("db-0 runs");
    let deadline = Instant::now() + Duration::from_secs(90);
    let refusal = loop {
        let found = events
            .list(&ListParams::default().fields("involvedObject.name=reader"))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("FailedMount"))
            .filter_map(|e| e.message)
            .find(|m| m.contains("held by pod"));
        if let Some(message) = found {
            break message;
        }
        assert!(
            Instant::now() < deadline,
            "no FailedMount naming the holder on pod reader within 90 s\nkubelet: {}",
            node.log_tail("kubelet")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for needle in [format!("default/db-0 (uid {db0})"), "this node".to_string()] {
        assert!(refusal.contains(&needle), "{needle}: {refusal}");
    }
    let described = kubectl.show(&["describe", "pod", "reader"]);
    assert!(described.contains("default/db-0"), "{described}");
    assert!(
        lines(log).iter().all(|l| !l.contains(" reader ")),
        "the refused pod wrote"
    );

    // Hand-over on the node: the holder goes, the waiting pod writes.
    let before = lines(log).len();
    kubectl.run(&["scale", "statefulset", "db", "--replicas=0"]);
    let first = first_line_by(node, log, before, "reader", Duration::from_secs(60)).await;
    println!("holder db-0 scaled away -> first write of pod reader after {first:?}");
    assert!(
        first < Duration::from_secs(20),
        "hand-over took {first:?} (was 82-87 s when a waiting publish blocked the unpublish)"
    );
    assert_single_writer(log, before);

    // And back: db-0 returns and waits; deleting `reader` hands the volume over.
    kubectl.run(&["scale", "statefulset", "db", "--replicas=1"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = lines(log).len();
    pods.delete("reader", &DeleteParams::default())
        .await
        .unwrap();
    let back = first_line_by(node, log, before, "db-0", Duration::from_secs(60)).await;
    println!("pod reader deleted -> first write of the new db-0 after {back:?}");
    if back > Duration::from_secs(10) {
        // db-0 was refused for seconds before `reader` went, so kubelet's pause between
        // its mount retries may have grown; its log shows what it waited for.
        let volume_lines = node.log_lines_matching("kubelet", "kubernetes.io/csi");
        let start = volume_lines.len().saturating_sub(40);
        println!(
            "kubelet on the volume:\n{}",
            volume_lines[start..].join("\n")
        );
    }
    // Bounded loosely: past the plugin's part (2–10 s in most runs), this hand-back is
    // kubelet and the attach/detach controller dropping the volume from the node when
    // `reader` goes and attaching it again for db-0; one CI run took 49 s there.
    assert!(back < Duration::from_secs(90), "hand-back took {back:?}");
    assert_single_writer(log, before);
}

/// After `from`, once a writer has appeared, the previous one never writes again.
fn assert_single_writer(log: &Path, from: usize) {
    let all = lines(log);
    let hosts: Vec<&str> = all[from..]
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let mut changes = 0;
    for pair in hosts.windows(2) {
        if pair[0] != pair[1] {
            changes += 1;
        }
    }
    assert!(
        changes <= 1,
        "writers interleave after line {from}: {hosts:?}"
    );
}

/// Kills the node plugin's pod: the writer's FUSE mount dies with it (ENOTCONN), and the
/// restarted plugin restarts the StatefulSet's pod, which writes again.
pub async fn killed_plugin_pod(
    kubectl: &Kubectl,
    client: kube::Client,
    node: &KubeletNode,
    log: &Path,
) {
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), "default");
    let plugin_pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), "holdfast");
    let plugin = plugin_pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=node"))
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.name()))
        .and_then(|p| p.metadata.name)
        .expect("the node plugin's pod on the kubelet node");
    let old = pod_uid(&pods, "db-0").await.expect("db-0 runs");
    let before = lines(log).len();
    let killed = Instant::now();
    kubectl.run(&[
        "delete",
        "pod",
        "-n",
        "holdfast",
        &plugin,
        "--grace-period=0",
        "--force",
    ]);
    // The writer's errors, from its container log on the node, until its pod is gone.
    let logs_glob = format!("/var/log/pods/default_db-0_{old}");
    let deadline = killed + Duration::from_secs(120);
    let mut enotconn = None;
    let (mut plugin_back, mut old_gone) = (None, None);
    let restarted = loop {
        if enotconn.is_none() && container_logs(Path::new(&logs_glob)).contains("not connected") {
            enotconn = Some(killed.elapsed());
        }
        if plugin_back.is_none() {
            let ready = plugin_pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=node"))
                .await
                .unwrap()
                .items
                .iter()
                .any(|p| {
                    p.metadata.name.as_deref() != Some(plugin.as_str())
                        && p.status
                            .as_ref()
                            .and_then(|s| s.container_statuses.as_ref())
                            .is_some_and(|c| c.iter().all(|c| c.ready))
                });
            if ready {
                plugin_back = Some(killed.elapsed());
            }
        }
        if old_gone.is_none() && pod_uid(&pods, "db-0").await.as_deref() != Some(old.as_str()) {
            old_gone = Some(killed.elapsed());
        }
        if let Some(uid) = pod_uid(&pods, "db-0").await {
            if uid != old && lines(log).len() > before {
                let by_new = lines(log)[before..].iter().any(|l| l.contains(" db-0 "));
                if by_new {
                    break killed.elapsed();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "db-0 not restarted and writing within 120 s of the plugin's kill \
             (ENOTCONN seen: {enotconn:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "node plugin pod killed -> writer ENOTCONN after {enotconn:?}; new plugin pod Ready \
         after {plugin_back:?}; old db-0 gone after {old_gone:?}; new db-0 writing after \
         {restarted:?}"
    );
    if restarted > Duration::from_secs(20) {
        // Where the time went, for the record: kubelet's view of the volume.
        let volume_lines = node.log_lines_matching("kubelet", "kubernetes.io/csi");
        let start = volume_lines.len().saturating_sub(60);
        println!(
            "kubelet on the volume:\n{}",
            volume_lines[start..].join("\n")
        );
    }
    assert!(
        enotconn.is_some(),
        "the writer never reported ENOTCONN (Transport endpoint is not connected)"
    );
    let events: kube::Api<Event> = kube::Api::namespaced(client, "default");
    let lost = events
        .list(&ListParams::default().fields(&format!("involvedObject.uid={old}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect::<Vec<_>>();
    assert!(
        lost.iter().any(|r| r == "VolumeDataPathLost"),
        "no VolumeDataPathLost event on the old db-0: {lost:?}"
    );
}

pub fn container_logs(pod_dir: &Path) -> String {
    let mut text = String::new();
    let Ok(containers) = std::fs::read_dir(pod_dir) else {
        return text;
    };
    for container in containers.flatten() {
        if let Ok(files) = std::fs::read_dir(container.path()) {
            for file in files.flatten() {
                text.push_str(&std::fs::read_to_string(file.path()).unwrap_or_default());
            }
        }
    }
    text
}
