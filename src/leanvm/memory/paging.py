"""Guest page-table walks: virtual address -> guest-physical address, with the CPU's checks.

The emulation fallback (machine/fallback/) runs one guest instruction outside KVM and must
see guest memory exactly as the guest's MMU would: this module walks the guest's own page
tables (4- and 5-level long mode with 1 GiB/2 MiB pages, 32-bit PAE and non-PAE paging, or
paging off) and applies the present/write/user/NX/SMEP/SMAP rules of Intel SDM vol. 3
section 4.6, answering a violation with the page-fault error code the CPU would push. Pure:
page-table entries are read through a callable, so tests build tables in a bytearray.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import NamedTuple

from leanvm.errors import GuestError

# Access kinds
READ, WRITE, FETCH = "read", "write", "fetch"

# Page-fault error code bits (Intel SDM 4.7)
PF_PRESENT = 1 << 0  # 0: not present; 1: protection violation
PF_WRITE = 1 << 1  # the access was a write
PF_USER = 1 << 2  # the access was made at CPL 3
PF_RSVD = 1 << 3  # a reserved bit was set in a paging-structure entry
PF_FETCH = 1 << 4  # instruction fetch (with NXE or SMEP)

# Paging-structure entry bits (Intel SDM 4.3-4.5)
P, RW, US, A, D, PS = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
XD = 1 << 63
MAX_PHYS_BITS = 52

# Control-register bits the walk depends on
CR0_PG, CR0_WP = 1 << 31, 1 << 16
CR4_PSE, CR4_PAE, CR4_LA57, CR4_SMEP, CR4_SMAP = 1 << 4, 1 << 5, 1 << 12, 1 << 20, 1 << 21
EFER_LMA, EFER_NXE = 1 << 10, 1 << 11

KiB4, MiB2, MiB4, GiB1 = 1 << 12, 1 << 21, 1 << 22, 1 << 30


class PagingMode(Enum):
    OFF = "paging off"
    LEGACY32 = "32-bit paging"
    PAE = "PAE paging"
    LONG4 = "4-level paging"
    LONG5 = "5-level paging"


class PageFault(GuestError):
    """The access faults: the guest should see #PF with CR2 = ``address`` and ``error_code``."""

    def __init__(self, address: int, error_code: int, why: str) -> None:
        super().__init__(f"page fault at {address:#x} (error code {error_code:#x}): {why}")
        self.address = address
        self.error_code = error_code


class NonCanonical(GuestError):
    """A long-mode address whose upper bits are not a sign extension: #GP(0), not #PF."""

    def __init__(self, address: int) -> None:
        super().__init__(f"non-canonical address {address:#x}")
        self.address = address


class PagingContext(NamedTuple):
    """What a walk needs from the vCPU's control registers."""

    mode: PagingMode
    cr3: int = 0
    write_protect: bool = True  # CR0.WP: supervisor writes honour read-only pages
    nx: bool = False  # EFER.NXE: the XD bit is honoured (PAE and long mode)
    pse: bool = False  # CR4.PSE: 4 MiB pages in 32-bit paging
    smep: bool = False  # CR4.SMEP: no supervisor fetches from user pages
    smap: bool = False  # CR4.SMAP: no supervisor data accesses to user pages unless RFLAGS.AC
    phys_bits: int = MAX_PHYS_BITS  # MAXPHYADDR: higher address bits in entries are reserved

    @classmethod
    def from_registers(cls, cr0: int, cr3: int, cr4: int, efer: int,
                       phys_bits: int = MAX_PHYS_BITS) -> "PagingContext":
        if not cr0 & CR0_PG:
            mode = PagingMode.OFF
        elif efer & EFER_LMA:
            mode = PagingMode.LONG5 if cr4 & CR4_LA57 else PagingMode.LONG4
        elif cr4 & CR4_PAE:
            mode = PagingMode.PAE
        else:
            mode = PagingMode.LEGACY32
        return cls(mode, cr3, bool(cr0 & CR0_WP), bool(efer & EFER_NXE), bool(cr4 & CR4_PSE),
                   bool(cr4 & CR4_SMEP), bool(cr4 & CR4_SMAP), phys_bits)


