//! The harness itself: plugins in their own namespaces reach etcd until partitioned,
//! a FUSE publish shows the shared backing directory, the writer's acknowledged records
//! land intact, and pause / resume / restart do what they say.

use std::time::Duration;

use holdfast_e2e::{Cluster, Landed, Writer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_runs_publishes_writes_and_partitions() {
    let mut cluster = Cluster::start(2).await;

    // Each plugin is in its own namespace, not the host's.
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    for k in 1..=2 {
        let pid = cluster.node(k).plugin.pid().unwrap();
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        assert_ne!(ns, host_ns, "node{k} runs in the host's network namespace");
    }

    // Partition cuts exactly one node off the lease store; heal restores it.
    cluster.partition(1);
    assert!(cluster
        .node(2)
        .ns
        .can_connect(cluster.store_addr_from(2), Duration::from_secs(1)));
    cluster.heal(1);

    let volume = cluster.create_volume("harness", &[]).await;
    cluster.attach(&volume, 1).await.expect("attach to node1");
    let target = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish: {e}\n{}", cluster.log_tail(1, 30)));
    assert!(cluster.is_mounted(&target));
    let fs_type = &holdfast_e2e::mounts::mounts_at(&target)[0].fs_type;
    assert!(
        fs_type.starts_with("fuse"),
        "default data path is FUSE, got {fs_type}"
    );

    let writer = Writer::start(&target.join("log"), "n1", Duration::from_millis(5), 3);
    assert!(
        writer.wait_acked(20, Duration::from_secs(10)),
        "writer made no progress"
    );

    // Paused plugin: the writer's next write waits in the kernel; resumed, it goes on.
    cluster.pause(1);
    std::thread::sleep(Duration::from_millis(300));
    let stuck = writer.stuck_since().is_some();
    let during = writer.acked().len();
    cluster.resume(1);
    assert!(stuck, "a write went through while the plugin was stopped");
    assert!(writer.wait_acked(during + 5, Duration::from_secs(5)));

    // SIGKILL: the FUSE connection dies with the plugin.
    cluster.kill(1);
    let (errno, _) = writer
        .wait_error(Duration::from_secs(5))
        .expect("no error after the plugin died");
    assert!(
        errno == holdfast_e2e::errno::ENOTCONN || errno == holdfast_e2e::errno::ECONNABORTED,
        "errno {errno}"
    );
    let acked = writer.acked();
    let landed = Landed::read(&cluster.data_dir(&volume.id).join("log")).unwrap();
    landed.acknowledged_present("n1", &acked).unwrap();
    println!(
        "harness: {} records acknowledged, {} landed, errno after SIGKILL {errno}",
        acked.len(),
        landed.records.len()
    );
    cluster.restart(1).await;
}
