//! Creating the fence's maps and program links once and pinning them on bpffs, or
//! reopening the pinned ones.
//!
//! Pinning is what makes the fence outlive the plugin: a pinned link keeps its program
//! attached and a pinned map keeps its guards after every fd is closed. Processes that
//! open the same pin directory at once serialise on an exclusive `flock` of the directory,
//! so exactly one creates what is missing and the others reopen it; a pin that still
//! appears meanwhile (`EEXIST`, e.g. from a process not taking the lock) is reopened
//! instead of ours.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use super::btf::Btf;
use super::program::{self, KernelLayout, Maps};
use super::{io_err, syscall, KernelFenceError};

const SECURITYFS: &str = "/sys/kernel/security";
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Guards: one per mounted volume on this node.
const GUARDS_MAX: u32 = 4096;
/// Passthrough inodes: one per open passthrough file.
const PASSTHROUGH_MAX: u32 = 65536;

pub(super) struct Pinned {
    pub guards: OwnedFd,
    pub passthrough: OwnedFd,
    pub links: [OwnedFd; 2],
}

/// Serialises mounting within this process (two threads must not stack two mounts).
static MOUNTING: Mutex<()> = Mutex::new(());

fn mount(source: &str, target: &str, fstype: &str, data: &str) -> io::Result<()> {
    use std::ffi::CString;
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (source, target, fstype, data) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// `f_type`'s width differs between architectures.
#[allow(clippy::unnecessary_cast)]
fn fs_magic(path: &Path) -> Option<i64> {
    rustix::fs::statfs(path).ok().map(|s| s.f_type as i64)
}

/// The active LSMs, in order; empty if the list cannot be read even after mounting
/// securityfs.
pub(super) fn active_lsms() -> Vec<String> {
    let list = Path::new(SECURITYFS).join("lsm");
    let read = || std::fs::read_to_string(&list).ok();
    let text = read().or_else(|| {
        let _serial = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
        read().or_else(|| {
            mount("securityfs", SECURITYFS, "securityfs", "").ok()?;
            read()
        })
    });
    text.unwrap_or_default()
        .trim()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Mounts bpffs at /sys/fs/bpf if `pin_dir` is under it and nothing is mounted there.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), KernelFenceError> {
    if !pin_dir.starts_with(BPFFS) {
        return Ok(());
    }
    let _serial = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
    if fs_magic(Path::new(BPFFS)) != Some(BPF_FS_MAGIC) {
        mount("bpf", BPFFS, "bpf", "mode=0700")
            .map_err(io_err(format!("mount bpffs at {BPFFS}")))?;
    }
    Ok(())
}

/// Opens the pin at `path`; if there is none, pins the object `create` makes. Returns the
/// fd and whether it was created here.
fn get_or_pin(
    path: &Path,
    create: impl FnOnce() -> Result<OwnedFd, KernelFenceError>,
) -> Result<(OwnedFd, bool), KernelFenceError> {
    match syscall::obj_get(path) {
        Ok(fd) => return Ok((fd, false)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(io_err(format!("open the pin {}", path.display()))(e)),
    }
    let fd = create()?;
    match syscall::obj_pin(fd.as_fd(), path) {
        Ok(()) => Ok((fd, true)),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            // Someone pinned theirs first: share it, drop ours.
            let theirs = syscall::obj_get(path)
                .map_err(io_err(format!("open the pin {}", path.display())))?;
            Ok((theirs, false))
        }
        Err(e) => Err(io_err(format!("pin {}", path.display()))(e)),
    }
}

fn load_and_attach(
    program: &'static str,
    insns: &[super::asm::Insn],
    btf_id: u32,
) -> Result<OwnedFd, KernelFenceError> {
    let prog = syscall::prog_load(program, insns, syscall::Target::lsm(btf_id)).map_err(
        |(source, log)| {
            // Refused before the verifier ran (nothing logged): a kernel policy against the
            // program type, not a fault in the program.
            if source.raw_os_error() == Some(libc::EPERM) && log.trim().is_empty() {
                KernelFenceError::LsmRefused { program, source }
            } else {
                KernelFenceError::ProgLoad {
                    program,
                    source,
                    log: trim_log(&log),
                }
            }
        },
    )?;
    // The link holds the program; the program fd can close once it is attached.
    syscall::link_create_lsm(prog.as_fd())
        .map_err(io_err(format!("attach the `{program}` LSM program")))
}

/// The end of a verifier log, where the reason for a rejection is.
fn trim_log(log: &str) -> String {
    const KEEP: usize = 4000;
    let log = log.trim();
    match log.char_indices().rev().nth(KEEP) {
        Some((cut, _)) => format!("…{}", &log[cut..]),
        None => log.to_string(),
    }
}

/// The pin directory, created and locked: held until the pins are settled.
struct LockedDir {
    _held: std::fs::File,
}

fn lock_pin_dir(pin_dir: &Path) -> Result<LockedDir, KernelFenceError> {
    ensure_bpffs(pin_dir)?;
    std::fs::create_dir_all(pin_dir).map_err(io_err(format!("create {}", pin_dir.display())))?;
    if fs_magic(pin_dir) != Some(BPF_FS_MAGIC) {
        return Err(KernelFenceError::NotBpffs {
            pin_dir: pin_dir.to_path_buf(),
        });
    }
    let dir =
        std::fs::File::open(pin_dir).map_err(io_err(format!("open {}", pin_dir.display())))?;
    rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_err(format!("lock {}", pin_dir.display()))(e.into()))?;
    Ok(LockedDir { _held: dir })
}

