//! The Node service of the real `holdfast-driver --standalone` binary, over its real unix
//! socket, with real kernel bind mounts: publish, readonly, idempotency, unpublish,
//! stats, restart and SIGTERM. Request validation is in `node_requests.rs`.
//!
//! Mount checks use the harness's own reading of `/proc/self/mountinfo`, so the
//! driver's mount-table code is not trusted to check itself.

mod common;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use common::{
    create_volume, fixture, mount_capability, mounts_at, publish_request, unpublish_request,
};
use holdfast_core::csi::v1::node_client::NodeClient;
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::{volume_usage, NodeGetVolumeStatsRequest, NodePublishVolumeRequest};
use tonic::Code;

#[tokio::test]
async fn publish_bind_mounts_the_volume_data_dir() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-publish", "bind").await;
    let target = f.plugin.target();
    assert!(
        !target.exists(),
        "the plugin, not the CO, creates the target"
    );

    f.node
        .node_publish_volume(publish_request(&id, &target, false))
        .await
        .expect("NodePublishVolume");

    let mounts = mounts_at(&target);
    assert_eq!(
        mounts.len(),
        1,
        "exactly one mount at the target: {mounts:?}"
    );
    let backing = f.plugin.data_dir(&id);
    assert!(
        mounts[0].root.ends_with(&format!("/volumes/{id}/data")),
        "the mount shows the volume's data dir: {mounts:?}"
    );
    assert!(!mounts[0].is_read_only());
    std::fs::write(target.join("through-target"), b"written by the pod").unwrap();
    assert_eq!(
        std::fs::read(backing.join("through-target")).unwrap(),
        b"written by the pod"
    );
    std::fs::write(backing.join("from-backend"), b"b").unwrap();
    assert_eq!(std::fs::read(target.join("from-backend")).unwrap(), b"b");
}

#[tokio::test]
async fn readonly_publish_rejects_writes() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-ro", "bind").await;
    std::fs::write(f.plugin.data_dir(&id).join("existing"), b"keep").unwrap();
    let target = f.plugin.target();

    f.node
        .node_publish_volume(publish_request(&id, &target, true))
        .await
        .expect("readonly NodePublishVolume");

    let mounts = mounts_at(&target);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert!(mounts[0].is_read_only(), "{mounts:?}");
    assert_eq!(std::fs::read(target.join("existing")).unwrap(), b"keep");
    let err = std::fs::write(target.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = std::fs::remove_file(target.join("existing")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
}

#[tokio::test]
async fn publish_is_idempotent_and_incompatible_republish_is_already_exists() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-idem", "bind").await;
    let other = create_volume(&f.channel, "pv-other", "bind").await;
    let target = f.plugin.target();

    for _ in 0..3 {
        f.node
            .node_publish_volume(publish_request(&id, &target, false))
            .await
            .expect("repeated identical NodePublishVolume");
    }
    assert_eq!(
        mounts_at(&target).len(),
        1,
        "a repeat must not stack mounts"
    );

    let err = f
        .node
        .node_publish_volume(publish_request(&id, &target, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = f
        .node
        .node_publish_volume(publish_request(&other, &target, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(
        mounts_at(&target).len(),
        1,
        "refusals leave the mount alone"
    );
}

#[tokio::test]
async fn unpublish_removes_mount_and_target_and_is_idempotent() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-unpublish", "bind").await;
    let target = f.plugin.target();
    f.node
        .node_publish_volume(publish_request(&id, &target, false))
        .await
        .unwrap();
    std::fs::write(target.join("kept"), b"data").unwrap();

    f.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .expect("NodeUnpublishVolume");
    assert!(mounts_at(&target).is_empty());
    assert!(!target.exists(), "the target directory is removed");
    assert_eq!(
        std::fs::read(f.plugin.data_dir(&id).join("kept")).unwrap(),
        b"data",
        "unpublish never touches the volume's data"
    );

    f.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .expect("NodeUnpublishVolume of a missing target is OK");
}

#[tokio::test]
async fn busy_bind_mount_is_not_detached() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-busy", "bind").await;
    let target = f.plugin.target();
    f.node
        .node_publish_volume(publish_request(&id, &target, false))
        .await
        .unwrap();
    // An open file stands for a process of the old pod that still uses the volume.
    let open = std::fs::File::create(target.join("open")).unwrap();

    let err = f
        .node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        mounts_at(&target).len(),
        1,
        "a busy bind mount stays mounted"
    );

    drop(open);
    f.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .expect("unpublish once nothing uses the volume");
    assert!(mounts_at(&target).is_empty());
}

#[tokio::test]
async fn single_node_single_writer_allows_one_target() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-snsw", "bind").await;
    let (first, second) = (f.plugin.target(), f.plugin.target());
    let request = |target: &Path| NodePublishVolumeRequest {
        volume_capability: Some(mount_capability(Mode::SingleNodeSingleWriter)),
        ..publish_request(&id, target, false)
    };
    f.node.node_publish_volume(request(&first)).await.unwrap();
    let err = f
        .node
        .node_publish_volume(request(&second))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(mounts_at(&second).is_empty());
    assert!(
        !second.exists(),
        "a refused publish leaves no target behind"
    );
    // SINGLE_NODE_WRITER (not single-writer) may be published at a second target.
    f.node
        .node_publish_volume(publish_request(&id, &second, false))
        .await
        .unwrap();
}

