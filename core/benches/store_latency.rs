//! Latency of the lease store operations the protocol makes most: `get_claim` and a
//! compare-and-swap `put_claim`, on the in-memory store (the baseline), on a real etcd
//! (with fsync, as in production, and without), and on the kubernetes store against a
//! real kube-apiserver whose etcd fsyncs (skipped with a note where no Kubernetes
//! binaries are found; see `holdfast_core::testkit::kube`). Prints p50 / p99 / ops per
//! second and the p50 ratio to the memory baseline of the same run.
//!
//! `cargo bench -p holdfast-core --bench store_latency` (iterations per row:
//! `HOLDFAST_BENCH_N`, default 2000 for etcd, 20000 for memory).

use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_core::lease::{ClaimRecord, ClaimState, Holder};
use holdfast_core::store::{KubernetesStore, LeaseStore, MemoryStore};
use holdfast_core::testkit::etcd::EtcdServer;
use holdfast_core::testkit::kube::{ControlPlane, ControlPlaneOptions};

struct Row {
    store: &'static str,
    op: &'static str,
    samples: Vec<Duration>,
    total: Duration,
}

impl Row {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index]
    }
    fn ops_per_sec(&self) -> f64 {
        self.samples.len() as f64 / self.total.as_secs_f64()
    }
}

fn claim(epoch: u64) -> ClaimRecord {
    ClaimRecord {
        volume_id: "bench-volume".into(),
        holder: Holder {
            node: "node-1".into(),
            pod_uid: "pod-1".into(),
            instance: "instance-1".into(),
            pod: None,
        },
        state: ClaimState::Held,
        epoch,
        expired: None,
    }
}

async fn measure(name: &'static str, store: Arc<dyn LeaseStore>, n: usize) -> Vec<Row> {
    let mut version = store.put_claim(&claim(0), None).await.expect("create");
    // Warm-up: connections, caches.
    for _ in 0..n / 10 {
        store.get_claim("bench-volume").await.expect("get");
    }

    let mut gets = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let found = store.get_claim("bench-volume").await.expect("get");
        gets.push(t.elapsed());
        assert!(found.is_some());
    }
    let get_total = started.elapsed();

    let mut puts = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        version = store
            .put_claim(&claim(i as u64 + 1), Some(&version))
            .await
            .expect("CAS put");
        puts.push(t.elapsed());
    }
    let put_total = started.elapsed();
    vec![
        Row {
            store: name,
            op: "get_claim",
            samples: gets,
            total: get_total,
        },
        Row {
            store: name,
            op: "put_claim (CAS)",
            samples: puts,
            total: put_total,
        },
    ]
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

#[tokio::main]
async fn main() {
    let n: Option<usize> = std::env::var("HOLDFAST_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut rows = measure("memory", Arc::new(MemoryStore::new()), n.unwrap_or(20_000)).await;

    let durable = EtcdServer::start_durable();
    rows.extend(
        measure(
            "etcd (fsync)",
            Arc::new(durable.store("/bench/").await),
            n.unwrap_or(2000),
        )
        .await,
    );
    drop(durable);
    let fast = EtcdServer::start();
    rows.extend(
        measure(
            "etcd (no fsync)",
            Arc::new(fast.store("/bench/").await),
            n.unwrap_or(2000),
        )
        .await,
    );

    if let Some(bins) = holdfast_core::testkit::kube::find_or_skip("store_latency", &[]) {
        let options = ControlPlaneOptions {
            durable_etcd: true,
            ..ControlPlaneOptions::default()
        };
        let plane = ControlPlane::start(bins, options).await;
        plane.ensure_namespace("holdfast").await;
        let store = KubernetesStore::new(plane.admin().await, "holdfast");
        rows.extend(measure("kubernetes", Arc::new(store), n.unwrap_or(2000)).await);
    }

    println!(
        "{:<16} {:<16} {:>7} {:>10} {:>10} {:>10} {:>12}",
        "store", "op", "n", "p50 µs", "p99 µs", "ops/s", "p50 / memory"
    );
    for row in &rows {
        let baseline = rows
            .iter()
            .find(|b| b.store == "memory" && b.op == row.op)
            .expect("memory baseline");
        let ratio = row.percentile(0.5).as_secs_f64() / baseline.percentile(0.5).as_secs_f64();
        println!(
            "{:<16} {:<16} {:>7} {:>10} {:>10} {:>10.0} {:>11.0}x",
            row.store,
            row.op,
            row.samples.len(),
            micros(row.percentile(0.5)),
            micros(row.percentile(0.99)),
            row.ops_per_sec(),
            ratio
        );
    }
}
