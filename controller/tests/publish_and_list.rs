//! ControllerPublish/Unpublish, ListVolumes paging, GetCapacity, capabilities and the
//! unimplemented RPCs, against the real controller binary.

mod common;

use std::collections::BTreeSet;

use common::*;
use holdfast_core::csi::v1::controller_service_capability::{rpc, Type as CapType};
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::*;
use tonic::Code;

fn publish(id: &str, node: &str, mode: Mode, readonly: bool) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap(mode)),
        readonly,
        ..Default::default()
    }
}

fn unpublish(id: &str, node: &str) -> ControllerUnpublishVolumeRequest {
    ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn publish_enforces_single_node_access() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    let id = c
        .create_volume(create_request("pvc-p"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let w = Mode::SingleNodeWriter;

    assert_eq!(
        code(
            c.controller_publish_volume(publish("", "n1", w, false))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish(&id, "", w, false))
                .await
        ),
        Code::InvalidArgument
    );
    let mut no_cap = publish(&id, "n1", w, false);
    no_cap.volume_capability = None;
    assert_eq!(
        code(c.controller_publish_volume(no_cap).await),
        Code::InvalidArgument
    );
    let mut block = publish(&id, "n1", w, false);
    block.volume_capability = Some(block_cap(w));
    assert_eq!(
        code(c.controller_publish_volume(block).await),
        Code::InvalidArgument
    );
    let unknown = "hf-ffffffffffffffffffffffffffffffff";
    assert_eq!(
        code(
            c.controller_publish_volume(publish(unknown, "n1", w, false))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish("../x", "n1", w, false))
                .await
        ),
        Code::NotFound
    );

    let reply = c
        .controller_publish_volume(publish(&id, "n1", w, false))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.publish_context.is_empty());
    c.controller_publish_volume(publish(&id, "n1", w, false))
        .await
        .unwrap();
    assert_eq!(
        code(
            c.controller_publish_volume(publish(&id, "n1", w, true))
                .await
        ),
        Code::AlreadyExists
    );
    let status = c
        .controller_publish_volume(publish(&id, "n2", w, false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("n1"),
        "the holder is named: {}",
        status.message()
    );
    let reader = Mode::MultiNodeReaderOnly;
    assert_eq!(
        code(
            c.controller_publish_volume(publish(&id, "n2", reader, true))
                .await
        ),
        Code::FailedPrecondition
    );

    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec!["n1".to_string()]
    );

    // Unpublish is idempotent, for unknown nodes and unknown or malformed volumes too.
    assert_eq!(
        code(c.controller_unpublish_volume(unpublish("", "n1")).await),
        Code::InvalidArgument
    );
    c.controller_unpublish_volume(unpublish(&id, "n2"))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish(unknown, "n1"))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish("not-ours", "n1"))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish(&id, "n1"))
        .await
        .unwrap();
    c.controller_unpublish_volume(unpublish(&id, "n1"))
        .await
        .unwrap();
    c.controller_publish_volume(publish(&id, "n2", w, false))
        .await
        .unwrap();
}

#[tokio::test]
async fn multi_node_readers_share_and_unpublish_all_clears_them() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    let mut req = create_request("pvc-ro");
    req.volume_capabilities = vec![mount_cap(Mode::MultiNodeReaderOnly)];
    let id = c
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let reader = Mode::MultiNodeReaderOnly;
    for node in ["n1", "n2", "n3"] {
        c.controller_publish_volume(publish(&id, node, reader, true))
            .await
            .unwrap();
    }
    let writer = Mode::SingleNodeWriter;
    assert_eq!(
        code(
            c.controller_publish_volume(publish(&id, "n4", writer, false))
                .await
        ),
        Code::FailedPrecondition
    );
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec!["n1", "n2", "n3"]
    );
    c.controller_unpublish_volume(unpublish(&id, ""))
        .await
        .unwrap();
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.status.unwrap().published_node_ids.is_empty());
    c.controller_publish_volume(publish(&id, "n4", writer, false))
        .await
        .unwrap();
}

