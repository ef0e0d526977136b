//! A holder's plugin is paused (SIGSTOP) or killed (SIGKILL) mid-write: the other node
//! takes over only once the holder is provably stopped, and the holder's writer sees
//! EIO (paused, then woken) or ENOTCONN (killed) — never a write landing after the
//! takeover. The restart path proves a dead predecessor through its flock and releases
//! its claims at once.
//!
//! Each scenario runs on etcd and on the kubernetes store (a real kube-apiserver), as
//! `<scenario>::etcd` and `<scenario>::kubernetes`, with the same bounds. Each test
//! prints its measured figures (run with `--nocapture` to see them).

use std::time::{Duration, Instant};

use holdfast_e2e::errno::{ECONNABORTED, EIO, ENOTCONN};
use holdfast_e2e::{Cluster, Landed, Writer};

const WRITE_EVERY: Duration = Duration::from_millis(10);
const FILE: &str = "log";

/// The earliest a silent holder's volume may go elsewhere, counted from the moment it
/// fell silent: its last renewal may precede that moment by up to one renewal interval,
/// and an acquirer must then see the session unrenewed for D·(1+ε) + margin.
fn earliest_takeover(cluster: &Cluster) -> Duration {
    cluster.timing.takeover_after() - cluster.timing.renew_interval()
}

holdfast_e2e::on_both_stores!(paused_holder_gets_eio_and_nothing_lands, 2);

async fn paused_holder_gets_eio_and_nothing_lands(cluster: Cluster) {
    let timing = cluster.timing;
    let volume = cluster.create_volume("paused", &[]).await;
    let target1 = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.log_tail(1, 40)));
    let a = Writer::start(&target1.join(FILE), "a", WRITE_EVERY, 20);
    assert!(a.wait_acked(20, Duration::from_secs(5)));

    cluster.pause(1);
    let paused = Instant::now();
    // The Kubernetes view: node1 looks dead; its pod is rescheduled on node2.
    let (target2, _) = cluster
        .publish_until_ok(2, &volume, "pod-b", timing.takeover_after() * 3)
        .await
        .unwrap_or_else(|e| panic!("node2 never took over: {e}\n{}", cluster.log_tail(2, 40)));
    let takeover = paused.elapsed();
    // Every byte beyond this offset was written after node2 was granted the volume.
    let fence_offset = std::fs::metadata(cluster.data_dir(&volume.id).join(FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    let acked_before_resume = a.acked();
    let b = Writer::start(&target2.join(FILE), "b", WRITE_EVERY, 3);
    assert!(
        b.wait_acked(20, Duration::from_secs(5)),
        "node2 cannot write"
    );

    cluster.resume(1);
    let resumed = Instant::now();
    let (errno, at) = a
        .wait_error(Duration::from_secs(5))
        .expect("node1's writer got no error after its plugin woke past its deadline");
    let time_to_error = at.saturating_duration_since(resumed);
    // A few more attempts: each must fail too.
    std::thread::sleep(WRITE_EVERY * 10);
    let mut a = a;
    a.stop();
    let b_acked = {
        let mut b = b;
        b.stop();
        b.acked()
    };

    println!(
        "paused holder: takeover {takeover:?} after SIGSTOP (bound D(1+e)+margin = {:?}); \
         node1's writer got errno {errno} {time_to_error:?} after SIGCONT; errors {:?}",
        timing.takeover_after(),
        a.errors()
    );
    assert!(
        takeover >= earliest_takeover(&cluster),
        "node2 took over {takeover:?} after node1 stopped, before node1's session could expire"
    );
    assert_eq!(errno, EIO, "node1's queued write after the deadline");
    assert!(a.errors().iter().all(|e| *e == EIO), "{:?}", a.errors());
    assert_eq!(
        a.acked(),
        acked_before_resume,
        "node1's writer was acknowledged a write after its plugin woke past its deadline"
    );
    let landed = Landed::read(&cluster.data_dir(&volume.id).join(FILE)).unwrap();
    landed.acknowledged_present("a", &a.acked()).unwrap();
    landed.acknowledged_present("b", &b_acked).unwrap();
    landed.nothing_from_after("a", fence_offset).unwrap();
    landed.no_interleave("a", "b").unwrap();
}

holdfast_e2e::on_both_stores!(killed_plugin_leaves_writer_with_enotconn, 2);

async fn killed_plugin_leaves_writer_with_enotconn(mut cluster: Cluster) {
    let timing = cluster.timing;
    let volume = cluster.create_volume("killed", &[]).await;
    let target1 = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.log_tail(1, 40)));
    let mut a = Writer::start(&target1.join(FILE), "a", WRITE_EVERY, 5);
    assert!(a.wait_acked(20, Duration::from_secs(5)));

    cluster.kill(1);
    let killed = Instant::now();
    let (errno, at) = a
        .wait_error(Duration::from_secs(5))
        .expect("the writer got no error after the plugin serving its volume died");
    let time_to_error = at.saturating_duration_since(killed);
    a.stop();
    assert!(errno == ENOTCONN || errno == ECONNABORTED, "errno {errno}");

    // The node stays down: node2 may take over only once node1's session expired.
    let (target2, _) = cluster
        .publish_until_ok(2, &volume, "pod-b", timing.takeover_after() * 3)
        .await
        .unwrap_or_else(|e| panic!("node2 never took over: {e}\n{}", cluster.log_tail(2, 40)));
    let takeover = killed.elapsed();
    let b = Writer::start(&target2.join(FILE), "b", WRITE_EVERY, 3);
    assert!(
        b.wait_acked(10, Duration::from_secs(5)),
        "node2 cannot write"
    );
    println!(
        "killed plugin: writer errno {errno} after {time_to_error:?}; node2 took over {takeover:?} after SIGKILL (lease bound {:?})",
        timing.takeover_after()
    );
    // Node2 cannot know node1 died: it must have waited out node1's session.
    assert!(
        takeover >= earliest_takeover(&cluster),
        "node2 took over {takeover:?} after the kill, before node1's session could expire"
    );
    let landed = Landed::read(&cluster.data_dir(&volume.id).join(FILE)).unwrap();
    landed.acknowledged_present("a", &a.acked()).unwrap();
    landed.acknowledged_present("b", &b.acked()).unwrap();
    landed.no_interleave("a", "b").unwrap();
}

