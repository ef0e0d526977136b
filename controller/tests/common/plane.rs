//! A real control plane (kube-apiserver on its own etcd) beside a separate etcd for
//! the lease store, Node objects the test taints, and controller processes started
//! against both, each with its log in a file and its metrics on its own port.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_core::lease::{LeaseParams, NodeIdentity, SessionLease};
use holdfast_core::store::LeaseStore;
use holdfast_core::testkit::etcd::EtcdServer;
use holdfast_core::testkit::kube::{ControlPlane, ControlPlaneOptions, Identity};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};

use super::{register_nodes, ControllerProcess};

pub const PREFIX: &str = "/holdfast-kube-tests/";
pub const NAMESPACE: &str = "holdfast";
pub const LEADER_LEASE: &str = "holdfast-controller-leader";

/// D = 1 s, ε = 1 %, margin = 200 ms, as the node plugins of these tests use.
pub fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_secs(1), 0.01, Duration::from_millis(200)).unwrap()
}

/// A controller process with what the test needs to look at it.
pub struct Replica {
    pub name: String,
    pub process: ControllerProcess,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Replica {
    /// The `holdfast_controller_leader` gauge, or `None` if it does not answer.
    pub async fn leader_gauge(&self) -> Option<f64> {
        super::series(
            &super::scrape(self.metrics_port).await?,
            "holdfast_controller_leader",
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

pub struct Plane {
    pub plane: ControlPlane,
    pub lease_etcd: EtcdServer,
    pub store: Arc<dyn LeaseStore>,
    pub dir: tempfile::TempDir,
}

impl Plane {
    /// `None` (the test skips) when the Kubernetes binaries are missing.
    pub async fn start(test: &str) -> Option<Plane> {
        let plane = ControlPlane::start_or_skip(test, ControlPlaneOptions::default()).await?;
        plane.ensure_namespace(NAMESPACE).await;
        let lease_etcd = EtcdServer::start();
        let store: Arc<dyn LeaseStore> = Arc::new(lease_etcd.store(PREFIX).await);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        register_nodes(&dir.path().join("root"), &["n1", "n2", "n3", "worker"]);
        Some(Plane {
            plane,
            lease_etcd,
            store,
            dir,
        })
    }

    /// The lease store and timing flags of every controller here.
    pub fn lease_args(&self) -> Vec<String> {
        vec![
            "--lease-store=etcd".into(),
            format!("--etcd-endpoints={}", self.lease_etcd.client_url()),
            format!("--etcd-prefix={PREFIX}"),
            "--lease-duration=1s".into(),
            "--lease-margin=200ms".into(),
            "--lease-epsilon=0.01".into(),
        ]
    }

    /// A controller named `name`, electing a leader on a 2 s Lease (renew deadline
    /// 1.5 s, retry 200 ms) and watching Nodes, as the admin identity.
    pub async fn replica(&self, name: &str) -> Replica {
        let metrics_port = super::free_port();
        let mut args = self.lease_args();
        args.extend([
            "--leader-elect=true".to_string(),
            format!("--leader-elect-namespace={NAMESPACE}"),
            format!("--leader-elect-identity={name}"),
            "--leader-elect-lease-duration=2s".into(),
            "--leader-elect-renew-deadline=1500ms".into(),
            "--leader-elect-retry-period=200ms".into(),
            "--watch-nodes=true".into(),
            format!("--metrics-address=127.0.0.1:{metrics_port}"),
        ]);
        let kubeconfig = self.plane.kubeconfig(&Identity::Admin);
        let log = self.dir.path().join(format!("{name}.log"));
        let process = ControllerProcess::start_logged(
            &self.dir.path().join("root"),
            &self.dir.path().join(format!("{name}.sock")),
            &args,
            &[("KUBECONFIG".into(), kubeconfig.display().to_string())],
            Some(&log),
        )
        .await;
        Replica {
            name: name.to_string(),
            process,
            metrics_port,
            log,
        }
    }

    pub async fn nodes(&self) -> Api<Node> {
        Api::all(self.plane.admin().await)
    }

    /// Creates a Ready Node object named `name`.
    pub async fn create_node(&self, name: &str) {
        let node: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        self.nodes()
            .await
            .create(&PostParams::default(), &node)
            .await
            .unwrap();
    }

    /// Puts the out-of-service taint on `name` (`true`) or takes every taint off.
    pub async fn set_taint(&self, name: &str, tainted: bool) {
        let taints = if tainted {
            serde_json::json!([{
                "key": "node.kubernetes.io/out-of-service",
                "value": "nodeshutdown",
                "effect": "NoExecute",
            }])
        } else {
            serde_json::json!(null)
        };
        self.nodes()
            .await
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"taints": taints}})),
            )
            .await
            .unwrap();
    }

    /// The leader Lease's holder, as the API server has it.
    pub async fn leader_holder(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.plane.admin().await, NAMESPACE);
        leases
            .get_opt(LEADER_LEASE)
            .await
            .unwrap()
            .and_then(|l| l.spec?.holder_identity)
            .filter(|h| !h.is_empty())
    }

    /// A node plugin's session for `node`, with its own state dir `state` (two sessions
    /// of one node in one state dir are an old and a new instance, as in a restart).
    pub async fn session(&self, node: &str, state: &str) -> SessionLease {
        let state_dir = self.dir.path().join(state);
        std::fs::create_dir_all(&state_dir).unwrap();
        let identity = NodeIdentity::of_this_machine(node).unwrap();
        SessionLease::start(self.store.clone(), identity, params(), &state_dir)
            .await
            .unwrap()
    }

    /// `holdfast-controller <args>` against the lease store: (success, stdout+stderr).
    pub async fn cli(&self, args: &[&str]) -> (bool, String) {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast-controller"));
        for (key, _) in std::env::vars() {
            if key.starts_with("HOLDFAST_") {
                command.env_remove(key);
            }
        }
        let out = command
            .args(args)
            .args(self.lease_args())
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Polls `check` every 10 ms until it returns `Some`, or panics with `what` after
/// `within`. Returns the value and how long it took.
pub async fn wait_for<T, F, Fut>(within: Duration, what: &str, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return (value, start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Prints the last lines of each log when the test fails (the guard is dropped while
/// panicking): what the controller and the attacher did is the first thing to read.
pub struct LogsOnFailure(pub Vec<PathBuf>);

impl Drop for LogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for path in &self.0 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last lines of {}", path.display());
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
        }
    }
}
