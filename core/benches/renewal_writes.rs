//! Steady-state lease-store traffic at a fixed number of sessions as the number of held
//! claims grows. Renewal is per session, never per claim, so writes per second must stay
//! flat: O(nodes), not O(volumes).
//!
//! `cargo bench -p holdfast-core --bench renewal_writes` prints one row per store and
//! claim count, with the ratio against that store's 1-claim baseline measured in the
//! same run: the in-memory store, and the kubernetes store on a real kube-apiserver
//! (skipped with a note where no Kubernetes binaries are found; see
//! `holdfast_core::testkit::kube`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use holdfast_core::lease::{
    ClaimRecord, DataPaths, LeaseParams, NodeFence, NodeIdentity, SessionKey, SessionLease,
    SessionRecord,
};
use holdfast_core::store::{
    KubernetesStore, LeaseStore, MemoryStore, StoreError, Version, Versioned,
};
use holdfast_core::testkit::kube::{ControlPlane, ControlPlaneOptions};

const SESSIONS: usize = 3;
const WINDOW: Duration = Duration::from_secs(2);

/// Counts the calls that reach the store.
struct Counting {
    inner: Arc<dyn LeaseStore>,
    writes: AtomicU64,
    reads: AtomicU64,
}

impl Counting {
    fn new(inner: Arc<dyn LeaseStore>) -> Self {
        Counting {
            inner,
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }
    fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
    fn write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> (u64, u64) {
        (
            self.writes.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
        )
    }
}

type R<T> = Result<T, StoreError>;
/// A fresh store for each row.
type MakeStore = Box<dyn Fn() -> Arc<dyn LeaseStore>>;

#[async_trait]
impl LeaseStore for Counting {
    fn kind(&self) -> &'static str {
        "counting"
    }
    async fn get_session(&self, key: &SessionKey) -> R<Option<Versioned<SessionRecord>>> {
        self.read();
        self.inner.get_session(key).await
    }
    async fn list_sessions(&self, node: &str) -> R<Vec<Versioned<SessionRecord>>> {
        self.read();
        self.inner.list_sessions(node).await
    }
    async fn put_session(&self, r: &SessionRecord, e: Option<&Version>) -> R<Version> {
        self.write();
        self.inner.put_session(r, e).await
    }
    async fn delete_session(&self, key: &SessionKey, e: &Version) -> R<()> {
        self.write();
        self.inner.delete_session(key, e).await
    }
    async fn get_claim(&self, volume_id: &str) -> R<Option<Versioned<ClaimRecord>>> {
        self.read();
        self.inner.get_claim(volume_id).await
    }
    async fn list_claims(&self) -> R<Vec<Versioned<ClaimRecord>>> {
        self.read();
        self.inner.list_claims().await
    }
    async fn put_claim(&self, r: &ClaimRecord, e: Option<&Version>) -> R<Version> {
        self.write();
        self.inner.put_claim(r, e).await
    }
    async fn delete_claim(&self, volume_id: &str, e: &Version) -> R<()> {
        self.write();
        self.inner.delete_claim(volume_id, e).await
    }
    async fn get_fence(&self, node: &str) -> R<Option<Versioned<NodeFence>>> {
        self.read();
        self.inner.get_fence(node).await
    }
    async fn put_fence(&self, r: &NodeFence, e: Option<&Version>) -> R<Version> {
        self.write();
        self.inner.put_fence(r, e).await
    }
    async fn delete_fence(&self, node: &str, e: &Version) -> R<()> {
        self.write();
        self.inner.delete_fence(node, e).await
    }
}

/// Store writes and reads per second with `claims` claims held by `SESSIONS` sessions.
async fn measure(claims: usize, params: LeaseParams, inner: Arc<dyn LeaseStore>) -> (f64, f64) {
    let counting = Arc::new(Counting::new(inner));
    let store: Arc<dyn LeaseStore> = counting.clone();
    let dirs: Vec<_> = (0..SESSIONS)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let mut sessions = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let identity = NodeIdentity {
            node: format!("r{claims}-node{i}"),
            boot_id: "boot".into(),
            machine_id: format!("machine{i}"),
        };
        let lease = SessionLease::start(store.clone(), identity, params, dir.path())
            .await
            .unwrap();
        sessions.push(lease);
    }
    for v in 0..claims {
        let lease = &sessions[v % SESSIONS];
        lease
            .acquire(&format!("r{claims}-vol{v}"), &format!("pod{v}"), None)
            .await
            .unwrap();
    }
    // Settle into the steady state, then count over the window.
    tokio::time::sleep(params.renew_interval()).await;
    let (w0, r0) = counting.snapshot();
    let start = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let (w1, r1) = counting.snapshot();
    let secs = start.elapsed().as_secs_f64();
    for lease in sessions {
        lease.shutdown(DataPaths::Stopped).await.unwrap();
    }
    ((w1 - w0) as f64 / secs, (r1 - r0) as f64 / secs)
}

fn main() {
    let params =
        LeaseParams::new(Duration::from_millis(300), 0.01, Duration::from_millis(60)).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "renewal traffic: {SESSIONS} sessions, D = {:?}, {:?} window per row",
        params.duration, WINDOW
    );
    println!(
        "{:<12} {:>8} {:>12} {:>8} {:>12} {:>8}",
        "store", "claims", "writes/s", "ratio", "reads/s", "ratio"
    );
    let plane = runtime.block_on(async {
        let bins = holdfast_core::testkit::kube::find_or_skip("renewal_writes", &[])?;
        let plane = ControlPlane::start(bins, ControlPlaneOptions::default()).await;
        plane.ensure_namespace("holdfast").await;
        Some(plane)
    });
    let mut stores: Vec<(&str, MakeStore)> =
        vec![("memory", Box::new(|| Arc::new(MemoryStore::new())))];
    if let Some(plane) = &plane {
        let client = runtime.block_on(plane.admin());
        stores.push((
            "kubernetes",
            Box::new(move || Arc::new(KubernetesStore::new(client.clone(), "holdfast"))),
        ));
    }
    for (name, store) in &stores {
        let mut baseline = None;
        for claims in [1, 10, 100, 1000] {
            let (writes, reads) = runtime.block_on(measure(claims, params, store()));
            let (bw, br) = *baseline.get_or_insert((writes, reads));
            println!(
                "{name:<12} {claims:>8} {writes:>12.1} {:>8.2} {reads:>12.1} {:>8.2}",
                writes / bw,
                reads / br
            );
        }
    }
}