/// The two maps, reopened or created and pinned; `true` if any was created here.
fn maps(pin_dir: &Path, _locked: &LockedDir) -> Result<(OwnedFd, OwnedFd, bool), KernelFenceError> {
    let (guards, new_guards) = get_or_pin(&pin_dir.join(GUARDS_PIN), || {
        syscall::map_create("hf_guards", 4, 16, GUARDS_MAX).map_err(io_err("create the guards map"))
    })?;
    let (passthrough, new_passthrough) = get_or_pin(&pin_dir.join(PASSTHROUGH_PIN), || {
        syscall::map_create("hf_passthrough", 16, 4, PASSTHROUGH_MAX)
            .map_err(io_err("create the passthrough map"))
    })?;
    Ok((guards, passthrough, new_guards || new_passthrough))
}

pub(super) const GUARDS_PIN: &str = "guards";
const PASSTHROUGH_PIN: &str = "passthrough";
const LINK_PINS: [&str; 2] = ["file_permission_link", "mmap_file_link"];

pub(super) fn open_or_create(pin_dir: &Path) -> Result<Pinned, KernelFenceError> {
    let locked = lock_pin_dir(pin_dir)?;
    let (guards, passthrough, new_maps) = maps(pin_dir, &locked)?;
    if new_maps {
        // Links pinned with maps that are gone would keep enforcing their stale guards;
        // replace them (unpinning detaches a program once nobody holds its link).
        for name in LINK_PINS {
            let _ = std::fs::remove_file(pin_dir.join(name));
        }
    }
    let mut layout = None;
    let mut link = |pin: &str, file_permission: bool| -> Result<OwnedFd, KernelFenceError> {
        let (fd, _) = get_or_pin(&pin_dir.join(pin), || {
            let l: &KernelLayout = match &layout {
                Some(l) => l,
                None => layout.insert(KernelLayout::from_btf(&Btf::load_kernel()?)?),
            };
            let maps = Maps {
                guards: guards.as_raw_fd(),
                passthrough: passthrough.as_raw_fd(),
            };
            if file_permission {
                load_and_attach(
                    "file_permission",
                    &program::file_permission(l, &maps),
                    l.file_permission_id,
                )
            } else {
                load_and_attach("mmap_file", &program::mmap_file(l, &maps), l.mmap_file_id)
            }
        })?;
        Ok(fd)
    };
    let links = link(LINK_PINS[0], true).and_then(|a| Ok([a, link(LINK_PINS[1], false)?]));
    match links {
        Ok(links) => Ok(Pinned {
            guards,
            passthrough,
            links,
        }),
        Err(e) => {
            if new_maps {
                // Leave no half-made fence behind: maps nobody's program reads.
                for name in [GUARDS_PIN, PASSTHROUGH_PIN].into_iter().chain(LINK_PINS) {
                    let _ = std::fs::remove_file(pin_dir.join(name));
                }
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn trims_long_logs_to_their_end() {
        let log = format!("{}the reason", "x".repeat(10_000));
        let t = trim_log(&log);
        assert!(t.len() < 4100 && t.ends_with("the reason"));
        assert_eq!(trim_log(" short \n"), "short");
    }

    /// Processes (here: threads) opening one pin directory at once end with the same
    /// maps: what one writes, every other one reads.
    #[test]
    fn concurrent_openers_share_one_set_of_maps() {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/holdfast-test-{}-maps",
            std::process::id()
        ));
        let opened: Vec<_> = (0..4)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let locked = lock_pin_dir(&dir).unwrap();
                    maps(&dir, &locked).unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(opened.iter().filter(|(_, _, created)| *created).count(), 1);
        for (i, (guards, passthrough, _)) in opened.iter().enumerate() {
            let key = (i as u32).to_ne_bytes();
            syscall::map_update(guards.as_fd(), &key, &[i as u8; 16]).unwrap();
            syscall::map_update(passthrough.as_fd(), &[i as u8; 16], &[1; 4]).unwrap();
        }
        for (guards, passthrough, _) in &opened {
            for i in 0..opened.len() {
                let mut v = [0u8; 16];
                assert!(
                    syscall::map_lookup(guards.as_fd(), &(i as u32).to_ne_bytes(), &mut v).unwrap()
                );
                assert_eq!(v, [i as u8; 16]);
                assert!(
                    syscall::map_lookup(passthrough.as_fd(), &[i as u8; 16], &mut [0; 4]).unwrap()
                );
            }
        }
        syscall::map_delete(opened[0].0.as_fd(), &0u32.to_ne_bytes()).unwrap();
        assert!(
            !syscall::map_lookup(opened[1].0.as_fd(), &0u32.to_ne_bytes(), &mut [0; 16]).unwrap()
        );
        for name in [GUARDS_PIN, PASSTHROUGH_PIN] {
            std::fs::remove_file(dir.join(name)).unwrap();
        }
        std::fs::remove_dir(&dir).unwrap();
    }
}
