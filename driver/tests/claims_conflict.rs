//! The node plugin enforces the volume lock between pods: two real `holdfast-driver`
//! processes (nodes `node-a` and `node-b`) share one real etcd and one backend root,
//! as two nodes of a cluster do. What a second pod gets while the first holds a volume,
//! what releases it, and what needs no claim at all.

mod common;

use std::time::{Duration, Instant};

use common::{
    create_volume_in, mounts_at, pair, publish_for, publish_for_pod, storage_epoch,
    unpublish_request, Plugin, POD_UID_KEY,
};
use tonic::{Code, Request};

/// Short lease: D = 1.5 s, renewals every 0.5 s; a silent holder can be taken over
/// after about 2 s.
const D: &str = "1500ms";
const MARGIN: &str = "500ms";

#[tokio::test]
async fn second_pod_is_refused_while_the_first_holds_and_takes_over_at_once_on_release() {
    let mut p = pair(D, MARGIN).await;
    let id = create_volume_in(&p.a.root, "pv-lock", &[("dataPath", "fuse")]);
    let (ta, ta2, tb) = (p.a.target(), p.a.target(), p.b.target());

    p.node_a
        .node_publish_volume(publish_for_pod(&id, &ta, "pod-1", "shop", "db-0"))
        .await
        .expect("first pod takes the volume");
    let epoch = storage_epoch(&p.a.root, &id).expect("epoch written on publish");
    std::fs::write(ta.join("f"), b"one").unwrap();

    let err = p
        .node_b
        .node_publish_volume(publish_for(&id, &tb, "pod-2"))
        .await
        .expect_err("a second pod on another node must be refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for needle in ["shop/db-0 (uid pod-1)", "node-a", "can expire in"] {
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    assert!(
        mounts_at(&tb).is_empty(),
        "a refused publish mounts nothing"
    );
    assert!(!tb.exists(), "a refused publish leaves no target behind");

    // The same pod again: idempotent at the same target, and fine at a second one.
    for target in [&ta, &ta, &ta2] {
        p.node_a
            .node_publish_volume(publish_for(&id, target, "pod-1"))
            .await
            .expect("same pod republishes");
    }
    assert_eq!(
        storage_epoch(&p.a.root, &id),
        Some(epoch),
        "same grant, same epoch"
    );
    // Another pod on the holder's own node is refused too, and told what frees it.
    let ta3 = p.a.target();
    let err = p
        .node_a
        .node_publish_volume(publish_for(&id, &ta3, "pod-3"))
        .await
        .expect_err("another pod on the same node");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("released when that pod's volume is unmounted"),
        "{}",
        err.message()
    );

    // Unpublishing one of two targets keeps the claim ...
    p.node_a
        .node_unpublish_volume(unpublish_request(&id, &ta2))
        .await
        .unwrap();
    let err = p
        .node_b
        .node_publish_volume(publish_for(&id, &tb, "pod-2"))
        .await
        .expect_err("still held through the other target");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // ... the last one releases it, and the other node takes it at once: node-a's
    // session is alive and renewing, so nothing but the release can free it.
    p.node_a
        .node_unpublish_volume(unpublish_request(&id, &ta))
        .await
        .unwrap();
    p.node_b
        .node_publish_volume(publish_for(&id, &tb, "pod-2"))
        .await
        .expect("released claim is taken at once");
    assert_eq!(std::fs::read(tb.join("f")).unwrap(), b"one");
    assert!(
        storage_epoch(&p.a.root, &id).unwrap() > epoch,
        "new holder, higher epoch"
    );
}

