//! [`KubeletNode`]: a real Kubernetes node for tests: a kubelet v1.20 with its own
//! containerd, runc and a CNI bridge, registered with a [`ControlPlane`], running real
//! pods from images built and imported locally (`scripts/image.sh`; there is no
//! registry). Everything it starts is killed, and everything it changed on the host is
//! undone, when it is dropped: processes, mounts, network devices and namespaces,
//! cgroups.
//!
//! What this machine needed (Debian bookworm, cgroup v1, PID 1 not systemd, `/` a
//! private mount, root without CAP_SYS_RESOURCE):
//!
//! - **Container runtime**: Debian's containerd 1.6 (it still serves the CRI v1alpha2
//!   that kubelet 1.20 speaks), started as a child with its own config, root, state and
//!   socket; overlayfs snapshots; `SystemdCgroup = false` (no systemd) and
//!   `restrict_oom_score_adj = true` (lowering an OOM score needs CAP_SYS_RESOURCE).
//!   The pod sandbox image is the busybox-static pause image of `scripts/image.sh
//!   --pause`, imported before the kubelet starts. Image garbage collection is off:
//!   a deleted local image cannot be pulled back.
//! - **cgroup driver**: `cgroupfs` in both kubelet and containerd (no systemd).
//! - **Swap**: `failSwapOn: false`, so a host with swap still runs the node.
//! - **Sysctls**: kubelet sets `vm.overcommit_memory=1`, `kernel.panic=10` and
//!   `kernel.panic_on_oops=1` on start. It runs in its own mount namespace
//!   (`unshare -m --propagation unchanged`) with files holding those values bind-mounted
//!   over the three `/proc/sys` entries, so the host's settings are untouched.
//! - **Mount propagation** (CSI needs it): the kubelet root directory is bound onto
//!   itself and made `rshared` in the host's namespace before the kubelet starts, so that
//!   the mounts kubelet makes reach containerd's containers and a privileged pod's
//!   `Bidirectional` mounts reach the host.
//! - **CNI**: one `bridge` + `host-local` network with `isGateway: false` and
//!   `ipMasq: false`: no iptables rules and no forwarding on the host. The harness
//!   creates the bridge, with a MAC address of its own (else it follows its ports', and
//!   every ARP entry for the node goes stale when a pod comes or goes), and puts the
//!   node's address on it; pods reach each other and the host, nothing else. There is no kube-proxy, so ClusterIP Services do not forward.
//! - **The `kubernetes` Service**: pods configure their API clients from
//!   `KUBERNETES_SERVICE_HOST` (`10.0.0.1:443`, the first address of the control
//!   plane's service range), and there is no kube-proxy to forward it. The harness puts
//!   `10.0.0.1/32` on the bridge, routes the service range from pods to the bridge
//!   (host-local `routes`), and forwards TCP `10.0.0.1:443` to the API server itself.
//! - **Node address**: kubelet 1.20 refuses a loopback node IP, so the node's
//!   InternalIP is the bridge address; the kubelet's API (anonymous, `AlwaysAllow`)
//!   listens there only, which is what `kubectl logs` goes through.
//! - **Network namespaces**: containerd names pod namespaces `/run/netns/cni-*`; those
//!   that appear while the node runs are deleted on drop (killing the containers does
//!   not run CNI's teardown).
//!
//! One node per machine at a time: the bridge, its addresses and the `kubernetes`
//! Service address are fixed, so [`KubeletNode::start`] first takes an exclusive lock
//! ([`MACHINE_LOCK`]) that the node holds until dropped, and a second test process
//! waits for it rather than colliding.

use std::collections::BTreeSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;

use super::{bins, spawn, ControlPlane, Identity};
use crate::testkit::etcd::{free_port, log_tail};

/// The pod sandbox image the node's containerd uses (`scripts/image.sh --pause`).
pub const PAUSE_IMAGE: &str = "holdfast.test/pause:1";
/// A shell image (`scripts/image.sh --busybox`), imported on every node.
pub const BUSYBOX_IMAGE: &str = "holdfast.test/busybox:1";

