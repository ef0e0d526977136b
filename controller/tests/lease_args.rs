//! The lease flags as the binary sees them: a bad setting, given as a flag or as the
//! environment variable the chart sets, stops it with a message naming the flag —
//! both when serving and for the admin verbs — before anything is connected.

use std::process::Output;
use std::time::Duration;

/// The binary with a clean environment: only `env` sets HOLDFAST_* variables.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast-controller"));
    for (key, _) in std::env::vars() {
        if key.starts_with("HOLDFAST_") || key == "CSI_ENDPOINT" {
            command.env_remove(key);
        }
    }
    command.args(args).envs(env.iter().copied());
    tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("holdfast-controller did not exit")
        .unwrap()
}

/// Asserts a failure whose stderr mentions every one of `needles`.
fn fails_with(out: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn admin_verbs_refuse_bad_lease_settings() {
    let fence = ["fence", "--node", "n1"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        fence.iter().chain(extra).copied().collect()
    };
    // clap's own usage errors exit 2; settings refused after parsing exit 1.
    let out = run(&with(&["--lease-store", "zookeeper"]), &[]).await;
    fails_with(&out, 2, &["zookeeper", "memory, etcd, kubernetes"]);
    let out = run(&with(&["--lease-store", "etcd"]), &[]).await;
    fails_with(&out, 1, &["--etcd-endpoints", "HOLDFAST_ETCD_ENDPOINTS"]);
    let out = run(
        &with(&["--lease-store=etcd", "--etcd-endpoints=http://127.0.0.1:9"]),
        &[
            ("HOLDFAST_LEASE_DURATION", "3s"),
            ("HOLDFAST_LEASE_MARGIN", "5s"),
        ],
    )
    .await;
    fails_with(&out, 1, &["--lease-margin (5s)", "--lease-duration (3s)"]);
    let out = run(
        &with(&["--lease-store=etcd", "--etcd-endpoints=http://127.0.0.1:9"]),
        &[("HOLDFAST_LEASE_EPSILON", "0.4")],
    )
    .await;
    fails_with(&out, 1, &["windows overlap"]);
    let out = run(&with(&["--lease-duration", "15h"]), &[]).await;
    fails_with(&out, 2, &["--lease-duration", "unknown unit"]);
    let out = run(&with(&["--lease-namespace", "Bad_NS"]), &[]).await;
    fails_with(&out, 1, &["--lease-namespace", "Bad_NS"]);
    // A fence in a store no node plugin shares would reach no one.
    let out = run(&["claims", "--lease-store", "memory"], &[]).await;
    fails_with(&out, 1, &["--lease-store=memory", "claims"]);
    let out = run(&["fence", "--node", " ", "--lease-store", "memory"], &[]).await;
    fails_with(&out, 1, &["--node must not be empty"]);
    let out = run(&["fence"], &[]).await;
    fails_with(&out, 2, &["--node"]);
}

#[tokio::test]
async fn serving_refuses_bad_lease_settings_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = format!("--backend-root={}", dir.path().display());
    let endpoint = format!("--endpoint=unix://{}/c.sock", dir.path().display());
    let serve = [root.as_str(), endpoint.as_str(), "--log-format=text"];
    let out = run(&serve, &[("HOLDFAST_LEASE_STORE", "etcd")]).await;
    fails_with(&out, 1, &["--etcd-endpoints"]);
    let out = run(&serve, &[("HOLDFAST_LEASE_MARGIN", "20s")]).await;
    fails_with(&out, 1, &["--lease-margin (20s)"]);
    let out = run(&serve, &[("HOLDFAST_LEASE_STORE", "consul")]).await;
    fails_with(&out, 2, &["consul"]);
    assert!(!dir.path().join("c.sock").exists(), "it never listened");
    // The explicit `serve` verb takes the same flags and makes the same checks.
    let mut explicit = vec!["serve"];
    explicit.extend(serve);
    let out = run(&explicit, &[("HOLDFAST_LEASE_EPSILON", "0.7")]).await;
    fails_with(&out, 1, &["epsilon 0.7"]);
}