#[tokio::test]
async fn on_conflict_wait_gets_the_volume_when_the_holder_releases_within_the_deadline() {
    let mut p = pair(D, MARGIN).await;
    let id = create_volume_in(
        &p.a.root,
        "pv-wait",
        &[("dataPath", "fuse"), ("onConflict", "wait")],
    );
    let (ta, tb) = (p.a.target(), p.b.target());
    p.node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .unwrap();

    let mut node_b = p.node_b.clone();
    let waiting = {
        let mut request = Request::new(publish_for(&id, &tb, "pod-2"));
        request.set_timeout(Duration::from_secs(20));
        tokio::spawn(async move { node_b.node_publish_volume(request).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "onConflict=wait must wait for the holder"
    );
    let released = Instant::now();
    p.node_a
        .node_unpublish_volume(unpublish_request(&id, &ta))
        .await
        .unwrap();
    waiting
        .await
        .unwrap()
        .expect("the waiting publish gets the volume once it is released");
    assert!(
        released.elapsed() < Duration::from_secs(5),
        "took {:?}",
        released.elapsed()
    );
    assert_eq!(mounts_at(&tb).len(), 1);

    // A wait that runs out of deadline is refused with the holder named, in time for
    // the caller to read the answer (not DEADLINE_EXCEEDED).
    let ta2 = p.a.target();
    let mut request = Request::new(publish_for(&id, &ta2, "pod-3"));
    request.set_timeout(Duration::from_millis(1500));
    let started = Instant::now();
    let err = p
        .node_a
        .node_publish_volume(request)
        .await
        .expect_err("held for the whole deadline");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("pod-2"), "{}", err.message());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it waited only {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_pod_on_the_holders_own_node_is_refused_at_once_even_with_on_conflict_wait() {
    // The replacement pod lands on the same node while the old one is terminating.
    // kubelet runs one operation per volume at a time, so a publish that waited here
    // would hold up the old pod's unpublish — the only thing that can free the claim —
    // until its deadline ran out. It is refused at once instead, naming the holder, and
    // kubelet's retry after the unpublish gets the volume.
    let plugin = Plugin::start_standalone().await;
    let mut node = holdfast_core::csi::v1::node_client::NodeClient::new(plugin.channel().await);
    let id = create_volume_in(
        &plugin.root,
        "pv-same-node",
        &[("dataPath", "fuse"), ("onConflict", "wait")],
    );
    let (old, new) = (plugin.target(), plugin.target());
    node.node_publish_volume(publish_for_pod(&id, &old, "pod-old", "shop", "db-0"))
        .await
        .unwrap();

    let mut request = Request::new(publish_for(&id, &new, "pod-new"));
    request.set_timeout(Duration::from_secs(20));
    let started = Instant::now();
    let err = node
        .node_publish_volume(request)
        .await
        .expect_err("another pod on the holder's node is refused");
    let refused_after = started.elapsed();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for needle in ["shop/db-0 (uid pod-old)", "this node", "kubelet retries"] {
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    assert!(
        refused_after < Duration::from_secs(2),
        "refused only after {refused_after:?}: it waited for a holder on its own node"
    );
    assert!(mounts_at(&new).is_empty());

    node.node_unpublish_volume(unpublish_request(&id, &old))
        .await
        .expect("the old pod's unpublish");
    node.node_publish_volume(publish_for(&id, &new, "pod-new"))
        .await
        .expect("the retry after the old pod's unpublish gets the volume");
    assert_eq!(mounts_at(&new).len(), 1);
    assert!(mounts_at(&old).is_empty());
}

#[tokio::test]
async fn non_exclusive_volumes_take_no_claim() {
    let mut p = pair(D, MARGIN).await;
    let id = create_volume_in(
        &p.a.root,
        "pv-shared",
        &[("dataPath", "fuse"), ("exclusive", "false")],
    );
    let (ta, tb) = (p.a.target(), p.b.target());
    p.node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .unwrap();
    p.node_b
        .node_publish_volume(publish_for(&id, &tb, "pod-2"))
        .await
        .expect("exclusive=false lets a second pod in");
    std::fs::write(ta.join("a"), b"a").unwrap();
    assert_eq!(std::fs::read(tb.join("a")).unwrap(), b"a");
    assert_eq!(storage_epoch(&p.a.root, &id), None, "no claim, no epoch");
}

#[tokio::test]
async fn exclusive_publish_needs_the_pod_uid_and_a_context_that_matches_the_volume() {
    // Cluster mode: a publish without the pod's UID is a CSIDriver set-up error
    // (podInfoOnMount), refused rather than claimed more loosely.
    let cluster = Plugin::start_node_only().await;
    let mut node = holdfast_core::csi::v1::node_client::NodeClient::new(cluster.channel().await);
    let id = create_volume_in(&cluster.root, "pv-ctx", &[("dataPath", "bind")]);
    let target = cluster.target();
    let mut request = publish_for(&id, &target, "pod-1");
    request.volume_context.remove(POD_UID_KEY);
    let err = node.node_publish_volume(request).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("podInfoOnMount"),
        "{}",
        err.message()
    );
    assert!(!target.exists());

    // Standalone (COs without pod info, csi-sanity): the claim goes to the node's
    // workload, so targets on this node share it and a pod with a UID is refused.
    let plugin = Plugin::start_standalone().await;
    let mut node = holdfast_core::csi::v1::node_client::NodeClient::new(plugin.channel().await);
    let id = create_volume_in(&plugin.root, "pv-ctx", &[("dataPath", "bind")]);
    let (first, second) = (plugin.target(), plugin.target());
    for target in [&first, &second] {
        let mut request = publish_for(&id, target, "unused");
        request.volume_context.remove(POD_UID_KEY);
        node.node_publish_volume(request)
            .await
            .expect("standalone claims for the node's workload");
    }
    let err = node
        .node_publish_volume(publish_for(&id, &plugin.target(), "pod-1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("node:"), "{}", err.message());
    for target in [&first, &second] {
        node.node_unpublish_volume(unpublish_request(&id, target))
            .await
            .unwrap();
    }
    let target = plugin.target();

    // volume_context may not switch the lock off: the volume's own metadata holds.
    let mut request = publish_for(&id, &target, "pod-1");
    request
        .volume_context
        .insert("exclusive".into(), "false".into());
    let err = node.node_publish_volume(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("exclusive"), "{}", err.message());

    // Repeating the volume's own parameters is fine.
    let mut request = publish_for(&id, &target, "pod-1");
    request
        .volume_context
        .insert("dataPath".into(), "bind".into());
    node.node_publish_volume(request)
        .await
        .expect("matching context");
}

#[tokio::test]
async fn a_higher_epoch_already_on_storage_refuses_the_grant_and_gives_it_back() {
    let mut p = pair(D, MARGIN).await;
    let id = create_volume_in(&p.a.root, "pv-newer", &[("dataPath", "fuse")]);
    let (ta, tb) = (p.a.target(), p.b.target());
    // Someone newer than any grant the store can give now holds the volume.
    common::write_storage_epoch(&p.a.root, &id, 1000);
    let err = p
        .node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .expect_err("a grant below the storage's epoch must not be used");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("epoch 1000"), "{}", err.message());
    assert!(mounts_at(&ta).is_empty() && !ta.exists());
    assert_eq!(storage_epoch(&p.a.root, &id), Some(1000), "never lowered");

    // The refused grant was given back: once the storage no longer shows a newer
    // holder, the other node takes the volume at once.
    std::fs::remove_file(p.a.root.join("volumes").join(&id).join(".holdfast-epoch")).unwrap();
    p.node_b
        .node_publish_volume(publish_for(&id, &tb, "pod-2"))
        .await
        .expect("the refused grant was released");
}
