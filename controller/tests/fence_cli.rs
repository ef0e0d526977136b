//! The `fence`, `unfence` and `claims` verbs of the real binary against a real etcd,
//! with real node sessions (`SessionLease`, short D) holding the claims they act on.

mod common;

use std::process::Output;
use std::time::Duration;

use common::sessions::SessionCluster;
use holdfast_core::clock::Mono;
use holdfast_core::lease::{ClaimState, LeaseError};
use serde_json::Value;

const PREFIX: &str = "/fence-cli/";

impl SessionCluster {
    /// Runs the binary with `args` plus the flags that point it at this etcd.
    async fn admin(&self, args: &[&str]) -> Output {
        let endpoints = self.etcd.client_url();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--lease-store", "etcd", "--etcd-endpoints", &endpoints]);
        all.extend(["--etcd-prefix", PREFIX]);
        run(&all, &[]).await
    }

    async fn claim(&self, volume: &str) -> (ClaimState, u64, String) {
        let claim = self.store.get_claim(volume).await.unwrap().unwrap().value;
        (claim.state, claim.epoch, claim.holder.node)
    }
}

/// The binary with a clean environment: only `env` sets HOLDFAST_* variables.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast-controller"));
    for (key, _) in std::env::vars() {
        if key.starts_with("HOLDFAST_") || key == "CSI_ENDPOINT" {
            command.env_remove(key);
        }
    }
    command.env("KUBECONFIG", "/nonexistent/kubeconfig");
    command.args(args).envs(env.iter().copied());
    tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("holdfast-controller did not exit")
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&stdout(out)).unwrap()
}

/// Waits (up to 2 s, ten renewal intervals) for `done`.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while !done() {
        assert!(tokio::time::Instant::now() < until, "{what}: not in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_frees_the_nodes_claims_and_closes_its_gate() {
    let cluster = SessionCluster::start(PREFIX).await;
    let n1 = cluster.session("n1").await;
    let a = n1.acquire("vol-a", "pod-a", None).await.unwrap();
    let b = n1.acquire("vol-b", "pod-b", None).await.unwrap();
    assert!(n1.deadline().is_live_at(Mono::now()));

    let out = cluster
        .admin(&[
            "fence",
            "--node",
            "n1",
            "--reason",
            "powered off",
            "-o",
            "json",
        ])
        .await;
    let report = json(&out);
    assert_eq!(report["node"], "n1");
    assert_eq!(report["already_fenced"], false);
    let mut freed: Vec<(String, u64)> = report["fenced_claims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["volume"].as_str().unwrap().into(),
                c["epoch"].as_u64().unwrap(),
            )
        })
        .collect();
    freed.sort();
    assert_eq!(
        freed,
        vec![("vol-a".into(), a.epoch + 1), ("vol-b".into(), b.epoch + 1)]
    );
    assert_eq!(
        cluster.claim("vol-a").await,
        (ClaimState::Fenced, a.epoch + 1, "n1".into())
    );
    let fence = cluster.store.get_fence("n1").await.unwrap().unwrap().value;
    assert_eq!(fence.reason, "powered off");

    // The node's own plugin sees the fence within one renewal interval and stops
    // writing: its session is fenced (not lost) and its deadline is revoked.
    eventually("n1 sees its fence", || n1.is_fenced()).await;
    assert!(!n1.is_lost());
    assert!(!n1.deadline().is_live_at(Mono::now()));
    let refused = n1.acquire("vol-c", "pod-c", None).await.unwrap_err();
    assert!(
        matches!(refused, LeaseError::NodeFenced { .. }),
        "{refused}"
    );

    // Another node takes the volume at once, without waiting out n1's lease.
    let n2 = cluster.session("n2").await;
    let taken = n2.acquire("vol-a", "pod-a2", None).await.unwrap();
    assert!(
        taken.epoch > a.epoch + 1,
        "{} after {}",
        taken.epoch,
        a.epoch + 1
    );
    assert_eq!(cluster.claim("vol-a").await.2, "n2");

    // Fencing again is not an error, and frees nothing more (vol-a is n2's now).
    let out = cluster.admin(&["fence", "--node", "n1"]).await;
    let text = stdout(&out);
    assert!(
        text.starts_with("fenced node n1 (it was already fenced): 0 claim(s) freed"),
        "{text}"
    );
    assert_eq!(cluster.claim("vol-a").await.2, "n2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_lists_holders_and_unfence_lets_the_node_work_again() {
    let cluster = SessionCluster::start(PREFIX).await;
    let n1 = cluster.session("n1").await;
    let n2 = cluster.session("n2").await;
    let a = n1.acquire("vol-a", "pod-a", None).await.unwrap();
    let b = n2.acquire("vol-b", "pod-b", None).await.unwrap();

    let rows = json(&cluster.admin(&["claims", "--output", "json"]).await);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["volume"], "vol-a");
    assert_eq!(rows[0]["pod"], "pod-a");
    assert_eq!(rows[0]["node"], "n1");
    assert_eq!(rows[0]["instance"], n1.key().instance.as_str());
    assert_eq!(rows[0]["state"], "held");
    assert_eq!(rows[0]["epoch"], a.epoch);
    assert_eq!(rows[0]["node_fenced"], false);
    assert_eq!(rows[1]["volume"], "vol-b");
    assert_eq!(rows[1]["epoch"], b.epoch);

    let table = stdout(&cluster.admin(&["claims", "--node", "n2"]).await);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("VOLUME"), "{table}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    let epoch = b.epoch.to_string();
    let expected = [
        "vol-b",
        "pod-b",
        "n2",
        &n2.key().instance,
        "held",
        &epoch,
        "no",
    ];
    assert_eq!(cells, expected);

    stdout(&cluster.admin(&["fence", "--node", "n1"]).await);
    let rows = json(&cluster.admin(&["claims", "--node=n1", "-o", "json"]).await);
    assert_eq!(rows[0]["state"], "fenced");
    assert_eq!(rows[0]["epoch"], a.epoch + 1);
    assert_eq!(rows[0]["node_fenced"], true);
    eventually("n1 sees its fence", || n1.is_fenced()).await;

    let text = stdout(&cluster.admin(&["unfence", "--node", "n1"]).await);
    assert_eq!(text, "unfenced node n1\n");
    assert!(cluster.store.get_fence("n1").await.unwrap().is_none());
    // The plugin resumes renewing; its fenced claim stays lost, new ones may be taken.
    eventually("n1 sees the fence lifted", || {
        !n1.is_fenced() && n1.deadline().is_live_at(Mono::now())
    })
    .await;
    n1.acquire("vol-c", "pod-c", None).await.unwrap();
    assert_eq!(cluster.claim("vol-a").await.0, ClaimState::Fenced);

    let report = json(
        &cluster
            .admin(&["unfence", "--node", "n1", "-o", "json"])
            .await,
    );
    assert_eq!(report["was_fenced"], false);
}

