//! Backend tests on real directories: escapes refused, persistence across reopen,
//! crash leftovers adopted or cleaned.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;

use super::*;

fn spec(name: &str) -> VolumeSpec {
    VolumeSpec {
        name: VolumeName::parse(name).unwrap(),
        capacity: CapacityRange::new(4096, 0).unwrap(),
        capabilities: vec![Capability {
            access_mode: AccessMode::SingleNodeWriter,
            fs_type: String::new(),
            mount_flags: vec![],
        }],
        params: VolumeParams::default(),
        co_metadata: BTreeMap::new(),
    }
}

fn writer() -> Publication {
    Publication {
        access_mode: AccessMode::SingleNodeWriter,
        readonly: false,
    }
}

fn setup() -> (tempfile::TempDir, Backend) {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::open(dir.path()).unwrap();
    for node in ["node-1", "n1", "n2"] {
        backend.register_node(node).unwrap();
    }
    (dir, backend)
}

fn assert_unsafe(result: Result<impl std::fmt::Debug, BackendError>) {
    match result {
        Err(BackendError::UnsafePath { .. }) => {}
        other => panic!("expected UnsafePath, got {other:?}"),
    }
}

#[test]
fn create_lays_out_data_dir_and_metadata() {
    let (dir, backend) = setup();
    let created = backend.create_volume(&spec("pvc-a")).unwrap();
    assert!(created.newly_created);
    let id = created.meta.id.clone();
    let data = backend.data_dir(&id).unwrap();
    assert_eq!(
        data,
        dir.path()
            .canonicalize()
            .unwrap()
            .join("volumes")
            .join(id.as_str())
            .join("data")
    );
    assert!(data.is_dir());
    assert!(dir.path().join("meta").join(format!("{id}.json")).is_file());
    assert_eq!(
        backend.epoch_file(&id).unwrap(),
        data.parent().unwrap().join(EPOCH_FILE)
    );
    assert_eq!(created.meta.capacity_bytes, 4096);
}

#[test]
fn create_is_idempotent_and_conflicts_are_refused() {
    let (_dir, backend) = setup();
    let first = backend.create_volume(&spec("pvc-a")).unwrap();
    let again = backend.create_volume(&spec("pvc-a")).unwrap();
    assert!(!again.newly_created);
    assert_eq!(again.meta, first.meta);
    let mut bigger = spec("pvc-a");
    bigger.capacity = CapacityRange::new(8192, 0).unwrap();
    assert!(matches!(
        backend.create_volume(&bigger),
        Err(BackendError::Incompatible { .. })
    ));
    assert_eq!(backend.list_volumes().unwrap().len(), 1);
}

#[test]
fn volumes_survive_a_restart() {
    let (dir, backend) = setup();
    let a = backend.create_volume(&spec("pvc-a")).unwrap().meta;
    let b = backend.create_volume(&spec("pvc-b")).unwrap().meta;
    backend.publish(&a.id, "node-1", writer()).unwrap();
    std::fs::write(backend.data_dir(&a.id).unwrap().join("file"), b"kept").unwrap();
    drop(backend);

    let reopened = Backend::open(dir.path()).unwrap();
    let listed = reopened.list_volumes().unwrap();
    assert_eq!(listed.iter().map(|m| m.id.clone()).collect::<Vec<_>>(), {
        let mut ids = vec![a.id.clone(), b.id.clone()];
        ids.sort();
        ids
    });
    let a_again = reopened.volume(&a.id).unwrap().unwrap();
    assert_eq!(a_again.published_nodes(), vec!["node-1".to_string()]);
    assert_eq!(
        std::fs::read(reopened.data_dir(&a.id).unwrap().join("file")).unwrap(),
        b"kept"
    );
    // No temporary files are left behind by the atomic writes.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("meta"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn metadata_lost_volume_is_adopted_by_name() {
    let (dir, backend) = setup();
    let meta = backend.create_volume(&spec("pvc-a")).unwrap().meta;
    std::fs::write(backend.data_dir(&meta.id).unwrap().join("f"), b"x").unwrap();
    std::fs::remove_file(dir.path().join("meta").join(format!("{}.json", meta.id))).unwrap();
    assert!(backend.volume(&meta.id).unwrap().is_none());
    let again = backend.create_volume(&spec("pvc-a")).unwrap();
    assert_eq!(again.meta.id, meta.id);
    assert!(backend.data_dir(&meta.id).unwrap().join("f").exists());
}

