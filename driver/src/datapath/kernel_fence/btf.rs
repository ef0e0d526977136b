//! A minimal reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find
//! the ids of the LSM hook functions and the offsets of the few struct members the fence
//! programs read.
//!
//! Where fuse is a module (most distribution kernels other than "cloud" builds) the FUSE
//! structs are not in vmlinux's BTF but in the module's, `/sys/kernel/btf/fuse`. That is
//! *split* BTF: its type ids continue after vmlinux's last one and its string offsets after
//! vmlinux's string section, and its members refer to vmlinux's types by their ids. So
//! the module's types and strings are appended to vmlinux's, and every lookup works on
//! the whole.
//!
//! Offsets are taken from the running kernel rather than hard-coded because struct layouts
//! change between kernel versions and configurations; a member that is missing, a bitfield
//! or of an unexpected size is an error, so a layout this code does not understand is
//! never guessed at (the caller then does not use passthrough).

use super::KernelFenceError;

/// Where the running kernel publishes its own type information.
pub(super) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The fuse module's types, where fuse is a module.
pub(super) const FUSE_MODULE_BTF: &str = "/sys/kernel/btf/fuse";
/// A FUSE struct the fence reads: present wherever the kernel's FUSE types are.
const FUSE_PROBE_STRUCT: &str = "fuse_mount";

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_MIN_LEN: usize = 24;

const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_FLOAT: u8 = 16;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

/// One member of a struct or union.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Raw `offset` word: a bit offset, or (if the parent's kind_flag is set) a bitfield
    /// size in the top 8 bits and a bit offset in the low 24.
    offset: u32,
}

/// One entry of the type section. Index in [`Btf::types`] is the type id (0 = void).
#[derive(Clone, Debug, Default)]
struct Type {
    name_off: u32,
    kind: u8,
    kind_flag: bool,
    vlen: u16,
    /// `size` for sized kinds, the referenced type id for the others.
    size_or_type: u32,
    /// The extra word of an INT (encoding, bit offset, bit count).
    int_data: u32,
    /// ARRAY: (element type, element count).
    array: (u32, u32),
    members: Vec<Member>,
}

/// A struct member the programs read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Field {
    /// Byte offset within its struct.
    pub offset: u32,
    /// Size in bytes (1, 2, 4 or 8 for the fields we load).
    pub size: u32,
    /// If the member is a pointer to a struct: that struct's name.
    pub pointee: Option<String>,
}

pub(super) struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn bad(what: impl Into<String>) -> KernelFenceError {
    KernelFenceError::Btf(what.into())
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, KernelFenceError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| bad(format!("truncated at byte {at}")))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, KernelFenceError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| bad(format!("truncated at byte {at}")))
}

/// Names the file a parse error is about.
fn in_file(path: &'static str) -> impl Fn(KernelFenceError) -> KernelFenceError {
    move |e| match e {
        KernelFenceError::Btf(what) => bad(format!("{path}: {what}")),
        other => other,
    }
}

fn read(path: &str) -> Result<Vec<u8>, KernelFenceError> {
    std::fs::read(path).map_err(|source| KernelFenceError::Io {
        what: format!("read {path}"),
        source,
    })
}

impl Btf {
    pub(super) fn load_vmlinux() -> Result<Btf, KernelFenceError> {
        Btf::parse(&read(VMLINUX_BTF)?).map_err(in_file(VMLINUX_BTF))
    }

    /// vmlinux's types, with the fuse module's appended where fuse is a module.
    pub(super) fn load_kernel() -> Result<Btf, KernelFenceError> {
        let mut btf = Btf::load_vmlinux()?;
        if btf.has_struct(FUSE_PROBE_STRUCT) {
            return Ok(btf);
        }
        if !std::path::Path::new(FUSE_MODULE_BTF).exists() {
            return Err(bad(format!(
                "no struct `{FUSE_PROBE_STRUCT}` in {VMLINUX_BTF} and no {FUSE_MODULE_BTF}: \
                 FUSE is neither built in nor loaded"
            )));
        }
        btf.append_split(&read(FUSE_MODULE_BTF)?)
            .map_err(in_file(FUSE_MODULE_BTF))?;
        Ok(btf)
    }

