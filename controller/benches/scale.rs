//! The controller at scale on a real kube-apiserver v1.20.2 (the test control plane,
//! see `holdfast_core::testkit::kube`): 100 Node objects (Ready), 10 000 exclusive
//! volumes whose claims are Lease objects of the kubernetes lease store, spread over the
//! nodes, one live node session per node (a real `SessionLease`, D = 15 s, renewing every
//! D/3). The real `holdfast-controller` binary serves CSI on a unix socket with the
//! kubernetes store, leader election and the Node watch on; the bench waits until it
//! leads, then measures:
//!
//! - its resident memory (VmRSS from /proc) after start, after a gate pass over every
//!   volume, after each fence, idle after, and its peak (VmHWM) at each point;
//! - ControllerPublishVolume latency over the socket, one call at a time on one
//!   connection: to a node other than the holder's (refused: the holder's session is
//!   live) and to the holder's node (granted); then the pass over every volume with 16
//!   calls in flight. The gate reads the store on each call (claim, then the holder's
//!   session and fence: three GETs);
//! - out-of-service taint → every claim of that node `Fenced`, for three nodes: the
//!   taint is patched onto the Node and a watch on that node's claim Leases (opened
//!   before the patch) sees each claim turn fenced; the end state is then re-read
//!   through the store API.
//!
//! `cargo bench -p holdfast-controller --bench scale` (as root, about 2 min). Knobs:
//! `HOLDFAST_BENCH_NODES` (100), `HOLDFAST_BENCH_CLAIMS` (10000),
//! `HOLDFAST_BENCH_SAMPLE` (2000 sequential publishes), `HOLDFAST_BENCH_DURABLE=0` (etcd
//! without fsync). Without the Kubernetes binaries it prints why and exits 0; run by
//! `cargo test --all-targets` (no `--bench` argument) it measures nothing.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use holdfast_core::backend::{
    AccessMode, Backend, Capability, CapacityRange, VolumeId, VolumeName, VolumeParams, VolumeSpec,
};
use holdfast_core::csi::serve::connect_unix;
use holdfast_core::csi::v1::controller_client::ControllerClient;
use holdfast_core::csi::v1::identity_client::IdentityClient;
use holdfast_core::csi::v1::volume_capability::{
    access_mode::Mode, AccessMode as CsiAccessMode, AccessType, MountVolume,
};
use holdfast_core::csi::v1::{ControllerPublishVolumeRequest, ProbeRequest, VolumeCapability};
use holdfast_core::lease::{
    ClaimRecord, ClaimState, Holder, LeaseParams, NodeIdentity, PodName, SessionLease,
};
use holdfast_core::store::kubernetes::{KIND_LABEL, NODE_LABEL, RECORD_ANNOTATION};
use holdfast_core::store::{KubernetesStore, LeaseStore};
use holdfast_core::testkit::kube::{find_or_skip, ControlPlane, ControlPlaneOptions, Identity};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use tonic::transport::Channel;

const NAMESPACE: &str = "holdfast";
const TAINT: &str = "node.kubernetes.io/out-of-service";
/// Store writes and publishes in flight at once while setting up / in the full pass.
const WRITE_PARALLELISM: usize = 32;
const PASS_PARALLELISM: usize = 16;
const FENCED_NODES: usize = 3;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The controller's default lease timing, which the sessions use too.
fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_secs(15), 0.01, Duration::from_secs(3)).unwrap()
}

fn node_name(i: usize) -> String {
    format!("scale-node-{i:03}")
}

fn volume_name(i: usize) -> String {
    format!("scale-pvc-{i:05}")
}

/// (VmRSS, VmHWM) of `pid` in KiB.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The real controller binary, killed when dropped.
struct Controller {
    child: Child,
    socket: PathBuf,
    metrics_port: u16,
    log: PathBuf,
}

