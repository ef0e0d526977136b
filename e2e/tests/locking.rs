//! The lock without faults: a second pod is refused (or waits) while the first holds
//! the volume, and a clean unpublish hands it over at once. Two real node plugins in
//! their own network namespaces, one real etcd, real FUSE mounts.
//!
//! Each test prints its measured figures (run with `--nocapture` to see them).

use std::time::{Duration, Instant};

use holdfast_e2e::{Cluster, Landed, Writer};
use tonic::Code;

const WRITE_EVERY: Duration = Duration::from_millis(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_pod_refused_while_first_holds() {
    let cluster = Cluster::start(2).await;
    let volume = cluster
        .create_volume("refused", &[("onConflict", "fail")])
        .await;
    cluster.attach(&volume, 1).await.expect("attach node1");
    let target = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("first publish: {e}\n{}", cluster.log_tail(1, 40)));

    let started = Instant::now();
    let refused = cluster
        .publish(2, &volume, "pod-b")
        .await
        .expect_err("a second pod on another node got the volume while pod-a holds it");
    let refusal_took = started.elapsed();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let message = refused.message();
    for word in ["pod-a", "node1", "expire"] {
        assert!(
            message.contains(word),
            "refusal does not name {word:?}: {message}"
        );
    }
    assert!(
        !cluster.is_mounted(&cluster.target(2, "pod-b")),
        "the refused target is mounted"
    );

    // The holder is the pod, not the node: another pod on node1 is refused too.
    let same_node = cluster
        .publish(1, &volume, "pod-c")
        .await
        .expect_err("a second pod on the holder's node got the volume");
    assert_eq!(same_node.code(), Code::FailedPrecondition, "{same_node:?}");

    // The holder keeps working throughout.
    let writer = Writer::start(&target.join("log"), "a", WRITE_EVERY, 3);
    assert!(
        writer.wait_acked(10, Duration::from_secs(5)),
        "holder cannot write"
    );
    println!("refused in {refusal_took:?}: {message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_releases_and_other_node_takes_over_at_once() {
    let cluster = Cluster::start(2).await;
    let volume = cluster.create_volume("handover", &[]).await;
    cluster.attach(&volume, 1).await.expect("attach node1");
    let target1 = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.log_tail(1, 40)));
    let epoch1 = cluster.stored_epoch(&volume.id);
    let file = "log";
    let mut a = Writer::start(&target1.join(file), "a", WRITE_EVERY, 3);
    assert!(a.wait_acked(20, Duration::from_secs(5)));
    a.stop();

    // As the CO does for a pod deleted normally: unpublish, detach, attach, publish.
    cluster
        .unpublish(1, &volume, &target1)
        .await
        .expect("unpublish node1");
    let released = Instant::now();
    cluster.detach(&volume, 1).await.expect("detach node1");
    cluster.attach(&volume, 2).await.expect("attach node2");
    let target2 = cluster
        .publish(2, &volume, "pod-b")
        .await
        .unwrap_or_else(|e| panic!("publish after release: {e}\n{}", cluster.log_tail(2, 40)));
    let takeover = released.elapsed();
    let epoch2 = cluster.stored_epoch(&volume.id);

    let b = Writer::start(&target2.join(file), "b", WRITE_EVERY, 3);
    assert!(
        b.wait_acked(20, Duration::from_secs(5)),
        "new holder cannot write"
    );
    let landed = Landed::read(&cluster.data_dir(&volume.id).join(file)).unwrap();
    landed.acknowledged_present("a", &a.acked()).unwrap();
    landed.acknowledged_present("b", &b.acked()).unwrap();
    landed.no_interleave("a", "b").unwrap();
    println!(
        "takeover after unpublish: {takeover:?} (lease expiry would take {:?}); epoch on storage {epoch1:?} -> {epoch2:?}",
        cluster.timing.takeover_after()
    );
    assert!(
        takeover < cluster.timing.self_fence_after(),
        "takeover after a clean release took {takeover:?}: it waited for a lease to run out"
    );
    assert_ne!(
        epoch1, epoch2,
        "the new holder did not write a new epoch on the storage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_publish_succeeds_when_holder_releases() {
    let cluster = Cluster::start(2).await;
    let volume = cluster
        .create_volume("waiting", &[("onConflict", "wait")])
        .await;
    let target1 = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.log_tail(1, 40)));

    // A deadline shorter than the hold: the call waits it out, then fails.
    let short = Duration::from_millis(1500);
    let started = Instant::now();
    let target_short = cluster.target(2, "pod-short");
    let timed_out = cluster
        .publish_at(2, &volume, "pod-short", &target_short, Some(short))
        .await
        .expect_err("wait-mode publish succeeded while the volume was held");
    let waited = started.elapsed();
    assert!(
        waited >= short / 2,
        "wait-mode publish gave up after {waited:?}, before its {short:?} deadline: {timed_out:?}"
    );
    assert!(!cluster.is_mounted(&target_short));

    // A longer deadline: the holder unpublishes meanwhile and the waiter gets it.
    let target2 = cluster.target(2, "pod-b");
    let hold_for = Duration::from_secs(1);
    let (waiter, released_at) = tokio::join!(
        async {
            let result = cluster
                .publish_at(2, &volume, "pod-b", &target2, Some(Duration::from_secs(15)))
                .await;
            (result, Instant::now())
        },
        async {
            tokio::time::sleep(hold_for).await;
            let at = Instant::now();
            cluster
                .unpublish(1, &volume, &target1)
                .await
                .expect("unpublish node1");
            at
        }
    );
    let (result, granted_at) = waiter;
    result.unwrap_or_else(|e| panic!("waiting publish failed: {e}\n{}", cluster.log_tail(2, 40)));
    assert!(
        granted_at > released_at,
        "the waiter was granted the volume before the holder released it"
    );
    let latency = granted_at - released_at;
    println!(
        "wait mode: short deadline {short:?} answered after {waited:?} with {:?}; waiter granted {latency:?} after the release",
        timed_out.code()
    );
    assert!(
        latency < cluster.timing.self_fence_after(),
        "the waiter was granted {latency:?} after the release: it waited for a lease to run out"
    );
    let b = Writer::start(&target2.join("log"), "b", WRITE_EVERY, 3);
    assert!(
        b.wait_acked(10, Duration::from_secs(5)),
        "waiter cannot write"
    );
}
