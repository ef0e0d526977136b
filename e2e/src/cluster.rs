//! [`Cluster`]: one real lease store, the real controller and N real node plugins, each
//! plugin in its own network namespace, over one shared backend root.
//!
//! The store is a real etcd ([`StoreKind::Etcd`]) or a real kube-apiserver
//! ([`StoreKind::Kubernetes`]: the core testkit's control plane, Lease objects in
//! namespace `holdfast`). With Kubernetes every process acts as the identity the chart
//! gives it — the plugins as the node ServiceAccount, the controller and the fence CLI
//! as the controller ServiceAccount — under the chart's RBAC (`manifests/deploy/
//! 20-rbac.yaml`, applied before anything starts), and the API server keeps an audit
//! log, so a test can check that every call was allowed and every grant used. Either
//! store listens on all addresses; each namespace reaches it through its veth's host
//! end, so a partition cuts the node off it.
//!
//! Layout under the run's temp dir (`/tmp/hf-e2e-<pid>-*`): `backend/` (the shared root),
//! `controller.sock`, `controller.log`, and per node `node<k>/` with `csi.sock`,
//! `state/`, `plugin.log` and `pods/<pod>/mount` targets.
//!
//! Clusters of one process run one at a time (an flock on `/tmp/hf-e2e.lock`, also
//! keeping test binaries apart): the fault tests time leases of a few seconds on two
//! cores, and a second cluster competing for them would make timings lie.
//!
//! Drop order matters for cleanup after a failure: plugins are killed first (which ends
//! every FUSE request still waiting, so no writer stays blocked), then every mount under
//! the temp dir is lazily unmounted, then the controller, etcd and namespaces go.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use holdfast_core::testkit::etcd::{EtcdOptions, EtcdServer};
use holdfast_core::testkit::kube::{ControlPlane, ControlPlaneOptions, Identity};

use crate::netns::{self, NetNs};
use crate::process::{supported_flags, Daemon};
use crate::{bins, mounts, stale};

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// Lease timing every process of the cluster runs with.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// D: session lease duration.
    pub duration: Duration,
    pub margin: Duration,
    /// ε: the bound on clock rate error.
    pub epsilon: f64,
}

impl LeaseTiming {
    /// D = 3 s, margin 600 ms, ε = 0.01: the e2e tests' timing.
    pub fn short() -> Self {
        LeaseTiming {
            duration: Duration::from_secs(3),
            margin: Duration::from_millis(600),
            epsilon: 0.01,
        }
    }

    /// D·(1+ε) + margin: how long an acquirer must see a session unrenewed.
    pub fn takeover_after(&self) -> Duration {
        self.duration.mul_f64(1.0 + self.epsilon) + self.margin
    }

    /// D − margin: how long after its last proven renewal a holder stops I/O.
    pub fn self_fence_after(&self) -> Duration {
        self.duration - self.margin
    }

    /// D/3: the renewal interval.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }
}

/// Which lease store a cluster runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Etcd,
    Kubernetes,
}

/// The running lease store.
pub enum LeaseServer {
    Etcd(EtcdServer),
    Kubernetes(Box<ControlPlane>),
}

/// The namespace of the kubernetes store's Lease objects (the chart's release namespace).
pub const LEASE_NAMESPACE: &str = "holdfast";

/// The chart's RBAC with its default values, as `kubectl apply` would take it.
pub const CHART_RBAC: &str = include_str!("../../manifests/deploy/20-rbac.yaml");

impl LeaseServer {
    /// The store's client port.
    pub fn port(&self) -> u16 {
        match self {
            LeaseServer::Etcd(etcd) => etcd.client_port(),
            LeaseServer::Kubernetes(plane) => plane.port(),
        }
    }

