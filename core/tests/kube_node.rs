//! The test kubelet node ([`KubeletNode`]): it registers and becomes Ready, the
//! scheduler places a pod on it, the pod runs from a locally imported image and exits 0,
//! and dropping the node leaves no process, mount, network device or namespace behind.

use std::path::Path;
use std::time::{Duration, Instant};

use holdfast_core::testkit::kube::node::{build_image, BUSYBOX_IMAGE};
use holdfast_core::testkit::kube::{ControlPlane, ControlPlaneOptions, KubeletNode, NodeOptions};
use k8s_openapi::api::core::v1::Pod;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_to_completion_on_a_real_kubelet() {
    let options = ControlPlaneOptions {
        controllers: true,
        ..ControlPlaneOptions::default()
    };
    let Some(plane) = ControlPlane::start_or_skip("kubelet node", options).await else {
        return;
    };
    let node_options = NodeOptions::default();
    let bridge = node_options.bridge.clone();
    let Some(node) = KubeletNode::start_or_skip("kubelet node", &plane, node_options).await else {
        return;
    };
    println!(
        "Node {} Ready {:?} after the kubelet started",
        node.name(),
        node.ready_after
    );
    let socket = node.containerd_socket().to_path_buf();
    let root_dir = node.root_dir().to_path_buf();

    let pods: kube::Api<Pod> = kube::Api::namespaced(plane.admin().await, "default");
    let created = Instant::now();
    let logs = run_to_completion(
        &pods,
        &node,
        "hello",
        BUSYBOX_IMAGE,
        &[(
            "hello",
            &[
                "sh",
                "-c",
                "echo hello from $(hostname); test -d /var/run/secrets/kubernetes.io/serviceaccount",
            ],
        )],
    )
    .await;
    println!("pod created -> Succeeded in {:?}", created.elapsed());
    assert_eq!(logs, ["hello from hello"]);

    // The holdfast image as scripts/image.sh builds it (from the debug binaries, which
    // CI has built already): both binaries start in it, so its libraries and loader are
    // complete.
    let tar = tempfile::tempdir().unwrap();
    let tar = tar.path().join("holdfast.tar");
    let tag = "holdfast.test/holdfast:dev";
    build_image(&[
        "--profile",
        "debug",
        "--tag",
        tag,
        "--out",
        tar.to_str().unwrap(),
    ]);
    println!(
        "holdfast image (debug binaries, stripped): {} KiB",
        std::fs::metadata(&tar).unwrap().len() / 1024
    );
    node.import_image(&tar);
    let logs = run_to_completion(
        &pods,
        &node,
        "holdfast",
        tag,
        &[
            ("driver", &["holdfast-driver", "--version"]),
            ("controller", &["holdfast-controller", "--version"]),
        ],
    )
    .await;
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        logs,
        [
            format!("holdfast-driver {version}"),
            format!("holdfast-controller {version}")
        ]
    );

    // A pod still running when the node goes: its containers, sandbox and network
    // namespace must go with the node.
    let sleeper: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "sleeper"},
        "spec": {"containers": [{
            "name": "sleeper",
            "image": BUSYBOX_IMAGE,
            "imagePullPolicy": "Never",
            "command": ["sleep", "3600"],
        }]},
    }))
    .unwrap();
    pods.create(&Default::default(), &sleeper).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pod = pods.get("sleeper").await.unwrap();
        if pod.status.and_then(|s| s.phase).as_deref() == Some("Running") {
            break;
        }
        assert!(Instant::now() < deadline, "sleeper not Running within 60 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Another test process may start its own node as soon as this one's machine lock is
    // released, so what must be gone is identified as this node's: its directory on
    // command lines and mount points, the bridge device by index, the pods' namespaces
    // by name (the finished pods' sandboxes may have gone already).
    let dir = socket.parent().unwrap().display().to_string();
    let root = root_dir.display().to_string();
    let bridge_index = std::fs::read_to_string(format!("/sys/class/net/{bridge}/ifindex")).unwrap();
    let pod_netns: Vec<String> = list("/run/netns")
        .into_iter()
        .filter(|n| n.starts_with("cni-"))
        .collect();
    assert!(
        !pod_netns.is_empty(),
        "the running pod has a network namespace"
    );
    drop(node);
    let left: Vec<String> = list("/proc")
        .into_iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir))
        .collect();
    assert!(left.is_empty(), "processes left: {left:?}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(&root) || l.contains(&dir))
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
    let index_now = std::fs::read_to_string(format!("/sys/class/net/{bridge}/ifindex")).ok();
    assert_ne!(index_now, Some(bridge_index), "bridge {bridge} left");
    let netns = list("/run/netns");
    let left: Vec<&String> = pod_netns.iter().filter(|n| netns.contains(n)).collect();
    assert!(left.is_empty(), "pod network namespaces left: {left:?}");
    assert!(!Path::new(&dir).exists(), "node directory left: {dir}");
}

fn list(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs a pod of `containers` (name, command) from `image` until it ends; asserts the
/// scheduler put it on `node` and every container exited 0; returns each one's log.
async fn run_to_completion(
    pods: &kube::Api<Pod>,
    node: &KubeletNode,
    name: &str,
    image: &str,
    containers: &[(&str, &[&str])],
) -> Vec<String> {
    let containers: Vec<serde_json::Value> = containers
        .iter()
        .map(|(name, command)| {
            serde_json::json!({
                "name": name,
                "image": image,
                // No registry: images exist only as imported.
                "imagePullPolicy": "Never",
                "command": command,
            })
        })
        .collect();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": containers},
    }))
    .unwrap();
    pods.create(&Default::default(), &pod).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let pod = loop {
        let pod = pods.get(name).await.unwrap();
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            break pod;
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} still {phase:?} after 90 s: {:?}\nkubelet: {}",
            pod.status,
            node.log_tail("kubelet")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(node.name()),
        "placed by the scheduler"
    );
    let status = pod.status.unwrap();
    for container in status.container_statuses.unwrap() {
        let terminated = container
            .state
            .as_ref()
            .and_then(|s| s.terminated.clone())
            .expect("terminated");
        assert_eq!(
            terminated.exit_code, 0,
            "{}: {terminated:?}",
            container.name
        );
    }
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    // Logs go API server -> kubelet, on the node's address.
    let mut logs = Vec::new();
    for container in &containers {
        let params = kube::api::LogParams {
            container: Some(container["name"].as_str().unwrap().to_string()),
            ..Default::default()
        };
        logs.push(pods.logs(name, &params).await.unwrap().trim().to_string());
    }
    logs
}