#[test]
fn delete_removes_everything_and_is_idempotent() {
    let (dir, backend) = setup();
    let meta = backend.create_volume(&spec("pvc-a")).unwrap().meta;
    std::fs::create_dir_all(backend.data_dir(&meta.id).unwrap().join("a/b")).unwrap();
    assert!(backend.delete_volume(&meta.id).unwrap());
    assert!(backend.volume(&meta.id).unwrap().is_none());
    assert!(matches!(
        backend.data_dir(&meta.id),
        Err(BackendError::NotFound { .. })
    ));
    assert_eq!(
        std::fs::read_dir(dir.path().join("trash")).unwrap().count(),
        0
    );
    assert!(!backend.delete_volume(&meta.id).unwrap());
}

#[test]
fn delete_refuses_a_published_volume() {
    let (_dir, backend) = setup();
    let meta = backend.create_volume(&spec("pvc-a")).unwrap().meta;
    backend.publish(&meta.id, "node-1", writer()).unwrap();
    assert!(matches!(
        backend.delete_volume(&meta.id),
        Err(BackendError::InUse { .. })
    ));
    assert!(backend.data_dir(&meta.id).is_ok());
    backend.unpublish(&meta.id, None).unwrap();
    assert!(backend.delete_volume(&meta.id).unwrap());
}

#[test]
fn interrupted_delete_is_finished_on_open() {
    let (dir, backend) = setup();
    std::fs::create_dir_all(dir.path().join("trash/hf-x.1/data/sub")).unwrap();
    drop(backend);
    Backend::open(dir.path()).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("trash")).unwrap().count(),
        0
    );
}

#[test]
fn symlinked_volume_dir_is_refused_everywhere() {
    let (dir, backend) = setup();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(outside.path().join("data")).unwrap();
    std::fs::write(outside.path().join("data/precious"), b"x").unwrap();
    let s = spec("pvc-evil");
    let id = VolumeId::for_name(&s.name);
    symlink(outside.path(), dir.path().join("volumes").join(id.as_str())).unwrap();

    assert_unsafe(backend.create_volume(&s));
    assert_unsafe(backend.data_dir(&id));
    assert_unsafe(backend.volume_dir(&id));
    assert_unsafe(backend.delete_volume(&id));
    assert!(outside.path().join("data/precious").exists());
}

#[test]
fn symlinked_data_dir_is_refused() {
    let (dir, backend) = setup();
    let outside = tempfile::tempdir().unwrap();
    let meta = backend.create_volume(&spec("pvc-a")).unwrap().meta;
    let data = dir
        .path()
        .join("volumes")
        .join(meta.id.as_str())
        .join("data");
    std::fs::remove_dir(&data).unwrap();
    symlink(outside.path(), &data).unwrap();
    assert_unsafe(backend.data_dir(&meta.id));
    assert_unsafe(backend.open_data_dir(&meta.id));
}

#[test]
fn symlinked_top_level_dirs_and_metadata_are_refused() {
    let (dir, backend) = setup();
    let outside = tempfile::tempdir().unwrap();
    let meta = backend.create_volume(&spec("pvc-a")).unwrap().meta;
    let meta_file = dir.path().join("meta").join(format!("{}.json", meta.id));
    std::fs::copy(&meta_file, outside.path().join("m.json")).unwrap();
    std::fs::remove_file(&meta_file).unwrap();
    symlink(outside.path().join("m.json"), &meta_file).unwrap();
    assert_unsafe(backend.volume(&meta.id));

    std::fs::rename(dir.path().join("volumes"), dir.path().join("real-volumes")).unwrap();
    symlink(outside.path(), dir.path().join("volumes")).unwrap();
    assert_unsafe(backend.data_dir(&meta.id));
    assert_unsafe(Backend::open(dir.path()));
}

