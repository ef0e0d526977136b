//! CreateVolume, DeleteVolume and ValidateVolumeCapabilities: required fields, name
//! idempotency, capacity, holdfast's StorageClass parameters, unknown volumes.

use std::collections::HashMap;

use holdfast_core::csi::v1::{
    CapacityRange, CreateVolumeRequest, DeleteVolumeRequest, ValidateVolumeCapabilitiesRequest,
};
use tonic::Code;

use crate::support::{
    absent_volume_id, assert_code, assert_ok, bounded, create_request, single_writer, unique,
    Sanity, TEST_VOLUME_SIZE,
};

// ---- CreateVolume -------------------------------------------------------------------

#[tokio::test]
async fn create_volume_without_name_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        // csi-sanity sends neither name nor capabilities; then only the name is missing.
        for req in [
            CreateVolumeRequest::default(),
            create_request("", Some(TEST_VOLUME_SIZE)),
        ] {
            let got = s.controller().create_volume(req.clone()).await;
            assert_code(&format!("CreateVolume {req:?}"), got, Code::InvalidArgument);
        }
    })
    .await
}

#[tokio::test]
async fn create_volume_without_capabilities_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        let mut req = create_request(&unique("no-caps"), Some(TEST_VOLUME_SIZE));
        req.volume_capabilities.clear();
        let got = s.controller().create_volume(req).await;
        assert_code(
            "CreateVolume with no capabilities",
            got,
            Code::InvalidArgument,
        );
    })
    .await
}

#[tokio::test]
async fn create_volume_without_capacity_range_succeeds() {
    bounded(async {
        let s = Sanity::start().await;
        s.create(create_request(&unique("no-capacity"), None)).await;
    })
    .await
}

#[tokio::test]
async fn create_volume_honours_required_bytes() {
    bounded(async {
        let s = Sanity::start().await;
        let vol = s
            .create(create_request(&unique("sized"), Some(TEST_VOLUME_SIZE)))
            .await;
        assert!(
            vol.capacity_bytes >= TEST_VOLUME_SIZE,
            "asked for at least {TEST_VOLUME_SIZE} bytes, got a volume of {}",
            vol.capacity_bytes
        );
    })
    .await
}

#[tokio::test]
async fn create_volume_twice_with_same_name_and_capacity_returns_the_same_volume() {
    bounded(async {
        let s = Sanity::start().await;
        let req = create_request(&unique("twice"), Some(TEST_VOLUME_SIZE));
        let first = s.create(req.clone()).await;
        let second = s.create(req).await;
        assert_eq!(
            first.volume_id, second.volume_id,
            "a retried CreateVolume made a second volume"
        );
        assert!(
            second.capacity_bytes >= TEST_VOLUME_SIZE,
            "retry reported {} bytes",
            second.capacity_bytes
        );
    })
    .await
}

#[tokio::test]
async fn create_volume_twice_with_same_name_and_other_capacity_is_already_exists() {
    bounded(async {
        let s = Sanity::start().await;
        let name = unique("twice-different");
        let mut req = create_request(&name, None);
        req.capacity_range = Some(CapacityRange {
            required_bytes: TEST_VOLUME_SIZE,
            limit_bytes: TEST_VOLUME_SIZE,
        });
        s.create(req.clone()).await;
        let doubled = 2 * TEST_VOLUME_SIZE;
        req.capacity_range = Some(CapacityRange {
            required_bytes: doubled,
            limit_bytes: doubled,
        });
        let got = s.controller().create_volume(req).await;
        assert_code(
            "CreateVolume reusing a name with another size",
            got,
            Code::AlreadyExists,
        );
    })
    .await
}

#[tokio::test]
async fn create_volume_accepts_a_128_character_name() {
    bounded(async {
        let s = Sanity::start().await;
        let mut name = unique("maxlen-");
        name.extend(std::iter::repeat_n('x', 128 - name.len()));
        assert_eq!(name.len(), 128);
        let vol = s
            .create(create_request(&name, Some(TEST_VOLUME_SIZE)))
            .await;
        assert!(vol.capacity_bytes >= TEST_VOLUME_SIZE);
    })
    .await
}

fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// holdfast's four StorageClass parameters, every accepted value of each, plus the
/// informational keys the external-provisioner adds with `--extra-create-metadata`.
#[tokio::test]
async fn create_volume_accepts_every_documented_storage_class_parameter() {
    bounded(async {
        let s = Sanity::start().await;
        let sets = [
            params(&[
                ("exclusive", "true"),
                ("onConflict", "fail"),
                ("dataPath", "fuse"),
                ("fenceAction", "error"),
            ]),
            params(&[
                ("exclusive", "false"),
                ("onConflict", "wait"),
                ("dataPath", "bind"),
                ("fenceAction", "freeze"),
            ]),
            params(&[
                ("exclusive", "true"),
                ("csi.storage.k8s.io/pvc/name", "data-db-0"),
                ("csi.storage.k8s.io/pvc/namespace", "default"),
                ("csi.storage.k8s.io/pv/name", "pvc-0123"),
            ]),
        ];
        for set in sets {
            let mut req = create_request(&unique("params"), Some(TEST_VOLUME_SIZE));
            req.parameters = set.clone();
            let first = s.create(req.clone()).await;
            // The same parameters again are the same request: still idempotent.
            let again = s.create(req).await;
            assert_eq!(
                first.volume_id, again.volume_id,
                "parameters {set:?} broke idempotency"
            );
        }
    })
    .await
}

