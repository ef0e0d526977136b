//! The leader's expiry sweep with the kubernetes lease store, on a real API server:
//! the sessions come from the watch of their Lease objects
//! ([`holdfast_controller::kubernetes::lease_watch`]), every claim is read only at the
//! first pass, and later passes read only the claims of nodes whose session went
//! silent. A holder that stops renewing is marked within about `W` plus a sweep; a
//! renewing one never is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_controller::expiry::{ExpiryWatch, SweepReport};
use holdfast_controller::kubernetes::leader::Leadership;
use holdfast_controller::kubernetes::lease_watch::{self, SessionCache};
use holdfast_core::lease::{LeaseParams, NodeIdentity, SessionLease};
use holdfast_core::store::{KubernetesStore, LeaseStore};
use holdfast_core::testkit::kube::{ControlPlane, ControlPlaneOptions};
use tokio::sync::{mpsc, watch};

const NAMESPACE: &str = "holdfast";
const SWEEP: Duration = Duration::from_millis(100);

/// D = 1 s, ε = 1 %, margin = 200 ms: renewals every 333 ms, W = 1.21 s.
fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_secs(1), 0.01, Duration::from_millis(200)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_from_the_lease_watch_mark_a_silent_holder_never_a_renewing_one() {
    let Some(plane) =
        ControlPlane::start_or_skip("expiry sweep on a watch", ControlPlaneOptions::default())
            .await
    else {
        return;
    };
    plane.ensure_namespace(NAMESPACE).await;
    let client = plane.admin().await;
    let store: Arc<dyn LeaseStore> = Arc::new(
        KubernetesStore::new(client.clone(), NAMESPACE).with_timeout(Duration::from_secs(10)),
    );
    let dir = tempfile::tempdir().unwrap();
    let session = |node: &'static str| {
        let store = store.clone();
        let state_dir = dir.path().join(node);
        async move {
            std::fs::create_dir_all(&state_dir).unwrap();
            let identity = NodeIdentity::of_this_machine(node).unwrap();
            SessionLease::start(store, identity, params(), &state_dir)
                .await
                .unwrap()
        }
    };
    let n1 = session("n1").await;
    let n2 = session("n2").await;
    n1.acquire("vol-a", "pod-a", None).await.unwrap();
    n2.acquire("vol-b", "pod-b", None).await.unwrap();

    // The watch, and the sweep on it: every claim is read at the first pass only.
    let (stop, stopped) = watch::channel(false);
    let cache = SessionCache::new();
    tokio::spawn(lease_watch::run(
        client,
        NAMESPACE.into(),
        cache.clone(),
        Duration::from_secs(290),
        stopped.clone(),
    ));
    let start = Instant::now();
    while cache.snapshot().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the watch never listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sweeper = ExpiryWatch::new(
        store.clone(),
        params(),
        "test-controller".into(),
        Leadership::always(),
    )
    .with_session_watch(cache.clone(), u32::MAX);
    let (reports_tx, mut reports) = mpsc::unbounded_channel::<SweepReport>();
    tokio::spawn(async move {
        while !*stopped.borrow() {
            reports_tx.send(sweeper.sweep().await.unwrap()).unwrap();
            tokio::time::sleep(SWEEP).await;
        }
    });
    let w = params().takeover_wait();
    let mark = |volume: &'static str| {
        let store = store.clone();
        async move {
            store
                .get_claim(volume)
                .await
                .unwrap()
                .unwrap()
                .value
                .expired
        }
    };

    // Both renew: over three W nothing is marked, and no pass after the first reads
    // any claim.
    tokio::time::sleep(w * 3).await;
    assert_eq!(mark("vol-a").await, None);
    assert_eq!(mark("vol-b").await, None);
    let mut passes = Vec::new();
    while let Ok(r) = reports.try_recv() {
        passes.push(r);
    }
    assert!(passes.len() > 5, "{passes:?}");
    assert!(passes[0].full);
    assert!(
        passes[1..]
            .iter()
            .all(|r| !r.full && r.held + r.expired + r.released + r.fenced == 0),
        "renewing holders: no claim read after the first pass: {passes:?}"
    );

    // n1 stops renewing (its record stays, as after a crash).
    let n1_key = n1.key();
    drop(n1);
    let stopped_at = Instant::now();
    let limit = w + 3 * SWEEP + Duration::from_secs(1);
    while mark("vol-a").await.is_none() {
        assert!(
            stopped_at.elapsed() < limit,
            "vol-a not marked within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = stopped_at.elapsed();
    assert!(
        took + params().renew_interval() + Duration::from_millis(20) >= w,
        "marked {took:?} after the holder stopped, before W = {w:?}"
    );
    let session = store.get_session(&n1_key).await.unwrap().unwrap();
    let marked = mark("vol-a").await.unwrap();
    assert_eq!(marked.session_renewals, session.value.renewals);
    assert_eq!(marked.observed_by, "test-controller");
    let mut by_watch = false;
    while let Ok(r) = reports.try_recv() {
        assert!(!r.full);
        by_watch |= r.marked == ["vol-a"];
        assert!(
            !r.marked.contains(&"vol-b".to_string()),
            "the renewing holder was marked: {r:?}"
        );
    }
    assert!(by_watch, "marked by a pass on the watch");
    println!("vol-a marked {took:?} after its holder stopped renewing (W = {w:?})");

    // The renewing holder is still never marked.
    tokio::time::sleep(w * 2).await;
    assert_eq!(mark("vol-b").await, None);
    assert!(mark("vol-a").await.is_some());
    drop(n2);
    let _ = stop.send(true);
}
