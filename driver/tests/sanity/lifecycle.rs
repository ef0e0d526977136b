//! Whole volume lifecycles over the real socket, with real mounts: create → controller
//! publish → node publish → use → stats → node unpublish → controller unpublish →
//! delete, once with the target left for the plugin to create (csi-sanity's default),
//! once with the target made beforehand by the CO, and once with every step repeated;
//! each through both data paths (`fuse`, the default, and `bind`).

use std::path::Path;

use holdfast_core::csi::v1::{
    ControllerUnpublishVolumeRequest, DeleteVolumeRequest, NodeGetVolumeStatsRequest,
    NodeUnpublishVolumeRequest, Volume,
};

use crate::support::{
    assert_ok, bounded, create_request, mount_count, unique, ControllerCap, NodeCap, Sanity,
    REPEAT, TEST_VOLUME_SIZE,
};

fn node_unpublish(vol: &Volume, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into_owned(),
    }
}

/// Controller-publishes when advertised (csi-sanity skips the step otherwise).
async fn attach(s: &Sanity, vol: &Volume, node: &str) -> std::collections::HashMap<String, String> {
    if s.has_controller_cap(ControllerCap::PublishUnpublishVolume)
        .await
    {
        s.controller_publish(vol, node).await
    } else {
        Default::default()
    }
}

async fn detach_and_delete(s: &Sanity, vol: &Volume, node: &str) {
    if s.has_controller_cap(ControllerCap::PublishUnpublishVolume)
        .await
    {
        let req = ControllerUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: node.to_string(),
            ..Default::default()
        };
        assert_ok(
            "ControllerUnpublishVolume",
            s.controller().controller_unpublish_volume(req).await,
        );
    }
    let req = DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    };
    assert_ok("DeleteVolume", s.controller().delete_volume(req).await);
}

/// The target is mounted once and is a usable directory.
fn assert_published(target: &Path) {
    assert_eq!(
        mount_count(target),
        1,
        "{} should carry exactly one mount",
        target.display()
    );
    assert!(
        target.is_dir(),
        "{} is not a directory after NodePublishVolume",
        target.display()
    );
}

/// After NodeUnpublishVolume nothing is mounted at the target; a target the plugin
/// created is gone (the spec makes the plugin delete what it created there).
fn assert_unpublished(target: &Path, plugin_created_it: bool) {
    assert_eq!(
        mount_count(target),
        0,
        "{} still mounted after NodeUnpublishVolume",
        target.display()
    );
    if plugin_created_it {
        assert!(
            !target.exists(),
            "{} created by the plugin was left behind",
            target.display()
        );
    } else if target.exists() {
        let left = std::fs::read_dir(target).unwrap().count();
        assert_eq!(
            left,
            0,
            "{} holds the volume's files after unpublish (written to the mount point?)",
            target.display()
        );
    }
}

/// A single-writer volume of csi-sanity's size on the given data path (`None`: default).
async fn create_on(s: &Sanity, label: &str, data_path: Option<&str>) -> Volume {
    let mut req = create_request(&unique(label), Some(TEST_VOLUME_SIZE));
    if let Some(dp) = data_path {
        req.parameters.insert("dataPath".into(), dp.into());
    }
    s.create(req).await
}

#[tokio::test]
async fn full_lifecycle_with_a_target_the_plugin_creates() {
    bounded(lifecycle_with_fresh_target(None)).await
}

#[tokio::test]
async fn full_lifecycle_with_a_target_the_plugin_creates_bind() {
    bounded(lifecycle_with_fresh_target(Some("bind"))).await
}

#[tokio::test]
async fn full_lifecycle_with_a_target_the_co_created() {
    bounded(lifecycle_with_precreated_target(None)).await
}

#[tokio::test]
async fn full_lifecycle_with_a_target_the_co_created_bind() {
    bounded(lifecycle_with_precreated_target(Some("bind"))).await
}

