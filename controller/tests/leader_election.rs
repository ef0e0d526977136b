//! Leader election between two real controller processes on a real kube-apiserver
//! (Lease 2 s, renew deadline 1.5 s, retry 200 ms): exactly one leads; after `kill -9`
//! of the leader the other leads within the lease duration; a leader stopped (SIGSTOP)
//! past its lease is replaced, and when it wakes it acts on nothing — even while the
//! API server cannot answer its renewal — because its acting window closed on
//! CLOCK_BOOTTIME while it slept. Figures are printed (`--nocapture`).

mod common;

use std::time::{Duration, Instant};

use common::plane::{wait_for, Plane, Replica};
use rustix::process::Signal;

/// Which of the two leads, once exactly one does by both the Lease and the gauges.
async fn the_leader(plane: &Plane, a: &Replica, b: &Replica, within: Duration) -> String {
    let (leader, _) = wait_for(within, "one replica leads", || async {
        let holder = plane.leader_holder().await?;
        let (ga, gb) = (a.leader_gauge().await?, b.leader_gauge().await?);
        match (holder.as_str(), ga, gb) {
            (h, 1.0, 0.0) if h == a.name => Some(h.to_string()),
            (h, 0.0, 1.0) if h == b.name => Some(h.to_string()),
            _ => None,
        }
    })
    .await;
    leader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_leads_and_the_other_takes_over_after_kill_9() {
    let Some(plane) = Plane::start("leader_election_kill").await else {
        return;
    };
    let a = plane.replica("replica-a").await;
    let b = plane.replica("replica-b").await;
    let leader = the_leader(&plane, &a, &b, Duration::from_secs(10)).await;

    // For 3 s (1.5 lease durations, 15 retry periods), exactly one gauge reads 1 and
    // the Lease names that replica.
    let steady = Instant::now();
    let mut samples = 0;
    while steady.elapsed() < Duration::from_secs(3) {
        let (ga, gb) = (
            a.leader_gauge().await.unwrap(),
            b.leader_gauge().await.unwrap(),
        );
        assert_eq!(ga + gb, 1.0, "leader gauges {ga} and {gb}");
        assert_eq!(
            plane.leader_holder().await.as_deref(),
            Some(leader.as_str())
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (mut dead, alive) = if leader == a.name { (a, b) } else { (b, a) };
    dead.process.kill();
    let killed = Instant::now();
    let (_, took) = wait_for(
        Duration::from_secs(10),
        "the other replica leads",
        || async {
            (alive.leader_gauge().await? == 1.0
                && plane.leader_holder().await.as_deref() == Some(alive.name.as_str()))
            .then_some(())
        },
    )
    .await;
    println!(
        "exactly one leader over {samples} samples; kill -9 of {} -> {} leads after {:.0} ms \
         (lease 2000 ms, retry 200 ms)",
        dead.name,
        alive.name,
        took.as_secs_f64() * 1000.0
    );
    // It may take over only after seeing the record unchanged for the lease duration,
    // and does so at the first retry after that.
    assert!(took >= Duration::from_millis(1500), "{took:?}: too early");
    assert!(
        took <= Duration::from_millis(2000 + 2 * 200 + 500),
        "{took:?}: not within the lease duration and a retry"
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_woken_from_sigstop_past_its_lease_steps_down_without_acting() {
    let Some(plane) = Plane::start("leader_election_sigstop").await else {
        return;
    };
    plane.create_node("worker").await;
    let a = plane.replica("replica-a").await;
    let b = plane.replica("replica-b").await;
    let leader = the_leader(&plane, &a, &b, Duration::from_secs(10)).await;
    let (old, new) = if leader == a.name { (a, b) } else { (b, a) };

    // The leader stops (a long GC pause, a frozen VM): the other takes over.
    old.process.signal(Signal::STOP);
    let stopped = Instant::now();
    let (_, took) = wait_for(
        Duration::from_secs(10),
        "takeover from a stopped leader",
        || async {
            (new.leader_gauge().await? == 1.0
                && plane.leader_holder().await.as_deref() == Some(new.name.as_str()))
            .then_some(())
        },
    )
    .await;
    println!(
        "SIGSTOP of {} -> {} leads after {:.0} ms",
        old.name,
        new.name,
        took.as_secs_f64() * 1000.0
    );

    // Freeze the new leader too, then give the old one something to act on: the
    // out-of-service taint on a Node. The taint reaches the old leader's Node watch as
    // soon as it wakes; its renewal cannot even be answered, because the API server's
    // etcd is paused. Only its own clock can tell it that it no longer leads.
    new.process.signal(Signal::STOP);
    plane.set_taint("worker", true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    plane.plane.etcd.pause();
    let asleep_for = stopped.elapsed();
    old.process.signal(Signal::CONT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fence = plane.store.get_fence("worker").await.unwrap();
    let woke_log = old.log();
    plane.plane.etcd.resume();
    assert!(
        fence.is_none(),
        "the old leader, asleep for {asleep_for:?} (> its 2 s lease), acted on waking: \
         {fence:?}\n{woke_log}"
    );
    assert!(
        woke_log.contains("stopped leading"),
        "the woken leader did not step down:\n{woke_log}"
    );

    // Everyone awake: whichever replica leads now fences the tainted node.
    new.process.signal(Signal::CONT);
    let resumed = Instant::now();
    let fence = loop {
        if let Some(fence) = plane.store.get_fence("worker").await.unwrap() {
            break fence;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(15),
            "the tainted node was not fenced once both replicas ran again\n--- {}:\n{}\n--- {}:\n{}",
            old.name,
            old.log(),
            new.name,
            new.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = resumed.elapsed();
    assert!(
        fence.value.reason.starts_with("out-of-service taint"),
        "{fence:?}"
    );
    println!(
        "woken leader stepped down without acting; the node was fenced {:.0} ms after \
         both replicas were running again, by the elected one ({:?})",
        took.as_secs_f64() * 1000.0,
        plane.leader_holder().await
    );
}
