//! In-process checks of the Node service that need to reach inside it: that publish and
//! unpublish really wait for the volume's lock (the black-box race test in
//! `tests/node_publish.rs` can only catch a missing lock some of the time).

use std::sync::Arc;
use std::time::Duration;

use holdfast_core::backend::{
    AccessMode, Backend, Capability, CapacityRange, DataPath, VolumeName, VolumeParams, VolumeSpec,
};
use holdfast_core::csi::v1::node_server::Node;
use holdfast_core::csi::v1::volume_capability::{access_mode::Mode, AccessType, MountVolume};
use holdfast_core::csi::v1::{
    volume_capability, NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use tonic::Request;

use holdfast_core::lease::{LeaseParams, NodeIdentity, SessionLease};
use holdfast_core::store::MemoryStore;

use super::{NodeService, POD_UID_KEY};
use crate::lock::claims::ClaimBook;
use crate::publish::kernel_mounts::{self as mount, DetachPolicy, MountTable};
use crate::publish::publisher::Publisher;

fn bind_volume(backend: &Backend, name: &str) -> String {
    let spec = VolumeSpec {
        name: VolumeName::parse(name).unwrap(),
        capacity: CapacityRange::new(0, 0).unwrap(),
        capabilities: vec![Capability {
            access_mode: AccessMode::SingleNodeWriter,
            fs_type: String::new(),
            mount_flags: Vec::new(),
        }],
        params: VolumeParams {
            data_path: DataPath::Bind,
            ..VolumeParams::default()
        },
        co_metadata: Default::default(),
    };
    backend.create_volume(&spec).unwrap().meta.id.to_string()
}

fn publish(volume_id: &str, target: &std::path::Path) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_str().unwrap().into(),
        volume_capability: Some(VolumeCapability {
            access_mode: Some(volume_capability::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }),
        volume_context: [(POD_UID_KEY.to_string(), "pod-a".to_string())].into(),
        ..Default::default()
    }
}

async fn service(backend: Arc<Backend>, state_dir: &std::path::Path) -> NodeService {
    let publisher = Arc::new(Publisher::new(backend, state_dir).unwrap());
    let session = SessionLease::start(
        Arc::new(MemoryStore::new()),
        NodeIdentity::of_this_machine("n1").unwrap(),
        LeaseParams::default(),
        state_dir,
    )
    .await
    .unwrap();
    let (book, _queue) = ClaimBook::new(Arc::new(session));
    NodeService::new("n1".into(), publisher, book)
}

fn is_mounted(target: &std::path::Path) -> bool {
    MountTable::read().unwrap().mounted_at(target).is_some()
}

#[tokio::test]
async fn publish_and_unpublish_wait_for_the_volume_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    std::fs::create_dir(base.join("backend")).unwrap();
    let backend = Arc::new(Backend::open(base.join("backend")).unwrap());
    let id = bind_volume(&backend, "locked");
    let target = base.join("target");
    let _cleanup = UnmountOnDrop(target.clone());
    let service = Arc::new(service(backend, &base).await);

    let held = service.publisher.locks.lock(&id).await;
    let call = {
        let (service, request) = (service.clone(), publish(&id, &target));
        tokio::spawn(async move { service.node_publish_volume(Request::new(request)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!call.is_finished(), "publish must wait for the volume lock");
    assert!(!is_mounted(&target));
    drop(held);
    call.await
        .unwrap()
        .expect("publish after the lock is released");
    assert!(is_mounted(&target));

    let held = service.publisher.locks.lock(&id).await;
    let call = {
        let service = service.clone();
        let request = NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.to_str().unwrap().into(),
        };
        tokio::spawn(async move { service.node_unpublish_volume(Request::new(request)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !call.is_finished(),
        "unpublish must wait for the volume lock"
    );
    assert!(is_mounted(&target));
    drop(held);
    call.await
        .unwrap()
        .expect("unpublish after the lock is released");
    assert!(!is_mounted(&target));
}

/// Lazily unmounts the path when the test ends, even by a failed assertion.
struct UnmountOnDrop(std::path::PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        while is_mounted(&self.0) {
            if mount::unmount(&self.0, DetachPolicy::IfBusy).is_err() {
                break;
            }
        }
    }
}

#[test]
fn grpc_timeout_header_sets_the_wait_budget() {
    use super::{grpc_timeout, wait_budget, DEFAULT_WAIT, MAX_WAIT};
    use tonic::metadata::MetadataMap;
    let header = |value: &'static str| {
        let mut map = MetadataMap::new();
        map.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&map)
    };
    assert_eq!(header("10S"), Some(Duration::from_secs(10)));
    assert_eq!(header("1500m"), Some(Duration::from_millis(1500)));
    assert_eq!(header("2M"), Some(Duration::from_secs(120)));
    assert_eq!(header("7u"), Some(Duration::from_micros(7)));
    assert_eq!(header("S"), None);
    assert_eq!(header("10x"), None);
    assert_eq!(grpc_timeout(&MetadataMap::new()), None);

    assert_eq!(wait_budget(None), DEFAULT_WAIT);
    // Slack is kept to mount and answer before the caller gives up ...
    assert_eq!(
        wait_budget(Some(Duration::from_secs(5))),
        Duration::from_secs(4)
    );
    assert_eq!(
        wait_budget(Some(Duration::from_secs(60))),
        Duration::from_secs(58)
    );
    // ... and no call waits longer than the cap.
    assert_eq!(wait_budget(Some(Duration::from_secs(3600))), MAX_WAIT);
}
