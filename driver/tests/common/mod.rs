//! Test harness shared by the driver's black-box suites: runs the REAL `holdfast-driver`
//! binary as a child process and talks CSI to it over its real unix socket.
//!
//! API:
//! - [`Plugin::start_standalone`] — a fresh `--standalone` plugin (Identity + Controller +
//!   Node, in-memory lease store) in its own temp dir; returns once the socket accepts
//!   connections. [`Plugin::start_standalone_with`] adds extra flags;
//!   [`Plugin::start_node_only`] runs the normal (cluster) mode: Identity + Node only.
//! - [`Plugin::channel`] — a tonic [`Channel`] to the socket (build any CSI client on it).
//! - [`Plugin::kill`] — SIGKILL (a crash: mounts stay, the socket file stays).
//! - [`Plugin::stop_sigterm`] — SIGTERM and wait for a graceful exit; returns its status.
//! - [`Plugin::restart`] — SIGKILL the process if it still runs, then start the binary
//!   again with the same flags, backend root and state dir.
//! - [`Plugin::target`] — a fresh publish target path whose parent exists (the CO's job)
//!   and the target itself does not (the plugin's job).
//! - [`Plugin::logs`] — everything the plugin wrote to stdout/stderr so far.
//! - [`Plugin::data_dir`] — the backing directory a volume's targets show.
//!
//! [`Plugin::start_with`] takes [`PluginOptions`]: node id, a shared backend root,
//! extra flags ([`PluginOptions::node_on_etcd`]: a node-only plugin on a real etcd with
//! a short lease), so that several plugins can share one store and one root.
//!
//! [`fixture`] starts a plugin and returns it with a channel and a Node client.
//! Request helpers: [`create_volume`] (through the Controller, with a `dataPath`),
//! [`create_volume_in`] (straight into a backend root), [`publish_request`] (for the
//! pod [`POD_UID`]), [`publish_for`] (for any pod), [`unpublish_request`],
//! [`mount_capability`]; and [`mounts_at`],
//! an independent reading of `/proc/self/mountinfo` for one mount point.
//!
//! Layout under `plugin.tmp`: `csi.sock`, `backend/` (`plugin.root`), `state/`,
//! `targets/`, `plugin.log`. Dropping the [`Plugin`] SIGKILLs the process, then lazily
//! unmounts every mount under the temp dir (deepest first), so a failing test never
//! leaves a mount behind, and only then removes the directory.
#![allow(dead_code)]