#[tokio::test]
async fn full_lifecycle_with_every_call_repeated() {
    bounded(lifecycle_repeated(None)).await
}

#[tokio::test]
async fn full_lifecycle_with_every_call_repeated_bind() {
    bounded(lifecycle_repeated(Some("bind"))).await
}

/// csi-sanity's "Node Service should work", plus proof that the data lands in the
/// volume: a file written through one target is read back through another.
async fn lifecycle_with_fresh_target(data_path: Option<&str>) {
    let s = Sanity::start().await;
    let node = s.node_id().await;
    let vol = create_on(&s, "lifecycle", data_path).await;
    let ctx = attach(&s, &vol, &node).await;

    let target = s.fresh_target();
    s.node_publish(&vol, &ctx, &target).await;
    assert_published(&target);
    std::fs::write(
        target.join("hello.txt"),
        b"written through the first target",
    )
    .expect("write through the target");

    if s.has_node_cap(NodeCap::GetVolumeStats).await {
        let req = NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let stats = assert_ok(
            "NodeGetVolumeStats",
            s.node().node_get_volume_stats(req).await,
        );
        assert!(
            !stats.usage.is_empty(),
            "NodeGetVolumeStats returned no usage"
        );
        if s.has_node_cap(NodeCap::VolumeCondition).await {
            // The spec makes the condition mandatory with this capability.
            let condition = stats
                .volume_condition
                .expect("VOLUME_CONDITION advertised, none reported");
            assert!(
                !condition.abnormal,
                "a fresh volume reported abnormal: {}",
                condition.message
            );
        }
    }

    assert_ok(
        "NodeUnpublishVolume",
        s.node()
            .node_unpublish_volume(node_unpublish(&vol, &target))
            .await,
    );
    assert_unpublished(&target, true);

    let second = s.fresh_target();
    s.node_publish(&vol, &ctx, &second).await;
    assert_published(&second);
    let read =
        std::fs::read(second.join("hello.txt")).expect("file written earlier is in the volume");
    assert_eq!(read, b"written through the first target");
    assert_ok(
        "NodeUnpublishVolume",
        s.node()
            .node_unpublish_volume(node_unpublish(&vol, &second))
            .await,
    );
    assert_unpublished(&second, true);

    detach_and_delete(&s, &vol, &node).await;
}

/// Kubernetes' kubelet makes the target directory itself before NodePublishVolume.
async fn lifecycle_with_precreated_target(data_path: Option<&str>) {
    let s = Sanity::start().await;
    let node = s.node_id().await;
    let vol = create_on(&s, "precreated", data_path).await;
    let ctx = attach(&s, &vol, &node).await;

    let target = s.fresh_target();
    std::fs::create_dir(&target).unwrap();
    s.node_publish(&vol, &ctx, &target).await;
    assert_published(&target);
    std::fs::write(target.join("data"), b"kept").expect("write through the target");

    assert_ok(
        "NodeUnpublishVolume",
        s.node()
            .node_unpublish_volume(node_unpublish(&vol, &target))
            .await,
    );
    assert_unpublished(&target, false);

    detach_and_delete(&s, &vol, &node).await;
}

