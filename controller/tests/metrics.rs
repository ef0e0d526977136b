//! The metrics endpoint of the real controller binary: `GET /metrics` answers in the
//! Prometheus text format, and a refused attach (another node's pod holds the volume,
//! in a real etcd lease store) moves `holdfast_controller_attaches_refused_total`; the
//! store calls the gate made show in `holdfast_controller_store_call_seconds`; the
//! leader's expiry sweep counts the claim in `holdfast_controller_claims`.

mod common;

use std::time::Duration;

use common::plane::params;
use common::*;
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::*;
use holdfast_core::lease::{NodeIdentity, SessionLease};
use holdfast_core::store::LeaseStore;
use holdfast_core::testkit::etcd::EtcdServer;

const REFUSED: &str = "holdfast_controller_attaches_refused_total{reason=\"held_elsewhere\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_attach_moves_the_refused_counter() {
    let etcd = EtcdServer::start();
    let store: std::sync::Arc<dyn LeaseStore> =
        std::sync::Arc::new(etcd.store("/metrics-test/").await);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    register_nodes(&root, &["n1", "n2"]);
    let port = free_port();
    let process = ControllerProcess::start_with(
        &root,
        &dir.path().join("c.sock"),
        &[
            "--lease-store=etcd".into(),
            format!("--etcd-endpoints={}", etcd.client_url()),
            "--etcd-prefix=/metrics-test/".into(),
            "--lease-duration=1s".into(),
            "--lease-margin=200ms".into(),
            format!("--metrics-address=127.0.0.1:{port}"),
        ],
    )
    .await;
    let mut c = process.controller().await;
    let volume = c
        .create_volume(create_request("pvc-metrics"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let state = dir.path().join("n1");
    std::fs::create_dir(&state).unwrap();
    let n1 = SessionLease::start(
        store.clone(),
        NodeIdentity::of_this_machine("n1").unwrap(),
        params(),
        &state,
    )
    .await
    .unwrap();
    n1.acquire(&volume, "pod-a-uid", None).await.unwrap();

    let before = scrape(port).await.expect("the metrics endpoint answers");
    assert_eq!(series(&before, REFUSED), None, "{before}");
    assert_eq!(
        series(&before, "holdfast_controller_leader"),
        Some(1.0),
        "without leader election the only replica acts: {before}"
    );
    for _ in 0..2 {
        let refused = c
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: volume.clone(),
                node_id: "n2".into(),
                volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    }
    let after = scrape(port).await.unwrap();
    assert_eq!(series(&after, REFUSED), Some(2.0), "{after}");
    assert!(
        after.contains(
            "holdfast_controller_store_call_seconds_count{op=\"get_claim\",outcome=\"ok\"}"
        ),
        "{after}"
    );
    // The expiry sweep (every D/3 = 333 ms) counts n1's live claim as held.
    let held = "holdfast_controller_claims{state=\"held\"}";
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let after = loop {
        let text = scrape(port).await.unwrap();
        if series(&text, held) == Some(1.0) {
            break text;
        }
        assert!(std::time::Instant::now() < until, "{held} never 1: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for state in ["released", "fenced", "expired"] {
        let name = format!("holdfast_controller_claims{{state=\"{state}\"}}");
        assert_eq!(series(&after, &name), Some(0.0), "{after}");
    }
    println!(
        "{}",
        after
            .lines()
            .filter(|l| l.contains("refused")
                || l.contains("leader")
                || l.contains("controller_claims"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(n1);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
