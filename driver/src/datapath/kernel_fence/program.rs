//! The two BPF LSM programs of the fence, assembled instruction by instruction.
//!
//! `file_permission` runs on every read, write, readdir, splice, copy and fallocate in the
//! system; it looks the file's superblock device up in the guards map and refuses the
//! access once the guard's deadline (CLOCK_BOOTTIME) has passed, or — for a FUSE guard —
//! once the FUSE connection is gone. `mmap_file` refuses shared mappings of writable
//! files on passthrough inodes (their page faults would reach the backing file without a
//! syscall) and every mapping on an expired guard. A FUSE guard refuses nothing unless
//! the superblock is one of our `fuse.holdfast` mounts: device numbers are reused, so a
//! stale guard may name someone else's filesystem.
//!
//! Member offsets come from the running kernel's BTF ([`KernelLayout`]), so the programs
//! fit whatever kernel they are loaded into; the verifier checks every load against the
//! same BTF.

use super::asm::*;
use super::btf::{Btf, Field};
use super::KernelFenceError;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_PROBE_READ_KERNEL: i32 = 113;
const HELPER_KTIME_GET_BOOT_NS: i32 = 125;

/// `FUSE_SUPER_MAGIC`: `super_block.s_magic` of every FUSE filesystem.
const FUSE_SUPER_MAGIC: i32 = 0x6573_5546;
/// `super_block.s_subtype` of our mounts (type `fuse.holdfast`), NUL included.
const OUR_SUBTYPE: &[u8; 9] = b"holdfast\0";

const EIO: i32 = 5;
const EACCES: i32 = 13;
const ENOTCONN: i32 = 107;

/// Guard value flag: the filesystem is a FUSE mount; refuse once its connection is gone.
pub(super) const GUARD_FUSE: u32 = 1;

/// The maps the programs read, by fd (the kernel swaps each fd for its map at load):
/// guards (u32 dev → {u64 deadline_ns, u32 flags, u32 pad}) and passthrough inodes
/// ({u32 dev, u32 pad, u64 ino} → u32).
pub(super) struct Maps {
    pub guards: i32,
    pub passthrough: i32,
}

/// Member offsets and hook ids of the running kernel.
#[derive(Clone, Debug)]
pub(super) struct KernelLayout {
    pub file_permission_id: u32,
    pub mmap_file_id: u32,
    f_inode: Field,
    f_mode: Field,
    i_sb: Field,
    i_ino: Field,
    s_dev: Field,
    s_magic: Field,
    s_subtype: Field,
    s_fs_info: Field,
    fm_fc: Field,
    fc_connected: Field,
}

fn expect(
    f: Field,
    what: &str,
    size: u32,
    pointee: Option<&str>,
) -> Result<Field, KernelFenceError> {
    if f.size != size || f.pointee.as_deref() != pointee {
        return Err(KernelFenceError::Btf(format!(
            "{what}: expected {size} bytes{}, found {f:?}",
            pointee
                .map(|p| format!(" pointing to struct {p}"))
                .unwrap_or_default()
        )));
    }
    Ok(f)
}

impl KernelLayout {
    pub(super) fn from_btf(btf: &Btf) -> Result<KernelLayout, KernelFenceError> {
        let (file_permission_id, perm_args) = btf.func("bpf_lsm_file_permission")?;
        let (mmap_file_id, mmap_args) = btf.func("bpf_lsm_mmap_file")?;
        if (perm_args, mmap_args) != (2, 4) {
            return Err(KernelFenceError::Btf(format!(
                "hook arities changed: file_permission {perm_args}, mmap_file {mmap_args}"
            )));
        }
        Ok(KernelLayout {
            file_permission_id,
            mmap_file_id,
            f_inode: expect(
                btf.field("file", "f_inode")?,
                "file.f_inode",
                8,
                Some("inode"),
            )?,
            f_mode: expect(btf.field("file", "f_mode")?, "file.f_mode", 4, None)?,
            i_sb: expect(
                btf.field("inode", "i_sb")?,
                "inode.i_sb",
                8,
                Some("super_block"),
            )?,
            i_ino: expect(btf.field("inode", "i_ino")?, "inode.i_ino", 8, None)?,
            s_dev: expect(
                btf.field("super_block", "s_dev")?,
                "super_block.s_dev",
                4,
                None,
            )?,
            s_magic: expect(
                btf.field("super_block", "s_magic")?,
                "super_block.s_magic",
                8,
                None,
            )?,
            s_subtype: expect(
                btf.field("super_block", "s_subtype")?,
                "super_block.s_subtype",
                8,
                None,
            )?,
            s_fs_info: expect(
                btf.field("super_block", "s_fs_info")?,
                "super_block.s_fs_info",
                8,
                None,
            )?,
            fm_fc: expect(
                btf.field("fuse_mount", "fc")?,
                "fuse_mount.fc",
                8,
                Some("fuse_conn"),
            )?,
            fc_connected: expect(
                btf.field("fuse_conn", "connected")?,
                "fuse_conn.connected",
                4,
                None,
            )?,
        })
    }
}

