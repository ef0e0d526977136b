//! A holder cut off from the lease store while its storage stays reachable: an admin's
//! fence frees its volume at once, the new holder writes a higher epoch onto the
//! storage, and the partitioned holder stops on seeing it — within one renewal
//! interval, long before its own session deadline (fencing a node that still runs
//! leaves that one interval in which both may write: the fence is meant for nodes known
//! to be down, and the epoch bounds the damage when the premise is wrong). A bind-mounted
//! holder, which needs no plugin to write, has its writers killed at its own deadline,
//! before the volume can move. And with `fenceAction: freeze`, a
//! fenced volume's writes block instead of failing, until unmount or the plugin's end.
//!
//! The epoch scenario runs on etcd and on the kubernetes store (a real kube-apiserver),
//! as `epoch_on_storage_stops_partitioned_holder::{etcd,kubernetes}`. Each test prints
//! its measured figures (run with `--nocapture` to see them).

use std::time::{Duration, Instant};

use holdfast_e2e::errno::EIO;
use holdfast_e2e::{Cluster, Landed, Writer};

const WRITE_EVERY: Duration = Duration::from_millis(10);
const FILE: &str = "log";

fn file_len(cluster: &Cluster, volume_id: &str) -> u64 {
    std::fs::metadata(cluster.data_dir(volume_id).join(FILE))
        .map(|m| m.len())
        .unwrap_or(0)
}

holdfast_e2e::on_both_stores!(epoch_on_storage_stops_partitioned_holder, 2);

