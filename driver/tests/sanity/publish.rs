//! ControllerPublishVolume / ControllerUnpublishVolume: required fields, unknown volume
//! and node, the read-only conflict, and idempotent repeats.

use holdfast_core::csi::v1::{
    ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest, DeleteVolumeRequest,
    NodeGetInfoRequest,
};
use tonic::Code;

use crate::support::{
    absent_volume_id, assert_code, assert_ok, bounded, create_request, single_writer, unique,
    ControllerCap, Sanity, REPEAT, TEST_VOLUME_SIZE,
};

fn publish(volume_id: &str, node_id: &str) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume_id.to_string(),
        node_id: node_id.to_string(),
        volume_capability: Some(single_writer()),
        ..Default::default()
    }
}

fn unpublish(volume_id: &str, node_id: &str) -> ControllerUnpublishVolumeRequest {
    ControllerUnpublishVolumeRequest {
        volume_id: volume_id.to_string(),
        node_id: node_id.to_string(),
        ..Default::default()
    }
}

/// Starts a plugin; `None` when it does not advertise controller publish (the RPCs must
/// then be UNIMPLEMENTED, which this checks).
async fn start() -> Option<Sanity> {
    let s = Sanity::start().await;
    if s.has_controller_cap(ControllerCap::PublishUnpublishVolume)
        .await
    {
        return Some(s);
    }
    let got = s
        .controller()
        .controller_publish_volume(publish("v", "n"))
        .await;
    assert_code(
        "ControllerPublishVolume while not advertised",
        got,
        Code::Unimplemented,
    );
    None
}

#[tokio::test]
async fn controller_publish_without_volume_id_is_invalid_argument() {
    bounded(async {
        let Some(s) = start().await else { return };
        let node = s.node_id().await;
        // csi-sanity sends an empty request; the other fields set prove the id check itself.
        for req in [
            ControllerPublishVolumeRequest::default(),
            publish("", &node),
        ] {
            let got = s.controller().controller_publish_volume(req.clone()).await;
            assert_code(
                &format!("ControllerPublishVolume {req:?}"),
                got,
                Code::InvalidArgument,
            );
        }
    })
    .await
}

#[tokio::test]
async fn controller_publish_without_node_id_is_invalid_argument() {
    bounded(async {
        let Some(s) = start().await else { return };
        let vol = s.create(create_request(&unique("pub-nonode"), None)).await;
        // csi-sanity: only an id that names nothing. Then a real volume and capability.
        let bare = ControllerPublishVolumeRequest {
            volume_id: absent_volume_id(),
            ..Default::default()
        };
        for req in [bare, publish(&vol.volume_id, "")] {
            let got = s.controller().controller_publish_volume(req.clone()).await;
            assert_code(
                &format!("ControllerPublishVolume {req:?}"),
                got,
                Code::InvalidArgument,
            );
        }
    })
    .await
}

#[tokio::test]
async fn controller_publish_without_capability_is_invalid_argument() {
    bounded(async {
        let Some(s) = start().await else { return };
        let vol = s.create(create_request(&unique("pub-nocap"), None)).await;
        let node = s.node_id().await;
        // csi-sanity names a volume and a node that do not exist: the check comes first.
        let mut bare = publish(&absent_volume_id(), &unique("fake-node-id"));
        bare.volume_capability = None;
        let mut full = publish(&vol.volume_id, &node);
        full.volume_capability = None;
        for req in [bare, full] {
            let got = s.controller().controller_publish_volume(req.clone()).await;
            assert_code(
                &format!("ControllerPublishVolume {req:?}"),
                got,
                Code::InvalidArgument,
            );
        }
    })
    .await
}

#[tokio::test]
async fn controller_publish_of_unknown_volume_is_not_found() {
    bounded(async {
        let Some(s) = start().await else { return };
        let node = s.node_id().await;
        // Against the real node, so the answer can only be about the volume.
        let got = s
            .controller()
            .controller_publish_volume(publish(&absent_volume_id(), &node))
            .await;
        assert_code(
            "ControllerPublishVolume of an unknown volume",
            got,
            Code::NotFound,
        );
        // csi-sanity's own variant: neither the volume nor the node exists.
        let got = s
            .controller()
            .controller_publish_volume(publish(&absent_volume_id(), &unique("fake-node-id")))
            .await;
        assert_code(
            "ControllerPublishVolume of an unknown volume to an unknown node",
            got,
            Code::NotFound,
        );
    })
    .await
}