/// `r9 = file->f_inode->i_sb` for the file in `file` (a BTF pointer; every load on it
/// is a checked kernel read, so a NULL on the way reads as 0 rather than faulting).
fn load_sb(a: &mut Asm, l: &KernelLayout, file: u8) {
    a.load_field(R2, file, &l.f_inode)
        .load_field(R9, R2, &l.i_sb);
}

/// `r0 = guards[dev]` with the dev key stored at `fp + key_at`.
fn lookup_guard(a: &mut Asm, maps: &Maps, dev: u8, key_at: i16) {
    a.store(FP, key_at, dev, 4)
        .mov(R2, FP)
        .add_imm(R2, key_at as i32)
        .load_map(R1, maps.guards)
        .call(HELPER_MAP_LOOKUP_ELEM);
}

/// Jumps to `not_ours` unless the superblock in `sb` is one of our FUSE mounts:
/// `s_magic` is FUSE's and `s_subtype` is exactly "holdfast". The subtype is read into
/// the 9 stack bytes at `fp + buf_at` with a checked read; a read that fails (a FUSE
/// mount without subtype has a NULL one) means "not ours".
///
/// Why: guards are keyed by device number, and the kernel hands a freed anonymous device
/// number to the next filesystem mounted. A guard left behind by a mount that is gone
/// would otherwise refuse every access to whatever filesystem gets its number next.
fn jump_unless_ours(a: &mut Asm, l: &KernelLayout, sb: u8, buf_at: i16, not_ours: &'static str) {
    a.load_field(R1, sb, &l.s_magic)
        .jump_imm(JNE, R1, FUSE_SUPER_MAGIC, not_ours)
        .load_field(R3, sb, &l.s_subtype)
        .mov(R1, FP)
        .add_imm(R1, buf_at as i32)
        .mov_imm(R2, OUR_SUBTYPE.len() as i32)
        .call(HELPER_PROBE_READ_KERNEL)
        .jump_imm(JNE, R0, 0, not_ours)
        .load(R1, FP, buf_at, 8)
        .load_imm64(
            R2,
            u64::from_ne_bytes(OUR_SUBTYPE[..8].try_into().expect("8 bytes")),
        )
        .jump_reg(JNE, R1, R2, not_ours)
        .load(R1, FP, buf_at + 8, 1)
        .jump_imm(JNE, R1, OUR_SUBTYPE[8] as i32, not_ours);
}

