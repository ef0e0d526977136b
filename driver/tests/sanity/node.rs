//! Node service, call by call: capabilities, NodeGetInfo, required fields of
//! NodePublish / NodeUnpublish, NodeGetVolumeStats errors, and the RPCs holdfast does
//! not offer (staging, node expansion).

use std::collections::HashMap;

use holdfast_core::csi::v1::{
    CapacityRange, NodeExpandVolumeRequest, NodeGetInfoRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest,
};
use tonic::Code;

use crate::support::{
    absent_volume_id, assert_code, assert_ok, bounded, create_request, publish_request,
    single_writer, unique, NodeCap, PluginService, Sanity, TEST_EXPAND_SIZE,
};

#[tokio::test]
async fn node_capabilities_are_known_and_exclude_staging() {
    bounded(async {
        let s = Sanity::start().await;
        // `node_caps` panics on a capability without a type or of an unknown number.
        let caps = s.node_caps().await;
        assert!(
            !caps.contains(&NodeCap::StageUnstageVolume),
            "NodeStage must not be advertised: {caps:?}"
        );
    })
    .await
}

#[tokio::test]
async fn node_info_reports_a_node_id() {
    bounded(async {
        let s = Sanity::start().await;
        let info = assert_ok(
            "NodeGetInfo",
            s.node().node_get_info(NodeGetInfoRequest {}).await,
        );
        assert!(!info.node_id.is_empty(), "empty node_id");
        assert!(
            info.max_volumes_per_node >= 0,
            "negative max_volumes_per_node"
        );
        if s.plugin_services()
            .await
            .contains(&PluginService::VolumeAccessibilityConstraints)
        {
            assert!(
                info.accessible_topology.is_some(),
                "topology advertised but not reported"
            );
        }
    })
    .await
}

// ---- NodePublishVolume / NodeUnpublishVolume input checks ----------------------------

#[tokio::test]
async fn node_publish_without_volume_id_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        let target = s.fresh_target();
        let full = NodePublishVolumeRequest {
            target_path: target.to_string_lossy().into_owned(),
            volume_capability: Some(single_writer()),
            ..Default::default()
        };
        // csi-sanity sends an empty request; the other fields set prove the id check itself.
        for req in [NodePublishVolumeRequest::default(), full] {
            let got = s.node().node_publish_volume(req.clone()).await;
            assert_code(
                &format!("NodePublishVolume {req:?}"),
                got,
                Code::InvalidArgument,
            );
        }
        assert!(
            !target.exists(),
            "a rejected NodePublishVolume created the target"
        );
    })
    .await
}

#[tokio::test]
async fn node_publish_without_target_path_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        let vol = s.create(create_request(&unique("np-notarget"), None)).await;
        // csi-sanity: an id that names nothing and nothing else. Then a real volume with
        // a capability, so only the target is missing.
        let bare = NodePublishVolumeRequest {
            volume_id: absent_volume_id(),
            ..Default::default()
        };
        let full = NodePublishVolumeRequest {
            volume_id: vol.volume_id,
            volume_capability: Some(single_writer()),
            ..Default::default()
        };
        for req in [bare, full] {
            let got = s.node().node_publish_volume(req.clone()).await;
            assert_code(
                &format!("NodePublishVolume {req:?}"),
                got,
                Code::InvalidArgument,
            );
        }
    })
    .await
}

#[tokio::test]
async fn node_publish_without_capability_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        let vol = s.create(create_request(&unique("np-nocap"), None)).await;
        let target = s.fresh_target();
        // csi-sanity names a volume that does not exist; the check must come first.
        let mut bare = publish_request(&vol, &HashMap::new(), &target);
        bare.volume_id = absent_volume_id();
        bare.volume_capability = None;
        let mut full = publish_request(&vol, &HashMap::new(), &target);
        full.volume_capability = None;
        for req in [bare, full] {
            let got = s.node().node_publish_volume(req.clone()).await;
            assert_code(
                &format!("NodePublishVolume {req:?}"),
                got,
                Code::InvalidArgument,
            );
        }
        assert!(
            !target.exists(),
            "a rejected NodePublishVolume created the target"
        );
    })
    .await
}

