//! [`Cluster`]: one real etcd, the real controller and N real node plugins, each plugin
//! in its own network namespace, over one shared backend root.
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
    pub etcd: EtcdServer,
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
        let etcd = EtcdServer::start_with(EtcdOptions {
            listen_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            ..EtcdOptions::default()
        });

        let controller_bin = bins::controller();
        let mut command = vec![controller_bin.display().to_string()];
        command.extend(serve_args(
            &controller_bin,
            &base.join("controller.sock"),
            &root,
        ));
        command.extend(lease_flags(
            &controller_bin,
            None,
            &etcd.client_url(),
            timing,
        ));
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
            etcd,
            controller,
            nodes: Vec::new(),
            _tmp: tmp,
            _serial: serial,
        };
        let number = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        for k in 1..=n {
            let node = cluster.start_node(number, k).await;
            cluster.nodes.push(node);
        }
        cluster
    }

    async fn start_node(&self, cluster: u32, k: usize) -> Node {
        let ns = NetNs::create(cluster, k);
        let id = format!("node{k}");
        let dir = self.base.join(&id);
        std::fs::create_dir_all(dir.join("pods")).expect("node dir");
        let driver = bins::driver();
        let socket = dir.join("csi.sock");
        let mut command = vec![
            "nsenter".to_string(),
            format!("--net={}", ns.path()),
            "--".to_string(),
            driver.display().to_string(),
            format!("--endpoint=unix://{}", socket.display()),
            format!("--node-id={id}"),
            format!("--backend-root={}", self.root.display()),
            format!("--state-dir={}", dir.join("state").display()),
            "--log-level=debug".to_string(),
        ];
        let etcd_url = self.etcd.client_url_at(IpAddr::V4(ns.host_ip));
        command.extend(lease_flags(&driver, None, &etcd_url, self.timing));
        let plugin = Daemon::start(command, socket, dir.join("plugin.log")).await;
        Node {
            k,
            id,
            dir,
            plugin,
            ns,
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

    /// The etcd address as node `k` reaches it.
    pub fn etcd_addr_from(&self, k: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.node(k).ns.host_ip), self.etcd.client_port())
    }

    /// Cuts node `k` off the network (etcd unreachable; the backend root is not
    /// network storage here, so it stays reachable). Verified by a failing connect.
    pub fn partition(&self, k: usize) {
        self.node(k).ns.partition();
        let addr = self.etcd_addr_from(k);
        assert!(
            !self
                .node(k)
                .ns
                .can_connect(addr, Duration::from_millis(300)),
            "node{k} still reaches etcd at {addr} after the partition"
        );
    }

    /// Restores node `k`'s link; returns once it reaches etcd again.
    pub fn heal(&self, k: usize) {
        self.node(k).ns.heal();
        let addr = self.etcd_addr_from(k);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .node(k)
            .ns
            .can_connect(addr, Duration::from_millis(300))
        {
            assert!(
                Instant::now() < deadline,
                "node{k} cannot reach etcd after heal"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `holdfast-controller fence --node node<k>` against this cluster's etcd: the
    /// admin's (or a fencing agent's) fence. `Err` carries the command's output.
    pub fn fence(&self, k: usize) -> Result<String, String> {
        let bin = bins::controller();
        let known = supported_flags(&bin, Some("fence"));
        if !known.iter().any(|f| f == "--node") {
            return Err("holdfast-controller has no `fence --node` verb in this build".into());
        }
        let out = std::process::Command::new(&bin)
            .arg("fence")
            .arg(format!("--node={}", self.node(k).id))
            .args(lease_flags(
                &bin,
                Some("fence"),
                &self.etcd.client_url(),
                self.timing,
            ))
            .output()
            .map_err(|e| format!("running holdfast-controller fence: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("fence exited with {}: {text}", out.status))
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
        // Fields drop next: etcd is killed, namespaces and veths deleted, the temp dir
        // removed, and the serial lock released last.
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

/// The shared lease flags, each only if `bin` (`subcommand`) knows it.
fn lease_flags(
    bin: &Path,
    subcommand: Option<&str>,
    etcd_url: &str,
    timing: LeaseTiming,
) -> Vec<String> {
    let known = supported_flags(bin, subcommand);
    let wanted = [
        ("--lease-store", "etcd".to_string()),
        ("--etcd-endpoints", etcd_url.to_string()),
        (
            "--lease-duration",
            format!("{}ms", timing.duration.as_millis()),
        ),
        ("--lease-margin", format!("{}ms", timing.margin.as_millis())),
        ("--lease-epsilon", timing.epsilon.to_string()),
    ];
    wanted
        .into_iter()
        .filter(|(flag, _)| known.iter().any(|k| k == flag))
        .map(|(flag, value)| format!("{flag}={value}"))
        .collect()
}

/// Serializes clusters across threads and processes; released when the file closes.
fn serial_lock() -> File {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/hf-e2e.lock")
        .expect("open /tmp/hf-e2e.lock");
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    file
}
