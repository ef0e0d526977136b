//! What a graceful stop (SIGTERM) does to the node's session: two real
//! `holdfast-driver` processes on one real etcd and one backend root.
//!
//! Kubelet keeps published targets mounted across a plugin restart, so a plugin that
//! stops with targets still mounted must not free their claims: its session record is
//! kept (the claims then end by expiry, or sooner when the node's next plugin instance
//! proves this one dead). A plugin with nothing mounted deletes its session.

mod common;

use common::{create_volume_in, pair, publish_for};
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