#[test]
fn corrupt_metadata_is_an_error_and_is_not_overwritten() {
    let (dir, backend) = setup();
    let s = spec("pvc-a");
    let id = VolumeId::for_name(&s.name);
    let path = dir.path().join("meta").join(format!("{id}.json"));
    std::fs::write(&path, b"{ not json").unwrap();
    assert!(matches!(
        backend.create_volume(&s),
        Err(BackendError::CorruptMetadata { .. })
    ));
    assert!(matches!(
        backend.volume(&id),
        Err(BackendError::CorruptMetadata { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"{ not json");
    // One damaged file does not hide the others.
    backend.create_volume(&spec("pvc-b")).unwrap();
    assert_eq!(backend.list_volumes().unwrap().len(), 1);
}

#[test]
fn metadata_under_the_wrong_id_is_corrupt() {
    let (dir, backend) = setup();
    let a = backend.create_volume(&spec("pvc-a")).unwrap().meta;
    let b_id = VolumeId::for_name(&VolumeName::parse("pvc-b").unwrap());
    std::fs::copy(
        dir.path().join("meta").join(format!("{}.json", a.id)),
        dir.path().join("meta").join(format!("{b_id}.json")),
    )
    .unwrap();
    assert!(matches!(
        backend.volume(&b_id),
        Err(BackendError::CorruptMetadata { .. })
    ));
}

#[test]
fn publish_rules_are_enforced_and_persisted() {
    let (_dir, backend) = setup();
    let id = backend.create_volume(&spec("pvc-a")).unwrap().meta.id;
    assert!(matches!(
        backend.publish(&id, "never-registered", writer()),
        Err(BackendError::UnknownNode { .. })
    ));
    backend.publish(&id, "n1", writer()).unwrap();
    backend.publish(&id, "n1", writer()).unwrap();
    assert!(matches!(
        backend.publish(&id, "n2", writer()),
        Err(BackendError::PublishedElsewhere { .. })
    ));
    backend.unpublish(&id, Some("n2")).unwrap();
    backend.unpublish(&id, Some("n1")).unwrap();
    backend.publish(&id, "n2", writer()).unwrap();
    assert_eq!(
        backend.volume(&id).unwrap().unwrap().published_nodes(),
        vec!["n2".to_string()]
    );
    let missing = VolumeId::for_name(&VolumeName::parse("nope").unwrap());
    assert!(matches!(
        backend.publish(&missing, "n1", writer()),
        Err(BackendError::NotFound { .. })
    ));
    backend.unpublish(&missing, Some("n1")).unwrap();
}

#[test]
fn expand_grows_never_shrinks() {
    let (_dir, backend) = setup();
    let id = backend.create_volume(&spec("pvc-a")).unwrap().meta.id;
    assert_eq!(
        backend
            .expand_volume(&id, CapacityRange::new(8192, 0).unwrap())
            .unwrap(),
        8192
    );
    assert_eq!(
        backend
            .expand_volume(&id, CapacityRange::new(100, 0).unwrap())
            .unwrap(),
        8192
    );
    assert!(matches!(
        backend.expand_volume(&id, CapacityRange::new(0, 100).unwrap()),
        Err(BackendError::ShrinkUnsupported { .. })
    ));
    let huge = backend.space().unwrap().total_bytes + 1;
    assert!(matches!(
        backend.expand_volume(&id, CapacityRange::new(huge, 0).unwrap()),
        Err(BackendError::CapacityUnsatisfiable { .. })
    ));
    assert_eq!(backend.volume(&id).unwrap().unwrap().capacity_bytes, 8192);
}

#[test]
fn concurrent_identical_creates_yield_one_volume() {
    let (_dir, backend) = setup();
    let backend = std::sync::Arc::new(backend);
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let backend = backend.clone();
            std::thread::spawn(move || backend.create_volume(&spec("pvc-race")).unwrap())
        })
        .collect();
    let results: Vec<Created> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|c| c.newly_created).count(), 1);
    assert!(results.iter().all(|c| c.meta == results[0].meta));
}

#[test]
fn non_directories_and_fifos_are_refused_without_hanging() {
    let (dir, backend) = setup();
    let s = spec("pvc-odd");
    let id = VolumeId::for_name(&s.name);
    std::fs::write(dir.path().join("volumes").join(id.as_str()), b"not a dir").unwrap();
    assert_unsafe(backend.create_volume(&s));
    assert_unsafe(backend.data_dir(&id));

    let other = VolumeId::for_name(&VolumeName::parse("pvc-fifo").unwrap());
    let fifo = dir.path().join("meta").join(format!("{other}.json"));
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    // Opening a FIFO for reading would block forever without O_NONBLOCK.
    assert_unsafe(backend.volume(&other));
}
