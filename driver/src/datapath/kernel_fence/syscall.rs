//! Thin wrappers of the bpf(2) commands the fence needs. Each builds the command's part
//! of `union bpf_attr` as a `#[repr(C)]` struct (the kernel accepts a shorter attr than
//! its own as long as what it does not see would be zero) and returns the kernel's errno
//! as an `io::Error`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::asm::Insn;

const BPF_MAP_CREATE: i32 = 0;
#[cfg(test)]
const BPF_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_MAP_UPDATE_ELEM: i32 = 2;
const BPF_MAP_DELETE_ELEM: i32 = 3;
const BPF_MAP_GET_NEXT_KEY: i32 = 4;
const BPF_PROG_LOAD: i32 = 5;
const BPF_OBJ_PIN: i32 = 6;
const BPF_OBJ_GET: i32 = 7;
const BPF_LINK_CREATE: i32 = 28;

const BPF_MAP_TYPE_HASH: u32 = 1;
/// Entries are allocated on update; only user space updates these maps.
const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_LSM: u32 = 29;
const BPF_LSM_MAC: u32 = 27;
/// MAP_UPDATE_ELEM flag: create or replace.
const BPF_ANY: u64 = 0;

fn bpf<T>(cmd: i32, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] struct of the layout the kernel
    // expects for `cmd`, and its size is passed along; pointers inside it refer to buffers
    // that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn bpf_fd<T>(cmd: i32, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the commands passed here return a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(name.bytes().take(15)) {
        *o = b;
    }
    out
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

pub(super) fn map_create(
    name: &str,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_HASH,
        key_size,
        value_size,
        max_entries,
        map_flags: BPF_F_NO_PREALLOC,
        map_name: name16(name),
        ..Default::default()
    };
    bpf_fd(BPF_MAP_CREATE, &mut attr)
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_elem(cmd: i32, map: BorrowedFd, key: &[u8], value: Option<&mut [u8]>) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.map_or(0, |v| v.as_mut_ptr() as u64),
        flags: BPF_ANY,
    };
    bpf(cmd, &mut attr).map(|_| ())
}

/// Creates or replaces `key → value`. The key and value lengths must be the map's.
pub(super) fn map_update(map: BorrowedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    // The kernel only reads `value` for an update; the copy keeps the signature honest.
    let mut value = value.to_vec();
    map_elem(BPF_MAP_UPDATE_ELEM, map, key, Some(&mut value))
}

/// Removes `key`; a missing key is not an error (the caller wants it gone).
pub(super) fn map_delete(map: BorrowedFd, key: &[u8]) -> io::Result<()> {
    match map_elem(BPF_MAP_DELETE_ELEM, map, key, None) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Reads the value of `key` into `value`; `Ok(false)` if there is none.
#[cfg(test)]
pub(super) fn map_lookup(map: BorrowedFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    match map_elem(BPF_MAP_LOOKUP_ELEM, map, key, Some(value)) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// Upper bound on the steps of [`map_keys`]: a hash map restarts its walk at the first
/// key when the current one is deleted meanwhile, so churn could otherwise loop forever.
const MAX_KEY_STEPS: usize = 1 << 20;

/// Every key of `map` (whose keys are `key_size` bytes), each once. A key added or
/// removed during the walk may be missed or still be listed.
pub(super) fn map_keys(map: BorrowedFd, key_size: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut current: Option<Vec<u8>> = None;
    for _ in 0..MAX_KEY_STEPS {
        let mut next = vec![0u8; key_size];
        let mut attr = NextKeyAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            // No key asks for the first one.
            key: current.as_ref().map_or(0, |k| k.as_ptr() as u64),
            next_key: next.as_mut_ptr() as u64,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
        if seen.insert(next.clone()) {
            keys.push(next.clone());
        }
        current = Some(next);
    }
    Ok(keys)
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_btf_obj_fd: u32,
    _pad: u32,
}

/// Size of the verifier log buffer: the fence programs are tiny, their full log fits.
const LOG_SIZE: usize = 64 * 1024;

/// What a program attaches to: its type, expected attach type and vmlinux BTF id.
#[derive(Clone, Copy, Debug)]
pub(super) struct Target {
    pub prog_type: u32,
    pub attach_type: u32,
    pub btf_id: u32,
}

impl Target {
    /// The BPF LSM hook whose vmlinux BTF FUNC id is `btf_id`.
    pub(super) fn lsm(btf_id: u32) -> Target {
        Target {
            prog_type: BPF_PROG_TYPE_LSM,
            attach_type: BPF_LSM_MAC,
            btf_id,
        }
    }
}

/// Loads a program for `target`. On failure returns the error and the verifier's log
/// (loading once more with logging on, so a successful load pays nothing for the log).
pub(super) fn prog_load(
    name: &str,
    insns: &[Insn],
    target: Target,
) -> Result<OwnedFd, (io::Error, String)> {
    let license = CString::new("GPL").expect("no NUL");
    let load = |log: Option<&mut Vec<u8>>| {
        let mut attr = ProgLoadAttr {
            prog_type: target.prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name16(name),
            expected_attach_type: target.attach_type,
            attach_btf_id: target.btf_id,
            ..Default::default()
        };
        if let Some(log) = log {
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
        }
        bpf_fd(BPF_PROG_LOAD, &mut attr)
    };
    match load(None) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            let mut log = vec![0u8; LOG_SIZE];
            let again = load(Some(&mut log));
            let end = log.iter().position(|&c| c == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]).into_owned();
            match again {
                // Loaded on the second try (a transient failure such as EAGAIN).
                Ok(fd) => Ok(fd),
                Err(_) => Err((first, text)),
            }
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    target_btf_id: u32,
    _pad: u32,
    _cookie: u64,
}

/// Attaches a loaded LSM program to its hook; the hook stays attached while the link
/// exists (an open fd or a pin).
pub(super) fn link_create_lsm(prog: BorrowedFd) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_LSM_MAC,
        ..Default::default()
    };
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn c_path(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Pins a map or link at `path` on a bpffs (`EEXIST` if something is pinned there).
pub(super) fn obj_pin(fd: BorrowedFd, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Opens the object pinned at `path` (`ENOENT` if nothing is).
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    bpf_fd(BPF_OBJ_GET, &mut attr)
}
