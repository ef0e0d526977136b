//! CreateVolume, DeleteVolume, ValidateVolumeCapabilities and expansion against the
//! real controller binary over its unix socket.

mod common;

use common::*;
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::*;
use tonic::Code;

#[tokio::test]
async fn create_validates_every_field() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;

    let mut r = create_request("");
    assert_eq!(
        code(c.create_volume(r.clone()).await),
        Code::InvalidArgument,
        "empty name"
    );
    r.name = "n".repeat(129);
    assert_eq!(
        code(c.create_volume(r).await),
        Code::InvalidArgument,
        "long name"
    );
    let mut r = create_request("a\0b");
    assert_eq!(
        code(c.create_volume(r.clone()).await),
        Code::InvalidArgument,
        "NUL in name"
    );

    r = create_request("v");
    r.volume_capabilities.clear();
    assert_eq!(
        code(c.create_volume(r).await),
        Code::InvalidArgument,
        "no capabilities"
    );
    for cap in [
        block_cap(Mode::SingleNodeWriter),
        mount_cap(Mode::MultiNodeMultiWriter),
        mount_cap(Mode::MultiNodeSingleWriter),
        mount_cap(Mode::Unknown),
        VolumeCapability {
            access_type: None,
            ..mount_cap(Mode::SingleNodeWriter)
        },
        VolumeCapability {
            access_mode: None,
            ..mount_cap(Mode::SingleNodeWriter)
        },
    ] {
        let mut r = create_request("v");
        r.volume_capabilities.push(cap.clone());
        assert_eq!(
            code(c.create_volume(r).await),
            Code::InvalidArgument,
            "{cap:?}"
        );
    }

    for (required, limit) in [(10, 5), (-1, 0), (0, -1)] {
        let mut r = create_request("v");
        r.capacity_range = Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        });
        assert_eq!(
            code(c.create_volume(r).await),
            Code::InvalidArgument,
            "{required}..{limit}"
        );
    }
    let mut r = create_request("v");
    r.capacity_range = Some(CapacityRange {
        required_bytes: i64::MAX,
        limit_bytes: 0,
    });
    assert_eq!(
        code(c.create_volume(r).await),
        Code::OutOfRange,
        "larger than the filesystem"
    );

    let mut r = create_request("v");
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "s".into(),
            },
        )),
    });
    assert_eq!(
        code(c.create_volume(r).await),
        Code::InvalidArgument,
        "content source"
    );

    let mut r = create_request("v");
    r.parameters = params(&[
        ("exclusive", "true"),
        ("dataPth", "fuse"),
        ("color", "blue"),
    ]);
    let status = c.create_volume(r).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("color, dataPth"),
        "{}",
        status.message()
    );

    let mut r = create_request("v");
    r.parameters = params(&[("onConflict", "retry")]);
    let status = c.create_volume(r).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("onConflict"),
        "{}",
        status.message()
    );

    // Nothing was created by any refused request.
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
}

#[tokio::test]
async fn create_is_idempotent_and_refuses_conflicts() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    let mut r = create_request("pvc-1");
    r.parameters = params(&[
        ("dataPath", "bind"),
        ("csi.storage.k8s.io/pvc/name", "data-db-0"),
        ("csi.storage.k8s.io/pvc/namespace", "default"),
    ]);
    let first = c
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(first.volume_id.starts_with("hf-"));
    assert_eq!(first.capacity_bytes, 1 << 20);
    assert!(first.accessible_topology.is_empty());
    assert_eq!(
        first.volume_context,
        params(&[
            ("exclusive", "true"),
            ("onConflict", "fail"),
            ("dataPath", "bind"),
            ("fenceAction", "error")
        ])
    );
    assert!(fx
        .root()
        .join("volumes")
        .join(&first.volume_id)
        .join("data")
        .is_dir());

    let again = c
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, first);

    let mut bigger = r.clone();
    bigger.capacity_range = Some(CapacityRange {
        required_bytes: 2 << 20,
        limit_bytes: 0,
    });
    assert_eq!(code(c.create_volume(bigger).await), Code::AlreadyExists);
    let mut other_cap = r.clone();
    other_cap.volume_capabilities = vec![mount_cap(Mode::MultiNodeReaderOnly)];
    assert_eq!(code(c.create_volume(other_cap).await), Code::AlreadyExists);
    let mut other_params = r.clone();
    other_params
        .parameters
        .insert("dataPath".into(), "fuse".into());
    let status = c.create_volume(other_params).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("pvc-1"), "{}", status.message());

    // A range the existing volume satisfies is a retry, not a conflict.
    let mut range = r.clone();
    range.capacity_range = Some(CapacityRange {
        required_bytes: 1,
        limit_bytes: 1 << 21,
    });
    assert_eq!(
        c.create_volume(range)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap(),
        first
    );
}