#[tokio::test]
async fn create_volume_rejects_an_unknown_parameter() {
    bounded(async {
        let s = Sanity::start().await;
        // A typo must never silently fall back to a default (here: unlocked or not).
        let mut req = create_request(&unique("bad-param"), Some(TEST_VOLUME_SIZE));
        req.parameters = params(&[("exclusiv", "true"), ("dataPath", "fuse")]);
        let got = s.controller().create_volume(req).await;
        assert_code(
            "CreateVolume with a misspelt parameter key",
            got,
            Code::InvalidArgument,
        );
    })
    .await
}

#[tokio::test]
async fn create_volume_rejects_a_parameter_value_out_of_its_set() {
    bounded(async {
        let s = Sanity::start().await;
        for (key, value) in [
            ("exclusive", "yes"),
            ("onConflict", "retry"),
            ("dataPath", "nfs"),
            ("fenceAction", ""),
        ] {
            let mut req = create_request(&unique("bad-value"), Some(TEST_VOLUME_SIZE));
            req.parameters = params(&[(key, value)]);
            let got = s.controller().create_volume(req).await;
            assert_code(
                &format!("CreateVolume with {key}={value:?}"),
                got,
                Code::InvalidArgument,
            );
        }
    })
    .await
}

// ---- DeleteVolume -------------------------------------------------------------------

#[tokio::test]
async fn delete_volume_without_id_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        let got = s
            .controller()
            .delete_volume(DeleteVolumeRequest::default())
            .await;
        assert_code("DeleteVolume with no id", got, Code::InvalidArgument);
    })
    .await
}

#[tokio::test]
async fn delete_volume_of_unknown_id_succeeds() {
    bounded(async {
        let s = Sanity::start().await;
        // csi-sanity sends the bare "fake-vol-id" here; deleting nothing is success.
        for id in ["fake-vol-id".to_string(), absent_volume_id()] {
            let req = DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            };
            assert_ok(
                &format!("DeleteVolume {id}"),
                s.controller().delete_volume(req).await,
            );
        }
    })
    .await
}

#[tokio::test]
async fn delete_volume_removes_a_created_volume_and_is_idempotent() {
    bounded(async {
        let s = Sanity::start().await;
        let vol = s
            .create(create_request(&unique("delete-me"), Some(TEST_VOLUME_SIZE)))
            .await;
        for attempt in 1..=2 {
            let req = DeleteVolumeRequest {
                volume_id: vol.volume_id.clone(),
                ..Default::default()
            };
            assert_ok(
                &format!("DeleteVolume attempt {attempt}"),
                s.controller().delete_volume(req).await,
            );
        }
        let validate = ValidateVolumeCapabilitiesRequest {
            volume_id: vol.volume_id.clone(),
            volume_capabilities: vec![single_writer()],
            ..Default::default()
        };
        let got = s.controller().validate_volume_capabilities(validate).await;
        assert_code(
            "ValidateVolumeCapabilities after delete",
            got,
            Code::NotFound,
        );
    })
    .await
}

// ---- ValidateVolumeCapabilities -----------------------------------------------------

#[tokio::test]
async fn validate_capabilities_without_volume_id_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        let with_caps = ValidateVolumeCapabilitiesRequest {
            volume_capabilities: vec![single_writer()],
            ..Default::default()
        };
        for req in [ValidateVolumeCapabilitiesRequest::default(), with_caps] {
            let got = s
                .controller()
                .validate_volume_capabilities(req.clone())
                .await;
            assert_code(
                &format!("ValidateVolumeCapabilities {req:?}"),
                got,
                Code::InvalidArgument,
            );
        }
    })
    .await
}

#[tokio::test]
async fn validate_capabilities_without_capabilities_is_invalid_argument() {
    bounded(async {
        let s = Sanity::start().await;
        let vol = s
            .create(create_request(
                &unique("validate-nocaps"),
                Some(TEST_VOLUME_SIZE),
            ))
            .await;
        let req = ValidateVolumeCapabilitiesRequest {
            volume_id: vol.volume_id,
            ..Default::default()
        };
        let got = s.controller().validate_volume_capabilities(req).await;
        assert_code(
            "ValidateVolumeCapabilities with no capabilities",
            got,
            Code::InvalidArgument,
        );
    })
    .await
}

#[tokio::test]
async fn validate_capabilities_confirms_single_node_writer() {
    bounded(async {
        let s = Sanity::start().await;
        let vol = s
            .create(create_request(&unique("validate"), Some(TEST_VOLUME_SIZE)))
            .await;
        let req = ValidateVolumeCapabilitiesRequest {
            volume_id: vol.volume_id,
            volume_capabilities: vec![single_writer()],
            ..Default::default()
        };
        let resp = assert_ok(
            "ValidateVolumeCapabilities",
            s.controller().validate_volume_capabilities(req).await,
        );
        let confirmed = resp
            .confirmed
            .unwrap_or_else(|| panic!("not confirmed: {:?}", resp.message));
        assert!(
            !confirmed.volume_capabilities.is_empty(),
            "confirmed without echoing the capabilities"
        );
    })
    .await
}

#[tokio::test]
async fn validate_capabilities_of_unknown_volume_is_not_found() {
    bounded(async {
        let s = Sanity::start().await;
        let req = ValidateVolumeCapabilitiesRequest {
            volume_id: absent_volume_id(),
            volume_capabilities: vec![single_writer()],
            ..Default::default()
        };
        let got = s.controller().validate_volume_capabilities(req).await;
        assert_code(
            "ValidateVolumeCapabilities of an unknown volume",
            got,
            Code::NotFound,
        );
    })
    .await
}
