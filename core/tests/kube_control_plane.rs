//! The test control plane itself (`testkit::kube`): identities are what they claim to be
//! (RBAC refuses a ServiceAccount nothing was granted to, as the real cluster would),
//! the controller-manager and scheduler run when asked (a pod is scheduled onto a Node
//! object), and everything is gone after drop.

use std::time::{Duration, Instant};

use holdfast_core::testkit::kube::{ControlPlane, ControlPlaneOptions, Identity};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};

#[tokio::test]
async fn identities_are_authorized_by_rbac_not_trusted() {
    let Some(plane) =
        ControlPlane::start_or_skip("identities", ControlPlaneOptions::default()).await
    else {
        return;
    };
    plane.ensure_namespace("holdfast").await;
    let as_node: Api<Pod> =
        Api::namespaced(plane.client(&Identity::node_plugin()).await, "holdfast");
    match as_node.list(&Default::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("the node plugin's identity listed pods without a grant: {other:?}"),
    }
    let as_admin: Api<Pod> = Api::namespaced(plane.admin().await, "holdfast");
    assert!(as_admin.list(&Default::default()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_schedule_a_pod_and_drop_removes_everything() {
    let options = ControlPlaneOptions {
        controllers: true,
        ..ControlPlaneOptions::default()
    };
    let Some(plane) = ControlPlane::start_or_skip("controllers", options).await else {
        return;
    };
    let client = plane.admin().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let status = serde_json::json!({
        "capacity": {"cpu": "2", "memory": "4Gi", "pods": "10"},
        "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "10"},
        "conditions": [{"type": "Ready", "status": "True"}]
    });
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "node-a"}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    // Status is a subresource. A merge patch, not a replace: the node lifecycle
    // controller writes the new Node too (taints), and a replace would race it.
    nodes
        .patch_status(
            "node-a",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "none"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let bound = pods.get("p").await.unwrap().spec.unwrap().node_name;
        if bound.as_deref() == Some("node-a") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduler did not bind the pod: {}",
            plane.log_tail("kube-scheduler")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let dir = plane.dir().to_path_buf();
    let (url, etcd_pid) = (plane.url(), plane.etcd.pid().unwrap());
    drop(plane);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{etcd_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{etcd_pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true),
        "etcd still runs"
    );
    let port = url.rsplit(':').next().unwrap();
    let refused = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err();
    assert!(refused, "the API server still answers at {url}");
}