/// `file_permission(struct file *file, int mask)`.
pub(super) fn file_permission(l: &KernelLayout, maps: &Maps) -> Vec<Insn> {
    let mut a = Asm::default();
    a.load(R6, R1, 0, 8).jump_imm(JEQ, R6, 0, "allow");
    load_sb(&mut a, l, R6);
    a.load_field(R3, R9, &l.s_dev);
    lookup_guard(&mut a, maps, R3, -4);
    a.jump_imm(JEQ, R0, 0, "allow")
        .load(R7, R0, 0, 8) // deadline_ns
        .load(R8, R0, 8, 4) // flags
        .and_imm(R8, GUARD_FUSE as i32)
        .jump_imm(JEQ, R8, 0, "deadline");
    // A FUSE guard whose device number now belongs to a filesystem that is not ours is
    // stale: it refuses nothing.
    jump_unless_ours(&mut a, l, R9, -40, "allow");
    // FUSE guard: s_fs_info is the superblock's struct fuse_mount (a void * to BTF, so a
    // plain number here); read fuse_mount.fc and fuse_conn.connected with checked reads.
    // A failed read counts as "disconnected": the fence fails closed.
    a.load_field(R3, R9, &l.s_fs_info)
        .add_imm(R3, l.fm_fc.offset as i32)
        .mov(R1, FP)
        .add_imm(R1, -16)
        .mov_imm(R2, 8)
        .call(HELPER_PROBE_READ_KERNEL)
        .jump_imm(JNE, R0, 0, "notconn")
        .load(R3, FP, -16, 8)
        .add_imm(R3, l.fc_connected.offset as i32)
        .mov(R1, FP)
        .add_imm(R1, -24)
        .mov_imm(R2, 4)
        .call(HELPER_PROBE_READ_KERNEL)
        .jump_imm(JNE, R0, 0, "notconn")
        .load(R1, FP, -24, 4)
        .jump_imm(JEQ, R1, 0, "notconn");
    a.label("deadline")
        .call(HELPER_KTIME_GET_BOOT_NS)
        .jump_reg(JGE, R0, R7, "expired");
    a.label("allow").ret(0);
    a.label("notconn").ret(-ENOTCONN);
    a.label("expired").ret(-EIO);
    a.finish()
}

/// `mmap_file(struct file *file, unsigned long reqprot, unsigned long prot,
/// unsigned long flags)`.
pub(super) fn mmap_file(l: &KernelLayout, maps: &Maps) -> Vec<Insn> {
    mmap_file_with_flags_at(l, maps, 3)
}

/// [`mmap_file`] reading the mmap flags from argument `flags_arg` (the tests load it on
/// a hook with fewer arguments to have the verifier check it).
pub(super) fn mmap_file_with_flags_at(l: &KernelLayout, maps: &Maps, flags_arg: i16) -> Vec<Insn> {
    let mut a = Asm::default();
    a.load(R6, R1, 0, 8)
        .load(R7, R1, 8 * flags_arg, 8) // flags
        .jump_imm(JEQ, R6, 0, "allow"); // anonymous mapping
    load_sb(&mut a, l, R6);
    a.load_field(R3, R9, &l.s_dev);
    lookup_guard(&mut a, maps, R3, -4);
    // r8 = the guard's deadline; none (all ones, never reached) without a guard.
    a.mov_imm(R8, -1)
        .jump_imm(JEQ, R0, 0, "passthrough")
        .load(R8, R0, 0, 8)
        .load(R1, R0, 8, 4)
        .and_imm(R1, GUARD_FUSE as i32)
        .jump_imm(JEQ, R1, 0, "passthrough");
    // A stale FUSE guard on a filesystem that is not ours refuses nothing; its
    // passthrough marks are as stale as it is.
    jump_unless_ours(&mut a, l, R9, -40, "allow");
    // A shared mapping of a file open for writing on a passthrough inode: its page
    // faults would write the backing file with no syscall the fence sees.
    a.label("passthrough")
        .mov(R1, R7)
        .and_imm(R1, libc::MAP_SHARED)
        .jump_imm(JEQ, R1, 0, "deadline")
        .load_field(R1, R6, &l.f_mode)
        .and_imm(R1, FMODE_WRITE)
        .jump_imm(JEQ, R1, 0, "deadline")
        .load_field(R1, R9, &l.s_dev)
        .store(FP, -24, R1, 4)
        .store_imm(FP, -20, 0, 4)
        .load_field(R2, R6, &l.f_inode)
        .load_field(R1, R2, &l.i_ino)
        .store(FP, -16, R1, 8)
        .mov(R2, FP)
        .add_imm(R2, -24)
        .load_map(R1, maps.passthrough)
        .call(HELPER_MAP_LOOKUP_ELEM)
        .jump_imm(JNE, R0, 0, "refused");
    a.label("deadline")
        .call(HELPER_KTIME_GET_BOOT_NS)
        .jump_reg(JGE, R0, R8, "expired");
    a.label("allow").ret(0);
    a.label("refused").ret(-EACCES);
    a.label("expired").ret(-EIO);
    a.finish()
}

/// `file->f_mode` bit of a file open for writing.
const FMODE_WRITE: i32 = 0x2;