#[tokio::test]
async fn stats_report_bytes_and_inodes_of_published_targets_only() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-stats", "bind").await;
    let other = create_volume(&f.channel, "pv-stats-other", "bind").await;
    let target = f.plugin.target();
    f.node
        .node_publish_volume(publish_request(&id, &target, false))
        .await
        .unwrap();

    let stats = f
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .expect("NodeGetVolumeStats")
        .into_inner();
    let by_unit = |unit: volume_usage::Unit| {
        stats
            .usage
            .iter()
            .find(|u| u.unit == unit as i32)
            .unwrap_or_else(|| panic!("{unit:?} usage missing: {stats:?}"))
    };
    let backing = rustix::fs::statvfs(f.plugin.data_dir(&id)).unwrap();
    let bytes = by_unit(volume_usage::Unit::Bytes);
    assert_eq!(bytes.total as u64, backing.f_blocks * backing.f_frsize);
    assert!(
        bytes.available > 0 && bytes.available <= bytes.total,
        "{bytes:?}"
    );
    assert!(bytes.used > 0 && bytes.used <= bytes.total, "{bytes:?}");
    let inodes = by_unit(volume_usage::Unit::Inodes);
    assert_eq!(inodes.total as u64, backing.f_files);
    assert!(inodes.used > 0 && inodes.used <= inodes.total, "{inodes:?}");
    let condition = stats.volume_condition.expect("volume_condition");
    assert!(!condition.abnormal);
    assert_eq!(condition.message, "ok");

    for (volume, path) in [
        (other.as_str(), target.clone()),
        (id.as_str(), f.plugin.target()),
        (id.as_str(), target.parent().unwrap().to_path_buf()),
        (id.as_str(), PathBuf::from("relative/path")),
    ] {
        let err = f
            .node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: volume.into(),
                volume_path: path.to_str().unwrap().into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{volume} at {path:?}: {err:?}");
    }
}