    /// Parses raw BTF (little-endian, as on every architecture holdfast runs on).
    pub(super) fn parse(b: &[u8]) -> Result<Btf, KernelFenceError> {
        let (types, strings) = Btf::sections(b)?;
        Ok(Btf {
            types: std::iter::once(Type::default()).chain(types).collect(),
            strings,
        })
    }

    /// Appends split BTF based on this one (a module's): its type ids continue after
    /// ours, its string offsets after our strings, so plain concatenation keeps every id
    /// and offset in it, and in ours, meaning what it meant.
    pub(super) fn append_split(&mut self, b: &[u8]) -> Result<(), KernelFenceError> {
        let (types, strings) = Btf::sections(b)?;
        self.types.extend(types);
        self.strings.extend(strings);
        Ok(())
    }

    fn has_struct(&self, name: &str) -> bool {
        self.types
            .iter()
            .any(|t| t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == name)
    }

    /// The types (void not included) and the string section of raw BTF.
    fn sections(b: &[u8]) -> Result<(Vec<Type>, Vec<u8>), KernelFenceError> {
        if u16_at(b, 0)? != BTF_MAGIC {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        if hdr_len < HEADER_MIN_LEN {
            return Err(bad(format!("header length {hdr_len} too short")));
        }
        let section = |off_at: usize| -> Result<&[u8], KernelFenceError> {
            let off = hdr_len + u32_at(b, off_at)? as usize;
            let len = u32_at(b, off_at + 4)? as usize;
            b.get(off..off + len)
                .ok_or_else(|| bad("section runs past the end of the data"))
        };
        let type_sec = section(8)?;
        let strings = section(16)?.to_vec();

        let mut types = Vec::new();
        let mut at = 0;
        while at < type_sec.len() {
            let info = u32_at(type_sec, at + 4)?;
            let mut t = Type {
                name_off: u32_at(type_sec, at)?,
                kind: ((info >> 24) & 0x1f) as u8,
                kind_flag: info >> 31 == 1,
                vlen: (info & 0xffff) as u16,
                size_or_type: u32_at(type_sec, at + 8)?,
                ..Type::default()
            };
            at += 12;
            let vlen = t.vlen as usize;
            let extra = match t.kind {
                KIND_INT => {
                    t.int_data = u32_at(type_sec, at)?;
                    4
                }
                KIND_ARRAY => {
                    t.array = (u32_at(type_sec, at)?, u32_at(type_sec, at + 8)?);
                    12
                }
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        t.members.push(Member {
                            name_off: u32_at(type_sec, m)?,
                            type_id: u32_at(type_sec, m + 4)?,
                            offset: u32_at(type_sec, m + 8)?,
                        });
                    }
                    12 * vlen
                }
                KIND_ENUM => 8 * vlen,
                KIND_FUNC_PROTO => 8 * vlen,
                14 | 17 => 4,                  // VAR, DECL_TAG
                15 | KIND_ENUM64 => 12 * vlen, // DATASEC, ENUM64
                0 | KIND_PTR | 7 | KIND_TYPEDEF..=KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                k => return Err(bad(format!("unknown type kind {k}"))),
            };
            at += extra;
            types.push(t);
        }
        Ok((types, strings))
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn get(&self, id: u32) -> Result<&Type, KernelFenceError> {
        self.types
            .get(id as usize)
            .ok_or_else(|| bad(format!("type id {id} out of range")))
    }