    /// What a process running as `identity`, reaching the store through `ip`, puts
    /// before its program (`env KUBECONFIG=…`) and after it (the `--lease-*` flags
    /// `bin` knows).
    fn command_for(
        &self,
        bin: &Path,
        subcommand: Option<&str>,
        identity: &Identity,
        ip: IpAddr,
        timing: LeaseTiming,
    ) -> (Vec<String>, Vec<String>) {
        let (env, store) = match self {
            LeaseServer::Etcd(etcd) => (
                Vec::new(),
                vec![
                    ("--lease-store", "etcd".to_string()),
                    ("--etcd-endpoints", etcd.client_url_at(ip)),
                ],
            ),
            LeaseServer::Kubernetes(plane) => (
                vec![
                    "env".to_string(),
                    format!("KUBECONFIG={}", plane.kubeconfig_at(identity, ip).display()),
                ],
                vec![
                    ("--lease-store", "kubernetes".to_string()),
                    ("--lease-namespace", LEASE_NAMESPACE.to_string()),
                ],
            ),
        };
        (env, lease_flags(bin, subcommand, store, timing))
    }
}

/// One node: its namespace and its plugin process.
pub struct Node {
    pub k: usize,
    pub id: String,
    pub dir: PathBuf,
    pub plugin: Daemon,
    pub ns: NetNs,
}

pub struct Cluster {
    pub base: PathBuf,
    /// The shared backend root.
    pub root: PathBuf,
    pub timing: LeaseTiming,
    pub store: LeaseServer,
    pub controller: Daemon,
    nodes: Vec<Node>,
    _tmp: tempfile::TempDir,
    _serial: File,
}

