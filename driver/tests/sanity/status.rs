//! Capabilities csi-sanity has no cases for but holdfast advertises, checked against
//! the MUSTs the CSI spec attaches to them: LIST_VOLUMES_PUBLISHED_NODES, GET_VOLUME and
//! SINGLE_NODE_MULTI_WRITER.

use holdfast_core::csi::v1::{
    volume_capability::access_mode::Mode, ControllerGetVolumeRequest,
    ControllerUnpublishVolumeRequest, ListVolumesRequest, ValidateVolumeCapabilitiesRequest,
};
use tonic::Code;

use crate::support::{
    absent_volume_id, assert_code, assert_ok, bounded, capability, create_request, unique,
    ControllerCap, Sanity,
};

/// A CO that sees a volume without this node concludes it is not attached and may act
/// on that (Kubernetes re-attaches, or worse, attaches elsewhere).
#[tokio::test]
async fn list_volumes_names_the_node_a_volume_is_published_to() {
    bounded(async {
        let s = Sanity::start().await;
        let caps = s.controller_caps().await;
        if !caps.contains(&ControllerCap::ListVolumesPublishedNodes) {
            return;
        }
        let node = s.node_id().await;
        let vol = s
            .create(create_request(&unique("published-nodes"), None))
            .await;
        s.controller_publish(&vol, &node).await;
        let listed = assert_ok(
            "ListVolumes",
            s.controller()
                .list_volumes(ListVolumesRequest::default())
                .await,
        );
        let entry = listed
            .entries
            .into_iter()
            .find(|e| {
                e.volume
                    .as_ref()
                    .is_some_and(|v| v.volume_id == vol.volume_id)
            })
            .expect("the published volume is listed");
        let nodes = entry
            .status
            .map(|st| st.published_node_ids)
            .unwrap_or_default();
        assert_eq!(
            nodes,
            vec![node],
            "published_node_ids of a volume published to one node"
        );
    })
    .await
}

#[tokio::test]
async fn get_volume_checks_its_input_and_reports_the_volume() {
    bounded(async {
        let s = Sanity::start().await;
        let caps = s.controller_caps().await;
        let get = |volume_id: String| ControllerGetVolumeRequest { volume_id };
        if !caps.contains(&ControllerCap::GetVolume) {
            let got = s
                .controller()
                .controller_get_volume(get(absent_volume_id()))
                .await;
            return assert_code(
                "ControllerGetVolume while not advertised",
                got,
                Code::Unimplemented,
            );
        }
        let got = s
            .controller()
            .controller_get_volume(get(String::new()))
            .await;
        assert_code("ControllerGetVolume with no id", got, Code::InvalidArgument);
        let got = s
            .controller()
            .controller_get_volume(get(absent_volume_id()))
            .await;
        assert_code(
            "ControllerGetVolume of an unknown volume",
            got,
            Code::NotFound,
        );

        let node = s.node_id().await;
        let vol = s.create(create_request(&unique("get-volume"), None)).await;
        s.controller_publish(&vol, &node).await;
        let resp = assert_ok(
            "ControllerGetVolume",
            s.controller()
                .controller_get_volume(get(vol.volume_id.clone()))
                .await,
        );
        let got = resp
            .volume
            .expect("ControllerGetVolume: volume is REQUIRED");
        assert_eq!(got.volume_id, vol.volume_id);
        assert_eq!(
            got.capacity_bytes, vol.capacity_bytes,
            "capacity differs from CreateVolume's"
        );
        let status = resp
            .status
            .expect("ControllerGetVolume: status is REQUIRED");
        if caps.contains(&ControllerCap::PublishUnpublishVolume) {
            assert_eq!(
                status.published_node_ids,
                vec![node.clone()],
                "published_node_ids"
            );
        }

        let unpublish = ControllerUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: node,
            ..Default::default()
        };
        let got = s.controller().controller_unpublish_volume(unpublish).await;
        assert_ok("ControllerUnpublishVolume", got);
        let resp = assert_ok(
            "ControllerGetVolume after unpublish",
            s.controller()
                .controller_get_volume(get(vol.volume_id.clone()))
                .await,
        );
        assert!(
            resp.status.is_some(),
            "ControllerGetVolume: status is REQUIRED"
        );
    })
    .await
}

/// SINGLE_NODE_MULTI_WRITER promises the single-node access modes (one writer pod, or
/// several pods of one node); a plugin advertising it must accept at least one of them.
#[tokio::test]
async fn single_node_access_modes_follow_their_capability() {
    bounded(async {
        let s = Sanity::start().await;
        if !s
            .has_controller_cap(ControllerCap::SingleNodeMultiWriter)
            .await
        {
            return;
        }
        let mut accepted = Vec::new();
        for mode in [Mode::SingleNodeSingleWriter, Mode::SingleNodeMultiWriter] {
            let mut req = create_request(&unique("single-node-mode"), None);
            req.volume_capabilities = vec![capability(mode)];
            let Ok(created) = s.controller().create_volume(req).await else {
                continue;
            };
            let vol = created
                .into_inner()
                .volume
                .expect("CreateVolume without a volume");
            let validate = ValidateVolumeCapabilitiesRequest {
                volume_id: vol.volume_id,
                volume_capabilities: vec![capability(mode)],
                ..Default::default()
            };
            let resp = assert_ok(
                "ValidateVolumeCapabilities",
                s.controller().validate_volume_capabilities(validate).await,
            );
            assert!(
                resp.confirmed.is_some(),
                "{mode:?}: created but not confirmed: {:?}",
                resp.message
            );
            accepted.push(mode);
        }
        assert!(
            !accepted.is_empty(),
            "SINGLE_NODE_MULTI_WRITER advertised, neither mode accepted"
        );
    })
    .await
}