#[tokio::test]
async fn controller_publish_to_unknown_node_is_not_found() {
    bounded(async {
        let Some(s) = start().await else { return };
        let vol = s
            .create(create_request(&unique("pub-wrong-node"), None))
            .await;
        let got = s
            .controller()
            .controller_publish_volume(publish(&vol.volume_id, &unique("fake-node-id")))
            .await;
        assert_code(
            "ControllerPublishVolume to a node that does not exist",
            got,
            Code::NotFound,
        );
    })
    .await
}

#[tokio::test]
async fn controller_publish_with_other_readonly_flag_is_already_exists() {
    bounded(async {
        let Some(s) = start().await else { return };
        if !s.has_controller_cap(ControllerCap::PublishReadonly).await {
            return;
        }
        let vol = s.create(create_request(&unique("pub-ro"), None)).await;
        let node = s.node_id().await;
        let mut req = publish(&vol.volume_id, &node);
        assert_ok(
            "ControllerPublishVolume",
            s.controller().controller_publish_volume(req.clone()).await,
        );
        req.readonly = true;
        let got = s.controller().controller_publish_volume(req).await;
        assert_code(
            "ControllerPublishVolume again, read-only this time",
            got,
            Code::AlreadyExists,
        );
    })
    .await
}

/// csi-sanity runs this only with `--csi.testnodevolumeattachlimit`; it matters only when
/// the node reports a limit at all.
#[tokio::test]
async fn controller_publish_beyond_the_node_attach_limit_fails() {
    bounded(async {
        let Some(s) = start().await else { return };
        let info = assert_ok(
            "NodeGetInfo",
            s.node().node_get_info(NodeGetInfoRequest {}).await,
        );
        if info.max_volumes_per_node <= 0 {
            return;
        }
        for i in 0..info.max_volumes_per_node {
            let vol = s
                .create(create_request(&unique(&format!("limit-{i}")), None))
                .await;
            s.controller_publish(&vol, &info.node_id).await;
        }
        let extra = s.create(create_request(&unique("limit-extra"), None)).await;
        let got = s
            .controller()
            .controller_publish_volume(publish(&extra.volume_id, &info.node_id))
            .await;
        assert!(
            got.is_err(),
            "published one volume more than max_volumes_per_node"
        );
    })
    .await
}

#[tokio::test]
async fn controller_unpublish_without_volume_id_is_invalid_argument() {
    bounded(async {
        let Some(s) = start().await else { return };
        let node = s.node_id().await;
        for req in [
            ControllerUnpublishVolumeRequest::default(),
            unpublish("", &node),
        ] {
            let got = s
                .controller()
                .controller_unpublish_volume(req.clone())
                .await;
            assert_code(
                &format!("ControllerUnpublishVolume {req:?}"),
                got,
                Code::InvalidArgument,
            );
        }
    })
    .await
}

#[tokio::test]
async fn controller_unpublish_is_idempotent() {
    bounded(async {
        let Some(s) = start().await else { return };
        let vol = s.create(create_request(&unique("unpub-twice"), None)).await;
        let node = s.node_id().await;
        // Never published: already in the state the caller asks for.
        let got = s
            .controller()
            .controller_unpublish_volume(unpublish(&vol.volume_id, &node))
            .await;
        assert_ok("ControllerUnpublishVolume of a volume never published", got);
        s.controller_publish(&vol, &node).await;
        for attempt in 1..=2 {
            let got = s
                .controller()
                .controller_unpublish_volume(unpublish(&vol.volume_id, &node))
                .await;
            assert_ok(&format!("ControllerUnpublishVolume attempt {attempt}"), got);
        }
    })
    .await
}

/// Create, publish to this node `REPEAT` times, unpublish, delete: the controller-only
/// lifecycle, with every publish after the first a retry of the same request.
#[tokio::test]
async fn controller_lifecycle_tolerates_repeated_publish() {
    bounded(async {
        let Some(s) = start().await else { return };
        let node = s.node_id().await;
        let vol = s
            .create(create_request(
                &unique("ctl-lifecycle"),
                Some(TEST_VOLUME_SIZE),
            ))
            .await;
        let first = s.controller_publish(&vol, &node).await;
        for _ in 1..REPEAT {
            let again = s.controller_publish(&vol, &node).await;
            assert_eq!(
                again, first,
                "a retried ControllerPublishVolume changed the publish context"
            );
        }
        let got = s
            .controller()
            .controller_unpublish_volume(unpublish(&vol.volume_id, &node))
            .await;
        assert_ok("ControllerUnpublishVolume", got);
        let del = DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        };
        assert_ok("DeleteVolume", s.controller().delete_volume(del).await);
    })
    .await
}