class Translation(NamedTuple):
    """Where a virtual address lives and what the entries on the way allow."""

    physical: int  # guest-physical address of the byte asked for
    page_size: int  # 4 KiB, 2 MiB, 4 MiB or 1 GiB (paging off: 4 KiB)
    writable: bool  # R/W set at every level
    user: bool  # U/S set at every level
    executable: bool  # XD clear at every level (or NXE off)
    entries: tuple[tuple[int, int], ...] = ()  # (address, size) of each entry, leaf last

    def updates(self, access: str) -> list[tuple[int, int]]:
        """(entry address, bits to set) for the accessed and, on a write, dirty flags the CPU
        sets in the entries it used (Intel SDM 4.8)."""
        out = [(address, A) for address, _ in self.entries]
        if access == WRITE and out:
            out[-1] = (out[-1][0], A | D)
        return out


EntryReader = Callable[[int, int], int]  # (guest-physical address, size) -> value


def translate(ctx: PagingContext, address: int, access: str, read_entry: EntryReader, *,
              user: bool = False, ac: bool = False) -> Translation:
    """Walk the page tables for ``address`` and check ``access`` ("read", "write" or
    "fetch") made at CPL 3 (``user``) or below, with RFLAGS.AC = ``ac``. PageFault or
    NonCanonical when the CPU would fault; errors from ``read_entry`` pass through."""
    found = walk(ctx, address, access, read_entry, user=user)
    code = violation(ctx, found, access, user=user, ac=ac)
    if code:
        raise PageFault(address, code, f"{access} not allowed by the page tables")
    return found


def walk(ctx: PagingContext, address: int, access: str, read_entry: EntryReader, *,
         user: bool = False) -> Translation:
    """The translation of ``address``; PageFault if an entry is not present or has a
    reserved bit set (the error code names ``access``)."""
    mode = ctx.mode
    if mode is PagingMode.OFF:
        return Translation(address & 0xFFFFFFFF, KiB4, True, True, True)  # 32-bit linear
    if mode is PagingMode.LEGACY32:
        return _walk_legacy(ctx, address & 0xFFFFFFFF, access, read_entry, user)
    if mode is PagingMode.PAE:
        return _walk_pae(ctx, address & 0xFFFFFFFF, access, read_entry, user)
    return _walk_long(ctx, address, access, read_entry, user)


def violation(ctx: PagingContext, found: Translation, access: str, *, user: bool = False,
              ac: bool = False) -> int:
    """0 if ``found`` allows ``access``, else the page-fault error code (Intel SDM 4.6)."""
    if ctx.mode is PagingMode.OFF:
        return 0
    allowed = True
    if user:
        allowed = found.user and (access != WRITE or found.writable)
    elif access == WRITE:
        allowed = found.writable or not ctx.write_protect
        if found.user and ctx.smap and not ac:
            allowed = False
    elif access == READ:
        allowed = not (found.user and ctx.smap and not ac)
    if access == FETCH:
        if not found.executable or (not user and found.user and ctx.smep):
            allowed = False
    return 0 if allowed else PF_PRESENT | _access_bits(ctx, access, user)


def _access_bits(ctx: PagingContext, access: str, user: bool) -> int:
    bits = PF_USER if user else 0
    if access == WRITE:
        bits |= PF_WRITE
    elif access == FETCH and ((ctx.nx and ctx.mode is not PagingMode.LEGACY32) or ctx.smep):
        bits |= PF_FETCH
    return bits


def _fault(ctx: PagingContext, address: int, access: str, user: bool, entry: int,
           level: str, reserved: bool = False) -> PageFault:
    code = _access_bits(ctx, access, user)
    if reserved:
        return PageFault(address, code | PF_PRESENT | PF_RSVD, f"reserved bit set in the {level}")
    return PageFault(address, code, f"{level} not present ({entry:#x})")


