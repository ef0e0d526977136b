//! Bad and unusual requests to the Node service of the real `holdfast-driver
//! --standalone` binary: every missing field is INVALID_ARGUMENT naming it, unknown
//! volumes are NOT_FOUND, target paths that could escape (relative, `..`, `.`, NUL,
//! symlink, file) are refused without creating or mounting anything; plus NodeGetInfo,
//! NodeGetCapabilities and the RPCs that are not implemented.

mod common;

use common::{create_volume, fixture, mounts_at, publish_request, unpublish_request};
use holdfast_core::csi::v1::node_service_capability::rpc::Type as NodeCap;
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume};
use holdfast_core::csi::v1::{
    node_service_capability, NodeExpandVolumeRequest, NodeGetCapabilitiesRequest,
    NodeGetInfoRequest, NodeGetVolumeStatsRequest, NodePublishVolumeRequest,
    NodeStageVolumeRequest, NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest,
};
use tonic::Code;

#[tokio::test]
async fn missing_fields_are_invalid_argument_naming_the_field() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-fields", "bind").await;
    let target = f.plugin.target();
    let good = publish_request(&id, &target, false);

    let mut cases: Vec<(&str, NodePublishVolumeRequest)> = Vec::new();
    cases.push((
        "volume_id",
        NodePublishVolumeRequest {
            volume_id: String::new(),
            ..good.clone()
        },
    ));
    cases.push((
        "target_path",
        NodePublishVolumeRequest {
            target_path: String::new(),
            ..good.clone()
        },
    ));
    cases.push((
        "volume_capability",
        NodePublishVolumeRequest {
            volume_capability: None,
            ..good.clone()
        },
    ));
    let mut no_type = good.clone();
    no_type.volume_capability.as_mut().unwrap().access_type = None;
    cases.push(("volume_capability.access_type", no_type));
    let mut no_mode = good.clone();
    no_mode.volume_capability.as_mut().unwrap().access_mode = None;
    cases.push(("volume_capability.access_mode", no_mode));
    let mut block = good.clone();
    block.volume_capability.as_mut().unwrap().access_type =
        Some(AccessType::Block(BlockVolume::default()));
    cases.push(("volume_capability.access_type", block));
    let mut multi_writer = good.clone();
    multi_writer.volume_capability.as_mut().unwrap().access_mode = Some(AccessMode {
        mode: Mode::MultiNodeMultiWriter as i32,
    });
    cases.push(("volume_capability.access_mode", multi_writer));
    cases.push((
        "staging_target_path",
        NodePublishVolumeRequest {
            staging_target_path: "/staging".into(),
            ..good.clone()
        },
    ));
    for (field, request) in cases {
        let err = f.node.node_publish_volume(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }
    assert!(!target.exists(), "refused requests create nothing");

    for (field, request) in [
        ("volume_id", unpublish_request("", &target)),
        (
            "target_path",
            NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: String::new(),
            },
        ),
    ] {
        let err = f.node.node_unpublish_volume(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }
    for (field, request) in [
        (
            "volume_id",
            NodeGetVolumeStatsRequest {
                volume_id: String::new(),
                volume_path: "/x".into(),
                ..Default::default()
            },
        ),
        (
            "volume_path",
            NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: String::new(),
                ..Default::default()
            },
        ),
    ] {
        let err = f.node.node_get_volume_stats(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }
}

#[tokio::test]
async fn unknown_volume_is_not_found() {
    let mut f = fixture().await;
    let target = f.plugin.target();
    for id in [
        "hf-00000000000000000000000000000000",
        "no-such-volume",
        "../../etc",
    ] {
        let err = f
            .node
            .node_publish_volume(publish_request(id, &target, false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{id}: {err:?}");
    }
    assert!(mounts_at(&target).is_empty());
}

#[tokio::test]
async fn target_path_escapes_are_refused() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-escape", "bind").await;
    let target = f.plugin.target();
    let parent = target.parent().unwrap().to_str().unwrap().to_string();
    let escapes = [
        "relative/target".to_string(),
        format!("{parent}/../escaped"),
        format!("{parent}/./mount"),
        format!("{parent}/mo\0unt"),
    ];
    for path in &escapes {
        let mut request = publish_request(&id, &target, false);
        request.target_path = path.clone();
        let err = f.node.node_publish_volume(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path:?}: {err:?}");
        assert!(err.message().contains("target_path"), "{err:?}");
        let err = f
            .node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: path.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path:?}: {err:?}");
    }
    let escaped = target.parent().unwrap().parent().unwrap().join("escaped");
    assert!(!escaped.exists(), "nothing was created outside the parent");
}

#[tokio::test]
async fn node_info_capabilities_and_unimplemented_rpcs() {
    let mut f = fixture().await;
    let info = f
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, common::NODE_ID);
    assert_eq!(info.max_volumes_per_node, 0);
    assert!(info.accessible_topology.is_none());

    let caps: Vec<i32> = f
        .node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| match c.r#type {
            Some(node_service_capability::Type::Rpc(rpc)) => Some(rpc.r#type),
            _ => None,
        })
        .collect();
    assert!(caps.contains(&(NodeCap::GetVolumeStats as i32)));
    assert!(caps.contains(&(NodeCap::VolumeCondition as i32)));
    assert!(!caps.contains(&(NodeCap::StageUnstageVolume as i32)));
    assert!(!caps.contains(&(NodeCap::ExpandVolume as i32)));

    let code = f
        .node
        .node_stage_volume(NodeStageVolumeRequest::default())
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, Code::Unimplemented);
    let code = f
        .node
        .node_unstage_volume(NodeUnstageVolumeRequest::default())
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, Code::Unimplemented);
    let code = f
        .node
        .node_expand_volume(NodeExpandVolumeRequest::default())
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, Code::Unimplemented);
}

#[tokio::test]
async fn symlink_or_file_target_is_refused() {
    let mut f = fixture().await;
    let id = create_volume(&f.channel, "pv-symlink", "bind").await;
    let elsewhere = f.plugin.tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let link = f.plugin.target();
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let file = f.plugin.target();
    std::fs::write(&file, b"not a dir").unwrap();

    for target in [&link, &file] {
        let err = f
            .node
            .node_publish_volume(publish_request(&id, target, false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{target:?}: {err:?}");
    }
    // mount(2) would follow the link: nothing may end up mounted at its destination.
    assert!(mounts_at(&elsewhere.canonicalize().unwrap()).is_empty());
}

#[tokio::test]
async fn cluster_mode_serves_identity_and_node_but_not_controller() {
    use holdfast_core::csi::v1::controller_client::ControllerClient;
    use holdfast_core::csi::v1::identity_client::IdentityClient;
    use holdfast_core::csi::v1::plugin_capability::service::Type as Service;
    use holdfast_core::csi::v1::{
        plugin_capability, ControllerGetCapabilitiesRequest, GetPluginCapabilitiesRequest,
    };

    let plugin = common::Plugin::start_node_only().await;
    let channel = plugin.channel().await;
    let info = holdfast_core::csi::v1::node_client::NodeClient::new(channel.clone())
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("the Node service is served")
        .into_inner();
    assert_eq!(info.node_id, common::NODE_ID);
    // Every instance of the plugin reports the same capabilities, controller included.
    let caps = IdentityClient::new(channel.clone())
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert!(caps.iter().any(|c| matches!(
        &c.r#type,
        Some(plugin_capability::Type::Service(s)) if s.r#type == Service::ControllerService as i32
    )));
    let err = ControllerClient::new(channel)
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}