/// csi-sanity's "should be idempotent" cases: every call of the lifecycle repeated as a
/// CO retry would repeat it. A repeated NodePublishVolume must not stack mounts.
async fn lifecycle_repeated(data_path: Option<&str>) {
    let s = Sanity::start().await;
    let node = s.node_id().await;
    let vol = create_on(&s, "idempotent", data_path).await;
    let ctx = attach(&s, &vol, &node).await;
    for _ in 1..REPEAT {
        assert_eq!(
            attach(&s, &vol, &node).await,
            ctx,
            "retried ControllerPublishVolume changed the context"
        );
    }

    let target = s.fresh_target();
    for _ in 0..REPEAT {
        s.node_publish(&vol, &ctx, &target).await;
        assert_published(&target);
    }
    std::fs::write(target.join("f"), b"x").expect("write through the target");

    for attempt in 1..=REPEAT {
        let got = s
            .node()
            .node_unpublish_volume(node_unpublish(&vol, &target))
            .await;
        assert_ok(&format!("NodeUnpublishVolume attempt {attempt}"), got);
        assert_unpublished(&target, true);
    }
    if s.has_controller_cap(ControllerCap::PublishUnpublishVolume)
        .await
    {
        for attempt in 1..REPEAT {
            let req = ControllerUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                node_id: node.clone(),
                ..Default::default()
            };
            assert_ok(
                &format!("ControllerUnpublishVolume attempt {attempt}"),
                s.controller().controller_unpublish_volume(req).await,
            );
        }
    }
    detach_and_delete(&s, &vol, &node).await;
}

/// csi-sanity runs every case against one plugin and publishes each case's volume at the
/// same `<mountdir>/target`: once unpublished, a target path must be free for the next
/// volume, and must show that volume's data, not the previous one's.
#[tokio::test]
async fn a_target_path_is_reusable_for_another_volume_after_unpublish() {
    bounded(reuse_target(None)).await
}

#[tokio::test]
async fn a_target_path_is_reusable_for_another_volume_after_unpublish_bind() {
    bounded(reuse_target(Some("bind"))).await
}

async fn reuse_target(data_path: Option<&str>) {
    let s = Sanity::start().await;
    let node = s.node_id().await;
    let target = s.fresh_target();
    for round in 0..2 {
        let vol = create_on(&s, &format!("reuse-{round}"), data_path).await;
        let ctx = attach(&s, &vol, &node).await;
        s.node_publish(&vol, &ctx, &target).await;
        assert_published(&target);
        let earlier: Vec<_> = std::fs::read_dir(&target).unwrap().collect();
        assert!(
            earlier.is_empty(),
            "round {round}: a new volume already holds files: {earlier:?}"
        );
        std::fs::write(target.join("round"), format!("{round}")).expect("write through the target");
        let req = node_unpublish(&vol, &target);
        assert_ok(
            "NodeUnpublishVolume",
            s.node().node_unpublish_volume(req).await,
        );
        assert_unpublished(&target, true);
        detach_and_delete(&s, &vol, &node).await;
    }
}

/// csi-sanity's cleanup sends NodeUnpublishVolume for every volume a case created, all at
/// the same target. An unpublish naming a volume other than the one mounted there must
/// leave that mount (and its claim) alone, whatever code it answers with.
#[tokio::test]
async fn node_unpublish_naming_another_volume_leaves_the_mount_alone() {
    bounded(unpublish_other_volume(None)).await
}

#[tokio::test]
async fn node_unpublish_naming_another_volume_leaves_the_mount_alone_bind() {
    bounded(unpublish_other_volume(Some("bind"))).await
}

async fn unpublish_other_volume(data_path: Option<&str>) {
    let s = Sanity::start().await;
    let node = s.node_id().await;
    let mounted = create_on(&s, "mounted", data_path).await;
    let bystander = create_on(&s, "bystander", data_path).await;
    let ctx = attach(&s, &mounted, &node).await;
    let target = s.fresh_target();
    s.node_publish(&mounted, &ctx, &target).await;
    std::fs::write(target.join("owner"), b"mounted").expect("write through the target");

    let _ = s
        .node()
        .node_unpublish_volume(node_unpublish(&bystander, &target))
        .await;
    assert_published(&target);
    let read = std::fs::read(target.join("owner")).expect("the mounted volume is still usable");
    assert_eq!(read, b"mounted");

    let req = node_unpublish(&mounted, &target);
    assert_ok(
        "NodeUnpublishVolume",
        s.node().node_unpublish_volume(req).await,
    );
    assert_unpublished(&target, true);
    detach_and_delete(&s, &mounted, &node).await;
}