/// What `kubectl exec` into the controller pod does: the lease flags come from the
/// pod's environment, serve-only settings present in it do not get in the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_verbs_take_the_lease_store_from_the_environment() {
    let cluster = SessionCluster::start(PREFIX).await;
    let n1 = cluster.session("n1").await;
    n1.acquire("vol-a", "pod-a", None).await.unwrap();
    let url = cluster.etcd.client_url();
    let env = [
        ("HOLDFAST_LEASE_STORE", "etcd"),
        ("HOLDFAST_ETCD_ENDPOINTS", url.as_str()),
        ("HOLDFAST_ETCD_PREFIX", PREFIX),
        ("HOLDFAST_LEASE_DURATION", "15s"),
        ("HOLDFAST_LEASE_MARGIN", "3s"),
        ("HOLDFAST_LEASE_EPSILON", "0.01"),
        ("HOLDFAST_BACKEND_ROOT", "/var/lib/holdfast/backend"),
        ("CSI_ENDPOINT", "unix:///csi/csi.sock"),
    ];
    let rows = json(&run(&["claims", "-o", "json"], &env).await);
    assert_eq!(rows[0]["volume"], "vol-a");
    // Another prefix is another holdfast installation: nothing of ours is listed.
    let mut other = env;
    other[2] = ("HOLDFAST_ETCD_PREFIX", "/someone-else/");
    let rows = json(&run(&["claims", "-o", "json"], &other).await);
    assert_eq!(rows, serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_fails_with_a_clear_error() {
    let mut cluster = SessionCluster::start(PREFIX).await;
    cluster.etcd.kill();
    let out = cluster.admin(&["fence", "--node", "n1"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unavailable"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing claimed as fenced");
}
