//! NodeGetVolumeStats: required fields, unknown volume, and a path where the volume is
//! not published.

use holdfast_core::csi::v1::{NodeGetVolumeStatsRequest, NodeUnpublishVolumeRequest};
use tonic::Code;

use crate::support::{
    absent_volume_id, assert_code, assert_ok, bounded, create_request, unique, NodeCap, Sanity,
};

/// Starts a plugin; `None` when it does not advertise volume stats (the RPC must then be
/// UNIMPLEMENTED, which this checks).
async fn start_with_stats() -> Option<Sanity> {
    let s = Sanity::start().await;
    if s.has_node_cap(NodeCap::GetVolumeStats).await {
        return Some(s);
    }
    let req = NodeGetVolumeStatsRequest {
        volume_id: "v".into(),
        volume_path: "/p".into(),
        ..Default::default()
    };
    assert_code(
        "NodeGetVolumeStats while not advertised",
        s.node().node_get_volume_stats(req).await,
        Code::Unimplemented,
    );
    None
}

#[tokio::test]
async fn volume_stats_without_volume_id_is_invalid_argument() {
    bounded(async {
        let Some(s) = start_with_stats().await else {
            return;
        };
        let req = NodeGetVolumeStatsRequest {
            volume_path: "some/path".into(),
            ..Default::default()
        };
        assert_code(
            "NodeGetVolumeStats with no id",
            s.node().node_get_volume_stats(req).await,
            Code::InvalidArgument,
        );
    })
    .await
}

#[tokio::test]
async fn volume_stats_without_path_is_invalid_argument() {
    bounded(async {
        let Some(s) = start_with_stats().await else {
            return;
        };
        let req = NodeGetVolumeStatsRequest {
            volume_id: absent_volume_id(),
            ..Default::default()
        };
        assert_code(
            "NodeGetVolumeStats with no path",
            s.node().node_get_volume_stats(req).await,
            Code::InvalidArgument,
        );
    })
    .await
}

#[tokio::test]
async fn volume_stats_of_unknown_volume_is_not_found() {
    bounded(async {
        let Some(s) = start_with_stats().await else {
            return;
        };
        let req = NodeGetVolumeStatsRequest {
            volume_id: absent_volume_id(),
            volume_path: "some/path".into(),
            ..Default::default()
        };
        assert_code(
            "NodeGetVolumeStats of an unknown volume",
            s.node().node_get_volume_stats(req).await,
            Code::NotFound,
        );
    })
    .await
}

#[tokio::test]
async fn volume_stats_at_a_path_where_the_volume_is_not_published_is_not_found() {
    bounded(async {
        let Some(s) = start_with_stats().await else {
            return;
        };
        let node = s.node_id().await;
        let vol = s
            .create(create_request(&unique("stats-wrong-path"), None))
            .await;
        let ctx = s.controller_publish(&vol, &node).await;
        let target = s.fresh_target();
        s.node_publish(&vol, &ctx, &target).await;
        // An absolute path that exists but holds nothing of this volume; then what
        // csi-sanity asks about, the relative "some/path".
        let elsewhere = s.fresh_target();
        std::fs::create_dir(&elsewhere).unwrap();
        for path in [
            elsewhere.to_string_lossy().into_owned(),
            "some/path".to_string(),
        ] {
            let req = NodeGetVolumeStatsRequest {
                volume_id: vol.volume_id.clone(),
                volume_path: path.clone(),
                ..Default::default()
            };
            assert_code(
                &format!("NodeGetVolumeStats at {path}"),
                s.node().node_get_volume_stats(req).await,
                Code::NotFound,
            );
        }
        let req = NodeUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: target.to_string_lossy().into_owned(),
        };
        assert_ok(
            "NodeUnpublishVolume",
            s.node().node_unpublish_volume(req).await,
        );
    })
    .await
}