holdfast_e2e::on_both_stores!(
    restarted_plugin_releases_dead_predecessors_claims_at_once,
    2
);

async fn restarted_plugin_releases_dead_predecessors_claims_at_once(mut cluster: Cluster) {
    let timing = cluster.timing;
    let volume = cluster.create_volume("restarted", &[]).await;
    let target1 = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.log_tail(1, 40)));
    let mut a = Writer::start(&target1.join(FILE), "a", WRITE_EVERY, 5);
    assert!(a.wait_acked(20, Duration::from_secs(5)));

    cluster.kill(1);
    let killed = Instant::now();
    assert!(a.wait_error(Duration::from_secs(5)).is_some());
    a.stop();
    // The DaemonSet restarts the plugin: it takes the node-local flock, which proves
    // its predecessor dead, and a dead predecessor's FUSE volumes have no I/O.
    cluster.restart(1).await;
    let restarted = Instant::now();
    let (target2, _) = cluster
        .publish_until_ok(2, &volume, "pod-b", timing.takeover_after() * 3)
        .await
        .unwrap_or_else(|e| panic!("node2 never took over: {e}\n{}", cluster.log_tail(2, 40)));
    let since_kill = killed.elapsed();
    let since_restart = restarted.elapsed();
    let b = Writer::start(&target2.join(FILE), "b", WRITE_EVERY, 3);
    assert!(
        b.wait_acked(10, Duration::from_secs(5)),
        "node2 cannot write"
    );
    println!(
        "restart: node2 took over {since_restart:?} after node1's plugin restarted \
         ({since_kill:?} after the kill; lease expiry bound {:?})",
        timing.takeover_after()
    );
    assert!(
        since_kill < timing.self_fence_after(),
        "takeover took {since_kill:?} after the kill although the restarted plugin could \
         prove its predecessor dead: it waited for the lease\n{}",
        cluster.log_tail(1, 40)
    );
    let landed = Landed::read(&cluster.data_dir(&volume.id).join(FILE)).unwrap();
    landed.acknowledged_present("a", &a.acked()).unwrap();
    landed.acknowledged_present("b", &b.acked()).unwrap();
    landed.no_interleave("a", "b").unwrap();
}

holdfast_e2e::on_both_stores!(wait_mode_publish_is_granted_once_a_killed_holder_expires, 2);

async fn wait_mode_publish_is_granted_once_a_killed_holder_expires(mut cluster: Cluster) {
    let timing = cluster.timing;
    let volume = cluster
        .create_volume("wait-crash", &[("onConflict", "wait")])
        .await;
    cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.log_tail(1, 40)));
    cluster.kill(1);
    let killed = Instant::now();
    // One call, waiting within its deadline, instead of kubelet's retries.
    let target = cluster.target(2, "pod-b");
    let deadline = timing.takeover_after() * 3;
    cluster
        .publish_at(2, &volume, "pod-b", &target, Some(deadline))
        .await
        .unwrap_or_else(|e| panic!("waiting publish failed: {e}\n{}", cluster.log_tail(2, 40)));
    let granted = killed.elapsed();
    println!(
        "wait mode after a crash: one NodePublishVolume call granted {granted:?} after the kill \
         (lease bound {:?}, call deadline {deadline:?})",
        timing.takeover_after()
    );
    assert!(
        granted >= earliest_takeover(&cluster),
        "granted {granted:?} after the kill, before node1's session could expire"
    );
    assert!(cluster.is_mounted(&target));
}
