//! The leader's expiry sweep ([`ExpiryWatch`]) against a real etcd in which real node
//! sessions (`SessionLease`, D = 600 ms) renew: a holder that stops renewing is marked
//! expired within about `W` plus one sweep; a renewing holder is never marked; another
//! node's acquire after the mark works as before (and its claim carries no mark); a
//! holder cut off from the store long enough to be marked, which then renews again, has
//! its mark removed. The claims gauge and the takeover histogram follow.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use holdfast_controller::expiry::ExpiryWatch;
use holdfast_controller::kubernetes::leader::Leadership;
use holdfast_controller::metrics;
use holdfast_core::clock::Mono;
use holdfast_core::lease::types::ExpiredMark;
use holdfast_core::lease::{
    ClaimRecord, LeaseParams, NodeFence, NodeIdentity, SessionKey, SessionLease, SessionRecord,
};
use holdfast_core::store::{LeaseStore, StoreError, Version, Versioned};
use holdfast_core::testkit::etcd::EtcdServer;
use tempfile::TempDir;
use tokio::sync::watch;

const PREFIX: &str = "/expired-marks/";
const SWEEP: Duration = Duration::from_millis(100);

/// D = 600 ms, ε = 1 %, margin = 150 ms: renewals every 200 ms, W = 756 ms.
fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_millis(600), 0.01, Duration::from_millis(150)).unwrap()
}

struct Cluster {
    _etcd: EtcdServer,
    store: Arc<dyn LeaseStore>,
    dir: TempDir,
    stop: watch::Sender<bool>,
}

impl Cluster {
    /// etcd, and the expiry sweep running every 100 ms as the only (leading) replica.
    /// Only one test of this binary may `report` to the process's metrics (the tests
    /// run side by side); the others sweep without them.
    async fn start(report: bool) -> Cluster {
        let etcd = EtcdServer::start();
        let store: Arc<dyn LeaseStore> = Arc::new(etcd.store(PREFIX).await);
        let (stop, stopped) = watch::channel(false);
        let sweeper = ExpiryWatch::new(
            store.clone(),
            params(),
            "test-controller".into(),
            Leadership::always(),
        );
        if report {
            tokio::spawn(sweeper.run(SWEEP, stopped));
        } else {
            tokio::spawn(async move {
                let mut sweeper = sweeper;
                while !*stopped.borrow() {
                    sweeper.sweep().await.unwrap();
                    tokio::time::sleep(SWEEP).await;
                }
            });
        }
        Cluster {
            _etcd: etcd,
            store,
            dir: tempfile::tempdir().unwrap(),
            stop,
        }
    }

    async fn session_on(&self, node: &str, store: Arc<dyn LeaseStore>) -> SessionLease {
        let state_dir = self.dir.path().join(node);
        std::fs::create_dir_all(&state_dir).unwrap();
        let identity = NodeIdentity::of_this_machine(node).unwrap();
        SessionLease::start(store, identity, params(), &state_dir)
            .await
            .unwrap()
    }

    async fn session(&self, node: &str) -> SessionLease {
        self.session_on(node, self.store.clone()).await
    }

    async fn claim(&self, volume: &str) -> ClaimRecord {
        self.store.get_claim(volume).await.unwrap().unwrap().value
    }

    async fn mark(&self, volume: &str) -> Option<ExpiredMark> {
        self.claim(volume).await.expired
    }

