//! The node plugin stops a holder's I/O when it is no longer the holder, and hands
//! volumes over as fast as certainty allows: two real `holdfast-driver` processes on
//! one real etcd and one backend root.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    create_volume_in, mounts_at, pair, publish_for, storage_epoch, unpublish_request,
    write_storage_epoch,
};
use holdfast_core::csi::v1::node_client::NodeClient;
use holdfast_core::csi::v1::{NodeGetVolumeStatsRequest, VolumeCondition};
use tonic::transport::Channel;
use tonic::Code;

async fn condition(node: &mut NodeClient<Channel>, id: &str, target: &Path) -> VolumeCondition {
    node.node_get_volume_stats(NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: target.to_str().unwrap().into(),
        ..Default::default()
    })
    .await
    .expect("stats")
    .into_inner()
    .volume_condition
    .expect("volume condition")
}

/// Polls `check` every 20 ms until it holds or `within` passes; returns how long it took.
async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn higher_epoch_on_storage_fences_the_holder_with_the_store_cut() {
    // D = 30 s, margin 3 s: renewals every 10 s, self-fence 27 s after the last one.
    // The epoch on storage is polled every second between renewals, so it must act
    // within about a second (a renewal tick alone would land in that window only 18% of
    // the time), long before the session could lapse, with etcd answering nothing.
    let mut p = pair("30s", "3s").await;
    let id = create_volume_in(&p.a.root, "pv-epoch", &[("dataPath", "fuse")]);
    let ta = p.a.target();
    p.node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .unwrap();
    std::fs::write(ta.join("before"), b"ok").unwrap();
    let ours = storage_epoch(&p.a.root, &id).unwrap();

    p.etcd.pause();
    write_storage_epoch(&p.a.root, &id, ours + 5);
    let took = eventually(Duration::from_millis(1800), || {
        std::fs::write(ta.join("after"), b"x")
            .err()
            .and_then(|e| e.raw_os_error())
            == Some(libc::EIO)
    })
    .await;
    assert!(
        took.is_some(),
        "the holder kept writing after a newer epoch reached the storage:\n{}",
        p.a.logs()
    );
    let cond = condition(&mut p.node_a, &id, &ta).await;
    assert!(cond.abnormal, "{cond:?}");
    assert!(
        cond.message
            .contains(&format!("wrote epoch {} on storage", ours + 5)),
        "{cond:?}"
    );
    p.etcd.resume();
}