#[tokio::test]
async fn list_volumes_pages_through_everything_once() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    let mut created = BTreeSet::new();
    for i in 0..7 {
        let v = c
            .create_volume(create_request(&format!("pvc-{i}")))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        created.insert(v.volume_id);
    }
    let first = created.iter().next().unwrap().clone();
    c.controller_publish_volume(publish(&first, "n1", Mode::SingleNodeWriter, false))
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_volumes(ListVolumesRequest {
                max_entries: 3,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= 3);
        for entry in page.entries {
            let volume = entry.volume.unwrap();
            let nodes = entry.status.unwrap().published_node_ids;
            assert_eq!(nodes.is_empty(), volume.volume_id != first, "{nodes:?}");
            assert_eq!(volume.volume_context.len(), 4);
            seen.push(volume.volume_id);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 7, "each volume exactly once");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), created);

    let all = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 7);
    assert!(all.next_token.is_empty());

    // A token whose volume was deleted meanwhile still continues the listing.
    let page = c
        .list_volumes(ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap();
    let token = page.into_inner().next_token;
    c.delete_volume(DeleteVolumeRequest {
        volume_id: token.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let rest = c
        .list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: token,
        })
        .await
        .unwrap();
    assert_eq!(rest.into_inner().entries.len(), 4);

    let bad = ListVolumesRequest {
        max_entries: 1,
        starting_token: "not-a-token".into(),
    };
    assert_eq!(code(c.list_volumes(bad).await), Code::Aborted);
    let negative = ListVolumesRequest {
        max_entries: -1,
        starting_token: String::new(),
    };
    assert_eq!(code(c.list_volumes(negative).await), Code::InvalidArgument);
}

#[tokio::test]
async fn capacity_and_capabilities_are_truthful() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    let cap = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);
    assert!(cap.maximum_volume_size.unwrap() >= cap.available_capacity);
    let block = GetCapacityRequest {
        volume_capabilities: vec![block_cap(Mode::SingleNodeWriter)],
        ..Default::default()
    };
    assert_eq!(
        c.get_capacity(block)
            .await
            .unwrap()
            .into_inner()
            .available_capacity,
        0
    );
    let writer = GetCapacityRequest {
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        ..Default::default()
    };
    assert!(
        c.get_capacity(writer)
            .await
            .unwrap()
            .into_inner()
            .available_capacity
            > 0
    );
    let unknown = GetCapacityRequest {
        parameters: params(&[("size", "big")]),
        ..Default::default()
    };
    assert_eq!(code(c.get_capacity(unknown).await), Code::InvalidArgument);

    let caps = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let types: BTreeSet<i32> = caps
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(CapType::Rpc(r)) => r.r#type,
            other => panic!("{other:?}"),
        })
        .collect();
    let expected: BTreeSet<i32> = [
        rpc::Type::CreateDeleteVolume,
        rpc::Type::PublishUnpublishVolume,
        rpc::Type::ListVolumes,
        rpc::Type::ListVolumesPublishedNodes,
        rpc::Type::GetCapacity,
        rpc::Type::ExpandVolume,
        rpc::Type::GetVolume,
        rpc::Type::SingleNodeMultiWriter,
    ]
    .into_iter()
    .map(|t| t as i32)
    .collect();
    assert_eq!(types, expected);

    let info = fx
        .process
        .identity()
        .await
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap();
    let advertises_controller = info.into_inner().capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(plugin_capability::Type::Service(s))
            if s.r#type == plugin_capability::service::Type::ControllerService as i32)
    });
    assert!(advertises_controller);
}

#[tokio::test]
async fn unsupported_rpcs_are_unimplemented() {
    let fx = Fixture::start().await;
    let mut c = fx.client().await;
    assert_eq!(
        code(c.create_snapshot(CreateSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(c.delete_snapshot(DeleteSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(c.list_snapshots(ListSnapshotsRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(c.get_snapshot(GetSnapshotRequest::default()).await),
        Code::Unimplemented
    );
    assert_eq!(
        code(
            c.controller_modify_volume(ControllerModifyVolumeRequest::default())
                .await
        ),
        Code::Unimplemented
    );
    let get = ControllerGetVolumeRequest {
        volume_id: String::new(),
    };
    assert_eq!(
        code(c.controller_get_volume(get).await),
        Code::InvalidArgument
    );
}
