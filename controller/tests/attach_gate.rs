//! The attach gate of the real controller binary, over its unix socket, against a real
//! etcd that real node sessions (`SessionLease`, short D) renew in: ControllerPublish
//! is refused with the holder named while the holder's session renews, granted once it
//! stops renewing for `D·(1+ε)+margin` on the controller's clock, granted at once after
//! `holdfast-controller fence`, and idempotent; ControllerUnpublish leaves the claim
//! alone. Each test prints its measured figures (`--nocapture`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::*;
use holdfast_core::lease::{LeaseParams, NodeIdentity, SessionKey, SessionLease};
use holdfast_core::store::{LeaseStore, Version};
use holdfast_core::testkit::etcd::EtcdServer;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

const PREFIX: &str = "/attach-gate/";

/// D = 1 s, ε = 1 %, margin = 200 ms: sessions renew every 333 ms; the gate waits
/// W = 1.21 s of silence.
fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_secs(1), 0.01, Duration::from_millis(200)).unwrap()
}

struct Cluster {
    etcd: EtcdServer,
    store: Arc<dyn LeaseStore>,
    dir: TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let etcd = EtcdServer::start();
        let store: Arc<dyn LeaseStore> = Arc::new(etcd.store(PREFIX).await);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        register_nodes(&dir.path().join("root"), &["n1", "n2"]);
        Cluster { etcd, store, dir }
    }

    /// The flags that point a controller at this etcd, with the sessions' timing.
    fn lease_args(&self) -> Vec<String> {
        vec![
            "--lease-store=etcd".into(),
            format!("--etcd-endpoints={}", self.etcd.client_url()),
            format!("--etcd-prefix={PREFIX}"),
            "--lease-duration=1s".into(),
            "--lease-margin=200ms".into(),
            "--lease-epsilon=0.01".into(),
        ]
    }

    async fn controller(&self) -> ControllerProcess {
        // No expiry sweep: its marks rewrite claims, and these tests check that the gate
        // itself never writes one (the sweep has its own tests).
        let mut args = self.lease_args();
        args.push("--expiry-interval=0".into());
        ControllerProcess::start_with(
            &self.dir.path().join("root"),
            &self.dir.path().join("c.sock"),
            &args,
        )
        .await
    }

    /// A node plugin's session for `node`, with its own state dir.
    async fn session(&self, node: &str) -> SessionLease {
        let state_dir = self.dir.path().join(node);
        std::fs::create_dir_all(&state_dir).unwrap();
        let identity = NodeIdentity::of_this_machine(node).unwrap();
        SessionLease::start(self.store.clone(), identity, params(), &state_dir)
            .await
            .unwrap()
    }

    async fn claim_version(&self, volume: &str) -> Version {
        self.store.get_claim(volume).await.unwrap().unwrap().version
    }

    /// `holdfast-controller fence --node <node>` against this etcd.
    async fn fence(&self, node: &str) {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast-controller"));
        for (key, _) in std::env::vars() {
            if key.starts_with("HOLDFAST_") {
                command.env_remove(key);
            }
        }
        command
            .args(["fence", "--node", node])
            .args(self.lease_args());
        let out = command.output().await.unwrap();
        assert!(
            out.status.success(),
            "fence: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

async fn create(c: &mut ControllerClient, name: &str, params: &[(&str, &str)]) -> String {
    let mut request = create_request(name);
    request.parameters = common::params(params);
    c.create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

type ControllerClient = holdfast_core::csi::v1::controller_client::ControllerClient<Channel>;

async fn attach(c: &mut ControllerClient, volume: &str, node: &str) -> Result<(), Status> {
    c.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn detach(c: &mut ControllerClient, volume: &str, node: &str) {
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// The refusal's message, after checking it is FAILED_PRECONDITION naming the holder.
fn refusal(result: Result<(), Status>, pod_uid: &str, node: &str) -> String {
    let status = result.expect_err("attached while another node's pod holds the volume");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let message = status.message().to_string();
    let fence = format!("`holdfast-controller fence --node {node}`");
    for needle in [pod_uid, &format!("on node {node}"), "can expire in", &fence] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
    message
}

type Readings = Arc<Mutex<Vec<(Instant, Option<Version>)>>>;

/// Reads `key`'s session every 10 ms until aborted: (when each read began, the version
/// it returned).
fn watch_session(store: Arc<dyn LeaseStore>, key: SessionKey) -> (Readings, JoinHandle<()>) {
    let readings = Readings::default();
    let sink = readings.clone();
    let task = tokio::spawn(async move {
        loop {
            let began = Instant::now();
            let version = store.get_session(&key).await.unwrap().map(|s| s.version);
            sink.lock().unwrap().push((began, version));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (readings, task)
}

/// The "can expire in X s" figure of a refusal.
fn expires_in(message: &str) -> f64 {
    let rest = message.split("can expire in ").nth(1).unwrap();
    rest.split('s').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_while_the_holder_renews_granted_once_it_stops_for_the_bound() {
    let cluster = Cluster::start().await;
    let controller = cluster.controller().await;
    let mut c = controller.controller().await;
    let volume = create(&mut c, "pvc-renewing", &[]).await;
    let w = params().takeover_wait();

    // Node n1 attaches (nothing holds the volume yet) and its pod takes the claim.
    attach(&mut c, &volume, "n1").await.unwrap();
    let n1 = cluster.session("n1").await;
    n1.acquire(&volume, "pod-a-uid", None).await.unwrap();
    // Re-attaching to the holder's own node is granted: idempotent.
    attach(&mut c, &volume, "n1").await.unwrap();

    // The orchestrator force-detaches n1, believing it dead: the claim is not touched.
    let claim = cluster.claim_version(&volume).await;
    detach(&mut c, &volume, "n1").await;
    assert_eq!(cluster.claim_version(&volume).await, claim);

    // While n1 renews, every attach to n2 is refused, for well over W.
    let renewing = Instant::now();
    let mut refusals = 0;
    while renewing.elapsed() < 3 * w {
        refusal(attach(&mut c, &volume, "n2").await, "pod-a-uid", "n1");
        refusals += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let message = refusal(attach(&mut c, &volume, "n2").await, "pod-a-uid", "n1");
    println!(
        "{refusals} attaches refused over {:?} while n1 renewed: {message}",
        renewing.elapsed()
    );

    // n1 stops renewing (its record stays, as after a crash or partition). Meanwhile
    // this test reads n1's session itself, to know when its last version was written.
    // It stops only once this reader has seen it renew: a version read before the last
    // one is what dates the last renewal below.
    let (readings, watching) = watch_session(cluster.store.clone(), n1.key());
    let watch_start = Instant::now();
    loop {
        let versions: std::collections::BTreeSet<_> = readings
            .lock()
            .unwrap()
            .iter()
            .map(|(_, v)| v.clone())
            .collect();
        if versions.len() >= 2 {
            break;
        }
        assert!(
            watch_start.elapsed() < Duration::from_secs(10),
            "n1 never renewed while watched"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(n1);
    let stopped = Instant::now();
    let granted_at = loop {
        match attach(&mut c, &volume, "n2").await {
            Ok(()) => break Instant::now(),
            Err(status) => {
                refusal(Err(status), "pod-a-uid", "n1");
            }
        }
        assert!(stopped.elapsed() < w * 4, "never granted after n1 stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A reading that began at `before` still showed an older version, so the last
    // version was written after `before`: the controller cannot have seen it earlier,
    // and must have watched it for W since.
    watching.abort();
    let readings = readings.lock().unwrap().clone();
    let last = readings.last().unwrap().1.clone();
    let before = readings
        .iter()
        .filter(|(_, v)| *v != last)
        .map(|(t, _)| *t)
        .max()
        .expect("n1 renewed while watched");
    assert!(
        granted_at - before >= w,
        "granted {:?} after the last renewal could first be seen, before W = {w:?}",
        granted_at - before
    );
    println!(
        "granted {:?} after n1 stopped renewing, {:?} after its last renewal could first be seen (W = {w:?})",
        granted_at - stopped,
        granted_at - before
    );
    attach(&mut c, &volume, "n2").await.unwrap();
    // The gate changed nothing in the store: the claim is still n1's.
    assert_eq!(cluster.claim_version(&volume).await, claim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_at_once_after_fence_and_non_exclusive_volumes_are_not_gated() {
    let cluster = Cluster::start().await;
    let controller = cluster.controller().await;
    let mut c = controller.controller().await;
    let locked = create(&mut c, "pvc-locked", &[]).await;
    let shared = create(&mut c, "pvc-shared", &[("exclusive", "false")]).await;
    let n1 = cluster.session("n1").await;
    n1.acquire(&locked, "pod-a-uid", None).await.unwrap();
    // A claim on a non-exclusive volume (no node plugin takes one; the store may hold
    // one all the same) does not gate it.
    n1.acquire(&shared, "pod-s-uid", None).await.unwrap();
    attach(&mut c, &shared, "n2").await.unwrap();

    refusal(attach(&mut c, &locked, "n2").await, "pod-a-uid", "n1");
    cluster.fence("n1").await;
    let fenced = Instant::now();
    attach(&mut c, &locked, "n2").await.unwrap();
    let latency = fenced.elapsed();
    attach(&mut c, &locked, "n2").await.unwrap();
    println!("attach granted {latency:?} after `holdfast-controller fence --node n1` returned");
    assert!(latency < Duration::from_secs(1), "{latency:?}");
}

/// Timers start at the controller's own start: a session that stopped renewing long
/// before is refused for W afresh, and the message says how long it has been watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_just_started_refuses_until_it_has_timed_the_session() {
    let cluster = Cluster::start().await;
    let w = params().takeover_wait();
    let n1 = cluster.session("n1").await;
    // The volume id is the claim's key; the controller makes it from the name.
    let volume = {
        let controller = cluster.controller().await;
        let mut c = controller.controller().await;
        let volume = create(&mut c, "pvc-old", &[]).await;
        n1.acquire(&volume, "pod-a-uid", None).await.unwrap();
        volume
    };
    drop(n1);
    tokio::time::sleep(2 * w).await;

    let controller = cluster.controller().await;
    let mut c = controller.controller().await;
    let started = Instant::now();
    let message = refusal(attach(&mut c, &volume, "n2").await, "pod-a-uid", "n1");
    assert!(
        message.contains("watched node n1's session for 0.0s"),
        "{message}"
    );
    let left = expires_in(&message);
    assert!((left - w.as_secs_f64()).abs() < 0.15, "{left} vs W = {w:?}");
    let granted = loop {
        if attach(&mut c, &volume, "n2").await.is_ok() {
            break started.elapsed();
        }
        assert!(started.elapsed() < 4 * w, "never granted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(granted >= w, "granted after {granted:?}, before W = {w:?}");
    println!("a fresh controller refused a session silent for {:?} and granted after {granted:?} of its own watching", 2 * w);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_refuses_with_unavailable() {
    let mut cluster = Cluster::start().await;
    let controller = cluster.controller().await;
    let mut c = controller.controller().await;
    let volume = create(&mut c, "pvc-down", &[]).await;
    cluster.etcd.kill();
    let status = attach(&mut c, &volume, "n2").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

/// DeleteVolume deletes the volume's claim record with it, so the store does not keep
/// one record per volume ever created; but never while the claim's holder may still be
/// writing (the same question as an attach elsewhere), and never on a store it cannot
/// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume_deletes_the_claim_but_not_while_its_holder_lives() {
    let cluster = Cluster::start().await;
    let controller = cluster.controller().await;
    let mut c = controller.controller().await;
    let held = create(&mut c, "pvc-held", &[]).await;
    let released = create(&mut c, "pvc-released", &[]).await;
    let n1 = cluster.session("n1").await;
    n1.acquire(&held, "pod-a-uid", None).await.unwrap();
    let grant = n1.acquire(&released, "pod-b-uid", None).await.unwrap();
    n1.release(&released, grant.epoch).await.unwrap();

    let delete = |id: &str| DeleteVolumeRequest {
        volume_id: id.to_string(),
        secrets: Default::default(),
    };
    let refused = c.delete_volume(delete(&held)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("pod-a-uid"),
        "{}",
        refused.message()
    );
    assert!(
        cluster.store.get_claim(&held).await.unwrap().is_some(),
        "a live holder's claim was deleted"
    );
    assert!(
        cluster.dir.path().join("root/volumes").join(&held).exists(),
        "a refused delete removed the volume's directory"
    );

    c.delete_volume(delete(&released)).await.unwrap();
    assert!(cluster.store.get_claim(&released).await.unwrap().is_none());
    // Idempotent: the volume and its claim are gone; deleting again is fine.
    c.delete_volume(delete(&released)).await.unwrap();

    // Once its node is fenced the held claim may go too.
    cluster.fence("n1").await;
    c.delete_volume(delete(&held)).await.unwrap();
    assert!(cluster.store.get_claim(&held).await.unwrap().is_none());

    // A store that cannot be read deletes nothing.
    let other = create(&mut c, "pvc-outage", &[]).await;
    let n2 = cluster.session("n2").await;
    n2.acquire(&other, "pod-c-uid", None).await.unwrap();
    drop(n2);
    cluster.etcd.pause();
    let err = c.delete_volume(delete(&other)).await.unwrap_err();
    cluster.etcd.resume();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(cluster
        .dir
        .path()
        .join("root/volumes")
        .join(&other)
        .exists());
}