#[tokio::test]
async fn fenced_bind_volume_kills_the_processes_using_it() {
    let mut p = pair("1500ms", "500ms").await;
    let id = create_volume_in(&p.a.root, "pv-bind", &[("dataPath", "bind")]);
    let ta = p.a.target();
    p.node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .unwrap();
    let mut user = Command::new("sleep")
        .arg("60")
        .current_dir(&ta)
        .spawn()
        .unwrap();
    let mut bystander = Command::new("sleep")
        .arg("60")
        .current_dir(p.a.tmp.path())
        .spawn()
        .unwrap();

    let ours = storage_epoch(&p.a.root, &id).unwrap();
    write_storage_epoch(&p.a.root, &id, ours + 1);
    let killed = eventually(Duration::from_secs(3), || {
        user.try_wait().unwrap().is_some()
    })
    .await;
    assert!(
        killed.is_some(),
        "the process in a fenced bind target still runs:\n{}",
        p.a.logs()
    );
    assert_eq!(user.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert_eq!(
        bystander.try_wait().unwrap(),
        None,
        "a bystander was killed"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
    assert!(p
        .a
        .logs()
        .contains("killed a process using a fenced bind volume"));
    let cond = condition(&mut p.node_a, &id, &ta).await;
    assert!(cond.abnormal && cond.message.contains("epoch"), "{cond:?}");
}

#[tokio::test]
async fn an_instance_that_dies_after_its_successor_started_frees_its_fuse_claim_at_the_next_publish(
) {
    // D = 6 s: expiry alone would keep the volume from the new pod for more than 6.5 s.
    let mut p = pair("6s", "1s").await;
    let fuse = create_volume_in(&p.a.root, "pv-s-fuse", &[("dataPath", "fuse")]);
    let old_target = p.a.target();
    p.node_a
        .node_publish_volume(publish_for(&fuse, &old_target, "pod-1"))
        .await
        .unwrap();
    // Started while the old instance still runs: its start-up recovery cannot prove it
    // dead, and a live instance's claim is never taken, however often it is asked.
    let successor = p.a.start_successor().await;
    let mut node = NodeClient::new(successor.channel().await);
    let target = successor.target();
    for _ in 0..2 {
        let err = node
            .node_publish_volume(publish_for(&fuse, &target, "pod-2"))
            .await
            .expect_err("the old instance lives and holds the volume for pod-1");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("on this node"), "{err:?}");
    }

    // The old instance dies; kubelet unmounts the old pod's dead target through the
    // successor, then mounts the new pod's.
    p.a.kill();
    let killed = Instant::now();
    node.node_unpublish_volume(unpublish_request(&fuse, &old_target))
        .await
        .unwrap_or_else(|e| panic!("unpublish of the dead target: {e:?}\n{}", successor.logs()));
    node.node_publish_volume(publish_for(&fuse, &target, "pod-2"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the dead instance's claim must be freed by proof, not expiry: {e:?}\n{}",
                successor.logs()
            )
        });
    let took = killed.elapsed();
    println!("old instance killed -> the new pod's publish granted after {took:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    std::fs::write(target.join("new"), b"ok").expect("the new pod writes");
}

#[tokio::test]
async fn restarted_plugin_releases_its_dead_fuse_claims_at_once_and_keeps_its_bind_ones() {
    // D = 6 s: takeover by expiry would need more than 6.5 s of silence.
    let mut p = pair("6s", "1s").await;
    let fuse = create_volume_in(&p.a.root, "pv-r-fuse", &[("dataPath", "fuse")]);
    let bind = create_volume_in(&p.a.root, "pv-r-bind", &[("dataPath", "bind")]);
    let (fa, ba) = (p.a.target(), p.a.target());
    p.node_a
        .node_publish_volume(publish_for(&fuse, &fa, "pod-f"))
        .await
        .unwrap();
    p.node_a
        .node_publish_volume(publish_for(&bind, &ba, "pod-b"))
        .await
        .unwrap();
    let bind_epoch = storage_epoch(&p.a.root, &bind).unwrap();

    p.a.kill();
    let (fb, bb) = (p.b.target(), p.b.target());
    let refused_at = Instant::now();
    let err = p
        .node_b
        .node_publish_volume(publish_for(&fuse, &fb, "pod-f2"))
        .await
        .expect_err("a crash alone proves nothing to another node");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    p.a.restart().await;
    // The successor proved its predecessor dead by its flock: the FUSE claim (whose data
    // path died with the process) is free long before the session could expire.
    p.node_b
        .node_publish_volume(publish_for(&fuse, &fb, "pod-f2"))
        .await
        .unwrap_or_else(|e| panic!("FUSE claim not released on restart: {e:?}\n{}", p.a.logs()));
    assert!(
        refused_at.elapsed() < Duration::from_secs(5),
        "took {:?}: that is expiry, not proof",
        refused_at.elapsed()
    );
    // The bind mount outlived the crash, so its claim was adopted at a new epoch,
    // written to the storage; other pods are still refused.
    let err = p
        .node_b
        .node_publish_volume(publish_for(&bind, &bb, "pod-b2"))
        .await
        .expect_err("an adopted bind claim stays held");
    assert!(err.message().contains("pod-b"), "{err:?}");
    assert_eq!(storage_epoch(&p.a.root, &bind), Some(bind_epoch + 1));
    std::fs::write(ba.join("still"), b"live").unwrap();

    // The dead FUSE target stays dead (never the bare directory), is reported, and
    // unpublishes cleanly.
    let mut node_a = NodeClient::new(p.a.channel().await);
    let err = std::fs::write(fa.join("x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    assert!(condition(&mut node_a, &fuse, &fa).await.abnormal);
    node_a
        .node_unpublish_volume(unpublish_request(&fuse, &fa))
        .await
        .unwrap();
    assert!(!fa.exists());
    // The adopted bind volume is enforced like any other: a newer epoch kills its users.
    let mut user = Command::new("sleep")
        .arg("60")
        .current_dir(&ba)
        .spawn()
        .unwrap();
    write_storage_epoch(&p.a.root, &bind, bind_epoch + 9);
    let killed = eventually(Duration::from_secs(6), || {
        user.try_wait().unwrap().is_some()
    })
    .await;
    assert!(
        killed.is_some(),
        "adopted bind volume not enforced:\n{}",
        p.a.logs()
    );
}

#[tokio::test]
async fn unpublish_with_the_store_down_succeeds_and_the_release_lands_later() {
    let mut p = pair("6s", "1s").await;
    let id = create_volume_in(&p.a.root, "pv-retry", &[("dataPath", "fuse")]);
    let (ta, tb) = (p.a.target(), p.b.target());
    p.node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .unwrap();

    p.etcd.pause();
    p.node_a
        .node_unpublish_volume(unpublish_request(&id, &ta))
        .await
        .expect("unpublish succeeds locally while the store is unreachable");
    assert!(!ta.exists());
    let err = p
        .node_b
        .node_publish_volume(publish_for(&id, &tb, "pod-2"))
        .await
        .expect_err("store unreachable");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    p.etcd.resume();

    // The queued release lands: the other node gets the volume well before node-a's
    // session (renewing again) could ever be taken over.
    let start = Instant::now();
    loop {
        match p
            .node_b
            .node_publish_volume(publish_for(&id, &tb, "pod-2"))
            .await
        {
            Ok(_) => break,
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                // Held until the release lands; UNAVAILABLE while node-b's own session
                // recovers from the outage.
                assert!(
                    matches!(e.code(), Code::FailedPrecondition | Code::Unavailable),
                    "{e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("queued release never landed: {e:?}\n{}", p.a.logs()),
        }
    }
    assert!(
        p.a.logs().contains("queued release landed"),
        "{}",
        p.a.logs()
    );
}

#[tokio::test]
async fn node_fence_in_the_store_stops_the_holder() {
    let mut p = pair("9s", "1s").await;
    let id = create_volume_in(&p.a.root, "pv-nodefence", &[("dataPath", "fuse")]);
    let (ta, tb) = (p.a.target(), p.b.target());
    p.node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .unwrap();
    std::fs::write(ta.join("before"), b"ok").unwrap();

    // What the controller's fence verb does after a confirmed power-off.
    let store = p
        .etcd
        .store(holdfast_core::store::etcd::DEFAULT_PREFIX)
        .await;
    holdfast_core::lease::fence_node(&store, "node-a", "test fence")
        .await
        .unwrap();
    p.node_b
        .node_publish_volume(publish_for(&id, &tb, "pod-2"))
        .await
        .expect("a fenced node's claim is free at once");
    // node-a learns it within a renewal interval (3 s) and stops, long before its
    // session could lapse by itself.
    let took = eventually(Duration::from_secs(4), || {
        std::fs::write(ta.join("after"), b"x")
            .err()
            .and_then(|e| e.raw_os_error())
            == Some(libc::EIO)
    })
    .await;
    assert!(took.is_some(), "fenced node kept writing:\n{}", p.a.logs());
    let cond = condition(&mut p.node_a, &id, &ta).await;
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("fenced"), "{cond:?}");
}

#[tokio::test]
async fn claim_taken_over_in_the_store_stops_the_old_holder() {
    use holdfast_core::store::LeaseStore;
    let mut p = pair("9s", "1s").await;
    let id = create_volume_in(&p.a.root, "pv-lost", &[("dataPath", "fuse")]);
    let ta = p.a.target();
    p.node_a
        .node_publish_volume(publish_for(&id, &ta, "pod-1"))
        .await
        .unwrap();
    std::fs::write(ta.join("before"), b"ok").unwrap();

    // The store now names another holder at a higher epoch (written with a
    // compare-and-swap, as a takeover would be); the storage epoch is left alone, so
    // only the store channel can tell node-a.
    let store = p
        .etcd
        .store(holdfast_core::store::etcd::DEFAULT_PREFIX)
        .await;
    let current = store.get_claim(&id).await.unwrap().expect("claim record");
    let mut taken = current.value.clone();
    taken.holder.node = "node-x".into();
    taken.holder.pod_uid = "pod-x".into();
    taken.holder.instance = "someone-else".into();
    taken.epoch += 1;
    store
        .put_claim(&taken, Some(&current.version))
        .await
        .unwrap();

    let took = eventually(Duration::from_secs(4), || {
        std::fs::write(ta.join("after"), b"x")
            .err()
            .and_then(|e| e.raw_os_error())
            == Some(libc::EIO)
    })
    .await;
    assert!(took.is_some(), "old holder kept writing:\n{}", p.a.logs());
    let cond = condition(&mut p.node_a, &id, &ta).await;
    assert!(
        cond.abnormal && cond.message.contains("claim lost") && cond.message.contains("pod-x"),
        "{cond:?}"
    );
}

#[tokio::test]
async fn a_publish_during_a_short_store_outage_waits_for_the_store_instead_of_failing() {
    // kubelet doubles its pause after each failed mount: a publish that answered
    // UNAVAILABLE at once during a few seconds' outage would leave the pod waiting far
    // longer than the outage. It keeps asking (up to 10 s) and succeeds.
    let p = pair("6s", "1s").await;
    let id = create_volume_in(&p.a.root, "pv-outage", &[("dataPath", "fuse")]);
    let ta = p.a.target();
    p.etcd.pause();
    let mut node_a = p.node_a.clone();
    let request = publish_for(&id, &ta, "pod-1");
    let publishing = tokio::spawn(async move { node_a.node_publish_volume(request).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!publishing.is_finished(), "answered during the outage");
    let resumed = Instant::now();
    p.etcd.resume();
    publishing
        .await
        .unwrap()
        .expect("the publish succeeds once the store answers again");
    println!(
        "published {:?} after the store came back",
        resumed.elapsed()
    );
    assert_eq!(mounts_at(&ta).len(), 1);
}
