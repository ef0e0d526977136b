//! Controller service beyond volume creation: advertised capabilities, ListVolumes
//! (paging and tokens), GetCapacity, ControllerExpandVolume, and the snapshot RPCs
//! holdfast does not offer.

use std::collections::HashSet;

use holdfast_core::csi::v1::{
    CapacityRange, ControllerExpandVolumeRequest, CreateSnapshotRequest, DeleteSnapshotRequest,
    DeleteVolumeRequest, GetCapacityRequest, ListSnapshotsRequest, ListVolumesRequest,
};
use tonic::Code;

use crate::support::{
    absent_volume_id, assert_code, assert_ok, bounded, create_request, single_writer, unique,
    ControllerCap, Sanity, TEST_EXPAND_SIZE, TEST_VOLUME_SIZE,
};

#[tokio::test]
async fn controller_capabilities_are_known_and_cover_the_contract() {
    bounded(async {
        let s = Sanity::start().await;
        // `controller_caps` panics on a capability without a type or of an unknown number.
        let caps = s.controller_caps().await;
        // csi-sanity fails on UNKNOWN and on anything newer than MODIFY_VOLUME.
        let rejected = [ControllerCap::Unknown, ControllerCap::GetSnapshot];
        for cap in &caps {
            assert!(!rejected.contains(cap), "csi-sanity rejects {cap:?}");
        }
        for wanted in [
            ControllerCap::CreateDeleteVolume,
            ControllerCap::PublishUnpublishVolume,
            ControllerCap::ListVolumes,
            ControllerCap::GetCapacity,
            ControllerCap::ExpandVolume,
        ] {
            assert!(
                caps.contains(&wanted),
                "{wanted:?} not advertised; got {caps:?}"
            );
        }
    })
    .await
}

// ---- ListVolumes --------------------------------------------------------------------

#[tokio::test]
async fn list_volumes_entries_carry_volume_ids() {
    bounded(async {
        let s = Sanity::start().await;
        if !s.has_controller_cap(ControllerCap::ListVolumes).await {
            let got = s
                .controller()
                .list_volumes(ListVolumesRequest::default())
                .await;
            return assert_code("ListVolumes while not advertised", got, Code::Unimplemented);
        }
        s.create(create_request(&unique("listed"), None)).await;
        let resp = assert_ok(
            "ListVolumes",
            s.controller()
                .list_volumes(ListVolumesRequest::default())
                .await,
        );
        assert!(
            !resp.entries.is_empty(),
            "a created volume is missing from ListVolumes"
        );
        for entry in resp.entries {
            let vol = entry.volume.expect("ListVolumes entry without a volume");
            assert!(
                !vol.volume_id.is_empty(),
                "ListVolumes entry with an empty volume_id"
            );
        }
    })
    .await
}

#[tokio::test]
async fn list_volumes_with_invalid_starting_token_is_aborted() {
    bounded(async {
        let s = Sanity::start().await;
        if !s.has_controller_cap(ControllerCap::ListVolumes).await {
            return;
        }
        let req = ListVolumesRequest {
            starting_token: "invalid-token".into(),
            ..Default::default()
        };
        let got = s.controller().list_volumes(req).await;
        assert_code(
            "ListVolumes with a token it never issued",
            got,
            Code::Aborted,
        );
    })
    .await
}

#[tokio::test]
async fn list_volumes_shows_a_created_volume_until_it_is_deleted() {
    bounded(async {
        let s = Sanity::start().await;
        if !s.has_controller_cap(ControllerCap::ListVolumes).await {
            return;
        }
        let before = list_all_ids(&s, 0).await;
        // csi-sanity uses this fixed name for this case.
        let vol = s.create(create_request("sanity", None)).await;
        let during = list_all_ids(&s, 0).await;
        assert_eq!(during.len(), before.len() + 1);
        assert!(during.contains(&vol.volume_id));
        let del = DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        };
        assert_ok("DeleteVolume", s.controller().delete_volume(del).await);
        let after = list_all_ids(&s, 0).await;
        assert_eq!(
            after, before,
            "the deleted volume is still listed (or others vanished)"
        );
    })
    .await
}

#[tokio::test]
async fn list_volumes_pages_cover_every_volume_exactly_once() {
    bounded(async {
        let s = Sanity::start().await;
        if !s.has_controller_cap(ControllerCap::ListVolumes).await {
            return;
        }
        let mut created = HashSet::new();
        for i in 0..5 {
            created.insert(
                s.create(create_request(&unique(&format!("page-{i}")), None))
                    .await
                    .volume_id,
            );
        }
        let unpaged = list_all_ids(&s, 0).await;
        let paged = list_all_ids(&s, 2).await;
        let mut sorted_unpaged = unpaged.clone();
        sorted_unpaged.sort();
        let mut sorted_paged = paged.clone();
        sorted_paged.sort();
        assert_eq!(
            sorted_paged, sorted_unpaged,
            "paging with max_entries=2 lost or repeated volumes"
        );
        let distinct: HashSet<_> = paged.iter().cloned().collect();
        assert_eq!(
            distinct.len(),
            paged.len(),
            "a volume appeared on two pages: {paged:?}"
        );
        assert!(
            created.is_subset(&distinct),
            "a created volume is missing from the pages"
        );
    })
    .await
}

