"""ELF64 core-file layouts for x86-64 dumps: headers, notes, elf_prstatus and QEMU's CPU-state
note. struct formats only, no policy; dump/elf.py and dump/kdump.py put them together.

Facts (System V gABI; Linux include/uapi/linux/elf.h, include/linux/elfcore.h,
arch/x86/include/asm/user_64.h; QEMU target/i386/arch_dump.c):

    typedef struct { unsigned char e_ident[16]; Elf64_Half e_type, e_machine;
        Elf64_Word e_version; Elf64_Addr e_entry; Elf64_Off e_phoff, e_shoff;
        Elf64_Word e_flags; Elf64_Half e_ehsize, e_phentsize, e_phnum, e_shentsize,
        e_shnum, e_shstrndx; } Elf64_Ehdr;                                   64 bytes
    typedef struct { Elf64_Word p_type, p_flags; Elf64_Off p_offset;
        Elf64_Addr p_vaddr, p_paddr; Elf64_Xword p_filesz, p_memsz, p_align; } Elf64_Phdr;
                                                                            56 bytes
    typedef struct { Elf64_Word sh_name, sh_type; Elf64_Xword sh_flags; Elf64_Addr sh_addr;
        Elf64_Off sh_offset; Elf64_Xword sh_size; Elf64_Word sh_link, sh_info;
        Elf64_Xword sh_addralign, sh_entsize; } Elf64_Shdr;                  64 bytes
    Elf64_Nhdr { Elf64_Word n_namesz, n_descsz, n_type; } then name and desc, each padded
    to 4 bytes.

More than 0xfffe program headers (PN_XNUM): e_phnum is 0xffff and section header 0's
sh_info holds the real count.
"""

from __future__ import annotations

import struct

ELFCLASS64, ELFDATA2LSB, EV_CURRENT = 2, 1, 1
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
PN_XNUM = 0xFFFF  # e_phnum when the count is in section header 0's sh_info

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
NHDR = struct.Struct("<III")
assert EHDR.size == 64 and PHDR.size == 56 and SHDR.size == 64

NT_PRSTATUS = 1
NT_QEMU_CPU_STATE = 0  # name "QEMU": QEMUCPUState (below)
NT_VMCOREINFO = 0  # name "VMCOREINFO": the guest kernel's "KEY=value\n" text

# struct elf_prstatus (x86-64, 336 bytes): elf_siginfo {int signo, code, errno}; short
# pr_cursig (+2 pad); unsigned long pr_sigpend, pr_sighold; pid_t pr_pid, pr_ppid, pr_pgrp,
# pr_sid; struct timeval pr_utime, pr_stime, pr_cutime, pr_cstime (16 each);
# elf_gregset_t pr_reg (27 x u64, struct user_regs_struct); int pr_fpvalid (+4 pad)
PRSTATUS = struct.Struct("<iiih2xQQiiii64s27Qi4x")
assert PRSTATUS.size == 336
PRSTATUS_REG_OFFSET = 112  # where pr_reg starts
# struct user_regs_struct, in order
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
             "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
             "fs_base", "gs_base", "ds", "es", "fs", "gs")

# QEMU's QEMUCPUState (version 1): u32 version, size; u64 rax .. r15, rip, rflags;
# QEMUCPUSegment cs, ds, es, fs, gs, ss, ldt, tr, gdt, idt (u32 selector, limit, flags, pad;
# u64 base); u64 cr[5]; u64 kernel_gs_base (an optional field: readers check ``size``)
QEMU_CPU_STATE_VERSION = 1
QEMU_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15", "rip", "rflags")
QEMU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
QEMU_SEGMENT = struct.Struct("<IIIIQ")
QEMU_CPU_STATE_SIZE = 8 + 8 * len(QEMU_REGS) + QEMU_SEGMENT.size * len(QEMU_SEGMENTS) + 8 * 5 + 8
assert QEMU_CPU_STATE_SIZE == 440


def ident() -> bytes:
    """e_ident of a little-endian ELF64 file (System V ABI)."""
    return b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT]) + bytes(9)


def pad4(length: int) -> int:
    return -(-length // 4) * 4


def note(name: bytes, note_type: int, desc: bytes) -> bytes:
    """One ELF note: header, NUL-terminated name and desc, each padded to 4 bytes."""
    name_z = name + b"\0"
    return (NHDR.pack(len(name_z), len(desc), note_type)
            + name_z.ljust(pad4(len(name_z)), b"\0") + desc.ljust(pad4(len(desc)), b"\0"))


def parse_note(data: bytes) -> tuple[bytes, int, bytes] | None:
    """(name without its NUL, type, desc) of the one note at the start of ``data``, or None
    where the header's sizes do not fit ``data`` (the bytes may come from a hostile guest)."""
    if len(data) < NHDR.size:
        return None
    namesz, descsz, note_type = NHDR.unpack_from(data)
    desc_at = NHDR.size + pad4(namesz)
    if namesz == 0 or desc_at + descsz > len(data):
        return None
    return data[NHDR.size:NHDR.size + namesz].rstrip(b"\0"), note_type, data[desc_at:desc_at + descsz]