def _canonical(address: int, bits: int) -> bool:
    top = address >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def _walk_long(ctx: PagingContext, address: int, access: str, read_entry: EntryReader,
               user: bool) -> Translation:
    bits = 57 if ctx.mode is PagingMode.LONG5 else 48
    if not 0 <= address < 1 << 64 or not _canonical(address, bits):
        raise NonCanonical(address)
    frame_mask = ((1 << ctx.phys_bits) - 1) & ~0xFFF
    reserved = ((1 << MAX_PHYS_BITS) - 1) & ~((1 << ctx.phys_bits) - 1)
    if not ctx.nx:
        reserved |= XD
    levels = [("PML5 entry", 48), ("PML4 entry", 39), ("PDPT entry", 30),
              ("page-directory entry", 21), ("page-table entry", 12)]
    if bits == 48:
        levels = levels[1:]
    table = ctx.cr3 & frame_mask
    writable = usr = True
    xd = False
    entries: list[tuple[int, int]] = []
    for level, shift in levels:
        where = table + ((address >> shift) & 0x1FF) * 8
        entry = read_entry(where, 8)
        entries.append((where, 8))
        if not entry & P:
            raise _fault(ctx, address, access, user, entry, level)
        large = shift in (30, 21) and entry & PS
        bad = entry & reserved
        if shift >= 39 and entry & PS:
            bad = True  # PS is reserved in PML4 and PML5 entries
        if large and entry & ((1 << shift) - 1) & ~0x1FFF:
            bad = True  # the frame of a large page must be aligned (bits shift-1..13)
        if bad:
            raise _fault(ctx, address, access, user, entry, level, reserved=True)
        writable &= bool(entry & RW)
        usr &= bool(entry & US)
        xd |= bool(ctx.nx and entry & XD)
        if large or shift == 12:
            size = 1 << shift
            frame = entry & frame_mask & ~(size - 1)
            return Translation(frame | (address & (size - 1)), size, writable, usr, not xd,
                               tuple(entries))
        table = entry & frame_mask
    raise AssertionError("unreachable: the page-table level ends the walk")


def _walk_pae(ctx: PagingContext, address: int, access: str, read_entry: EntryReader,
              user: bool) -> Translation:
    frame_mask = ((1 << ctx.phys_bits) - 1) & ~0xFFF
    reserved = ((1 << MAX_PHYS_BITS) - 1) & ~((1 << ctx.phys_bits) - 1)
    if not ctx.nx:
        reserved |= XD
    pdpte = read_entry((ctx.cr3 & 0xFFFFFFE0) + (address >> 30) * 8, 8)  # held in PDPTE registers
    if not pdpte & P:
        raise _fault(ctx, address, access, user, pdpte, "PDPT entry")
    if pdpte & (reserved | 0x1E6) & ~XD:  # bits 2:1 and 8:5 are reserved in PAE PDPTEs
        raise _fault(ctx, address, access, user, pdpte, "PDPT entry", reserved=True)
    entries: list[tuple[int, int]] = []
    where = (pdpte & frame_mask) + ((address >> 21) & 0x1FF) * 8
    pde = read_entry(where, 8)
    entries.append((where, 8))
    if not pde & P:
        raise _fault(ctx, address, access, user, pde, "page-directory entry")
    if pde & reserved or (pde & PS and pde & 0x1FE000):
        raise _fault(ctx, address, access, user, pde, "page-directory entry", reserved=True)
    writable, usr = bool(pde & RW), bool(pde & US)
    xd = bool(ctx.nx and pde & XD)
    if pde & PS:
        frame = pde & frame_mask & ~(MiB2 - 1)
        return Translation(frame | (address & (MiB2 - 1)), MiB2, writable, usr, not xd,
                           tuple(entries))
    where = (pde & frame_mask) + ((address >> 12) & 0x1FF) * 8
    pte = read_entry(where, 8)
    entries.append((where, 8))
    if not pte & P:
        raise _fault(ctx, address, access, user, pte, "page-table entry")
    if pte & reserved:
        raise _fault(ctx, address, access, user, pte, "page-table entry", reserved=True)
    writable &= bool(pte & RW)
    usr &= bool(pte & US)
    xd |= bool(ctx.nx and pte & XD)
    return Translation((pte & frame_mask) | (address & 0xFFF), KiB4, writable, usr, not xd,
                       tuple(entries))