/// About 17 s after the kubelet starts on an idle machine.
const READY_WITHIN: Duration = Duration::from_secs(120);
/// Host programs the node needs besides the Kubernetes binaries.
const HOST_PROGRAMS: [&str; 6] = ["containerd", "ctr", "runc", "ip", "unshare", "mount"];
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// containerd's CRI plugin puts pod network namespaces here.
const NETNS_DIR: &str = "/run/netns";
/// Held (flock) by the one running node of this machine.
pub const MACHINE_LOCK: &str = "/run/holdfast-test-kubelet-node.lock";
/// The control plane's `--service-cluster-ip-range` and its `kubernetes` Service.
const SERVICE_RANGE: &str = "10.0.0.0/24";
const KUBERNETES_SERVICE: &str = "10.0.0.1:443";
/// The bridge's own (locally administered) MAC address.
const BRIDGE_MAC: &str = "02:68:66:00:00:01";
/// Where kubelet 1.20 writes the pods' container logs (not configurable).
const POD_LOGS_DIR: &str = "/var/log/pods";

/// How to start a [`KubeletNode`].
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// The Node's name.
    pub name: String,
    /// The bridge device that carries the pods' network.
    pub bridge: String,
    /// The bridge's address, which is also the node's InternalIP; pods get addresses in
    /// its /24.
    pub address: Ipv4Addr,
    /// The kubelet's root directory (`--root-dir`). `None`: a directory of the node's
    /// own. A chart that hard-codes `/var/lib/kubelet` needs that path here.
    pub root_dir: Option<PathBuf>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            name: "holdfast-node-0".to_string(),
            bridge: "hfbr0".to_string(),
            address: Ipv4Addr::new(10, 244, 0, 1),
            root_dir: None,
        }
    }
}

/// A running kubelet node; see the module documentation.
pub struct KubeletNode {
    /// Dropped last (fields drop after `Drop::drop`), so the next node starts only once
    /// this one is gone.
    _machine_lock: fs::File,
    options: NodeOptions,
    dir: tempfile::TempDir,
    root_dir: PathBuf,
    socket: PathBuf,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    /// What existed before the node started, so that drop removes only its own.
    netns_before: BTreeSet<String>,
    /// Pod log directories (`/var/log/pods`, fixed in kubelet 1.20) before the node.
    pod_logs_before: BTreeSet<String>,
    cgroups_before: BTreeSet<PathBuf>,
    bridge_made: bool,
    /// Forwards the `kubernetes` Service to the API server.
    service_proxy: Option<ServiceProxy>,
    /// Time from starting the kubelet to the Node's Ready condition.
    pub ready_after: Duration,
}

impl KubeletNode {
    /// Starts a node registered with `plane`, or returns `None` after printing why
    /// `test` skips (not root, or no kubelet / containerd / runc / CNI plugins; under
    /// `HOLDFAST_REQUIRE_KUBE=1` that panics instead). Panics if the node does not come
    /// up Ready.
    pub async fn start_or_skip(
        test: &str,
        plane: &ControlPlane,
        options: NodeOptions,
    ) -> Option<Self> {
        let kube = bins::find_or_skip(test, &["kubelet"])?;
        if let Err(why) = host_ready() {
            if bins::required() {
                panic!(
                    "{test}: cannot run a kubelet node here: {why} ({}=1)",
                    bins::REQUIRE_ENV
                );
            }
            eprintln!("SKIPPED {test}: cannot run a kubelet node here: {why}");
            return None;
        }
        Some(Self::start(&kube.require("kubelet"), plane, options).await)
    }

