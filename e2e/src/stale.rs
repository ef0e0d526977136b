//! What a run that was itself killed leaves behind, removed by the next run: its temp
//! dir (`/tmp/hf-e2e-<pid>-*`, named after the dead process), the dead FUSE mounts under
//! it, and the plugins and controller it started. (Its namespaces and veths are removed
//! by [`crate::netns::remove_stale`]; its etcd, started by the core testkit, is not
//! tagged and stays.)

use std::path::Path;

use crate::mounts;

pub const TMP_PREFIX: &str = "hf-e2e-";

/// Unmounts and removes the temp dirs of runs whose process is gone (a run that was
/// itself killed cannot clean up; its plugins' dead FUSE mounts would stay forever).
pub fn remove_stale_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(TMP_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        let owner_gone = !pid.is_empty()
            && pid.chars().all(|c| c.is_ascii_digit())
            && !Path::new(&format!("/proc/{pid}")).exists();
        if owner_gone && entry.path().is_dir() {
            kill_processes_using(&entry.path());
            mounts::sweep(&entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// SIGKILLs the plugins and controller a killed run left behind: every process whose
/// command line names `dir` (their sockets and roots are all under it).
fn kill_processes_using(dir: &Path) {
    let needle = dir.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}