impl Controller {
    fn start(plane: &ControlPlane, dir: &Path, root: &Path) -> Controller {
        let socket = dir.join("csi.sock");
        let log = dir.join("controller.log");
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_holdfast-controller"));
        for (key, _) in std::env::vars() {
            if key.starts_with("HOLDFAST_") || key == "POD_NAMESPACE" || key == "CSI_ENDPOINT" {
                command.env_remove(key);
            }
        }
        let child = command
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!("--backend-root={}", root.display()))
            .args([
                "--log-format=text",
                "--log-level=info",
                "--lease-store=kubernetes",
                &format!("--lease-namespace={NAMESPACE}"),
                "--leader-elect=true",
                &format!("--leader-elect-namespace={NAMESPACE}"),
                "--leader-elect-identity=scale-bench",
                "--watch-nodes=true",
                &format!("--metrics-address=127.0.0.1:{metrics_port}"),
            ])
            .env("KUBECONFIG", plane.kubeconfig(&Identity::Admin))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start holdfast-controller");
        Controller {
            child,
            socket,
            metrics_port,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until it answers Probe and its `holdfast_controller_leader` gauge is 1.
    async fn wait_leading(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("holdfast-controller exited: {status}\n{}", self.log_tail());
            }
            if self.probe().await && self.leader_gauge().await == Some(1.0) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "holdfast-controller did not lead within {within:?}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn probe(&self) -> bool {
        let Ok(channel) = connect_unix(&self.socket).await else {
            return false;
        };
        IdentityClient::new(channel)
            .probe(ProbeRequest {})
            .await
            .is_ok_and(|r| r.into_inner().ready == Some(true))
    }