    /// Starts a node from the kubelet binary at `kubelet`. Panics if it does not become
    /// Ready; whatever was started by then is cleaned up.
    pub async fn start(kubelet: &Path, plane: &ControlPlane, options: NodeOptions) -> Self {
        let machine_lock = tokio::task::spawn_blocking(|| {
            let file = fs::File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(MACHINE_LOCK)
                .unwrap_or_else(|e| panic!("{MACHINE_LOCK}: {e}"));
            rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
                .unwrap_or_else(|e| panic!("locking {MACHINE_LOCK}: {e}"));
            file
        })
        .await
        .expect("taking the machine lock");
        let dir = tempfile::Builder::new()
            .prefix("hf-node-")
            .tempdir()
            .expect("temp dir for the node");
        let root_dir = options
            .root_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("kubelet"));
        let mut node = KubeletNode {
            _machine_lock: machine_lock,
            socket: dir.path().join("containerd.sock"),
            root_dir,
            dir,
            options,
            containerd: None,
            kubelet: None,
            netns_before: list_dir(Path::new(NETNS_DIR)),
            pod_logs_before: list_dir(Path::new(POD_LOGS_DIR)),
            cgroups_before: kubepods_cgroups(),
            bridge_made: false,
            service_proxy: None,
            ready_after: Duration::ZERO,
        };
        node.make_bridge();
        node.start_service_proxy(plane).await;
        node.start_containerd().await;
        for (flag, name) in [("--pause", PAUSE_IMAGE), ("--busybox", BUSYBOX_IMAGE)] {
            let tar = node
                .dir
                .path()
                .join(format!("{}.tar", flag.trim_start_matches('-')));
            build_image(&[
                flag,
                "--tag",
                name,
                "--out",
                tar.to_str().expect("utf-8 path"),
            ]);
            node.import_image(&tar);
        }
        node.bind_root_dir();
        node.start_kubelet(kubelet, plane).await;
        node
    }

    /// The Node's name.
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// The node's containerd socket (for `ctr -a`).
    pub fn containerd_socket(&self) -> &Path {
        &self.socket
    }

    /// The kubelet's root directory.
    pub fn root_dir(&self) -> &Path {
        &self.root_dir
    }

    /// Imports a docker-archive or OCI tar into the node's containerd, where kubelet
    /// finds it (namespace `k8s.io`). Pods use it with `imagePullPolicy: Never`.
    pub fn import_image(&self, tar: &Path) {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(tar)
            .output()
            .expect("running ctr");
        assert!(
            out.status.success(),
            "ctr images import {}: {}",
            tar.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the kubelet (SIGSTOP) and leaves everything else running: the node's pods,
    /// the node plugin among them, carry on while Kubernetes hears nothing from the
    /// node. A zombie node as the API server sees it.
    pub fn pause_kubelet(&self) {
        self.signal_kubelet("-STOP");
    }

    /// Wakes a kubelet stopped by [`KubeletNode::pause_kubelet`].
    pub fn resume_kubelet(&self) {
        self.signal_kubelet("-CONT");
    }

    fn signal_kubelet(&self, signal: &str) {
        let pid = self.kubelet.as_ref().expect("the kubelet runs").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Every line `containerd` or `kubelet` logged that contains `needle`.
    pub fn log_lines_matching(&self, component: &str, needle: &str) -> Vec<String> {
        fs::read_to_string(self.dir.path().join(format!("{component}.log")))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// The last lines `containerd` or `kubelet` logged.
    pub fn log_tail(&self, component: &str) -> String {
        log_tail(&self.dir.path().join(format!("{component}.log")))
    }

    fn make_bridge(&mut self) {
        let bridge = &self.options.bridge;
        // A fixed address: a bridge without one takes the lowest of its ports' and changes
        // it as pods come and go, and every pod's (and the host's) ARP entry for it goes
        // stale until it expires: tens of seconds in which the pods lose the API server
        // and kubelet loses their probes.
        run(
            "ip",
            &[
                "link", "add", bridge, "address", BRIDGE_MAC, "type", "bridge",
            ],
        );
        self.bridge_made = true;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.options.address),
                "dev",
                bridge,
            ],
        );
        run("ip", &["link", "set", bridge, "up"]);
        let d = self.dir.path();
        let net_d = d.join("cni/net.d");
        fs::create_dir_all(&net_d).expect("CNI config dir");
        let [a, b, c, _] = self.options.address.octets();
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "holdfast-test",
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                // No gateway, no masquerade: no iptables rules, no forwarding.
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("{a}.{b}.{c}.0/24"),
                                 "gateway": self.options.address.to_string()}]],
                    // Leases live and die with the node, not in /var/lib/cni.
                    "dataDir": d.join("cni/ipam"),
                    // The service range goes to the host, where the harness answers
                    // for the `kubernetes` Service.
                    "routes": [{"dst": SERVICE_RANGE}],
                },
            }],
        });
        fs::write(
            net_d.join("10-holdfast-test.conflist"),
            serde_json::to_vec_pretty(&conflist).expect("json"),
        )
        .expect("CNI config");
    }

    async fn start_service_proxy(&mut self, plane: &ControlPlane) {
        let service: std::net::SocketAddr = KUBERNETES_SERVICE.parse().expect("an address");
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/32", service.ip()),
                "dev",
                &self.options.bridge,
            ],
        );
        let listener = std::net::TcpListener::bind(service)
            .unwrap_or_else(|e| panic!("listening on {service}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let apiserver = std::net::SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), plane.port());
        // On a thread and runtime of its own: a test's runtime has two workers, which a
        // test's blocking calls (kubectl, file reads) can both hold for seconds; the pods'
        // API connections, and the leader elections riding on them, would stall with it.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the service proxy's runtime");
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                let accept = async {
                    while let Ok((mut inbound, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            if let Ok(mut outbound) =
                                tokio::net::TcpStream::connect(apiserver).await
                            {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        });
        self.service_proxy = Some(ServiceProxy { stop, thread });
    }

    async fn start_containerd(&mut self) {
        let d = self.dir.path();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{net_d}"
"#,
            root = d.join("containerd/root").display(),
            state = d.join("containerd/state").display(),
            sock = self.socket.display(),
            net_d = d.join("cni/net.d").display(),
        );
        let config_path = d.join("containerd.toml");
        fs::write(&config_path, config).expect("containerd config");
        let child = spawn(
            Path::new("containerd"),
            &["--config".to_string(), config_path.display().to_string()],
            &d.join("containerd.log"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        self.containerd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("ctr")
                .arg("-a")
                .arg(&self.socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer on {} within 30 s: {}",
                self.socket.display(),
                self.log_tail("containerd")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn bind_root_dir(&mut self) {
        fs::create_dir_all(&self.root_dir).expect("kubelet root dir");
        let root = self.root_dir.to_str().expect("utf-8 path");
        run("mount", &["--bind", root, root]);
        run("mount", &["--make-rshared", root]);
    }

    async fn start_kubelet(&mut self, kubelet: &Path, plane: &ControlPlane) {
        let d = self.dir.path().to_path_buf();
        let port = free_port(IpAddr::V4(self.options.address));
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
makeIPTablesUtilChains: false
address: {address}
port: {port}
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
clusterDomain: cluster.local
"#,
            address = self.options.address,
        );
        fs::write(d.join("kubelet.yaml"), config).expect("kubelet config");
        // The values kubelet insists on writing into /proc/sys, in files bound over the
        // real entries inside its own mount namespace.
        let mut binds = String::new();
        for (entry, value) in [
            ("vm/overcommit_memory", "1"),
            ("kernel/panic", "10"),
            ("kernel/panic_on_oops", "1"),
        ] {
            let file = d.join(format!("sysctl-{}", entry.replace('/', "-")));
            fs::write(&file, format!("{value}\n")).expect("sysctl file");
            binds.push_str(&format!(
                "mount --bind {} /proc/sys/{entry} && ",
                file.display()
            ));
        }
        let kubeconfig = plane.kubeconfig(&Identity::Admin);
        let kubelet_args = [
            "--container-runtime=remote".to_string(),
            format!(
                "--container-runtime-endpoint=unix://{}",
                self.socket.display()
            ),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--config={}", d.join("kubelet.yaml").display()),
            format!("--root-dir={}", self.root_dir.display()),
            format!("--cert-dir={}", d.join("kubelet-pki").display()),
            format!("--hostname-override={}", self.options.name),
            format!("--node-ip={}", self.options.address),
            "--v=2".to_string(),
        ];
        let script = format!("{binds}exec \"$0\" \"$@\"");
        let mut args = vec![
            "-m".to_string(),
            "--propagation".to_string(),
            "unchanged".to_string(),
            "sh".to_string(),
            "-c".to_string(),
            script,
            kubelet.display().to_string(),
        ];
        args.extend(kubelet_args);
        let started = Instant::now();
        let child = spawn(Path::new("unshare"), &args, &d.join("kubelet.log"))
            .unwrap_or_else(|e| panic!("{e}"));
        self.kubelet = Some(child);

        let nodes: kube::Api<Node> = kube::Api::all(plane.admin().await);
        let deadline = started + READY_WITHIN;
        loop {
            if let Some(status) = self
                .kubelet
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.kubelet = None;
                panic!("kubelet exited with {status}: {}", self.log_tail("kubelet"));
            }
            if let Ok(Some(node)) = nodes.get_opt(&self.options.name).await {
                if is_ready(&node) {
                    self.ready_after = started.elapsed();
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "Node {} not Ready within {READY_WITHIN:?}: {}",
                self.options.name,
                self.log_tail("kubelet")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops every container of the node's containerd (the pods' processes), then
    /// containerd itself and the shims it started.
    fn stop_runtime(&mut self) {
        if self.containerd.is_none() {
            return;
        }
        let ctr = |args: &[&str]| {
            Command::new("ctr")
                .arg("-a")
                .arg(&self.socket)
                .args(["-n", "k8s.io"])
                .args(args)
                .stderr(Stdio::null())
                .output()
        };
        if let Ok(out) = ctr(&["tasks", "ls", "-q"]) {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            for id in &ids {
                let _ = ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
            }
            for id in &ids {
                // A killed task can be deleted once it has exited; that also unmounts its
                // root filesystem and ends its shim.
                for _ in 0..50 {
                    if ctr(&["tasks", "delete", id]).is_ok_and(|o| o.status.success()) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        if let Some(mut child) = self.containerd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd by design; ours name our socket on their command line.
        let socket = self.socket.display().to_string();
        for pid in processes_mentioning(&socket) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// The `kubernetes` Service's forwarder (see the module docs), and how to stop it.
struct ServiceProxy {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        if let Some(proxy) = self.service_proxy.take() {
            let _ = proxy.stop.send(());
            let _ = proxy.thread.join();
        }
        if let Some(mut child) = self.kubelet.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stop_runtime();
        // Pod network namespaces: deleting one also removes its veth pair. Only the CNI's
        // (`cni-*`): other tests of the same run make namespaces of their own meanwhile.
        let new = list_dir(Path::new(NETNS_DIR));
        for name in new
            .difference(&self.netns_before)
            .filter(|n| n.starts_with("cni-"))
        {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
        if self.bridge_made {
            let _ = Command::new("ip")
                .args(["link", "delete", &self.options.bridge])
                .status();
        }
        // The pods' container logs this node's kubelet wrote (it removes them only for
        // pods it saw deleted while running).
        for name in list_dir(Path::new(POD_LOGS_DIR)).difference(&self.pod_logs_before) {
            let _ = fs::remove_dir_all(Path::new(POD_LOGS_DIR).join(name));
        }
        // Every mount under the node's directories, deepest first (pods' volumes and
        // secrets under the kubelet root, container root filesystems under containerd's).
        for prefix in [self.root_dir.clone(), self.dir.path().to_path_buf()] {
            for mount in mounts_under(&prefix) {
                let _ = rustix::mount::unmount(&mount, rustix::mount::UnmountFlags::DETACH);
            }
        }
        // cgroups made for the pods (kubepods, besteffort, burstable, pod<uid>…).
        let mut made: Vec<PathBuf> = kubepods_cgroups()
            .difference(&self.cgroups_before)
            .cloned()
            .collect();
        made.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for cgroup in made {
            let _ = fs::remove_dir(&cgroup);
        }
        if self.options.root_dir.is_some() {
            let _ = fs::remove_dir_all(&self.root_dir);
        }
    }
}

/// Whether a Node's Ready condition is True.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Builds an image with `scripts/image.sh` and the given arguments.
pub fn build_image(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .expect("running scripts/image.sh");
    assert!(
        out.status.success(),
        "scripts/image.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why this machine cannot run a node, if it cannot.
fn host_ready() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("not root".to_string());
    }
    for program in HOST_PROGRAMS {
        let found = std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
        });
        if !found {
            return Err(format!(
                "{program} is not installed (scripts/setup.sh installs it)"
            ));
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        if !Path::new(CNI_BIN_DIR).join(plugin).is_file() {
            return Err(format!(
                "the CNI plugin {CNI_BIN_DIR}/{plugin} is missing (scripts/setup.sh installs it)"
            ));
        }
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn list_dir(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every `kubepods*` cgroup directory under each cgroup v1 hierarchy (and v2's root).
fn kubepods_cgroups() -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, inside: bool, found: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let kube = inside || entry.file_name().to_string_lossy().starts_with("kubepods");
            if kube {
                found.insert(path.clone());
                walk(&path, true, found);
            }
        }
    }
    let mut found = BTreeSet::new();
    let root = Path::new("/sys/fs/cgroup");
    walk(root, false, &mut found);
    for hierarchy in list_dir(root) {
        walk(&root.join(hierarchy), false, &mut found);
    }
    found
}

/// Mount points at or under `prefix`, deepest (and latest) first.
fn mounts_under(prefix: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(prefix))
        .collect();
    found.reverse();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Pids whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    list_dir(Path::new("/proc"))
        .into_iter()
        .filter_map(|name| name.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}