#[tokio::test]
async fn node_publish_of_unknown_volume_is_not_found() {
    bounded(async {
        let s = Sanity::start().await;
        let target = s.fresh_target();
        let req = NodePublishVolumeRequest {
            volume_id: absent_volume_id(),
            target_path: target.to_string_lossy().into_owned(),
            volume_capability: Some(single_writer()),
            ..Default::default()
        };
        assert_code(
            "NodePublishVolume of an unknown volume",
            s.node().node_publish_volume(req).await,
            Code::NotFound,
        );
        assert!(
            !target.exists(),
            "a rejected NodePublishVolume left the target behind"
        );
    })
    .await
}

#[tokio::test]
async fn node_unpublish_without_volume_id_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        let with_target = NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: s.fresh_target().to_string_lossy().into_owned(),
        };
        for req in [NodeUnpublishVolumeRequest::default(), with_target] {
            let got = s.node().node_unpublish_volume(req.clone()).await;
            assert_code(
                &format!("NodeUnpublishVolume {req:?}"),
                got,
                Code::InvalidArgument,
            );
        }
    })
    .await
}

#[tokio::test]
async fn node_unpublish_without_target_path_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        let req = NodeUnpublishVolumeRequest {
            volume_id: absent_volume_id(),
            target_path: String::new(),
        };
        assert_code(
            "NodeUnpublishVolume with no target",
            s.node().node_unpublish_volume(req).await,
            Code::InvalidArgument,
        );
    })
    .await
}

/// csi-sanity's cleanup unpublishes every volume it created at its usual target, whether
/// or not it was ever published there; anything but OK or NOT_FOUND fails its run.
#[tokio::test]
async fn node_unpublish_of_a_never_published_volume_is_ok_or_not_found() {
    bounded(async {
        let s = Sanity::start().await;
        let vol = s.create(create_request(&unique("np-never"), None)).await;
        for volume_id in [vol.volume_id, absent_volume_id()] {
            let req = NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: s.fresh_target().to_string_lossy().into_owned(),
            };
            match s.node().node_unpublish_volume(req).await {
                Ok(_) => {}
                Err(st) if st.code() == Code::NotFound => {}
                Err(st) => panic!(
                    "NodeUnpublishVolume {volume_id} never published: {}",
                    crate::support::show(&st)
                ),
            }
        }
    })
    .await
}

// ---- Not offered: staging and node-side expansion -----------------------------------

#[tokio::test]
async fn node_stage_and_unstage_are_unimplemented() {
    bounded(async {
        let s = Sanity::start().await;
        assert!(
            !s.has_node_cap(NodeCap::StageUnstageVolume).await,
            "staging advertised"
        );
        let staging = s.fresh_target().to_string_lossy().into_owned();
        let stage = NodeStageVolumeRequest {
            volume_id: absent_volume_id(),
            staging_target_path: staging.clone(),
            volume_capability: Some(single_writer()),
            ..Default::default()
        };
        assert_code(
            "NodeStageVolume",
            s.node().node_stage_volume(stage).await,
            Code::Unimplemented,
        );
        let unstage = NodeUnstageVolumeRequest {
            volume_id: absent_volume_id(),
            staging_target_path: staging,
        };
        assert_code(
            "NodeUnstageVolume",
            s.node().node_unstage_volume(unstage).await,
            Code::Unimplemented,
        );
    })
    .await
}

#[tokio::test]
async fn node_expand_follows_its_capability() {
    bounded(async {
        let s = Sanity::start().await;
        let expand = |volume_id: String, volume_path: String| NodeExpandVolumeRequest {
            volume_id,
            volume_path,
            capacity_range: Some(CapacityRange {
                required_bytes: TEST_EXPAND_SIZE,
                limit_bytes: 0,
            }),
            volume_capability: Some(single_writer()),
            ..Default::default()
        };
        if !s.has_node_cap(NodeCap::ExpandVolume).await {
            let got = s
                .node()
                .node_expand_volume(expand(unique("v"), "/p".into()))
                .await;
            return assert_code(
                "NodeExpandVolume while not advertised",
                got,
                Code::Unimplemented,
            );
        }
        let vol = s.create(create_request(&unique("node-expand"), None)).await;
        let cases = [
            (
                String::new(),
                "some/path".to_string(),
                Code::InvalidArgument,
                "no volume id",
            ),
            (
                vol.volume_id.clone(),
                String::new(),
                Code::InvalidArgument,
                "no path",
            ),
            (
                absent_volume_id(),
                "some/path".to_string(),
                Code::NotFound,
                "unknown volume",
            ),
        ];
        for (id, path, code, what) in cases {
            let got = s.node().node_expand_volume(expand(id, path)).await;
            assert_code(&format!("NodeExpandVolume with {what}"), got, code);
        }
    })
    .await
}