    /// The id of the FUNC named `name` and the number of parameters of its prototype.
    pub(super) fn func(&self, name: &str) -> Result<(u32, usize), KernelFenceError> {
        let id = (1..self.types.len())
            .find(|&i| self.types[i].kind == KIND_FUNC && self.name(self.types[i].name_off) == name)
            .ok_or_else(|| bad(format!("no FUNC `{name}` (kernel built without BPF LSM?)")))?;
        let proto = self.get(self.types[id].size_or_type)?;
        if proto.kind != KIND_FUNC_PROTO {
            return Err(bad(format!("FUNC `{name}` has no prototype")));
        }
        Ok((id as u32, proto.vlen as usize))
    }

    /// The id of the TYPEDEF named `name` (the tests look up `btf_trace_*` typedefs).
    #[cfg(test)]
    pub(super) fn typedef(&self, name: &str) -> Option<u32> {
        (1..self.types.len())
            .find(|&i| {
                self.types[i].kind == KIND_TYPEDEF && self.name(self.types[i].name_off) == name
            })
            .map(|i| i as u32)
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Result<(u32, &Type), KernelFenceError> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok((id, t)),
            }
        }
        Err(bad(format!("type chain from id {id} too long")))
    }

    fn size_of(&self, id: u32) -> Result<u32, KernelFenceError> {
        let (_, t) = self.resolve(id)?;
        match t.kind {
            KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION | KIND_FLOAT => {
                Ok(t.size_or_type)
            }
            KIND_PTR => Ok(8),
            KIND_ARRAY => Ok(self.size_of(t.array.0)? * t.array.1),
            k => Err(bad(format!("type id {id} (kind {k}) has no size"))),
        }
    }

    /// Finds member `member` of `struct struct_name`, looking into anonymous struct and
    /// union members (the kernel groups many fields that way).
    pub(super) fn field(&self, struct_name: &str, member: &str) -> Result<Field, KernelFenceError> {
        let id = (1..self.types.len())
            .find(|&i| {
                let t = &self.types[i];
                t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == struct_name
            })
            .ok_or_else(|| bad(format!("no struct `{struct_name}`")))?;
        let bits = self
            .find_member(id as u32, member, 0, 0)?
            .ok_or_else(|| bad(format!("struct `{struct_name}` has no member `{member}`")))?;
        let (bit_offset, type_id) = bits;
        let what = format!("{struct_name}.{member}");
        if bit_offset % 8 != 0 {
            return Err(bad(format!("{what} is not byte-aligned")));
        }
        let size = self.size_of(type_id)?;
        let (_, t) = self.resolve(type_id)?;
        if t.kind == KIND_INT && (t.int_data & 0xff) != size * 8 {
            return Err(bad(format!("{what} is a bitfield")));
        }
        let pointee = if t.kind == KIND_PTR {
            let (_, target) = self.resolve(t.size_or_type)?;
            (target.kind == KIND_STRUCT).then(|| self.name(target.name_off).to_string())
        } else {
            None
        };
        Ok(Field {
            offset: bit_offset / 8,
            size,
            pointee,
        })
    }

    /// Returns (bit offset from the outermost struct, member type id).
    fn find_member(
        &self,
        id: u32,
        member: &str,
        base_bits: u32,
        depth: u32,
    ) -> Result<Option<(u32, u32)>, KernelFenceError> {
        if depth > 8 {
            return Ok(None);
        }
        let t = self.get(id)?;
        for m in &t.members {
            let (bit_offset, bitfield_size) = if t.kind_flag {
                (m.offset & 0xff_ffff, m.offset >> 24)
            } else {
                (m.offset, 0)
            };
            let name = self.name(m.name_off);
            if name == member {
                if bitfield_size != 0 {
                    return Err(bad(format!("member `{member}` is a bitfield")));
                }
                return Ok(Some((base_bits + bit_offset, m.type_id)));
            }
            if name.is_empty() {
                let (inner, it) = self.resolve(m.type_id)?;
                if matches!(it.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some(found) =
                        self.find_member(inner, member, base_bits + bit_offset, depth + 1)?
                    {
                        return Ok(Some(found));
                    }
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmlinux_btf_has_the_fence_hooks_and_fields() {
        let Ok(bytes) = std::fs::read(VMLINUX_BTF) else {
            eprintln!("SKIP: {VMLINUX_BTF} not readable; this kernel exposes no BTF");
            return;
        };
        let btf = Btf::parse(&bytes).expect("vmlinux BTF parses");
        let (perm, perm_args) = btf.func("bpf_lsm_file_permission").unwrap();
        let (mmap, mmap_args) = btf.func("bpf_lsm_mmap_file").unwrap();
        assert!(perm > 0 && mmap > 0 && perm != mmap);
        assert_eq!((perm_args, mmap_args), (2, 4));

        let f_inode = btf.field("file", "f_inode").unwrap();
        assert!(
            f_inode.offset > 0,
            "f_inode is not the first member of struct file"
        );
        assert_eq!(f_inode.size, 8);
        assert_eq!(f_inode.pointee.as_deref(), Some("inode"));
        assert_eq!(btf.field("super_block", "s_dev").unwrap().size, 4);
        assert_eq!(
            btf.field("inode", "i_sb").unwrap().pointee.as_deref(),
            Some("super_block")
        );
        assert!(btf.field("file", "no_such_member").is_err());
        assert!(btf.func("no_such_function_anywhere").is_err());
    }

    /// Raw BTF of `types` (12-byte type entries with their trailing data, as words)
    /// and `strings`.
    fn raw(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_len = 4 * types.len() as u32;
        let header = [
            u32::from(BTF_MAGIC) | 1 << 16, // magic, version 1, flags 0
            HEADER_MIN_LEN as u32,
            0,
            type_len,
            type_len,
            strings.len() as u32,
        ];
        let words = header.iter().chain(types).flat_map(|w| w.to_le_bytes());
        words.chain(strings.iter().copied()).collect()
    }

    fn info(kind: u8, vlen: u32) -> u32 {
        (kind as u32) << 24 | vlen
    }

    /// Module BTF as the kernel publishes it for a fuse module: ids and string offsets
    /// continue after vmlinux's, and members use vmlinux's types by id.
    #[test]
    fn module_types_are_found_through_split_btf() {
        // vmlinux: 1 = unsigned int.
        let base_strings = b"\0unsigned int\0";
        let vmlinux = raw(&[1, info(KIND_INT, 0), 4, 32], base_strings);
        // fuse: 2 = struct fuse_conn { u64 pad; unsigned int connected; }, 3 = a pointer
        // to it, 4 = struct fuse_mount { struct fuse_conn *fc; }.
        let at = base_strings.len() as u32;
        let module_strings = b"fuse_conn\0connected\0fuse_mount\0fc\0";
        let (conn, connected, mount, fc) = (at, at + 10, at + 20, at + 31);
        let module = raw(
            &[
                conn,
                info(KIND_STRUCT, 1),
                16,
                connected,
                1,
                64, //
                0,
                info(KIND_PTR, 0),
                2, //
                mount,
                info(KIND_STRUCT, 1),
                8,
                fc,
                3,
                0,
            ],
            module_strings,
        );

        let mut btf = Btf::parse(&vmlinux).unwrap();
        assert!(!btf.has_struct("fuse_mount"));
        btf.append_split(&module).unwrap();
        assert!(btf.has_struct("fuse_mount"));
        let connected = btf.field("fuse_conn", "connected").unwrap();
        assert_eq!((connected.offset, connected.size), (8, 4), "a vmlinux type");
        let fc = btf.field("fuse_mount", "fc").unwrap();
        assert_eq!((fc.offset, fc.size), (0, 8));
        assert_eq!(fc.pointee.as_deref(), Some("fuse_conn"), "a module type");
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(&[0u8; 8]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
    }
}