async fn epoch_on_storage_stops_partitioned_holder(cluster: Cluster) {
    let timing = cluster.timing;
    let volume = cluster.create_volume("epoch", &[]).await;
    let target1 = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.log_tail(1, 40)));
    let epoch_before = cluster.stored_epoch(&volume.id);
    let mut a = Writer::start(&target1.join(FILE), "a", WRITE_EVERY, 20);
    assert!(a.wait_acked(20, Duration::from_secs(5)));

    cluster.partition(1);
    let partitioned = Instant::now();
    let fence_output = cluster
        .fence(1)
        .unwrap_or_else(|e| panic!("holdfast-controller fence: {e}"));
    let (target2, _) = cluster
        .publish_until_ok(2, &volume, "pod-b", Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "node2 not granted a fenced node's volume: {e}\n{}",
                cluster.log_tail(2, 40)
            )
        });
    let granted = Instant::now();
    let takeover = granted - partitioned;
    let epoch_offset = file_len(&cluster, &volume.id);
    let epoch_after = cluster.stored_epoch(&volume.id);

    let (errno, at) = a
        .wait_error(timing.duration * 2)
        .unwrap_or_else(|| panic!("node1's writer never stopped\n{}", cluster.log_tail(1, 40)));
    let stop_offset = file_len(&cluster, &volume.id);
    let time_to_eio = at.saturating_duration_since(granted);
    let b = Writer::start(&target2.join(FILE), "b", WRITE_EVERY, 3);
    assert!(
        b.wait_acked(10, Duration::from_secs(5)),
        "node2 cannot write"
    );
    std::thread::sleep(WRITE_EVERY * 10);
    a.stop();
    let landed = Landed::read(&cluster.data_dir(&volume.id).join(FILE)).unwrap();
    let in_window = landed.of("a").filter(|r| r.offset >= epoch_offset).count();
    println!(
        "epoch on storage: fence said {:?}; node2 granted {takeover:?} after the partition; \
         epoch {epoch_before:?} -> {epoch_after:?}; node1's writer got errno {errno} \
         {time_to_eio:?} after the grant (renewal interval {:?}, node1's own deadline at most {:?} \
         after the partition); {in_window} record(s) of node1 landed between the epoch change and its stop",
        fence_output.trim(),
        timing.renew_interval(),
        timing.self_fence_after()
    );
    assert_ne!(epoch_before, epoch_after, "no new epoch on the storage");
    assert_eq!(errno, EIO);
    // Caught by the epoch, not by node1's own deadline running out.
    assert!(
        at - partitioned < timing.self_fence_after(),
        "node1 stopped only {:?} after the partition: its deadline, not the epoch, stopped it",
        at - partitioned
    );
    assert!(
        time_to_eio <= timing.renew_interval() + Duration::from_millis(500),
        "node1 stopped {time_to_eio:?} after the new epoch, more than one renewal interval"
    );
    landed.acknowledged_present("a", &a.acked()).unwrap();
    landed.acknowledged_present("b", &b.acked()).unwrap();
    // Nothing of node1 after it saw the epoch. Between the new epoch and that moment
    // node1's writes still land: fencing a running node leaves a window of up to one
    // renewal interval (stated in `holdfast-controller fence --help`), bounded above.
    landed.nothing_from_after("a", stop_offset).unwrap();
    landed.no_interleave("a", "b").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_blocks_instead_of_failing() {
    let mut cluster = Cluster::start(1).await;
    let timing = cluster.timing;
    let volume = cluster
        .create_volume("frozen", &[("fenceAction", "freeze")])
        .await;
    let target = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.log_tail(1, 40)));
    let mut a = Writer::start(&target.join(FILE), "a", WRITE_EVERY, 5);
    assert!(a.wait_acked(20, Duration::from_secs(5)));

    // Cut off from the store, the plugin cannot prove its session past D - margin.
    cluster.partition(1);
    let partitioned = Instant::now();
    std::thread::sleep(timing.duration + Duration::from_secs(1));
    let stuck_since = a.stuck_since();
    let freeze_offset = file_len(&cluster, &volume.id);
    let acked_at_freeze = a.acked();
    assert!(
        a.errors().is_empty(),
        "a frozen volume returned errors {:?}",
        a.errors()
    );
    let stuck_since = stuck_since.unwrap_or_else(|| {
        panic!(
            "no write is blocked {:?} after the partition (acked {})\n{}",
            partitioned.elapsed(),
            acked_at_freeze.len(),
            cluster.log_tail(1, 40)
        )
    });
    let blocked_for = stuck_since.elapsed();
    let frozen_after = stuck_since.saturating_duration_since(partitioned);
    assert!(
        blocked_for >= Duration::from_millis(500),
        "blocked only {blocked_for:?}"
    );

    // Unpublish (lazy unmount) must release the blocked writer without its write landing;
    // failing that, the plugin's end does.
    let unpublish = cluster.unpublish(1, &volume, &target).await;
    let released_by = if a.wait_error(Duration::from_secs(3)).is_some() {
        "unpublish"
    } else {
        cluster.kill(1);
        assert!(
            a.wait_error(Duration::from_secs(3)).is_some(),
            "the blocked write survived unpublish and the plugin's death"
        );
        "plugin exit"
    };
    a.stop();
    println!(
        "freeze: writes blocked {frozen_after:?} after the partition (self-fence bound {:?}); \
         blocked {blocked_for:?} with no error; released by {released_by} (unpublish: {unpublish:?}) \
         with errors {:?}",
        timing.self_fence_after(),
        a.errors()
    );
    assert_eq!(
        a.acked(),
        acked_at_freeze,
        "a write was acknowledged after the freeze"
    );
    let landed = Landed::read(&cluster.data_dir(&volume.id).join(FILE)).unwrap();
    landed.acknowledged_present("a", &a.acked()).unwrap();
    landed.nothing_from_after("a", freeze_offset).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_mode_partitioned_holder_is_killed_before_takeover() {
    use std::os::unix::process::ExitStatusExt;

    let cluster = Cluster::start(2).await;
    let timing = cluster.timing;
    let volume = cluster
        .create_volume("bound", &[("dataPath", "bind")])
        .await;
    let target1 = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.log_tail(1, 40)));
    let fs_type = &holdfast_e2e::mounts::mounts_at(&target1)[0].fs_type;
    assert!(
        !fs_type.starts_with("fuse"),
        "bind volume served as {fs_type}"
    );
    let mut a = Writer::start(&target1.join(FILE), "a", WRITE_EVERY, 20);
    assert!(a.wait_acked(20, Duration::from_secs(5)));

    // A bind mount needs no plugin to write: only killing the writer stops it, and
    // that must happen at node1's own deadline, before anyone may take over.
    cluster.partition(1);
    let partitioned = Instant::now();
    let (target2, _) = cluster
        .publish_until_ok(2, &volume, "pod-b", timing.takeover_after() * 3)
        .await
        .unwrap_or_else(|e| panic!("node2 never took over: {e}\n{}", cluster.log_tail(2, 40)));
    let granted = Instant::now();
    let alive_at_grant = a.running();
    let grant_offset = file_len(&cluster, &volume.id);
    let (status, _) = a.wait_exit(Duration::from_millis(100)).unwrap_or_else(|| {
        panic!(
            "node1's writer still runs after node2 was granted the volume\n{}",
            cluster.log_tail(1, 40)
        )
    });
    let b = Writer::start(&target2.join(FILE), "b", WRITE_EVERY, 3);
    assert!(
        b.wait_acked(10, Duration::from_secs(5)),
        "node2 cannot write"
    );
    let last_a = a.events().last().map(|e| e.at).unwrap_or(partitioned);
    println!(
        "bind mode: node1's writer ended by {status:?} (last report {:?} after the partition), \
         node2 granted {:?} after the partition (self-fence bound {:?}, takeover bound {:?})",
        last_a - partitioned,
        granted - partitioned,
        timing.self_fence_after(),
        timing.takeover_after()
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "writer ended by {status:?}"
    );
    assert!(
        !alive_at_grant,
        "node1's writer was alive when node2 was granted the volume"
    );
    assert!(
        last_a < granted,
        "node1's writer reported after node2's grant"
    );
    let landed = Landed::read(&cluster.data_dir(&volume.id).join(FILE)).unwrap();
    landed.acknowledged_present("a", &a.acked()).unwrap();
    landed.acknowledged_present("b", &b.acked()).unwrap();
    landed.nothing_from_after("a", grant_offset).unwrap();
    landed.no_interleave("a", "b").unwrap();
}