def _walk_legacy(ctx: PagingContext, address: int, access: str, read_entry: EntryReader,
                 user: bool) -> Translation:
    where = (ctx.cr3 & 0xFFFFF000) + (address >> 22) * 4
    pde = read_entry(where, 4)
    entries = [(where, 4)]
    if not pde & P:
        raise _fault(ctx, address, access, user, pde, "page-directory entry")
    if pde & PS and ctx.pse:  # 4 MiB page; PSE-36 puts physical bits 39:32 in bits 20:13
        high = ((pde >> 13) & 0xFF) << 32
        if pde & (1 << 21) or high >> ctx.phys_bits:
            raise _fault(ctx, address, access, user, pde, "page-directory entry", reserved=True)
        frame = (pde & 0xFFC00000) | high
        return Translation(frame | (address & (MiB4 - 1)), MiB4, bool(pde & RW), bool(pde & US),
                           True, tuple(entries))
    where = (pde & 0xFFFFF000) + ((address >> 12) & 0x3FF) * 4
    pte = read_entry(where, 4)
    entries.append((where, 4))
    if not pte & P:
        raise _fault(ctx, address, access, user, pte, "page-table entry")
    return Translation((pte & 0xFFFFF000) | (address & 0xFFF), KiB4, bool(pde & RW & pte),
                       bool(pde & US & pte), True, tuple(entries))


MAX_MAPPINGS = 1 << 20  # ranges a dump's enumeration keeps (a hostile guest's tables are bounded)


def mappings(ctx: PagingContext, read_table: Callable[[int], bytes], *, limit: int,
             max_ranges: int = MAX_MAPPINGS) -> list[tuple[int, int, int]]:
    """Every present leaf mapping of the page tables as (virtual address, physical address,
    size), contiguous ones merged, in virtual-address order; physical frames at or above
    ``limit`` (past guest memory) are left out. Long mode walks the tables (4 KiB read at a
    time through ``read_table``; tables it cannot read are skipped); with paging off the
    mapping is the identity up to ``limit``. 32-bit paging is not enumerated (ValueError)."""
    import struct

    if ctx.mode is PagingMode.OFF:
        return [(0, 0, limit)] if limit > 0 else []
    if ctx.mode not in (PagingMode.LONG4, PagingMode.LONG5):
        raise ValueError(f"guest-virtual dumps need long mode or paging off, not {ctx.mode.value}")
    top = 57 if ctx.mode is PagingMode.LONG5 else 48
    frame_mask = ((1 << ctx.phys_bits) - 1) & ~0xFFF
    table_format = struct.Struct("<512Q")
    out: list[list[int]] = []
    visited: set[int] = set()

    def add(vaddr: int, paddr: int, size: int) -> None:
        if paddr >= limit:
            return
        size = min(size, limit - paddr)
        if vaddr >> (top - 1) & 1:  # sign-extend into the canonical upper half
            vaddr |= ~((1 << top) - 1) & ((1 << 64) - 1)
        last = out[-1] if out else None
        if last is not None and last[0] + last[2] == vaddr and last[1] + last[2] == paddr:
            last[2] += size
        elif len(out) < max_ranges:
            out.append([vaddr, paddr, size])

    def walk_table(table: int, shift: int, base: int) -> None:
        if table in visited or table + 4096 > limit:  # loops and tables past memory
            return
        visited.add(table)
        try:
            entries = table_format.unpack(read_table(table))
        except GuestError:
            return
        for index, entry in enumerate(entries):
            if not entry & P:
                continue
            vaddr = base | (index << shift)
            if shift == 12 or (shift in (21, 30) and entry & PS):
                size = 1 << shift
                add(vaddr, entry & frame_mask & ~(size - 1), size)
            elif shift > 12:
                walk_table(entry & frame_mask, shift - 9, vaddr)
            if len(out) >= max_ranges:
                return

    walk_table(ctx.cr3 & frame_mask, top - 9, 0)
    return [(v, p, n) for v, p, n in out]