    /// Waits up to `limit` for `volume`'s mark to be `Some` (or `None`).
    async fn wait_for_mark(&self, volume: &str, present: bool, limit: Duration) -> Duration {
        let start = Instant::now();
        while self.mark(volume).await.is_some() != present {
            assert!(
                start.elapsed() < limit,
                "{volume}: mark present={present} not within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_holder_is_marked_a_renewing_one_never_and_takeover_still_works() {
    let cluster = Cluster::start(true).await;
    let p = params();
    let w = p.takeover_wait();
    let n1 = cluster.session("n1").await;
    let n2 = cluster.session("n2").await;
    let a = n1.acquire("vol-a", "pod-a", None).await.unwrap();
    n2.acquire("vol-b", "pod-b", None).await.unwrap();

    // Both renew: over three W nothing is marked.
    tokio::time::sleep(w * 3).await;
    assert_eq!(cluster.mark("vol-a").await, None);
    assert_eq!(cluster.mark("vol-b").await, None);

    // n1 stops renewing; its record stays, as after a crash or a partition.
    let n1_key = n1.key();
    drop(n1);
    let stopped = Instant::now();
    let stopped_wall = wall_ms();
    // Its last renewal was sent at most one renewal interval before it stopped; the
    // sweep sees it within one sweep, marks after W of silence, within one more sweep.
    let took = cluster
        .wait_for_mark("vol-a", true, w + 2 * SWEEP + Duration::from_millis(300))
        .await;
    assert!(
        took + p.renew_interval() + Duration::from_millis(20) >= w,
        "marked {took:?} after the holder stopped, before W = {w:?} of silence could pass"
    );
    let mark = cluster.mark("vol-a").await.unwrap();
    let session = cluster.store.get_session(&n1_key).await.unwrap().unwrap();
    assert_eq!(mark.observed_by, "test-controller");
    assert_eq!(mark.session_renewals, session.value.renewals);
    // "Self-fenced by": after the last renewal was sent, at most D(1+ε) + one sweep
    // after the holder stopped (this test and the sweeper share a wall clock).
    let bound = p.duration.mul_f64(1.0 + p.epsilon) + SWEEP * 2;
    assert!(
        mark.at_unix_ms + (p.renew_interval().as_millis() as u64) + 50 >= stopped_wall
            && mark.at_unix_ms <= stopped_wall + bound.as_millis() as u64,
        "mark at {} vs stopped at {stopped_wall}",
        mark.at_unix_ms
    );
    println!(
        "vol-a marked {took:?} after its holder stopped renewing (W = {w:?}, sweep every {SWEEP:?}); \
         self-fenced by {} ms after the stop (estimate)",
        mark.at_unix_ms as i64 - stopped_wall as i64
    );
    // The mark changed nothing else.
    let claim = cluster.claim("vol-a").await;
    assert_eq!((claim.epoch, claim.holder.node.as_str()), (a.epoch, "n1"));

    // n2 takes vol-a: its own node times n1's session for W, exactly as without a mark.
    let wait_from = Instant::now();
    let taken = n2
        .acquire("vol-a", "pod-a2", Some(Mono::now() + w * 3))
        .await
        .unwrap();
    let waited = wait_from.elapsed();
    assert!(
        waited >= w,
        "n2 took vol-a after {waited:?}, before its own W"
    );
    assert_eq!(taken.epoch, a.epoch + 1);
    let claim = cluster.claim("vol-a").await;
    assert_eq!(claim.holder.node, "n2");
    assert_eq!(claim.expired, None, "a new holder starts without a mark");
    println!(
        "n2 acquired vol-a {waited:?} after asking ({:?} after n1 stopped)",
        stopped.elapsed()
    );

    // The renewing holder was never marked, and the sweep saw the takeover.
    tokio::time::sleep(w + 3 * SWEEP).await;
    assert_eq!(cluster.mark("vol-b").await, None);
    assert_eq!(cluster.mark("vol-a").await, None);
    let text = metrics::metrics().render();
    let count = common_series(&text, "holdfast_controller_takeover_seconds_count");
    assert_eq!(count, Some(1.0), "{text}");
    let sum = common_series(&text, "holdfast_controller_takeover_seconds_sum").unwrap();
    assert!(
        sum >= w.as_secs_f64() * 0.9,
        "takeover {sum}s, below W: {text}"
    );
    assert_eq!(
        common_series(&text, "holdfast_controller_claims{state=\"held\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        common_series(&text, "holdfast_controller_claims{state=\"expired\"}"),
        Some(0.0),
        "{text}"
    );
    println!("takeover observed by the sweep: {sum:.3}s");
}

/// Lets a session's renewals through, or fails them as unreachable (a node cut off
/// from the store); every other call passes.
struct Cuttable {
    inner: Arc<dyn LeaseStore>,
    cut: AtomicBool,
}

#[async_trait]
impl LeaseStore for Cuttable {
    fn kind(&self) -> &'static str {
        "cuttable"
    }
    async fn get_session(
        &self,
        key: &SessionKey,
    ) -> Result<Option<Versioned<SessionRecord>>, StoreError> {
        self.inner.get_session(key).await
    }
    async fn list_sessions(&self, node: &str) -> Result<Vec<Versioned<SessionRecord>>, StoreError> {
        self.inner.list_sessions(node).await
    }
    async fn put_session(
        &self,
        record: &SessionRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("cut off by the test".into()));
        }
        self.inner.put_session(record, expected).await
    }
    async fn delete_session(&self, key: &SessionKey, expected: &Version) -> Result<(), StoreError> {
        self.inner.delete_session(key, expected).await
    }
    async fn get_claim(
        &self,
        volume_id: &str,
    ) -> Result<Option<Versioned<ClaimRecord>>, StoreError> {
        self.inner.get_claim(volume_id).await
    }
    async fn list_claims(&self) -> Result<Vec<Versioned<ClaimRecord>>, StoreError> {
        self.inner.list_claims().await
    }
    async fn put_claim(
        &self,
        record: &ClaimRecord,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        self.inner.put_claim(record, expected).await
    }
    async fn delete_claim(&self, volume_id: &str, expected: &Version) -> Result<(), StoreError> {
        self.inner.delete_claim(volume_id, expected).await
    }
    async fn get_fence(&self, node: &str) -> Result<Option<Versioned<NodeFence>>, StoreError> {
        self.inner.get_fence(node).await
    }
    async fn put_fence(
        &self,
        record: &NodeFence,
        expected: Option<&Version>,
    ) -> Result<Version, StoreError> {
        self.inner.put_fence(record, expected).await
    }
    async fn delete_fence(&self, node: &str, expected: &Version) -> Result<(), StoreError> {
        self.inner.delete_fence(node, expected).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_renews_again_after_its_mark_has_it_removed() {
    let cluster = Cluster::start(false).await;
    let w = params().takeover_wait();
    let link = Arc::new(Cuttable {
        inner: cluster.store.clone(),
        cut: AtomicBool::new(false),
    });
    let n1 = cluster.session_on("n1", link.clone()).await;
    let grant = n1.acquire("vol-a", "pod-a", None).await.unwrap();

    // Cut off: n1 self-fences (its deadline passes) and the sweep marks its claim.
    link.cut.store(true, Ordering::SeqCst);
    cluster
        .wait_for_mark("vol-a", true, w + 2 * SWEEP + Duration::from_millis(300))
        .await;
    assert!(!n1.deadline().is_live_at(Mono::now()), "n1 self-fenced");

    // Nobody took the volume, so its session record is still there: n1 renews it as
    // soon as it reaches the store again, and the now stale mark is removed.
    link.cut.store(false, Ordering::SeqCst);
    let took = cluster
        .wait_for_mark("vol-a", false, params().renew_interval() + 3 * SWEEP)
        .await;
    assert!(n1.deadline().is_live_at(Mono::now()), "n1 renewed");
    let claim = cluster.claim("vol-a").await;
    assert_eq!(
        (claim.epoch, claim.holder.node.as_str()),
        (grant.epoch, "n1")
    );
    // n1's own view of its claim is unchanged by the mark and its removal.
    assert_eq!(
        n1.claim_status("vol-a", grant.epoch).await.unwrap(),
        holdfast_core::lease::ClaimStatus::Held
    );
    println!("stale mark removed {took:?} after n1 reached the store again");
}

/// The value of one series in Prometheus text (first match).
fn common_series(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        line.strip_prefix(name)?
            .trim()
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}