#[tokio::test]
async fn restart_rebuilds_the_published_table_from_the_mount_table() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-restart", "bind").await;
    let (rw_target, ro_target) = (f.plugin.target(), f.plugin.target());
    f.node
        .node_publish_volume(publish_request(&id, &rw_target, false))
        .await
        .unwrap();
    f.node
        .node_publish_volume(publish_request(&id, &ro_target, true))
        .await
        .unwrap();

    f.plugin.restart().await; // SIGKILL, then a new process
    assert_eq!(mounts_at(&rw_target).len(), 1, "mounts survive the plugin");
    let mut node = NodeClient::new(f.plugin.channel().await);
    let stats = node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: rw_target.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .expect("stats of a target published before the restart");
    assert!(!stats.into_inner().usage.is_empty());
    // The recovered table knows the readonly-ness: the same request is idempotent,
    // a conflicting one is refused.
    node.node_publish_volume(publish_request(&id, &ro_target, true))
        .await
        .expect("idempotent republish after restart");
    let err = node
        .node_publish_volume(publish_request(&id, &ro_target, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    for target in [&rw_target, &ro_target] {
        node.node_unpublish_volume(unpublish_request(&id, target))
            .await
            .expect("unpublish after restart");
        assert!(mounts_at(target).is_empty());
    }
}

#[tokio::test]
async fn sigterm_stops_gracefully_removes_the_socket_and_leaves_mounts() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-sigterm", "bind").await;
    let target = f.plugin.target();
    f.node
        .node_publish_volume(publish_request(&id, &target, false))
        .await
        .unwrap();

    let status = f.plugin.stop_sigterm().await;
    assert!(
        status.success(),
        "graceful exit: {status}\n{}",
        f.plugin.logs()
    );
    assert_eq!(
        std::fs::symlink_metadata(&f.plugin.socket)
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound,
        "the socket file is removed"
    );
    assert_eq!(
        mounts_at(&target).len(),
        1,
        "kubelet's mounts stay in place"
    );
}

/// Without per-volume serialisation two calls can both find a target unmounted and
/// stack two bind mounts. The race is timing-dependent, so it is run in several rounds;
/// with the lock removed this test fails in most runs, with it never.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_of_one_target_make_one_mount() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-race", "bind").await;
    for round in 0..5 {
        let targets: Vec<PathBuf> = (0..6).map(|_| f.plugin.target()).collect();
        let mut calls = Vec::new();
        for target in &targets {
            for _ in 0..24 {
                // One connection per call, so the server really runs them side by side.
                let channel = f.plugin.channel().await;
                let request = publish_request(&id, target, false);
                calls.push(tokio::spawn(async move {
                    NodeClient::new(channel).node_publish_volume(request).await
                }));
            }
        }
        for call in calls {
            call.await
                .unwrap()
                .expect("every concurrent identical publish succeeds");
        }
        for target in &targets {
            assert_eq!(mounts_at(target).len(), 1, "round {round}: {target:?}");
            f.node
                .node_unpublish_volume(unpublish_request(&id, target))
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn unpublish_naming_another_volume_leaves_the_mount_alone() {
    let mut f = fixture().await;
    let mounted = create_volume(&f.channel, "pv-mounted", "bind").await;
    let bystander = create_volume(&f.channel, "pv-bystander", "bind").await;
    let target = f.plugin.target();
    f.node
        .node_publish_volume(publish_request(&mounted, &target, false))
        .await
        .unwrap();

    let err = f
        .node
        .node_unpublish_volume(unpublish_request(&bystander, &target))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(mounts_at(&target).len(), 1);
    // Also after a restart, when only the mount table tells which volume it is.
    f.plugin.restart().await;
    let mut node = NodeClient::new(f.plugin.channel().await);
    let err = node
        .node_unpublish_volume(unpublish_request(&bystander, &target))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(mounts_at(&target).len(), 1);
}

#[tokio::test]
async fn reader_only_access_modes_mount_read_only() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-reader", "bind").await;
    for mode in [Mode::SingleNodeReaderOnly, Mode::MultiNodeReaderOnly] {
        let target = f.plugin.target();
        let request = NodePublishVolumeRequest {
            volume_capability: Some(mount_capability(mode)),
            ..publish_request(&id, &target, false)
        };
        f.node.node_publish_volume(request).await.unwrap();
        let mounts = mounts_at(&target);
        assert!(mounts[0].is_read_only(), "{mode:?}: {mounts:?}");
        let err = std::fs::write(target.join("w"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{mode:?}");
    }
}
