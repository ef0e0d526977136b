//! Unit tests of the mount module: mountinfo parsing on fixed text, and one real bind
//! mount, read-only remount and unmount (needs root).

use super::*;

const SAMPLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
28 27 0:25 / /mnt/tools ro,nosuid,nodev,relatime - tmpfs tools ro,size=4k
90 27 254:0 /srv/backend/volumes/v1/data /var/lib/kubelet/pods/a\\040b/vol rw,relatime shared:1 master:2 - ext4 /dev/vda rw
91 90 254:0 /srv/backend/volumes/v2/data /var/lib/kubelet/pods/a\\040b/vol ro,relatime - ext4 /dev/vda rw
92 28 0:25 /sub /mnt/tools/sub ro,nosuid,nodev,relatime - tmpfs tools ro
";

fn sample() -> MountTable {
    MountTable::parse(SAMPLE.as_bytes()).unwrap()
}

#[test]
fn parses_fields_and_optional_tags() {
    let table = sample();
    assert_eq!(table.entries().len(), 5);
    let bind = &table.entries()[2];
    assert_eq!(bind.mount_id, 90);
    assert_eq!(bind.parent_id, 27);
    assert_eq!(bind.device, (254, 0));
    assert_eq!(bind.root, Path::new("/srv/backend/volumes/v1/data"));
    assert_eq!(bind.fs_type, "ext4");
    assert_eq!(bind.source, "/dev/vda");
    assert!(!bind.is_read_only());
    assert!(table.entries()[1].is_read_only());
}

#[test]
fn unescapes_octal_sequences() {
    assert_eq!(unescape(b"a\\040b"), b"a b");
    assert_eq!(unescape(b"t\\011n\\012s\\134"), b"t\tn\ns\\");
    // Not an escape: kept verbatim.
    assert_eq!(unescape(b"x\\9y\\04"), b"x\\9y\\04");
    assert_eq!(
        sample().entries()[2].mount_point,
        Path::new("/var/lib/kubelet/pods/a b/vol")
    );
}

#[test]
fn mounted_at_picks_the_top_of_a_stack() {
    let table = sample();
    let top = table
        .mounted_at(Path::new("/var/lib/kubelet/pods/a b/vol"))
        .unwrap();
    assert_eq!(top.mount_id, 91);
    assert!(table.mounted_at(Path::new("/var/lib/kubelet")).is_none());
}

#[test]
fn locate_maps_a_directory_into_its_filesystem() {
    let table = sample();
    let loc = table.locate(Path::new("/srv/backend/volumes")).unwrap();
    assert_eq!(loc.device, (254, 0));
    assert_eq!(loc.root, Path::new("/srv/backend/volumes"));
    // Inside a bind mount the filesystem path is the mount's root plus the rest.
    let loc = table.locate(Path::new("/mnt/tools/sub/x")).unwrap();
    assert_eq!(loc.device, (0, 25));
    assert_eq!(loc.root, Path::new("/sub/x"));
}

#[test]
fn showing_inside_finds_binds_of_subdirectories_only_on_the_same_device() {
    let table = sample();
    let volumes = FsLocation {
        device: (254, 0),
        root: PathBuf::from("/srv/backend/volumes"),
    };
    let found: Vec<(u32, PathBuf)> = table
        .showing_inside(&volumes)
        .map(|(m, rest)| (m.mount_id, rest.to_path_buf()))
        .collect();
    assert_eq!(
        found,
        vec![
            (90, PathBuf::from("v1/data")),
            (91, PathBuf::from("v2/data"))
        ]
    );
    let other_device = FsLocation {
        device: (0, 25),
        ..volumes
    };
    assert_eq!(table.showing_inside(&other_device).count(), 0);
}

#[test]
fn rejects_lines_without_separator() {
    assert!(MountTable::parse(b"1 2 3:4 / / rw shared:1 ext4 /dev/x rw\n").is_err());
    assert!(MountTable::parse(b"x 2 3:4 / / rw - ext4 /dev/x rw\n").is_err());
}

#[test]
fn plain_absolute_paths() {
    assert!(is_plain_absolute(Path::new("/a/b")));
    assert!(!is_plain_absolute(Path::new("a/b")));
    assert!(!is_plain_absolute(Path::new("/a/../b")));
    assert!(!is_plain_absolute(Path::new("/a/..")));
}

/// A real bind mount, read-only remount and unmount (needs root).
#[test]
fn real_bind_mount_read_only_and_unmount() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("source");
    let target = tmp.path().join("target");
    std::fs::create_dir(&source).unwrap();
    std::fs::create_dir(&target).unwrap();
    std::fs::write(source.join("f"), b"hello").unwrap();
    let target = target.canonicalize().unwrap();

    bind_mount(&source, &target, true).unwrap();
    let table = MountTable::read().unwrap();
    let mounted = table.mounted_at(&target).expect("target is a mount point");
    assert!(mounted.is_read_only());
    let source_loc = table.locate(&source.canonicalize().unwrap()).unwrap();
    assert_eq!(mounted.location(), source_loc);
    assert_eq!(std::fs::read(target.join("f")).unwrap(), b"hello");
    let err = std::fs::write(target.join("g"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    // Busy under Never: an open directory handle keeps it mounted.
    let busy = std::fs::File::open(target.join("f")).unwrap();
    assert!(matches!(
        unmount(&target, DetachPolicy::Never),
        Err(MountError::Busy { .. })
    ));
    drop(busy);
    assert_eq!(
        unmount(&target, DetachPolicy::Never).unwrap(),
        Unmounted::Unmounted
    );
    assert_eq!(
        unmount(&target, DetachPolicy::Never).unwrap(),
        Unmounted::NotMounted
    );
    assert!(MountTable::read().unwrap().mounted_at(&target).is_none());
}