impl Cluster {
    /// Starts etcd, the controller and `n` node plugins (`node1` … `node<n>`) with
    /// [`LeaseTiming::short`]; returns once every one answers Probe.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, LeaseTiming::short()).await
    }

    pub async fn start_with(n: usize, timing: LeaseTiming) -> Cluster {
        Self::start_on(StoreKind::Etcd, n, timing)
            .await
            .expect("an etcd cluster always starts")
    }

    /// Like [`Cluster::start`] on a real kube-apiserver, or `None` after printing why
    /// `test` skips (no Kubernetes binaries, and `HOLDFAST_REQUIRE_KUBE` unset).
    pub async fn start_kubernetes(test: &str, n: usize) -> Option<Cluster> {
        holdfast_core::testkit::kube::find_or_skip(test, &["kube-apiserver"])?;
        Self::start_on(StoreKind::Kubernetes, n, LeaseTiming::short()).await
    }

    async fn start_on(kind: StoreKind, n: usize, timing: LeaseTiming) -> Option<Cluster> {
        let serial = serial_lock();
        netns::remove_stale();
        stale::remove_stale_dirs();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}{}-", stale::TMP_PREFIX, std::process::id()))
            .tempdir()
            .expect("temp dir");
        let base = tmp.path().canonicalize().expect("canonical temp dir");
        let root = base.join("backend");
        std::fs::create_dir_all(&root).expect("backend root");
        // Namespaces first: their host addresses go into the API server's certificate.
        let number = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let namespaces: Vec<NetNs> = (1..=n).map(|k| NetNs::create(number, k)).collect();
        let store = match kind {
            StoreKind::Etcd => LeaseServer::Etcd(EtcdServer::start_with(EtcdOptions {
                listen_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                ..EtcdOptions::default()
            })),
            StoreKind::Kubernetes => {
                let options = ControlPlaneOptions {
                    listen_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    extra_ips: namespaces.iter().map(|ns| IpAddr::V4(ns.host_ip)).collect(),
                    audit: true,
                    ..ControlPlaneOptions::default()
                };
                let plane = ControlPlane::start_or_skip("e2e cluster", options).await?;
                plane.ensure_namespace(LEASE_NAMESPACE).await;
                plane.apply_yaml(CHART_RBAC).await;
                LeaseServer::Kubernetes(Box::new(plane))
            }
        };

        let controller_bin = bins::controller();
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (mut command, flags) = store.command_for(
            &controller_bin,
            None,
            &Identity::controller(),
            loopback,
            timing,
        );
        command.push(controller_bin.display().to_string());
        command.extend(serve_args(
            &controller_bin,
            &base.join("controller.sock"),
            &root,
        ));
        command.extend(flags);
        let controller = Daemon::start(
            command,
            base.join("controller.sock"),
            base.join("controller.log"),
        )
        .await;

        let mut cluster = Cluster {
            base,
            root,
            timing,
            store,
            controller,
            nodes: Vec::new(),
            _tmp: tmp,
            _serial: serial,
        };
        for (k, ns) in (1..=n).zip(namespaces) {
            let node = cluster.start_node(k, ns).await;
            cluster.nodes.push(node);
        }
        Some(cluster)
    }

    async fn start_node(&self, k: usize, ns: NetNs) -> Node {
        let id = format!("node{k}");
        let dir = self.base.join(&id);
        std::fs::create_dir_all(dir.join("pods")).expect("node dir");
        let driver = bins::driver();
        let socket = dir.join("csi.sock");
        let (env, flags) = self.store.command_for(
            &driver,
            None,
            &Identity::node_plugin(),
            IpAddr::V4(ns.host_ip),
            self.timing,
        );
        let mut command = vec![
            "nsenter".to_string(),
            format!("--net={}", ns.path()),
            "--".to_string(),
        ];
        command.extend(env);
        command.extend([
            driver.display().to_string(),
            format!("--endpoint=unix://{}", socket.display()),
            format!("--node-id={id}"),
            format!("--backend-root={}", self.root.display()),
            format!("--state-dir={}", dir.join("state").display()),
            "--log-level=debug".to_string(),
        ]);
        command.extend(flags);
        let plugin = Daemon::start(command, socket, dir.join("plugin.log")).await;
        Node {
            k,
            id,
            dir,
            plugin,
            ns,
        }
    }

    /// The control plane, when the cluster runs on the kubernetes store.
    pub fn control_plane(&self) -> Option<&ControlPlane> {
        match &self.store {
            LeaseServer::Kubernetes(plane) => Some(plane),
            LeaseServer::Etcd(_) => None,
        }
    }

    /// Node `k` (1-based).
    pub fn node(&self, k: usize) -> &Node {
        &self.nodes[k - 1]
    }

    pub fn node_mut(&mut self, k: usize) -> &mut Node {
        &mut self.nodes[k - 1]
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// SIGKILL node `k`'s plugin (a crash: its mounts stay, dead).
    pub fn kill(&mut self, k: usize) {
        self.node_mut(k).plugin.kill();
    }

    /// SIGSTOP node `k`'s plugin; returns once it is stopped.
    pub fn pause(&self, k: usize) {
        self.node(k).plugin.pause();
    }

    /// SIGCONT node `k`'s plugin; returns once it runs.
    pub fn resume(&self, k: usize) {
        self.node(k).plugin.resume();
    }

    /// Kills node `k`'s plugin if it runs and starts it again with the same flags and
    /// state dir (a DaemonSet pod restart); returns once it answers Probe.
    pub async fn restart(&mut self, k: usize) {
        self.node_mut(k).plugin.restart().await;
    }

    /// The lease store's address as node `k` reaches it.
    pub fn store_addr_from(&self, k: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.node(k).ns.host_ip), self.store.port())
    }

    /// Cuts node `k` off the network (the lease store unreachable; the backend root is
    /// not network storage here, so it stays reachable). Verified by a failing connect.
    pub fn partition(&self, k: usize) {
        self.node(k).ns.partition();
        let addr = self.store_addr_from(k);
        assert!(
            !self
                .node(k)
                .ns
                .can_connect(addr, Duration::from_millis(300)),
            "node{k} still reaches the lease store at {addr} after the partition"
        );
    }

    /// Restores node `k`'s link; returns once it reaches the lease store again.
    pub fn heal(&self, k: usize) {
        self.node(k).ns.heal();
        let addr = self.store_addr_from(k);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .node(k)
            .ns
            .can_connect(addr, Duration::from_millis(300))
        {
            assert!(
                Instant::now() < deadline,
                "node{k} cannot reach the lease store after heal"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `holdfast-controller fence --node node<k>` against this cluster's store, as the
    /// controller's identity: the admin's (or a fencing agent's) fence. `Err` carries the
    /// command's output.
    pub fn fence(&self, k: usize) -> Result<String, String> {
        let bin = bins::controller();
        let known = supported_flags(&bin, Some("fence"));
        if !known.iter().any(|f| f == "--node") {
            return Err("holdfast-controller has no `fence --node` verb in this build".into());
        }
        self.controller_cli("fence", &[format!("--node={}", self.node(k).id)])
    }

    /// `holdfast-controller <subcommand> <args>` against this cluster's store, as the
    /// controller's identity. `Ok` carries stdout and stderr; `Err` also the status.
    pub fn controller_cli(&self, subcommand: &str, args: &[String]) -> Result<String, String> {
        let bin = bins::controller();
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (env, flags) = self.store.command_for(
            &bin,
            Some(subcommand),
            &Identity::controller(),
            loopback,
            self.timing,
        );
        let mut argv = env;
        argv.push(bin.display().to_string());
        argv.push(subcommand.to_string());
        argv.extend(args.iter().cloned());
        argv.extend(flags);
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .map_err(|e| format!("running holdfast-controller {subcommand}: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{subcommand} exited with {}: {text}", out.status))
        }
    }

    /// Where a volume's files land on the shared storage (read by the checker).
    pub fn data_dir(&self, volume_id: &str) -> PathBuf {
        self.root.join("volumes").join(volume_id).join("data")
    }

    /// The epoch file the plugins write on acquire.
    pub fn epoch_file(&self, volume_id: &str) -> PathBuf {
        self.root
            .join("volumes")
            .join(volume_id)
            .join(holdfast_core::backend::EPOCH_FILE)
    }

    /// The epoch written on the storage, if any.
    pub fn stored_epoch(&self, volume_id: &str) -> Option<String> {
        std::fs::read_to_string(self.epoch_file(volume_id))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// A fresh target for `pod` on node `k`: its parent exists (the CO's job), the
    /// target itself does not (the plugin's).
    pub fn target(&self, k: usize, pod: &str) -> PathBuf {
        let parent = self.node(k).dir.join("pods").join(pod);
        std::fs::create_dir_all(&parent).expect("target parent");
        parent.join("mount")
    }

    /// Every plugin's and the controller's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = format!("--- controller ---\n{}", self.controller.logs());
        for node in &self.nodes {
            out += &format!("--- {} ---\n{}", node.id, node.plugin.logs());
        }
        out
    }

    /// The last `lines` lines of node `k`'s log.
    pub fn log_tail(&self, k: usize, lines: usize) -> String {
        let text = self.node(k).plugin.logs();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether `path` is a mount point now.
    pub fn is_mounted(&self, path: &Path) -> bool {
        !mounts::mounts_at(path).is_empty()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.plugin.kill();
        }
        mounts::sweep(&self.base);
        self.controller.kill();
        // Fields drop next: the store is killed, namespaces and veths deleted, the temp
        // dir removed, and the serial lock released last.
    }
}

/// The controller's serving arguments. If the binary has grown subcommands, it serves
/// under `serve`.
fn serve_args(bin: &Path, socket: &Path, root: &Path) -> Vec<String> {
    let mut args = Vec::new();
    if !supported_flags(bin, None).iter().any(|f| f == "--endpoint") {
        args.push("serve".to_string());
    }
    args.push(format!("--endpoint=unix://{}", socket.display()));
    args.push(format!("--backend-root={}", root.display()));
    args.push("--log-format=text".to_string());
    args.push("--log-level=debug".to_string());
    args
}

/// The lease flags (`store`'s and the shared timing), each only if `bin`
/// (`subcommand`) knows it.
fn lease_flags(
    bin: &Path,
    subcommand: Option<&str>,
    store: Vec<(&str, String)>,
    timing: LeaseTiming,
) -> Vec<String> {
    let known = supported_flags(bin, subcommand);
    let timing_flags = [
        (
            "--lease-duration",
            format!("{}ms", timing.duration.as_millis()),
        ),
        ("--lease-margin", format!("{}ms", timing.margin.as_millis())),
        ("--lease-epsilon", timing.epsilon.to_string()),
    ];
    store
        .into_iter()
        .chain(timing_flags)
        .filter(|(flag, _)| known.iter().any(|k| k == flag))
        .map(|(flag, value)| format!("{flag}={value}"))
        .collect()
}

/// The file whose flock serializes clusters on this machine.
pub const SERIAL_LOCK: &str = "/tmp/hf-e2e.lock";

/// Serializes clusters across threads and processes; released when the file closes.
fn serial_lock() -> File {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(SERIAL_LOCK)
        .unwrap_or_else(|e| panic!("open {SERIAL_LOCK}: {e}"));
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    file
}
