//! Finding and killing the processes that use a bind-mounted volume: the bind data
//! path's only way to stop I/O once its gate stops (fenced, or its session deadline
//! passed). FUSE volumes need none of this: their gate refuses every operation.
//!
//! A process uses the volume if its cwd, root, an open file descriptor or a memory
//! mapping lies under one of the volume's views: the plugin's bind targets of the
//! volume, and — read from that process's own `/proc/<pid>/mountinfo`, once per mount
//! namespace other than the plugin's — every mount in its namespace that shows the
//! volume's data directory (a container sees the volume at its own mount point, e.g.
//! `/data`). The plugin runs with `hostPID`, so every process on the node is listed in
//! `/proc`. In other namespaces any mount of the data directory counts: on one node a
//! second holder of the same volume cannot exist while this one's claim is not over.
//!
//! What this cannot guarantee (the bind mode's honest limits):
//! - a process the scan misses: in another PID namespace without `hostPID` on the
//!   plugin, or one that opens the volume after the scan (the next tick kills it);
//! - I/O already in the kernel at the instant of the kill (a write(2) in progress
//!   completes; dirty pages already written are flushed to the storage later);
//! - anything written between the moment the gate stopped and the scan that follows
//!   (at most one enforcement tick, or the wake-up at the session deadline).
//!
//! The FUSE data path has none of these gaps; choose it where they matter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::publish::kernel_mounts::{FsLocation, MountTable};

/// Where a volume can be seen from.
#[derive(Clone, Debug)]
pub struct VolumeViews {
    /// Paths in this process's mount namespace (bind target, backing data directory).
    pub paths: Vec<PathBuf>,
    /// The backing data directory as (device, path inside its filesystem), to find the
    /// volume's mounts in other mount namespaces. `None`: paths only.
    pub location: Option<FsLocation>,
}

/// A process found using a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HolderProcess {
    pub pid: i32,
    pub command: String,
    /// What ties it to the volume, e.g. "cwd /var/lib/kubelet/.../mount".
    pub uses: String,
}

/// Every process other than this one that uses the volume.
pub fn find(views: &VolumeViews) -> Vec<HolderProcess> {
    scan(views, false)
}

/// [`find`], and also every process of a mount namespace (other than this process's)
/// that shows the volume at a mount point that is not one of `views.paths`: a
/// container's bind of the target (at `/data`, say) lets each of its processes open the
/// volume at any moment, whether or not one has anything open now. A namespace that
/// shows the volume only at a target's own path has merely received the plugin's mount
/// by propagation (the host's, kubelet's, another pod's with the kubelet directory
/// mounted): there only processes with something open count, as in [`find`].
///
/// This is the proof [`crate::lock::gone_pods`] needs before releasing a claim nobody
/// unpublished: an empty answer means no process can issue I/O through the volume's
/// mounts (in the PID namespace scanned: the plugin runs with `hostPID`).
pub fn users(views: &VolumeViews) -> Vec<HolderProcess> {
    scan(views, true)
}

/// What one mount namespace shows of the volume.
struct NamespaceView {
    /// Mount points showing the volume, for the path checks.
    prefixes: Vec<PathBuf>,
    /// One that is not a target's own path (see [`users`]).
    own_mount: Option<PathBuf>,
}

fn scan(views: &VolumeViews, whole_namespaces: bool) -> Vec<HolderProcess> {
    let me = std::process::id() as i32;
    let mut per_namespace: HashMap<PathBuf, NamespaceView> = HashMap::new();
    // In our own namespace only the given paths count: another mount of the same data
    // directory here is another plugin instance's target, not ours to police.
    if let Ok(own) = std::fs::read_link("/proc/self/ns/mnt") {
        let view = NamespaceView {
            prefixes: Vec::new(),
            own_mount: None,
        };
        per_namespace.insert(own, view);
    }
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let proc_dir = entry.path();
        let mut prefixes = views.paths.clone();
        let mut own_mount = None;
        if let (Some(location), Ok(ns)) =
            (&views.location, std::fs::read_link(proc_dir.join("ns/mnt")))
        {
            let view = per_namespace.entry(ns).or_insert_with(|| {
                let prefixes = mounts_showing(&proc_dir, location);
                let own_mount = prefixes
                    .iter()
                    .find(|m| !views.paths.iter().any(|p| p == *m))
                    .cloned();
                NamespaceView {
                    prefixes,
                    own_mount,
                }
            });
            prefixes.extend(view.prefixes.iter().cloned());
            own_mount = view.own_mount.clone();
        }
        let uses = match (whole_namespaces, own_mount) {
            (true, Some(mount)) => Some(format!(
                "its mount namespace shows the volume at {}",
                mount.display()
            )),
            _ => uses_volume(&proc_dir, &prefixes),
        };
        if let Some(uses) = uses {
            let command = std::fs::read_to_string(proc_dir.join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            found.push(HolderProcess { pid, command, uses });
        }
    }
    found
}

