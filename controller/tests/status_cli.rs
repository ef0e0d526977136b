//! `holdfast-controller status` of the real binary against a real etcd in which real
//! node sessions (`SessionLease`, D = 600 ms) hold, release and lose claims: the table
//! and the JSON (schema `holdfast.status/v1`) list held, released and fenced claims,
//! the node fences with their reasons, what the command saw of each holder's session,
//! and an expired mark.

mod common;

use std::process::Output;
use std::time::Duration;

use common::sessions::SessionCluster;
use holdfast_core::lease::types::ExpiredMark;
use holdfast_core::lease::{fence_node, PodName};
use serde_json::Value;

const PREFIX: &str = "/status-cli/";

impl SessionCluster {
    /// `holdfast-controller status <args>` against this etcd, with the sessions' timing.
    async fn status(&self, args: &[&str]) -> Output {
        let url = self.etcd.client_url();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast-controller"));
        for (key, _) in std::env::vars() {
            if key.starts_with("HOLDFAST_") || key == "CSI_ENDPOINT" {
                command.env_remove(key);
            }
        }
        command.env("KUBECONFIG", "/nonexistent/kubeconfig");
        command.arg("status").args(args).args([
            "--lease-store=etcd",
            &format!("--etcd-endpoints={url}"),
            &format!("--etcd-prefix={PREFIX}"),
            "--lease-duration=600ms",
            "--lease-margin=150ms",
            "--lease-epsilon=0.01",
        ]);
        let out = tokio::time::timeout(Duration::from_secs(20), command.output())
            .await
            .expect("status did not exit")
            .unwrap();
        assert!(
            out.status.success(),
            "exit {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn pod(name: &str) -> Option<PodName> {
    Some(PodName {
        namespace: "db".into(),
        name: name.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_held_released_and_fenced_claims_with_what_it_saw() {
    let cluster = SessionCluster::start(PREFIX).await;
    let n1 = cluster.session("n1").await;
    let n2 = cluster.session("n2").await;
    let n3 = cluster.session("n3").await;
    let a = n1
        .acquire_for_pod("vol-a", "uid-a", pod("db-0"), None)
        .await
        .unwrap();
    let b = n2.acquire("vol-b", "uid-b", None).await.unwrap();
    n2.release("vol-b", b.epoch).await.unwrap();
    let c = n3.acquire("vol-c", "uid-c", None).await.unwrap();
    fence_node(cluster.store.as_ref(), "n3", "powered off by agent")
        .await
        .unwrap();
    // A silent holder: n4 stops renewing right after taking vol-d.
    let n4 = cluster.session("n4").await;
    let d = n4.acquire("vol-d", "uid-d", None).await.unwrap();
    drop(n4);

    // Watched for 1 s (five renewal intervals, more than W): n1 is seen renewing,
    // n4's session is seen unchanged for W.
    let report: Value =
        serde_json::from_slice(&cluster.status(&["-o", "json", "--observe=1s"]).await.stdout)
            .unwrap();
    assert_eq!(report["schema"], "holdfast.status/v1");
    assert_eq!(report["lease"]["takeover_wait_ms"], 756);
    assert!(report["observed_ms"].as_u64().unwrap() >= 1000, "{report}");
    let claims = report["claims"].as_array().unwrap();
    let volumes: Vec<&str> = claims
        .iter()
        .map(|c| c["volume"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, ["vol-a", "vol-b", "vol-c", "vol-d"]);

    let held = &claims[0];
    assert_eq!(held["state"], "held");
    assert_eq!(held["epoch"], a.epoch);
    assert_eq!(held["pod"], "db/db-0");
    assert_eq!(held["pod_uid"], "uid-a");
    assert_eq!(held["node"], "n1");
    assert_eq!(held["instance"], n1.key().instance.as_str());
    assert_eq!(held["node_fenced"], false);
    assert_eq!(held["session"]["liveness"], "live", "{held}");
    assert!(held["session"]["renewals"].as_u64().unwrap() >= 4, "{held}");
    // The bound counts from the last renewal seen: at most one renewal interval ago.
    let within = held["session"]["expires_within_ms"].as_u64().unwrap();
    assert!((756 - 300..=756).contains(&within), "{held}");
    assert_eq!(held["expired"], Value::Null);

    let released = &claims[1];
    assert_eq!(released["state"], "released");
    assert_eq!(released["epoch"], b.epoch);
    assert_eq!(released["pod"], Value::Null);
    assert_eq!(released["session"], Value::Null);

    let fenced = &claims[2];
    assert_eq!(fenced["state"], "fenced");
    assert_eq!(fenced["epoch"], c.epoch + 1);
    assert_eq!(fenced["node"], "n3");
    assert_eq!(fenced["node_fenced"], true);

    let silent = &claims[3];
    assert_eq!(silent["state"], "held");
    assert_eq!(silent["epoch"], d.epoch);
    assert_eq!(silent["session"]["liveness"], "expired", "{silent}");
    assert_eq!(silent["session"]["expires_within_ms"], 0);
    assert!(silent["session"]["unrenewed_for_ms"].as_u64().unwrap() >= 756);

    assert_eq!(
        report["fences"],
        serde_json::json!([{"node": "n3", "reason": "powered off by agent"}])
    );

    // Without observation the command cannot tell: unknown, a full W to go at most.
    let quick: Value =
        serde_json::from_slice(&cluster.status(&["-o", "json"]).await.stdout).unwrap();
    let held = &quick["claims"][0];
    assert_eq!(held["session"]["liveness"], "unknown", "{held}");
    assert!(held["session"]["expires_within_ms"].as_u64().unwrap() > 700);

    // An expired mark, as the controller writes it, is shown; one naming an older
    // renewal than n1's session shows is stale.
    let stored = cluster.store.get_claim("vol-a").await.unwrap().unwrap();
    let mut marked = stored.value.clone();
    marked.expired = Some(ExpiredMark {
        at_unix_ms: 1_795_689_601_000,
        observed_by: "controller-0".into(),
        session_renewals: 0,
    });
    cluster
        .store
        .put_claim(&marked, Some(&stored.version))
        .await
        .unwrap();
    let report: Value =
        serde_json::from_slice(&cluster.status(&["-o", "json", "--node=n1"]).await.stdout).unwrap();
    assert_eq!(report["claims"].as_array().unwrap().len(), 1);
    let mark = &report["claims"][0]["expired"];
    assert_eq!(mark["at"], "2026-11-26T10:40:01.000Z");
    assert_eq!(mark["observed_by"], "controller-0");
    assert_eq!(mark["stale"], true);

    // The table: one line per claim, then the fences, then what the columns mean.
    let out = cluster.status(&["--observe=300ms"]).await;
    let table = String::from_utf8(out.stdout).unwrap();
    println!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0]
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "VOLUME", "STATE", "EPOCH", "POD", "POD UID", "NODE", "SESSION", "AGE", "EXPIRES",
            "NOTE"
        ]
    );
    let row = |volume: &str| -> Vec<&str> {
        let line = lines.iter().find(|l| l.starts_with(volume)).unwrap();
        line.split_whitespace().collect()
    };
    let a_row = row("vol-a");
    assert_eq!(
        &a_row[..7],
        [
            "vol-a",
            "held",
            &a.epoch.to_string(),
            "db/db-0",
            "uid-a",
            "n1",
            "live"
        ]
    );
    assert!(lines.iter().any(|l| l.starts_with("vol-a")
        && l.contains(
            "self-fenced by 2026-11-26T10:40:01.000Z [controller-0] (stale: renewed since)"
        )));
    assert_eq!(&row("vol-b")[..2], ["vol-b", "released"]);
    let c_line = lines.iter().find(|l| l.starts_with("vol-c")).unwrap();
    assert!(
        c_line.contains("fenced") && c_line.ends_with("node fenced"),
        "{c_line}"
    );
    assert!(lines.iter().any(|l| l.starts_with("FENCED NODE")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("n3") && l.ends_with("powered off by agent")));
    assert!(table.contains("Sessions watched for 0.3s"), "{table}");
    drop((n1, n2, n3));
}