pub mod pods_plane;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdfast_core::csi::v1::controller_client::ControllerClient;
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use holdfast_core::csi::v1::{
    CreateVolumeRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use holdfast_driver::publish::kernel_mounts::{self as mount, DetachPolicy, MountTable};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// How long a plugin may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERM'd plugin may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The node id every harness plugin uses.
pub const NODE_ID: &str = "harness-node";

/// The pod UID [`publish_request`] names (exclusive volumes need one).
pub const POD_UID: &str = "pod-harness-0001";
/// Where kubelet puts the pod UID in volume_context.
pub const POD_UID_KEY: &str = "csi.storage.k8s.io/pod.uid";

/// How to start a plugin (see [`Plugin::start_with`]).
#[derive(Clone, Debug)]
pub struct PluginOptions {
    pub standalone: bool,
    pub node_id: String,
    /// Share this backend root (another plugin's `root`) instead of a fresh one.
    pub root: Option<PathBuf>,
    pub extra_args: Vec<String>,
}

impl PluginOptions {
    /// A node-only plugin named `node_id` on the lease store at `etcd_endpoints`, with
    /// a short lease (D = 1.5 s, margin 0.5 s: renewals every 0.5 s).
    pub fn node_on_etcd(node_id: &str, etcd_endpoints: &str, root: Option<PathBuf>) -> Self {
        Self::node_on_etcd_with(node_id, etcd_endpoints, root, "1500ms", "500ms")
    }

    /// [`PluginOptions::node_on_etcd`] with the lease duration D and margin given.
    pub fn node_on_etcd_with(
        node_id: &str,
        etcd_endpoints: &str,
        root: Option<PathBuf>,
        duration: &str,
        margin: &str,
    ) -> Self {
        PluginOptions {
            standalone: false,
            node_id: node_id.to_string(),
            root,
            extra_args: [
                "--lease-store",
                "etcd",
                "--etcd-endpoints",
                etcd_endpoints,
                "--lease-duration",
                duration,
                "--lease-margin",
                margin,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }
}

pub struct Plugin {
    /// The CSI socket path.
    pub socket: PathBuf,
    /// The backend root (`--backend-root`).
    pub root: PathBuf,
    /// The node-local state dir (`--state-dir`).
    pub state_dir: PathBuf,
    /// Owns everything above; removed on drop after the mounts under it are gone.
    pub tmp: tempfile::TempDir,
    extra_args: Vec<String>,
    standalone: bool,
    node_id: String,
    child: Option<Child>,
    next_target: AtomicU64,
}

impl Plugin {
    /// Starts `holdfast-driver --standalone` in a new temp dir.
    pub async fn start_standalone() -> Plugin {
        Self::start_standalone_with(&[]).await
    }

    /// Like [`Plugin::start_standalone`], with extra command-line flags.
    pub async fn start_standalone_with(extra_args: &[&str]) -> Plugin {
        Self::start(true, extra_args).await
    }

    /// The normal (cluster) mode: Identity + Node, no Controller, with the memory
    /// lease store (no cluster store exists here).
    pub async fn start_node_only() -> Plugin {
        Self::start(false, &["--lease-store", "memory"]).await
    }

    async fn start(standalone: bool, extra_args: &[&str]) -> Plugin {
        Self::start_with(PluginOptions {
            standalone,
            node_id: NODE_ID.to_string(),
            root: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        })
        .await
    }

    /// Starts a plugin as `options` say, in a new temp dir (its own state dir and
    /// targets; the backend root is shared if `options.root` names one).
    pub async fn start_with(options: PluginOptions) -> Plugin {
        let tmp = tempfile::Builder::new()
            .prefix("holdfast-driver-test-")
            .tempdir()
            .expect("create temp dir");
        // Canonical, so paths compare equal to the ones in the mount table.
        let base = tmp.path().canonicalize().expect("canonicalize temp dir");
        let root = options.root.clone().unwrap_or_else(|| base.join("backend"));
        let state_dir = base.join("state");
        for dir in [&root, &state_dir, &base.join("targets")] {
            std::fs::create_dir_all(dir).expect("create harness dir");
        }
        let mut plugin = Plugin {
            socket: base.join("csi.sock"),
            root,
            state_dir,
            tmp,
            extra_args: options.extra_args,
            standalone: options.standalone,
            node_id: options.node_id,
            child: None,
            next_target: AtomicU64::new(0),
        };
        plugin.spawn().await;
        plugin
    }

    fn log_path(&self) -> PathBuf {
        self.tmp.path().join("plugin.log")
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "plugin already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open plugin log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_holdfast-driver"));
        if self.standalone {
            command.arg("--standalone");
        }
        let child = command
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--node-id")
            .arg(&self.node_id)
            .arg("--backend-root")
            .arg(&self.root)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--log-level")
            .arg("debug")
            .args(&self.extra_args)
            .env_remove("CSI_ENDPOINT")
            .env_remove("KUBE_NODE_NAME")
            // No metrics endpoint unless a test asks (--metrics-address wins over this):
            // the default port would be shared by every plugin of a test run.
            .env("HOLDFAST_METRICS_ADDRESS", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn holdfast-driver");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "holdfast-driver exited before serving ({status}):\n{}",
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "holdfast-driver did not open {} within {START_TIMEOUT:?}:\n{}",
                    self.socket.display(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A channel to the plugin's socket. Connects eagerly, so an error here means the
    /// plugin is not serving.
    pub async fn channel(&self) -> Channel {
        let socket = self.socket.clone();
        // The URI is required by tonic but unused: every connection goes to the socket.
        Endpoint::from_static("http://holdfast.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(socket).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .expect("connect to the plugin socket")
    }

    /// The running process id, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the process dies as in a crash; its mounts and socket file stay.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (SIGKILL and panic after [`STOP_TIMEOUT`]).
    pub async fn stop_sigterm(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("plugin is not running");
        let pid = rustix::process::Pid::from_child(&child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for plugin") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "holdfast-driver ignored SIGTERM for {STOP_TIMEOUT:?}:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A second instance on this one's node, backend root and state dir, started while
    /// this one may still run (a rolling update's overlap, or a killed plugin still
    /// exiting when its replacement starts). Its own socket and targets.
    pub async fn start_successor(&self) -> Plugin {
        let tmp = tempfile::Builder::new()
            .prefix("holdfast-driver-test-")
            .tempdir()
            .expect("create temp dir");
        let base = tmp.path().canonicalize().expect("canonicalize temp dir");
        std::fs::create_dir_all(base.join("targets")).expect("create harness dir");
        let mut plugin = Plugin {
            socket: base.join("csi.sock"),
            root: self.root.clone(),
            state_dir: self.state_dir.clone(),
            tmp,
            extra_args: self.extra_args.clone(),
            standalone: self.standalone,
            node_id: self.node_id.clone(),
            child: None,
            next_target: AtomicU64::new(0),
        };
        plugin.spawn().await;
        plugin
    }

    /// Kills the process if it still runs, and starts it again on the same dirs.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// A fresh target path under `targets/`: its parent exists, it does not.
    pub fn target(&self) -> PathBuf {
        let n = self.next_target.fetch_add(1, Ordering::Relaxed);
        let parent = self.tmp.path().join("targets").join(format!("pod-{n}"));
        std::fs::create_dir_all(&parent).expect("create target parent");
        parent
            .canonicalize()
            .expect("canonicalize target parent")
            .join("mount")
    }

    /// `<root>/volumes/<id>/data`: what the volume's targets show.
    pub fn data_dir(&self, volume_id: &str) -> PathBuf {
        self.root.join("volumes").join(volume_id).join("data")
    }

    /// What the plugin logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// Two node-only plugins, `node-a` and `node-b`, sharing one real etcd and one backend
/// root (as two nodes share them in a cluster), each with a Node client.
pub struct Pair {
    pub a: Plugin,
    pub b: Plugin,
    pub node_a: holdfast_core::csi::v1::node_client::NodeClient<Channel>,
    pub node_b: holdfast_core::csi::v1::node_client::NodeClient<Channel>,
    /// Dropped last: the plugins die before their store.
    pub etcd: holdfast_core::testkit::etcd::EtcdServer,
}

/// Starts etcd and two plugins on it with lease duration `duration` and `margin`.
pub async fn pair(duration: &str, margin: &str) -> Pair {
    let etcd = holdfast_core::testkit::etcd::EtcdServer::start();
    let url = etcd.client_url();
    let a = Plugin::start_with(PluginOptions::node_on_etcd_with(
        "node-a", &url, None, duration, margin,
    ))
    .await;
    let b = Plugin::start_with(PluginOptions::node_on_etcd_with(
        "node-b",
        &url,
        Some(a.root.clone()),
        duration,
        margin,
    ))
    .await;
    let node_a = holdfast_core::csi::v1::node_client::NodeClient::new(a.channel().await);
    let node_b = holdfast_core::csi::v1::node_client::NodeClient::new(b.channel().await);
    Pair {
        a,
        b,
        node_a,
        node_b,
        etcd,
    }
}

/// The fencing epoch on the storage of `volume_id` under `root`, if written.
pub fn storage_epoch(root: &Path, volume_id: &str) -> Option<u64> {
    let path = root.join("volumes").join(volume_id).join(".holdfast-epoch");
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().parse().expect("epoch file holds a number"))
}

/// Writes `epoch` into the volume's epoch file by hand (what a newer holder elsewhere
/// would do).
pub fn write_storage_epoch(root: &Path, volume_id: &str, epoch: u64) {
    let path = root.join("volumes").join(volume_id).join(".holdfast-epoch");
    std::fs::write(path, format!("{epoch}\n")).expect("write epoch file");
}

/// A started plugin with a channel and a Node client on it.
pub struct Fixture {
    pub plugin: Plugin,
    pub node: holdfast_core::csi::v1::node_client::NodeClient<Channel>,
    pub channel: Channel,
}

/// Starts a standalone plugin and connects to it.
pub async fn fixture() -> Fixture {
    let plugin = Plugin::start_standalone().await;
    let channel = plugin.channel().await;
    Fixture {
        node: holdfast_core::csi::v1::node_client::NodeClient::new(channel.clone()),
        channel,
        plugin,
    }
}

/// A mount capability with `mode`.
pub fn mount_capability(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

/// Creates a SINGLE_NODE_WRITER volume through the Controller with the given
/// `dataPath` parameter ("bind" or "fuse"); returns its id.
pub async fn create_volume(channel: &Channel, name: &str, data_path: &str) -> String {
    let response = ControllerClient::new(channel.clone())
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter)],
            parameters: [("dataPath".to_string(), data_path.to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("CreateVolume");
    response.into_inner().volume.expect("volume").volume_id
}

/// A SINGLE_NODE_WRITER mount publish of `volume_id` at `target` for the pod [`POD_UID`].
pub fn publish_request(volume_id: &str, target: &Path, readonly: bool) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        readonly,
        ..publish_for(volume_id, target, POD_UID)
    }
}

/// A SINGLE_NODE_WRITER read-write mount publish of `volume_id` at `target` for `pod_uid`.
pub fn publish_for(volume_id: &str, target: &Path, pod_uid: &str) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_str().unwrap().into(),
        volume_capability: Some(mount_capability(Mode::SingleNodeWriter)),
        volume_context: [(POD_UID_KEY.to_string(), pod_uid.to_string())].into(),
        ..Default::default()
    }
}

/// [`publish_for`] with the pod's namespace and name, as kubelet sends them with
/// `podInfoOnMount`.
pub fn publish_for_pod(
    volume_id: &str,
    target: &Path,
    pod_uid: &str,
    namespace: &str,
    name: &str,
) -> NodePublishVolumeRequest {
    let mut request = publish_for(volume_id, target, pod_uid);
    request.volume_context.extend([
        (
            "csi.storage.k8s.io/pod.namespace".to_string(),
            namespace.to_string(),
        ),
        ("csi.storage.k8s.io/pod.name".to_string(), name.to_string()),
    ]);
    request
}

/// Creates a volume directly in the backend at `root` (no Controller needed), with the
/// given StorageClass parameters; returns its id.
pub fn create_volume_in(root: &Path, name: &str, params: &[(&str, &str)]) -> String {
    use holdfast_core::backend::{
        AccessMode, Backend, Capability, CapacityRange, VolumeName, VolumeParams, VolumeSpec,
    };
    let parameters: std::collections::BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let parsed = VolumeParams::from_parameters(&parameters).expect("parameters");
    let spec = VolumeSpec {
        name: VolumeName::parse(name).unwrap(),
        capacity: CapacityRange::new(0, 0).unwrap(),
        capabilities: vec![Capability {
            access_mode: AccessMode::SingleNodeWriter,
            fs_type: String::new(),
            mount_flags: Vec::new(),
        }],
        params: parsed.params,
        co_metadata: Default::default(),
    };
    let backend = Backend::open(root).expect("open backend");
    backend
        .create_volume(&spec)
        .expect("create volume")
        .meta
        .id
        .to_string()
}

pub fn unpublish_request(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_str().unwrap().into(),
    }
}

/// One line of `/proc/self/mountinfo`, as read by [`mounts_at`].
#[derive(Debug)]
pub struct MountLine {
    pub mount_id: String,
    /// The directory of the mounted filesystem shown (the bound one, for a bind).
    pub root: String,
    /// Per-mount options (`rw`/`ro`, …).
    pub options: Vec<String>,
    pub fs_type: String,
}

impl MountLine {
    pub fn is_read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Every mount whose mount point is `path` (a plain path without spaces), bottom first.
/// Parsed here rather than with the driver's own code, so that code is not trusted to
/// check itself.
pub fn mounts_at(path: &Path) -> Vec<MountLine> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            (fields[4] == path).then(|| MountLine {
                mount_id: fields[0].to_string(),
                root: fields[3].to_string(),
                options: fields[5].split(',').map(str::to_string).collect(),
                fs_type: fields[dash + 1].to_string(),
            })
        })
        .collect()
}

/// Lazily unmounts every mount at or below `dir`, deepest first, until none is left.
pub fn sweep_mounts(dir: &Path) {
    for _ in 0..100 {
        let Ok(table) = MountTable::read() else {
            return;
        };
        let mut below: Vec<PathBuf> = table
            .entries()
            .iter()
            .map(|m| m.mount_point.clone())
            .filter(|p| p.starts_with(dir))
            .collect();
        if below.is_empty() {
            return;
        }
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for path in below {
            let _ = mount::unmount(&path, DetachPolicy::IfBusy);
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
        if let Ok(base) = self.tmp.path().canonicalize() {
            sweep_mounts(&base);
        }
    }
}