#[tokio::test]
async fn concurrent_identical_creates_agree() {
    let fx = Fixture::start().await;
    let client = fx.client().await;
    let calls = (0..8).map(|_| {
        let mut c = client.clone();
        tokio::spawn(async move { c.create_volume(create_request("pvc-race")).await })
    });
    let mut ids = Vec::new();
    for call in calls {
        ids.push(
            call.await
                .unwrap()
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id,
        );
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    let listed = client
        .clone()
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
}

#[tokio::test]
async fn delete_is_idempotent_and_refuses_published_volumes() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    let req = |id: &str| DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    assert_eq!(code(c.delete_volume(req("")).await), Code::InvalidArgument);
    // Ids holdfast never generates name no volume, so they are already deleted.
    for id in [
        "../../etc",
        "/",
        "hf-0000",
        "hf-00000000000000000000000000000000",
    ] {
        c.delete_volume(req(id)).await.unwrap();
    }
    assert!(fx.root().join("volumes").is_dir());

    let id = c
        .create_volume(create_request("pvc-d"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    std::fs::write(fx.root().join("volumes").join(&id).join("data/f"), b"x").unwrap();
    c.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-1".into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    })
    .await
    .unwrap();
    let status = c.delete_volume(req(&id)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("node-1"), "{}", status.message());
    assert!(fx.root().join("volumes").join(&id).join("data/f").exists());

    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_volume(req(&id)).await.unwrap();
    assert!(!fx.root().join("volumes").join(&id).exists());
    c.delete_volume(req(&id)).await.unwrap();
    let get = ControllerGetVolumeRequest { volume_id: id };
    assert_eq!(code(c.controller_get_volume(get).await), Code::NotFound);
}

#[tokio::test]
async fn planted_symlink_is_refused_not_followed() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    let id = c
        .create_volume(create_request("pvc-s"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("precious"), b"x").unwrap();
    let volume_dir = fx.root().join("volumes").join(&id);
    std::fs::remove_dir_all(&volume_dir).unwrap();
    std::os::unix::fs::symlink(outside.path(), &volume_dir).unwrap();
    let status = c
        .delete_volume(DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status.message().contains("symbolic link"),
        "{}",
        status.message()
    );
    assert!(outside.path().join("precious").exists());
}

#[tokio::test]
async fn validate_volume_capabilities() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    let id = c
        .create_volume(create_request("pvc-v"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let req = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = vec![mount_cap(Mode::SingleNodeWriter)];
    assert_eq!(
        code(c.validate_volume_capabilities(req("", ok.clone())).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.validate_volume_capabilities(req(&id, vec![])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.validate_volume_capabilities(req("hf-nope", ok.clone()))
                .await
        ),
        Code::NotFound
    );
    let unknown = "hf-ffffffffffffffffffffffffffffffff";
    assert_eq!(
        code(
            c.validate_volume_capabilities(req(unknown, ok.clone()))
                .await
        ),
        Code::NotFound
    );

    let confirmed = c
        .validate_volume_capabilities(req(&id, ok.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.confirmed.unwrap().volume_capabilities, ok);
    for bad in [
        mount_cap(Mode::MultiNodeMultiWriter),
        block_cap(Mode::SingleNodeWriter),
    ] {
        let r = c
            .validate_volume_capabilities(req(&id, vec![bad]))
            .await
            .unwrap()
            .into_inner();
        assert!(r.confirmed.is_none());
        assert!(!r.message.is_empty());
    }
    let mut other = req(&id, ok);
    other.parameters = params(&[("dataPath", "bind")]);
    assert!(c
        .validate_volume_capabilities(other)
        .await
        .unwrap()
        .into_inner()
        .confirmed
        .is_none());
}

#[tokio::test]
async fn expand_records_growth_and_refuses_shrinking() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    let id = c
        .create_volume(create_request("pvc-e"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let req = |id: &str, required: i64, limit: i64| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    };
    assert_eq!(
        code(c.controller_expand_volume(req("", 1, 0)).await),
        Code::InvalidArgument
    );
    let mut no_range = req(&id, 1, 0);
    no_range.capacity_range = None;
    assert_eq!(
        code(c.controller_expand_volume(no_range).await),
        Code::InvalidArgument
    );
    let unknown = "hf-ffffffffffffffffffffffffffffffff";
    assert_eq!(
        code(c.controller_expand_volume(req(unknown, 1, 0)).await),
        Code::NotFound
    );
    let mut block = req(&id, 4 << 20, 0);
    block.volume_capability = Some(block_cap(Mode::SingleNodeWriter));
    assert_eq!(
        code(c.controller_expand_volume(block).await),
        Code::InvalidArgument
    );

    let grown = c
        .controller_expand_volume(req(&id, 4 << 20, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 4 << 20);
    assert!(!grown.node_expansion_required);
    let same = c
        .controller_expand_volume(req(&id, 2 << 20, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.capacity_bytes, 4 << 20);
    assert_eq!(
        code(c.controller_expand_volume(req(&id, 0, 2 << 20)).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(c.controller_expand_volume(req(&id, i64::MAX, 0)).await),
        Code::OutOfRange
    );

    let got = c
        .controller_get_volume(ControllerGetVolumeRequest { volume_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 4 << 20);
}
