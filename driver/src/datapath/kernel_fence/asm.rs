//! A small eBPF assembler: the instruction layout, opcode and register names, and an
//! instruction list with forward jumps to named labels. The fence's programs
//! ([`super::program`]) are written with it.

use super::btf::Field;

/// One eBPF instruction, in the kernel's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Insn {
    pub(super) code: u8,
    /// dst register in the low 4 bits, src register in the high 4 bits.
    pub(super) regs: u8,
    pub(super) off: i16,
    pub(super) imm: i32,
}

// Instruction classes and fields (linux/bpf.h, linux/bpf_common.h).
pub(super) const LD: u8 = 0x00;
pub(super) const LDX: u8 = 0x01;
pub(super) const ST: u8 = 0x02;
pub(super) const STX: u8 = 0x03;
pub(super) const JMP: u8 = 0x05;
pub(super) const ALU64: u8 = 0x07;
pub(super) const MEM: u8 = 0x60;
pub(super) const IMM: u8 = 0x00;
pub(super) const K: u8 = 0x00;
pub(super) const X: u8 = 0x08;
pub(super) const W: u8 = 0x00;
pub(super) const H: u8 = 0x08;
pub(super) const B: u8 = 0x10;
pub(super) const DW: u8 = 0x18;
pub(super) const ADD: u8 = 0x00;
pub(super) const AND: u8 = 0x50;
pub(super) const MOV: u8 = 0xb0;
pub(super) const JEQ: u8 = 0x10;
pub(super) const JGE: u8 = 0x30;
pub(super) const JNE: u8 = 0x50;
pub(super) const CALL: u8 = 0x80;
pub(super) const EXIT: u8 = 0x90;
pub(super) const PSEUDO_MAP_FD: u8 = 1;

pub(super) const R0: u8 = 0;
pub(super) const R1: u8 = 1;
pub(super) const R2: u8 = 2;
pub(super) const R3: u8 = 3;
pub(super) const R6: u8 = 6;
pub(super) const R7: u8 = 7;
pub(super) const R8: u8 = 8;
pub(super) const R9: u8 = 9;
pub(super) const FP: u8 = 10;

/// An instruction list with forward jumps to named labels.
#[derive(Default)]
pub(super) struct Asm {
    insns: Vec<Insn>,
    labels: Vec<(&'static str, usize)>,
    jumps: Vec<(usize, &'static str)>,
}

pub(super) fn field_off(f: &Field) -> i16 {
    f.offset as i16
}

pub(super) fn size_code(size: u32) -> u8 {
    match size {
        1 => B,
        2 => H,
        4 => W,
        _ => DW,
    }
}

impl Asm {
    pub(super) fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        self.insns.push(Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        });
        self
    }
    pub(super) fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.push((name, self.insns.len()));
        self
    }
    /// dst = *(size *)(src + off)
    pub(super) fn load(&mut self, dst: u8, src: u8, off: i16, size: u32) -> &mut Self {
        self.raw(LDX | MEM | size_code(size), dst, src, off, 0)
    }
    pub(super) fn load_field(&mut self, dst: u8, src: u8, f: &Field) -> &mut Self {
        self.load(dst, src, field_off(f), f.size)
    }
    /// *(size *)(dst + off) = src
    pub(super) fn store(&mut self, dst: u8, off: i16, src: u8, size: u32) -> &mut Self {
        self.raw(STX | MEM | size_code(size), dst, src, off, 0)
    }
    /// *(size *)(dst + off) = imm
    pub(super) fn store_imm(&mut self, dst: u8, off: i16, imm: i32, size: u32) -> &mut Self {
        self.raw(ST | MEM | size_code(size), dst, 0, off, imm)
    }
    pub(super) fn mov(&mut self, dst: u8, src: u8) -> &mut Self {
        self.raw(ALU64 | MOV | X, dst, src, 0, 0)
    }
    pub(super) fn mov_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.raw(ALU64 | MOV | K, dst, 0, 0, imm)
    }
    pub(super) fn add_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.raw(ALU64 | ADD | K, dst, 0, 0, imm)
    }
    pub(super) fn and_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.raw(ALU64 | AND | K, dst, 0, 0, imm)
    }
    /// dst = pointer to the map behind `fd` (a two-slot LD_IMM64 the kernel rewrites).
    pub(super) fn load_map(&mut self, dst: u8, fd: i32) -> &mut Self {
        self.raw(LD | IMM | DW, dst, PSEUDO_MAP_FD, 0, fd);
        self.raw(0, 0, 0, 0, 0)
    }
    /// dst = imm (a two-slot LD_IMM64 holding all 64 bits).
    pub(super) fn load_imm64(&mut self, dst: u8, imm: u64) -> &mut Self {
        self.raw(LD | IMM | DW, dst, 0, 0, imm as u32 as i32);
        self.raw(0, 0, 0, 0, (imm >> 32) as u32 as i32)
    }
    pub(super) fn call(&mut self, helper: i32) -> &mut Self {
        self.raw(JMP | CALL, 0, 0, 0, helper)
    }
    pub(super) fn jump_imm(&mut self, op: u8, dst: u8, imm: i32, to: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), to));
        self.raw(JMP | op | K, dst, 0, 0, imm)
    }
    pub(super) fn jump_reg(&mut self, op: u8, dst: u8, src: u8, to: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), to));
        self.raw(JMP | op | X, dst, src, 0, 0)
    }
    pub(super) fn ret(&mut self, value: i32) -> &mut Self {
        self.mov_imm(R0, value);
        self.raw(JMP | EXIT, 0, 0, 0, 0)
    }
    pub(super) fn finish(mut self) -> Vec<Insn> {
        for (at, to) in &self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(name, _)| name == to)
                .unwrap_or_else(|| panic!("undefined label {to}"))
                .1;
            self.insns[*at].off = (target as i64 - *at as i64 - 1) as i16;
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_resolve_forward() {
        let mut a = Asm::default();
        a.jump_imm(JEQ, R1, 0, "end").mov_imm(R0, 1).load_map(R1, 7);
        a.label("end").ret(0);
        let insns = a.finish();
        assert_eq!(insns[0].off, 3, "skips mov and the two LD_IMM64 slots");
        assert_eq!(insns[2].regs, R1 | (PSEUDO_MAP_FD << 4));
        assert_eq!(insns[2].imm, 7);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    #[test]
    fn imm64_is_split_low_then_high() {
        let mut a = Asm::default();
        a.load_imm64(R2, 0x8877_6655_4433_2211);
        let insns = a.finish();
        assert_eq!(insns.len(), 2);
        assert_eq!(insns[0].regs, R2);
        assert_eq!(insns[0].imm as u32, 0x4433_2211);
        assert_eq!(insns[1].imm as u32, 0x8877_6655);
    }
}