    async fn leader_gauge(&self) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix("holdfast_controller_leader "))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(CsiAccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// One ControllerPublishVolume: its latency and whether it was granted (`Ok(true)`),
/// refused with FAILED_PRECONDITION (`Ok(false)`), or failed otherwise.
async fn publish(
    client: &mut ControllerClient<Channel>,
    volume: &str,
    node: &str,
) -> (Duration, Result<bool, tonic::Status>) {
    let request = ControllerPublishVolumeRequest {
        volume_id: volume.to_string(),
        node_id: node.to_string(),
        volume_capability: Some(capability()),
        ..Default::default()
    };
    let started = Instant::now();
    let result = client.controller_publish_volume(request).await;
    let took = started.elapsed();
    let outcome = match result {
        Ok(_) => Ok(true),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => Ok(false),
        Err(status) => Err(status),
    };
    (took, outcome)
}

/// A held claim at epoch 1, as a node's acquire writes it. Built from its JSON form so
/// that fields only the controller sets (and that default to absent) stay absent.
fn held_claim(volume_id: &str, holder: Holder) -> ClaimRecord {
    serde_json::from_value(serde_json::json!({
        "volume_id": volume_id,
        "holder": holder,
        "state": ClaimState::Held,
        "epoch": 1,
    }))
    .expect("a claim record")
}

struct LatencyRow {
    what: String,
    samples: Vec<Duration>,
    errors: usize,
    wall: Duration,
}

impl LatencyRow {
    fn new(what: String, mut samples: Vec<Duration>, errors: usize, wall: Duration) -> Self {
        samples.sort();
        LatencyRow {
            what,
            samples,
            errors,
            wall,
        }
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` (or --all-targets) runs this
    // binary without it, where a two-minute control-plane run does not belong.
    if !std::env::args().any(|a| a == "--bench") {
        println!("scale: nothing measured outside `cargo bench` (no --bench argument)");
        return;
    }
    let nodes = knob("HOLDFAST_BENCH_NODES", 100).max(FENCED_NODES + 1);
    let claims = knob("HOLDFAST_BENCH_CLAIMS", 10_000).max(nodes);
    let sample = knob("HOLDFAST_BENCH_SAMPLE", 2000).min(claims);
    let durable = std::env::var("HOLDFAST_BENCH_DURABLE").map_or(true, |v| v != "0");

    let Some(bins) = find_or_skip("scale", &["kube-apiserver"]) else {
        println!("scale: no Kubernetes control plane, nothing measured (see above)");
        return;
    };
    let bench_start = Instant::now();
    let plane = ControlPlane::start(
        bins,
        ControlPlaneOptions {
            durable_etcd: durable,
            ..ControlPlaneOptions::default()
        },
    )
    .await;
    plane.ensure_namespace(NAMESPACE).await;
    let admin = plane.admin().await;
    let store: Arc<dyn LeaseStore> = Arc::new(
        KubernetesStore::new(admin.clone(), NAMESPACE).with_timeout(Duration::from_secs(10)),
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let backend = Arc::new(Backend::open(&root).unwrap());

    // Nodes: created, then Ready through the status subresource.
    let started = Instant::now();
    let node_api: Api<Node> = Api::all(admin.clone());
    futures::stream::iter(0..nodes)
        .map(|i| {
            let node_api = node_api.clone();
            let backend = backend.clone();
            async move {
                let name = node_name(i);
                let node: Node =
                    serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
                        .unwrap();
                node_api.create(&PostParams::default(), &node).await?;
                let now = k8s_openapi::jiff::Timestamp::now()
                    .strftime("%Y-%m-%dT%H:%M:%SZ")
                    .to_string();
                let status = serde_json::json!({"status": {"conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "set by the scale bench",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                }]}});
                node_api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await?;
                backend.register_node(&name).unwrap();
                Ok::<_, kube::Error>(())
            }
        })
        .buffer_unordered(WRITE_PARALLELISM)
        .try_collect::<Vec<_>>()
        .await
        .expect("create Nodes");
    let nodes_took = started.elapsed();

    // One live session per node.
    let started = Instant::now();
    let sessions: Vec<SessionLease> = futures::stream::iter(0..nodes)
        .map(|i| {
            let store = store.clone();
            let state = dir.path().join("state").join(node_name(i));
            async move {
                std::fs::create_dir_all(&state).unwrap();
                let identity = NodeIdentity::of_this_machine(&node_name(i)).unwrap();
                SessionLease::start(store, identity, params(), &state).await
            }
        })
        .buffered(WRITE_PARALLELISM)
        .try_collect()
        .await
        .expect("start node sessions");
    let sessions_took = started.elapsed();

    // Volumes in the backend (what CreateVolume would have made), on blocking threads,
    // while the claims are written.
    let volumes_task = {
        let backend = backend.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let ids: Vec<String> = (0..claims)
                .map(|i| {
                    let spec = VolumeSpec {
                        name: VolumeName::parse(&volume_name(i)).unwrap(),
                        capacity: CapacityRange::new(1 << 20, 0).unwrap(),
                        capabilities: vec![Capability {
                            access_mode: AccessMode::SingleNodeWriter,
                            fs_type: String::new(),
                            mount_flags: vec![],
                        }],
                        params: VolumeParams::default(),
                        co_metadata: BTreeMap::new(),
                    };
                    backend
                        .create_volume(&spec)
                        .unwrap()
                        .meta
                        .id
                        .as_str()
                        .to_string()
                })
                .collect();
            (ids, started.elapsed())
        })
    };
    let ids: Vec<String> = (0..claims)
        .map(|i| {
            VolumeId::for_name(&VolumeName::parse(&volume_name(i)).unwrap())
                .as_str()
                .to_string()
        })
        .collect();
    let holder_of = |i: usize| i % nodes;

    // Claims: volume i held by a pod on node i % nodes, through that node's session.
    let started = Instant::now();
    futures::stream::iter(0..claims)
        .map(|i| {
            let store = store.clone();
            let holder = Holder {
                node: node_name(holder_of(i)),
                pod_uid: format!("00000000-0000-4000-8000-{i:012}"),
                instance: sessions[holder_of(i)].key().instance,
                pod: Some(PodName {
                    namespace: "default".into(),
                    name: format!("db-{i}"),
                }),
            };
            let record = held_claim(&ids[i], holder);
            async move { store.put_claim(&record, None).await }
        })
        .buffer_unordered(WRITE_PARALLELISM)
        .try_collect::<Vec<_>>()
        .await
        .expect("write claims");
    let claims_took = started.elapsed();
    let (created_ids, volumes_took) = volumes_task.await.unwrap();
    assert_eq!(created_ids, ids);
    println!(
        "setup: {nodes} Nodes in {:.1} s, {nodes} sessions in {:.1} s, {claims} claim Leases in \
         {:.1} s ({:.0}/s, {WRITE_PARALLELISM} in flight), {claims} backend volumes in {:.1} s",
        nodes_took.as_secs_f64(),
        sessions_took.as_secs_f64(),
        claims_took.as_secs_f64(),
        claims as f64 / claims_took.as_secs_f64(),
        volumes_took.as_secs_f64(),
    );

    // The controller.
    let mut controller = Controller::start(&plane, dir.path(), &root);
    let to_lead = controller.wait_leading(Duration::from_secs(60)).await;
    // Let the leader's first Node list settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut memory = vec![(
        "after start, leading".to_string(),
        memory_of(controller.pid()),
    )];
    // The kernel updates VmHWM lazily; a sampler keeps the highest VmRSS it sees too.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (pid, sampling) = (controller.pid(), sampling.clone());
        std::thread::spawn(move || {
            let mut highest = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                highest = highest.max(memory_of(pid).0);
                std::thread::sleep(Duration::from_millis(10));
            }
            highest
        })
    };
    println!(
        "controller pid {} leads after {:.1} s; RSS {}",
        controller.pid(),
        to_lead.as_secs_f64(),
        mib(memory[0].1 .0)
    );

    let channel = connect_unix(&controller.socket).await.unwrap();
    let mut latency_rows = Vec::new();

    // Sequential sample: most to another node (refused), every tenth to the holder's
    // node (granted), spread over the volumes.
    let stride = (claims / sample).max(1);
    let mut refused = Vec::new();
    let mut granted = Vec::new();
    let mut errors = Vec::new();
    let mut unexpected = 0usize;
    let mut client = ControllerClient::new(channel.clone());
    let started = Instant::now();
    for k in 0..sample {
        let i = (k * stride) % claims;
        let to_holder = k % 10 == 0;
        let node = if to_holder {
            node_name(holder_of(i))
        } else {
            node_name((holder_of(i) + 1) % nodes)
        };
        let (took, outcome) = publish(&mut client, &ids[i], &node).await;
        match outcome {
            Ok(true) if to_holder => granted.push(took),
            Ok(false) if !to_holder => refused.push(took),
            Ok(_) => unexpected += 1,
            Err(status) => errors.push(status),
        }
    }
    let sample_wall = started.elapsed();
    assert_eq!(
        unexpected, 0,
        "a publish was granted/refused against the rules"
    );
    if let Some(first) = errors.first() {
        println!(
            "sequential sample: {} calls failed, first: {first:?}",
            errors.len()
        );
    }
    let mut all: Vec<Duration> = refused.iter().chain(&granted).copied().collect();
    all.sort();
    latency_rows.push(LatencyRow::new(
        "refused (holder elsewhere, live), 1 in flight".into(),
        refused,
        0,
        Duration::ZERO,
    ));
    latency_rows.push(LatencyRow::new(
        "granted (holder's own node), 1 in flight".into(),
        granted,
        0,
        Duration::ZERO,
    ));
    latency_rows.push(LatencyRow::new(
        "all of the above".into(),
        all,
        errors.len(),
        sample_wall,
    ));

    // The pass over every volume, to another node than the holder's: all refused.
    let started = Instant::now();
    let results: Vec<(Duration, Result<bool, tonic::Status>)> = futures::stream::iter(0..claims)
        .map(|i| {
            let mut client = ControllerClient::new(channel.clone());
            let volume = ids[i].clone();
            let node = node_name((holder_of(i) + 1) % nodes);
            async move { publish(&mut client, &volume, &node).await }
        })
        .buffer_unordered(PASS_PARALLELISM)
        .collect()
        .await;
    let pass_wall = started.elapsed();
    let pass_errors = results.iter().filter(|(_, r)| r.is_err()).count();
    assert!(
        results.iter().all(|(_, r)| !matches!(r, Ok(true))),
        "a live holder's volume was granted to another node"
    );
    if let Some((_, Err(status))) = results.iter().find(|(_, r)| r.is_err()) {
        println!("full pass: {pass_errors} calls failed, first: {status:?}");
    }
    latency_rows.push(LatencyRow::new(
        format!("refused, every volume, {PASS_PARALLELISM} in flight"),
        results.iter().map(|(d, _)| *d).collect(),
        pass_errors,
        pass_wall,
    ));
    memory.push((
        format!("after the gate pass over all {claims} volumes"),
        memory_of(controller.pid()),
    ));

    // Taint -> every claim of the node fenced, for a few nodes.
    let lease_api: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let mut fence_rows = Vec::new();
    for f in 0..FENCED_NODES {
        let node_index = f * (nodes / FENCED_NODES);
        let node = node_name(node_index);
        let selector = format!("{KIND_LABEL}=claim,{NODE_LABEL}={node}");
        let list = lease_api
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap();
        let expected: HashSet<String> = (0..claims)
            .filter(|i| holder_of(*i) == node_index)
            .map(|i| ids[i].clone())
            .collect();
        assert_eq!(list.items.len(), expected.len(), "claims of {node}");
        let version = list.metadata.resource_version.unwrap();
        let mut events = lease_api
            .watch(&WatchParams::default().labels(&selector), &version)
            .await
            .unwrap()
            .boxed();
        let taints = serde_json::json!({"spec": {"taints": [{
            "key": TAINT, "value": "nodeshutdown", "effect": "NoExecute",
        }]}});
        let tainted = Instant::now();
        node_api
            .patch(&node, &PatchParams::default(), &Patch::Merge(taints))
            .await
            .unwrap();
        let mut fenced = HashSet::new();
        let mut first = None;
        let deadline = tainted + Duration::from_secs(60);
        while fenced.len() < expected.len() {
            let next = tokio::time::timeout_at(deadline.into(), events.try_next()).await;
            let event = match next {
                Ok(Ok(Some(event))) => event,
                Ok(Ok(None)) => {
                    // The API server ended the watch: resume where it was.
                    panic!("the claim watch ended early");
                }
                Ok(Err(e)) => panic!("claim watch: {e}"),
                Err(_) => panic!(
                    "{node}: {} of {} claims fenced within 60 s\n{}",
                    fenced.len(),
                    expected.len(),
                    controller.log_tail()
                ),
            };
            if let WatchEvent::Modified(lease) = event {
                let record: ClaimRecord = serde_json::from_str(
                    lease
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(RECORD_ANNOTATION))
                        .expect("a claim Lease carries its record"),
                )
                .unwrap();
                if record.state == ClaimState::Fenced && expected.contains(&record.volume_id) {
                    first.get_or_insert_with(|| tainted.elapsed());
                    fenced.insert(record.volume_id);
                }
            }
        }
        let all_fenced = tainted.elapsed();
        // The same, through the store API.
        for volume in &expected {
            let claim = store.get_claim(volume).await.unwrap().unwrap();
            assert_eq!(claim.value.state, ClaimState::Fenced, "{volume}");
        }
        assert!(store.get_fence(&node).await.unwrap().is_some());
        memory.push((format!("after {node} fenced"), memory_of(controller.pid())));
        fence_rows.push((node, expected.len(), first.unwrap(), all_fenced));
    }
    // What one fence reads (one node's claims), and what an expiry sweep reads (every
    // claim), through the same store API.
    let started = Instant::now();
    let of_node = store
        .list_claims_of_node(&node_name(1))
        .await
        .unwrap()
        .len();
    let of_node_took = started.elapsed();
    let started = Instant::now();
    let listed = store.list_claims().await.unwrap().len();
    let list_took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    memory.push(("5 s later, idle".to_string(), memory_of(controller.pid())));
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let sampled_peak = sampler.join().unwrap();
    let peak = memory.last().unwrap().1 .1.max(sampled_peak);
    let total = bench_start.elapsed();
    let sessions_lost = sessions.iter().filter(|s| s.is_lost()).count();
    drop(channel);
    drop(controller);
    drop(sessions);

    let tree = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!();
    println!("controller built from {tree}");
    println!(
        "{nodes} Nodes, {claims} claims (Lease objects, {} per node), {nodes} live sessions; \
         etcd {}; whole run {:.0} s",
        claims / nodes,
        if durable {
            "with fsync"
        } else {
            "without fsync"
        },
        total.as_secs_f64()
    );
    println!();
    println!("| controller memory | VmRSS | peak so far (VmHWM) |");
    println!("|---|---|---|");
    for (when, (rss, hwm)) in &memory {
        println!("| {when} | {} | {} |", mib(*rss), mib(*hwm));
    }
    println!(
        "\npeak {} (the highest of VmHWM and VmRSS sampled every 10 ms: {}) — goal ≤ 64 MiB: {}",
        mib(peak),
        mib(sampled_peak),
        if peak <= 64 * 1024 { "met" } else { "not met" }
    );
    println!();
    println!("| ControllerPublishVolume (gate + 3 store reads) | calls | p50 | p90 | p99 | max | calls/s |");
    println!("|---|---|---|---|---|---|---|");
    for row in &latency_rows {
        let rate = if row.wall.is_zero() {
            String::new()
        } else {
            format!("{:.0}", row.samples.len() as f64 / row.wall.as_secs_f64())
        };
        let errors = if row.errors > 0 {
            format!(" ({} failed)", row.errors)
        } else {
            String::new()
        };
        println!(
            "| {} | {}{} | {} | {} | **{}** | {} | {} |",
            row.what,
            row.samples.len(),
            errors,
            ms(percentile(&row.samples, 0.5)),
            ms(percentile(&row.samples, 0.9)),
            ms(percentile(&row.samples, 0.99)),
            ms(row.samples.last().copied().unwrap_or_default()),
            rate
        );
    }
    println!();
    println!("| out-of-service taint on | its claims | first claim fenced | every claim fenced |");
    println!("|---|---|---|---|");
    for (node, count, first, all) in &fence_rows {
        println!("| {node} | {count} | {} | **{}** |", ms(*first), ms(*all));
    }
    println!(
        "\none list_claims_of_node() of {of_node} claim Leases through the store API (what \
         each fence reads before it writes): {}",
        ms(of_node_took)
    );
    println!(
        "one list_claims() of all {listed} claim Leases (what each expiry sweep reads): {}",
        ms(list_took)
    );
    if let Ok(arenas) = std::env::var("MALLOC_ARENA_MAX") {
        println!("the controller ran with MALLOC_ARENA_MAX={arenas}");
    }
    if sessions_lost > 0 {
        println!("\nnote: {sessions_lost} node sessions were lost during the run");
    }
}