/// Follows next_token to the end, asserting no page exceeds `max_entries` (0 = no limit).
async fn list_all_ids(s: &Sanity, max_entries: i32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    for _ in 0..1000 {
        let req = ListVolumesRequest {
            max_entries,
            starting_token: token.clone(),
        };
        let page = assert_ok("ListVolumes page", s.controller().list_volumes(req).await);
        if max_entries > 0 {
            assert!(
                page.entries.len() <= max_entries as usize,
                "page of {} > max_entries {max_entries}",
                page.entries.len()
            );
        }
        ids.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.expect("entry without volume").volume_id),
        );
        if page.next_token.is_empty() {
            return ids;
        }
        token = page.next_token;
    }
    panic!("ListVolumes never returned an empty next_token");
}

// ---- GetCapacity --------------------------------------------------------------------

#[tokio::test]
async fn get_capacity_without_parameters_succeeds() {
    bounded(async {
        let s = Sanity::start().await;
        let got = s
            .controller()
            .get_capacity(GetCapacityRequest::default())
            .await;
        if !s.has_controller_cap(ControllerCap::GetCapacity).await {
            return assert_code("GetCapacity while not advertised", got, Code::Unimplemented);
        }
        let resp = assert_ok("GetCapacity", got);
        assert!(
            resp.available_capacity >= 0,
            "negative capacity {}",
            resp.available_capacity
        );
    })
    .await
}

// ---- ControllerExpandVolume ---------------------------------------------------------

#[tokio::test]
async fn expand_volume_without_id_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        if !s.has_controller_cap(ControllerCap::ExpandVolume).await {
            return;
        }
        let req = ControllerExpandVolumeRequest {
            capacity_range: Some(CapacityRange {
                required_bytes: TEST_EXPAND_SIZE,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        let got = s.controller().controller_expand_volume(req).await;
        assert_code(
            "ControllerExpandVolume with no id",
            got,
            Code::InvalidArgument,
        );
    })
    .await
}

#[tokio::test]
async fn expand_volume_without_capacity_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        if !s.has_controller_cap(ControllerCap::ExpandVolume).await {
            return;
        }
        // csi-sanity omits both fields; naming a real volume proves the capacity check itself.
        let vol = s
            .create(create_request(
                &unique("expand-nocap"),
                Some(TEST_VOLUME_SIZE),
            ))
            .await;
        for volume_id in [String::new(), vol.volume_id] {
            let req = ControllerExpandVolumeRequest {
                volume_id: volume_id.clone(),
                ..Default::default()
            };
            let got = s.controller().controller_expand_volume(req).await;
            assert_code(
                &format!("ControllerExpandVolume {volume_id:?} with no capacity"),
                got,
                Code::InvalidArgument,
            );
        }
    })
    .await
}

#[tokio::test]
async fn expand_volume_grows_capacity_to_the_requested_size() {
    bounded(async {
        let s = Sanity::start().await;
        if !s.has_controller_cap(ControllerCap::ExpandVolume).await {
            return;
        }
        let vol = s
            .create(create_request(&unique("expand"), Some(TEST_VOLUME_SIZE)))
            .await;
        let req = ControllerExpandVolumeRequest {
            volume_id: vol.volume_id,
            capacity_range: Some(CapacityRange {
                required_bytes: TEST_EXPAND_SIZE,
                limit_bytes: 0,
            }),
            volume_capability: Some(single_writer()),
            ..Default::default()
        };
        let resp = assert_ok(
            "ControllerExpandVolume",
            s.controller().controller_expand_volume(req).await,
        );
        // csi-sanity demands exactly the requested size here.
        assert_eq!(resp.capacity_bytes, TEST_EXPAND_SIZE);
    })
    .await
}

#[tokio::test]
async fn expand_unknown_volume_is_not_found() {
    bounded(async {
        let s = Sanity::start().await;
        if !s.has_controller_cap(ControllerCap::ExpandVolume).await {
            return;
        }
        let req = ControllerExpandVolumeRequest {
            volume_id: absent_volume_id(),
            capacity_range: Some(CapacityRange {
                required_bytes: TEST_EXPAND_SIZE,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        let got = s.controller().controller_expand_volume(req).await;
        assert_code(
            "ControllerExpandVolume of an unknown volume",
            got,
            Code::NotFound,
        );
    })
    .await
}

// ---- Snapshots: not offered ---------------------------------------------------------

#[tokio::test]
async fn snapshot_rpcs_are_unimplemented_unless_advertised() {
    bounded(async {
        let s = Sanity::start().await;
        let caps = s.controller_caps().await;
        if caps.contains(&ControllerCap::CreateDeleteSnapshot)
            || caps.contains(&ControllerCap::ListSnapshots)
        {
            panic!("snapshots are advertised but this suite has no cases for them: {caps:?}");
        }
        let c = || s.controller();
        let create = CreateSnapshotRequest {
            name: unique("snap"),
            source_volume_id: absent_volume_id(),
            ..Default::default()
        };
        assert_code(
            "CreateSnapshot",
            c().create_snapshot(create).await,
            Code::Unimplemented,
        );
        let delete = DeleteSnapshotRequest {
            snapshot_id: "reallyfakesnapshotid".into(),
            ..Default::default()
        };
        assert_code(
            "DeleteSnapshot",
            c().delete_snapshot(delete).await,
            Code::Unimplemented,
        );
        assert_code(
            "ListSnapshots",
            c().list_snapshots(ListSnapshotsRequest::default()).await,
            Code::Unimplemented,
        );
    })
    .await
}
