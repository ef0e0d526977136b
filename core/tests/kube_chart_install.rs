//! `helm install` of charts/holdfast, as a user runs it, onto a real kubelet node
//! ([`KubeletNode`]) with a real helm (v4, from `scripts/setup.sh`): the holdfast image
//! and the CSI sidecars' images are built locally (`scripts/image.sh`) and imported into
//! the node's containerd; every pod of the release becomes Ready; `helm uninstall`
//! leaves none of the release's objects behind. In between, the examples a user applies
//! next (manifests/examples: StorageClass, StatefulSet) run on it: the real
//! external-provisioner provisions the PVC, the writer's volume is served through FUSE,
//! and its writes land in the backing directory.

#[path = "chart_install/lock.rs"]
mod lock;
#[path = "chart_install/other_node.rs"]
mod other_node;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use holdfast_core::testkit::kube::bins::{self, find_or_skip};
use holdfast_core::testkit::kube::node::build_image;
use holdfast_core::testkit::kube::{
    ControlPlane, ControlPlaneOptions, Identity, KubeletNode, NodeOptions,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode};

const NAMESPACE: &str = "holdfast";
const DRIVER: &str = "holdfast.csi.dev";
/// Chart value name, binary in ../shared/k8s.
const SIDECARS: [(&str, &str); 5] = [
    ("provisioner", "csi-provisioner"),
    ("attacher", "csi-attacher"),
    ("resizer", "csi-resizer"),
    ("nodeDriverRegistrar", "csi-node-driver-registrar"),
    ("livenessProbe", "livenessprobe"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm() -> Option<PathBuf> {
    let dir = std::env::var_os("HOLDFAST_KUBE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/kube-tools"));
    let helm = dir.join("helm");
    helm.is_file().then_some(helm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_makes_every_pod_ready_and_uninstall_leaves_nothing() {
    let test = "helm install";
    let Some(helm) = helm() else {
        assert!(
            !bins::required(),
            "{test}: no helm in target/kube-tools (scripts/setup.sh fetches it)"
        );
        eprintln!("SKIPPED {test}: no helm in target/kube-tools (scripts/setup.sh fetches it)");
        return;
    };
    let names: Vec<&str> = SIDECARS.iter().map(|(_, bin)| *bin).collect();
    let Some(kube_bins) = find_or_skip(test, &names) else {
        return;
    };
    let options = ControlPlaneOptions {
        controllers: true,
        ..ControlPlaneOptions::default()
    };
    let Some(plane) = ControlPlane::start_or_skip(test, options).await else {
        return;
    };
    let Some(node) = KubeletNode::start_or_skip(test, &plane, NodeOptions::default()).await else {
        return;
    };
    println!(
        "Node Ready {:?} after the kubelet started",
        node.ready_after
    );

    let dir = tempfile::tempdir().unwrap();
    let mut set = vec![
        "image.repository=holdfast.test/holdfast".to_string(),
        "image.tag=dev".to_string(),
        // Nothing can be pulled: a missing image must fail, not wait for a registry.
        "image.pullPolicy=Never".to_string(),
        format!("kubeletDir={}", node.root_dir().display()),
        format!("stateDir={}", dir.path().join("state").display()),
        format!(
            "backend.hostPath.path={}",
            dir.path().join("backend").display()
        ),
        // One node: a second controller replica would only wait for its leader.
        "controller.replicas=1".to_string(),
    ];
    let images = Instant::now();
    let tar = dir.path().join("image.tar");
    let tar_path = tar.to_str().unwrap();
    build_image(&[
        "--profile",
        "debug",
        "--tag",
        "holdfast.test/holdfast:dev",
        "--out",
        tar_path,
    ]);
    node.import_image(&tar);
    for (value, bin) in SIDECARS {
        let tag = format!("holdfast.test/{bin}:dev");
        let binary = kube_bins.require(bin);
        build_image(&[
            "--binary",
            binary.to_str().unwrap(),
            "--tag",
            &tag,
            "--out",
            tar_path,
        ]);
        node.import_image(&tar);
        set.push(format!("sidecars.{value}.repository=holdfast.test/{bin}"));
        set.push(format!("sidecars.{value}.tag=dev"));
        set.push(format!("sidecars.{value}.pullPolicy=Never"));
    }
    println!("images built and imported in {:?}", images.elapsed());

    let kubeconfig = plane.kubeconfig(&Identity::Admin);
    let helm_run = |args: &[&str]| {
        let out = Command::new(&helm)
            .args(args)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            // Helm's own cache and config stay in the test's directory.
            .env("HELM_CACHE_HOME", dir.path().join("helm/cache"))
            .env("HELM_CONFIG_HOME", dir.path().join("helm/config"))
            .env("HELM_DATA_HOME", dir.path().join("helm/data"))
            .output()
            .expect("running helm");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "helm {args:?}: {text}");
        text
    };
    let chart = workspace().join("charts/holdfast");
    let mut install: Vec<String> = vec![
        "install".into(),
        "holdfast".into(),
        chart.display().to_string(),
        "--namespace".into(),
        NAMESPACE.into(),
        "--create-namespace".into(),
    ];
    for s in &set {
        install.push("--set".into());
        install.push(s.clone());
    }
    let installed = Instant::now();
    let args: Vec<&str> = install.iter().map(String::as_str).collect();
    println!("{}", helm_run(&args));

    let client = plane.admin().await;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let deadline = installed + Duration::from_secs(180);
    let mut node_ready = None;
    loop {
        let list = pods.list(&Default::default()).await.unwrap().items;
        let ready = |pod: &Pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        };
        let component = |pod: &Pod| {
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/component").cloned())
                .unwrap_or_default()
        };
        if node_ready.is_none() && list.iter().any(|p| component(p) == "node" && ready(p)) {
            node_ready = Some(installed.elapsed());
        }
        // One node plugin and one controller, both Ready.
        if list.len() == 2 && list.iter().all(ready) {
            break;
        }
        if Instant::now() > deadline {
            let states: Vec<String> = list
                .iter()
                .map(|p| {
                    format!(
                        "{}: {:?}",
                        p.metadata.name.clone().unwrap_or_default(),
                        p.status.as_ref().map(|s| &s.container_statuses)
                    )
                })
                .collect();
            panic!(
                "release pods not Ready within 180 s:\n{}\nkubelet: {}",
                states.join("\n"),
                node.log_tail("kubelet")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "helm install -> node plugin Ready {:?}, every pod Ready {:?}",
        node_ready.unwrap(),
        installed.elapsed()
    );

    // The node-driver-registrar registered the plugin with kubelet, and kubelet called
    // the plugin's NodeGetInfo over its socket: the node's CSINode lists the driver.
    let csinodes: kube::Api<CSINode> = kube::Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let registered = csinodes
            .get_opt(node.name())
            .await
            .unwrap()
            .is_some_and(|n| n.spec.drivers.iter().any(|d| d.name == DRIVER));
        if registered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{DRIVER} not registered on {} within 60 s\nkubelet: {}",
            node.name(),
            node.log_tail("kubelet")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "helm install -> driver registered with kubelet {:?}",
        installed.elapsed()
    );
    // Still running, never restarted: the controller and the node plugin reached the API
    // server (leader election, session lease) through the `kubernetes` Service.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for pod in pods.list(&Default::default()).await.unwrap().items {
        for container in pod.status.unwrap().container_statuses.unwrap_or_default() {
            assert!(
                container.ready && container.restart_count == 0,
                "{} of {}: {:?}",
                container.name,
                pod.metadata.name.clone().unwrap_or_default(),
                container
            );
        }
    }

    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let names: Vec<String> = leases
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|l| l.metadata.name)
        .collect();
    println!("leases written from inside the pods: {names:?}");
    assert!(
        names.iter().any(|n| n.contains(node.name())),
        "no session lease of {} among {names:?}",
        node.name()
    );

    let kubectl = helm.with_file_name("kubectl");
    examples_write_through_fuse_into_the_backend(
        &kubectl,
        &plane,
        &node,
        &dir.path().join("backend"),
    )
    .await;

    helm_run(&["uninstall", "holdfast", "--namespace", NAMESPACE, "--wait"]);
    let drivers: kube::Api<CSIDriver> = kube::Api::all(client.clone());
    let roles: kube::Api<ClusterRole> = kube::Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left_pods = pods.list(&Default::default()).await.unwrap().items.len();
        let left_drivers = drivers.list(&Default::default()).await.unwrap().items.len();
        let left_roles = roles
            .list(&kube::api::ListParams::default().labels("app.kubernetes.io/instance=holdfast"))
            .await
            .unwrap()
            .items
            .len();
        if left_pods + left_drivers + left_roles == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after helm uninstall: {left_pods} pods, {left_drivers} CSIDrivers, {left_roles} ClusterRoles left"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Applies manifests/examples/storageclass.yaml and statefulset.yaml, as a user does
/// after `helm install`, and follows the writer's lines into `backend`; then deletes the
/// StatefulSet and its PVC, and the volume's directory goes with them.
///
/// Two edits for this cluster: no registry (the writer's image is the local busybox,
/// never pulled), and Kubernetes v1.20 has no ReadWriteOncePod (1.22+; its API server
/// refuses the value), so the claim asks ReadWriteOnce. The exclusive StorageClass is
/// what keeps the volume to one pod either way: the node plugin claims it per pod,
/// whatever the access mode.
async fn examples_write_through_fuse_into_the_backend(
    kubectl: &Path,
    plane: &ControlPlane,
    node: &KubeletNode,
    backend: &Path,
) {
    let examples = workspace().join("manifests/examples");
    let read = |name: &str| std::fs::read_to_string(examples.join(name)).unwrap();
    let statefulset = read("statefulset.yaml");
    assert!(
        statefulset.contains("image: busybox:1.37") && statefulset.contains("ReadWriteOncePod")
    );
    let statefulset = statefulset
        .replace(
            "image: busybox:1.37",
            "image: holdfast.test/busybox:1\n          imagePullPolicy: Never",
        )
        .replace("ReadWriteOncePod", "ReadWriteOnce");
    let edited = tempfile::tempdir().unwrap();
    std::fs::write(edited.path().join("statefulset.yaml"), statefulset).unwrap();
    let applied = Instant::now();
    // As a user does it: kubectl apply (v1.34, client-side apply on this old server).
    let out = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(plane.kubeconfig(&Identity::Admin))
        .args(["apply", "-n", "default", "-f"])
        .arg(examples.join("storageclass.yaml"))
        .arg("-f")
        .arg(edited.path().join("statefulset.yaml"))
        .output()
        .expect("running kubectl");
    println!(
        "kubectl apply: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kubectl apply failed");

    let client = plane.admin().await;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), "default");
    let pvcs: kube::Api<PersistentVolumeClaim> = kube::Api::namespaced(client.clone(), "default");
    let deadline = applied + Duration::from_secs(120);
    // The writer's log, found in the backend once it has a few lines.
    let log = loop {
        let found = walk(backend)
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n == "log"))
            .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.lines().count() >= 3));
        if let Some(log) = found {
            break log;
        }
        if Instant::now() > deadline {
            let pod = pods.get_opt("db-0").await.unwrap().map(|p| p.status);
            let pvc = pvcs.get_opt("data-db-0").await.unwrap().map(|p| p.status);
            panic!(
                "no writer log with 3 lines under {} within 120 s\npod: {pod:?}\npvc: {pvc:?}\nkubelet: {}",
                backend.display(),
                node.log_tail("kubelet")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let text = std::fs::read_to_string(&log).unwrap();
    println!(
        "examples applied -> 3 lines in {} after {:?}:\n{}",
        log.display(),
        applied.elapsed(),
        text.trim_end()
    );
    assert!(text.lines().all(|l| l.contains(" db-0 ")), "{text}");
    let pvc = pvcs.get("data-db-0").await.unwrap();
    assert_eq!(pvc.status.and_then(|s| s.phase).as_deref(), Some("Bound"));
    // The pod's volume is a FUSE mount under kubelet's pods directory, made by the node
    // plugin inside its pod and propagated to the host (Bidirectional).
    let pods_dir = node.root_dir().join("pods").display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let fuse: Vec<&str> = mountinfo
        .lines()
        .filter(|l| {
            l.contains(&pods_dir) && l.contains("kubernetes.io~csi") && l.contains(" - fuse")
        })
        .collect();
    assert_eq!(
        fuse.len(),
        1,
        "the volume's FUSE mount on the host: {fuse:#?}"
    );

    let kubectl = lock::Kubectl {
        bin: kubectl.to_path_buf(),
        kubeconfig: plane.kubeconfig(&Identity::Admin),
    };
    lock::lock_through_kubernetes(&kubectl, client.clone(), node, &log).await;
    let moved = other_node::moved_to_another_node(
        &kubectl,
        client.clone(),
        node,
        &other_node::controller_binary(),
        backend,
        &log,
    )
    .await;
    println!(
        "db-0 moved to a node of its own while the old one was a zombie: attach refused \
         ({}); after the out-of-service taint the zombie's writer got EIO at {:?} and the \
         attach was granted at {:?}",
        moved.refused_message, moved.eio_after_taint, moved.granted_after_taint
    );
    lock::killed_plugin_pod(&kubectl, client.clone(), node, &log).await;

    let statefulsets: kube::Api<StatefulSet> = kube::Api::namespaced(client.clone(), "default");
    statefulsets
        .delete("db", &Default::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while pods.get_opt("db-0").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "db-0 not gone within 90 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pvcs.delete("data-db-0", &Default::default()).await.unwrap();
    let volume_dir = log.parent().unwrap().to_path_buf();
    let deadline = Instant::now() + Duration::from_secs(90);
    while volume_dir.exists() {
        assert!(
            Instant::now() < deadline,
            "{} still there 90 s after its PVC was deleted\n{}",
            volume_dir.display(),
            kubectl.run(&["get", "volumeattachments,pv,pvc,pods", "-A", "-o", "wide"])
                + &other_node::controller_pod_logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // DeleteVolume deleted the volume's claim record too: no claim Lease is left.
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let claims: Vec<String> = leases
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|l| l.metadata.name)
        .filter(|n| n.starts_with("holdfast-claim-"))
        .collect();
    assert!(
        claims.is_empty(),
        "claim records left after DeleteVolume: {claims:?}"
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(&pods_dir) && l.contains(" - fuse"))
        .collect();
    assert!(
        left.is_empty(),
        "the volume's FUSE mount is left: {left:#?}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
    }
    found
}
