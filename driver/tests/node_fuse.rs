//! NodePublishVolume over the FUSE data path (the default), through the real
//! `holdfast-driver --standalone` binary: the target is served by the plugin process,
//! and its I/O stops when that process dies — and stays stopped (the mount is never
//! replaced by the bare target directory behind the pod's back).

mod common;

use std::path::Path;

use common::{create_volume, mounts_at, publish_request, unpublish_request, Plugin};
use holdfast_core::csi::v1::node_client::NodeClient;
use holdfast_core::csi::v1::{volume_usage, NodeGetVolumeStatsRequest};
use tonic::Code;

const FUSE: &str = "fuse.holdfast";

fn assert_dead(target: &Path) {
    let err = std::fs::write(target.join("after-death"), b"x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOTCONN),
        "a dead FUSE target must refuse I/O: {err}"
    );
}

#[tokio::test]
async fn fuse_publish_serves_the_volume_through_the_plugin() {
    let plugin = Plugin::start_standalone().await;
    let channel = plugin.channel().await;
    let mut node = NodeClient::new(channel.clone());
    let id = create_volume(&channel, "pv-fuse", "fuse").await;
    let target = plugin.target();

    node.node_publish_volume(publish_request(&id, &target, false))
        .await
        .expect("NodePublishVolume (fuse)");
    let mounts = mounts_at(&target);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert_eq!(mounts[0].fs_type, FUSE);
    std::fs::write(target.join("through-fuse"), b"served").unwrap();
    assert_eq!(
        std::fs::read(plugin.data_dir(&id).join("through-fuse")).unwrap(),
        b"served"
    );

    // Idempotent; a readonly republish of the same target is incompatible.
    node.node_publish_volume(publish_request(&id, &target, false))
        .await
        .expect("repeat");
    assert_eq!(mounts_at(&target).len(), 1);
    let err = node
        .node_publish_volume(publish_request(&id, &target, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .expect("stats of a FUSE target")
        .into_inner();
    assert!(stats
        .usage
        .iter()
        .any(|u| u.unit == volume_usage::Unit::Bytes as i32 && u.total > 0));

    node.node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .expect("unpublish");
    assert!(mounts_at(&target).is_empty());
    assert!(!target.exists());
}

#[tokio::test]
async fn fuse_readonly_publish_rejects_writes() {
    let plugin = Plugin::start_standalone().await;
    let channel = plugin.channel().await;
    let mut node = NodeClient::new(channel.clone());
    let id = create_volume(&channel, "pv-fuse-ro", "fuse").await;
    std::fs::write(plugin.data_dir(&id).join("existing"), b"keep").unwrap();
    let target = plugin.target();

    node.node_publish_volume(publish_request(&id, &target, true))
        .await
        .expect("readonly NodePublishVolume (fuse)");
    let mounts = mounts_at(&target);
    assert!(mounts[0].is_read_only(), "{mounts:?}");
    assert_eq!(std::fs::read(target.join("existing")).unwrap(), b"keep");
    let err = std::fs::write(target.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
}

#[tokio::test]
async fn fuse_io_stops_when_the_plugin_dies_and_restart_cleans_up() {
    let mut plugin = Plugin::start_standalone().await;
    let channel = plugin.channel().await;
    let id = create_volume(&channel, "pv-fuse-kill", "fuse").await;
    let (target, second) = (plugin.target(), plugin.target());
    let mut node = NodeClient::new(channel);
    for t in [&target, &second] {
        node.node_publish_volume(publish_request(&id, t, false))
            .await
            .unwrap();
    }
    std::fs::write(target.join("before"), b"1").unwrap();

    plugin.restart().await; // SIGKILL, then a new process
    assert_eq!(mounts_at(&target).len(), 1, "the dead mount stays");
    assert_dead(&target);
    assert!(
        !plugin.data_dir(&id).join("after-death").exists(),
        "nothing reached the volume after the plugin died"
    );

    let mut node = NodeClient::new(plugin.channel().await);
    // The restarted plugin knows which volume the dead target showed (from its record):
    // stats report it abnormal, and an unpublish naming another volume is refused.
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .expect("stats of a dead FUSE target")
        .into_inner();
    let condition = stats.volume_condition.expect("volume_condition");
    assert!(condition.abnormal, "{condition:?}");
    let other = create_volume(&plugin.channel().await, "pv-fuse-other", "fuse").await;
    let err = node
        .node_unpublish_volume(unpublish_request(&other, &target))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Unpublish of a dead FUSE target removes it.
    node.node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .expect("unpublish of a dead FUSE target");
    assert!(mounts_at(&target).is_empty());
    assert!(!target.exists());
    // Publishing again at a target with a dead mount replaces it with a live one.
    node.node_publish_volume(publish_request(&id, &second, false))
        .await
        .expect("republish over a dead FUSE mount");
    assert_eq!(mounts_at(&second).len(), 1, "replaced, not stacked");
    assert_eq!(std::fs::read(second.join("before")).unwrap(), b"1");
}

#[tokio::test]
async fn sigterm_leaves_fuse_targets_mounted_and_dead() {
    let mut plugin = Plugin::start_standalone().await;
    let channel = plugin.channel().await;
    let id = create_volume(&channel, "pv-fuse-term", "fuse").await;
    let target = plugin.target();
    NodeClient::new(channel)
        .node_publish_volume(publish_request(&id, &target, false))
        .await
        .unwrap();

    let status = plugin.stop_sigterm().await;
    assert!(status.success(), "{status}\n{}", plugin.logs());
    // Unmounting on exit would let the pod write into the bare target directory on
    // the node's disk; the mount must stay, failing every operation.
    assert_eq!(
        mounts_at(&target).len(),
        1,
        "the FUSE mount is left in place"
    );
    assert_dead(&target);
}

#[tokio::test]
async fn fuse_unpublish_naming_another_volume_leaves_the_mount_alone() {
    let plugin = Plugin::start_standalone().await;
    let channel = plugin.channel().await;
    let mut node = NodeClient::new(channel.clone());
    let mounted = create_volume(&channel, "pv-fuse-mounted", "fuse").await;
    let bystander = create_volume(&channel, "pv-fuse-bystander", "fuse").await;
    let target = plugin.target();
    node.node_publish_volume(publish_request(&mounted, &target, false))
        .await
        .unwrap();

    let err = node
        .node_unpublish_volume(unpublish_request(&bystander, &target))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(mounts_at(&target).len(), 1);
    std::fs::write(target.join("still-served"), b"yes").expect("the volume is still served");
}

/// A volume served without passthrough has nothing to do with the kernel fence, so its
/// publish says nothing about it, even on a node where the fence was tried before and
/// cannot run here (its pin directory is then left behind, empty). With passthrough
/// asked for and no fence, one line says that volumes are served through the daemon.
#[tokio::test]
async fn the_kernel_fence_is_mentioned_only_where_passthrough_is_asked_for() {
    use holdfast_driver::datapath::kernel_fence::KernelFence;
    // What an earlier attempt leaves on this node, whatever its outcome.
    let fence_runs = KernelFence::open(&KernelFence::default_pin_dir()).is_ok();

    for (args, passthrough) in [(&[][..], false), (&["--fuse-passthrough"][..], true)] {
        let plugin = Plugin::start_standalone_with(args).await;
        let channel = plugin.channel().await;
        let mut node = NodeClient::new(channel.clone());
        for n in 0..2 {
            let id = create_volume(&channel, &format!("pv-fence-{n}"), "fuse").await;
            let target = plugin.target().with_file_name(format!("mount-{n}"));
            node.node_publish_volume(publish_request(&id, &target, false))
                .await
                .expect("NodePublishVolume (fuse)");
            std::fs::write(target.join("file"), b"served").unwrap();
            node.node_unpublish_volume(unpublish_request(&id, &target))
                .await
                .expect("unpublish");
        }
        let logs = plugin.logs();
        let mentions = logs.lines().filter(|l| l.contains("kernel fence")).count();
        match (passthrough, fence_runs) {
            (false, _) => assert_eq!(mentions, 0, "passthrough off:\n{logs}"),
            (true, false) => assert_eq!(
                logs.lines()
                    .filter(|l| l.contains("kernel fence unavailable")
                        && l.contains("served through the daemon"))
                    .count(),
                1,
                "no fence here: one line says so\n{logs}"
            ),
            (true, true) => assert!(logs.contains("kernel fence loaded"), "{logs}"),
        }
    }
}
