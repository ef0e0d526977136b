//! The node's session: what a graceful stop (SIGTERM) does to it, and what the pods see
//! when it lapses. Real `holdfast-driver` processes on one real etcd and one backend root.
//!
//! Kubelet keeps published targets mounted across a plugin restart, so a plugin that
//! stops with targets still mounted must not free their claims: its session record is
//! kept (the claims then end by expiry, or sooner when the node's next plugin instance
//! proves this one dead). A plugin with nothing mounted deletes its session.

mod common;

use std::time::{Duration, Instant};

use common::{create_volume_in, pair, publish_for, unpublish_request};
use holdfast_core::csi::v1::node_client::NodeClient;
use holdfast_core::csi::v1::NodeGetVolumeStatsRequest;
use holdfast_core::store::LeaseStore;
use tonic::Code;

#[tokio::test]
async fn sigterm_keeps_the_session_while_targets_stay_mounted_and_deletes_it_otherwise() {
    let mut p = pair("6s", "1s").await;
    let store = p
        .etcd
        .store(holdfast_core::store::etcd::DEFAULT_PREFIX)
        .await;
    let id = create_volume_in(&p.a.root, "pv-term", &[("dataPath", "fuse")]);
    let (ta, tb) = (p.a.target(), p.b.target());
    p.node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .unwrap();

    let status = p.a.stop_sigterm().await;
    assert!(status.success(), "{status:?}\n{}", p.a.logs());
    assert_eq!(
        store.list_sessions("node-a").await.unwrap().len(),
        1,
        "a session whose targets stay mounted must be kept"
    );
    let err = p
        .node_b
        .node_publish_volume(publish_for(&id, &tb, "pod-2"))
        .await
        .expect_err("the stopped node's claim is not freed by its stop");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // node-b has nothing mounted: its stop deletes its session.
    assert_eq!(store.list_sessions("node-b").await.unwrap().len(), 1);
    let status = p.b.stop_sigterm().await;
    assert!(status.success(), "{status:?}\n{}", p.b.logs());
    assert!(
        store.list_sessions("node-b").await.unwrap().is_empty(),
        "{}",
        p.b.logs()
    );
}

#[tokio::test]
async fn after_a_sigterm_with_targets_mounted_the_next_instance_frees_the_fuse_claim_at_once() {
    // D = 6 s: expiry alone would keep the volume from the next pod for over 6.5 s.
    let mut p = pair("6s", "1s").await;
    let id = create_volume_in(&p.a.root, "pv-term-next", &[("dataPath", "fuse")]);
    let old = p.a.target();
    p.node_a
        .node_publish_volume(publish_for(&id, &old, "pod-1"))
        .await
        .unwrap();
    let status = p.a.stop_sigterm().await;
    assert!(status.success(), "{status:?}\n{}", p.a.logs());
    let stopped = Instant::now();
    // The session was kept (a target stays mounted), and so was the instance's lock
    // file: the next instance takes its flock, which proves the old one dead.
    p.a.restart().await;
    let mut node = NodeClient::new(p.a.channel().await);
    node.node_unpublish_volume(unpublish_request(&id, &old))
        .await
        .unwrap();
    let new = p.a.target();
    node.node_publish_volume(publish_for(&id, &new, "pod-2"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the stopped instance's FUSE claim must be freed by proof, not expiry: \
                 {e:?}\n{}",
                p.a.logs()
            )
        });
    let took = stopped.elapsed();
    println!("SIGTERM with a FUSE target -> next instance's publish for a new pod after {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    std::fs::write(new.join("after"), b"ok").expect("the new pod writes");
}

#[tokio::test]
async fn lapsed_session_stops_io_and_says_so_then_resumes_after_a_proven_renewal() {
    // D = 1.5 s: with etcd silent, the holder stops within D − margin = 1 s of its last
    // renewal.
    let mut p = pair("1500ms", "500ms").await;
    let id = create_volume_in(&p.a.root, "pv-lapse", &[("dataPath", "fuse")]);
    let ta = p.a.target();
    p.node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .unwrap();
    std::fs::write(ta.join("before"), b"ok").unwrap();

    p.etcd.pause();
    let start = Instant::now();
    let eio = || {
        std::fs::write(ta.join("during"), b"x")
            .err()
            .and_then(|e| e.raw_os_error())
            == Some(libc::EIO)
    };
    while !eio() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "still writing with the store silent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = p
        .node_a
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: ta.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(
        cond.abnormal && cond.message.contains("session expired"),
        "{cond:?}"
    );

    // Nobody took the session over meanwhile, so a renewal that lands proves this node
    // still holds it: the volume works again.
    p.etcd.resume();
    let start = Instant::now();
    while std::fs::write(ta.join("after"), b"ok").is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "never resumed:\n{}",
            p.a.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_publish_waits_out_a_brief_store_outage_rather_than_failing() {
    // D = 6 s: the session stays live through a 3 s outage. Each store call gives up
    // after 2 s, so an answer at the first failure would be UNAVAILABLE at about 2 s;
    // kubelet would then double its pause before the next mount.
    let p = pair("6s", "1s").await;
    let id = create_volume_in(&p.a.root, "pv-outage", &[("dataPath", "fuse")]);
    let ta = p.a.target();
    p.etcd.pause();
    let asked = Instant::now();
    let mut node = p.node_a.clone();
    let publish = tokio::spawn({
        let (id, ta) = (id.clone(), ta.clone());
        async move {
            node.node_publish_volume(publish_for(&id, &ta, "pod-1"))
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.etcd.resume();
    let answer = publish.await.unwrap();
    let took = asked.elapsed();
    answer.unwrap_or_else(|e| panic!("answered after {took:?}: {e:?}\n{}", p.a.logs()));
    println!("store paused 3 s -> publish granted after {took:?}");
    assert!(took >= Duration::from_secs(3), "{took:?}");
    std::fs::write(ta.join("after"), b"ok").unwrap();
}

#[tokio::test]
async fn plugin_refuses_to_serve_without_a_session() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    for dir in ["backend", "state"] {
        std::fs::create_dir(base.join(dir)).unwrap();
    }
    // Nothing listens on port 1: the session record cannot be written.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast-driver"))
        .arg(format!(
            "--endpoint=unix://{}",
            base.join("csi.sock").display()
        ))
        .args(["--node-id", "node-a", "--lease-store", "etcd"])
        .args(["--etcd-endpoints", "http://127.0.0.1:1"])
        .arg(format!("--backend-root={}", base.join("backend").display()))
        .arg(format!("--state-dir={}", base.join("state").display()))
        .env_remove("CSI_ENDPOINT")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the plugin must give up, not hang")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("lease session"), "{stderr}");
    assert!(!base.join("csi.sock").exists(), "it must not have served");
}