/// SIGKILLs every process [`find`] reports; returns those it signalled.
pub fn kill_all(views: &VolumeViews) -> Vec<HolderProcess> {
    let mut killed = Vec::new();
    for holder in find(views) {
        let Some(pid) = rustix::process::Pid::from_raw(holder.pid) else {
            continue;
        };
        match rustix::process::kill_process(pid, rustix::process::Signal::KILL) {
            Ok(()) => killed.push(holder),
            // Exited meanwhile.
            Err(rustix::io::Errno::SRCH) => {}
            Err(e) => {
                tracing::error!(pid = holder.pid, error = %e, "cannot kill a process using a fenced volume")
            }
        }
    }
    killed
}

/// Mount points in `proc_dir`'s mount namespace that show `location` or a directory in it.
fn mounts_showing(proc_dir: &Path, location: &FsLocation) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read(proc_dir.join("mountinfo")) else {
        return Vec::new();
    };
    let Ok(table) = MountTable::parse(&text) else {
        return Vec::new();
    };
    table
        .showing_inside(location)
        .map(|(mount, _)| mount.mount_point.clone())
        .collect()
}

fn uses_volume(proc_dir: &Path, prefixes: &[PathBuf]) -> Option<String> {
    let under = |path: &Path| prefixes.iter().any(|p| path.starts_with(p));
    for link in ["cwd", "root"] {
        if let Ok(path) = std::fs::read_link(proc_dir.join(link)) {
            if under(&path) {
                return Some(format!("{link} {}", path.display()));
            }
        }
    }
    if let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) {
        for fd in fds.flatten() {
            if let Ok(path) = std::fs::read_link(fd.path()) {
                if under(&path) {
                    return Some(format!(
                        "fd {} {}",
                        fd.file_name().to_string_lossy(),
                        path.display()
                    ));
                }
            }
        }
    }
    if let Ok(maps) = std::fs::read_to_string(proc_dir.join("maps")) {
        for line in maps.lines() {
            // address perms offset dev inode [path]: the path is the sixth field.
            let path = line.splitn(6, ' ').nth(5).map(str::trim_start);
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                if under(Path::new(path)) {
                    return Some(format!("mmap {path}"));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn views(dir: &Path) -> VolumeViews {
        VolumeViews {
            paths: vec![dir.to_path_buf()],
            location: None,
        }
    }

    #[test]
    fn finds_and_kills_a_process_by_cwd_and_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let inside = dir.join("sub");
        std::fs::create_dir(&inside).unwrap();
        let mut by_cwd = Command::new("sleep")
            .arg("60")
            .current_dir(&inside)
            .spawn()
            .unwrap();
        let file = std::fs::File::create(dir.join("held")).unwrap();
        let mut by_fd = Command::new("sleep")
            .arg("60")
            .current_dir(elsewhere.path())
            .stdout(Stdio::from(file))
            .spawn()
            .unwrap();
        let mut bystander = Command::new("sleep")
            .arg("60")
            .current_dir(elsewhere.path())
            .spawn()
            .unwrap();

        let found = find(&views(&dir));
        let pids: Vec<i32> = found.iter().map(|h| h.pid).collect();
        assert!(pids.contains(&(by_cwd.id() as i32)), "{found:?}");
        assert!(pids.contains(&(by_fd.id() as i32)), "{found:?}");
        assert!(!pids.contains(&(bystander.id() as i32)), "{found:?}");
        // This process opened nothing there and is never listed anyway.
        assert!(!pids.contains(&(std::process::id() as i32)));

        let killed = kill_all(&views(&dir));
        assert!(killed.len() >= 2, "{killed:?}");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(by_cwd.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(by_fd.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert_eq!(bystander.try_wait().unwrap(), None, "bystander must live");
        bystander.kill().unwrap();
        bystander.wait().unwrap();
    }
}
