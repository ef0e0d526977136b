//! Reading the mount table and clearing every mount a run left under its temp dir.
//! Parsed here, not with the driver's code, so the driver is not trusted to check itself.

use std::path::{Path, PathBuf};

/// One `/proc/self/mountinfo` line: mount point and filesystem type.
#[derive(Clone, Debug)]
pub struct MountLine {
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// Every mount in this process's mount namespace (octal escapes such as `\040` decoded).
pub fn mounts() -> Vec<MountLine> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(MountLine {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type: fields.get(dash + 1)?.to_string(),
            })
        })
        .collect()
}

/// The mounts whose mount point is exactly `path`, bottom first.
pub fn mounts_at(path: &Path) -> Vec<MountLine> {
    mounts()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let code = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("0");
            out.push(u8::from_str_radix(code, 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts every mount at or below `dir`, deepest first, until none is left.
/// Lazy (MNT_DETACH) so that a dead or frozen FUSE mount cannot make cleanup hang.
pub fn sweep(dir: &Path) {
    for _ in 0..100 {
        let mut below: Vec<PathBuf> = mounts()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(dir))
            .collect();
        if below.is_empty() {
            return;
        }
        below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for path in below {
            let _ = rustix::mount::unmount(&path, rustix::mount::UnmountFlags::DETACH);
        }
    }
}
