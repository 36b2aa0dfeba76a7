"""Guest page-table walks (memory/paging.py) over page tables built here in a bytearray.

Entries are written with literal bit values from the Intel SDM (P=1, R/W=2, U/S=4, PS=0x80,
XD=bit 63) rather than the module's constants, so a wrong constant there shows up here.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from leanvm.memory.paging import (NonCanonical, PageFault, PagingContext, PagingMode,
                                  translate, walk)


class Tables:
    """A tiny guest-physical memory holding page tables."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.mem = bytearray(size)
        self.reads: list[int] = []

    def put(self, address: int, value: int, size: int = 8) -> None:
        self.mem[address:address + size] = value.to_bytes(size, "little")

    def read(self, address: int, size: int) -> int:
        self.reads.append(address)
        return int.from_bytes(self.mem[address:address + size], "little")


def long_mode(t: Tables, *, nx: bool = True, wp: bool = True, smep: bool = False,
              smap: bool = False, phys_bits: int = 46) -> PagingContext:
    return PagingContext(PagingMode.LONG4, 0x1000, wp, nx, False, smep, smap, phys_bits)


def build_4k(t: Tables, va: int, frame: int, leaf: int, upper: int = 0x7) -> None:
    """PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> frame; ``leaf`` are PTE flags."""
    t.put(0x1000 + ((va >> 39) & 511) * 8, 0x2000 | upper)
    t.put(0x2000 + ((va >> 30) & 511) * 8, 0x3000 | upper)
    t.put(0x3000 + ((va >> 21) & 511) * 8, 0x4000 | upper)
    t.put(0x4000 + ((va >> 12) & 511) * 8, frame | leaf)


def test_4k_page_translates_and_reports_the_entries_used() -> None:
    t = Tables()
    va = 0xFFFF_8000_1234_5678  # kernel half: PML4 index 256
    build_4k(t, va, 0x7_6000, 0x3)
    found = translate(long_mode(t), va, "read", t.read)
    assert found.physical == 0x7_6678 and found.page_size == 4096
    assert found.writable and not found.user and found.executable
    # indices: PML4 256 (bit 47), PDPT 0, PD 0x91, PT 0x145
    assert [a for a, _ in found.entries] == [0x1000 + 256 * 8, 0x2000,
                                             0x3000 + 0x91 * 8, 0x4000 + 0x145 * 8]
    assert found.updates("write")[-1] == (0x4000 + 0x145 * 8, 0x60)  # accessed + dirty
    assert found.updates("read")[0] == (0x1000 + 256 * 8, 0x20)


def test_2m_and_1g_pages() -> None:
    t = Tables()
    t.put(0x1000, 0x2000 | 0x7)
    t.put(0x2000 + 1 * 8, 0x4000_0000 | 0x83)  # 1 GiB page for [1 GiB, 2 GiB)
    t.put(0x2000 + 0 * 8, 0x3000 | 0x7)
    t.put(0x3000 + 3 * 8, 0x80_0000 | 0x83)  # 2 MiB page for [6 MiB, 8 MiB)
    ctx = long_mode(t)
    big = translate(ctx, 0x4123_4567, "write", t.read)
    assert big.physical == 0x4123_4567 and big.page_size == 1 << 30
    mid = translate(ctx, 0x60_1234, "fetch", t.read)
    assert mid.physical == 0x80_1234 and mid.page_size == 2 << 20
    assert len(mid.entries) == 3


def test_not_present_gives_error_code_without_p_bit() -> None:
    t = Tables()
    build_4k(t, 0x40_0000, 0x5000, 0x0)  # PTE not present
    with pytest.raises(PageFault) as info:
        translate(long_mode(t), 0x40_0010, "write", t.read)
    assert info.value.address == 0x40_0010 and info.value.error_code == 0x2  # W, not P
    with pytest.raises(PageFault) as info:
        translate(long_mode(t), 0x40_0010, "fetch", t.read, user=True)
    assert info.value.error_code == 0x4 | 0x10  # U, I/D


def test_read_only_page_write_protection() -> None:
    t = Tables()
    build_4k(t, 0x40_0000, 0x5000, 0x1)  # present, read-only, supervisor
    with pytest.raises(PageFault) as info:
        translate(long_mode(t, wp=True), 0x40_0000, "write", t.read)
    assert info.value.error_code == 0x3  # P | W
    # CR0.WP clear: supervisor writes ignore R/W
    assert translate(long_mode(t, wp=False), 0x40_0000, "write", t.read).physical == 0x5000
    # a read-only upper level makes the whole range read-only too
    build_4k(t, 0x40_0000, 0x5000, 0x3, upper=0x5)
    with pytest.raises(PageFault):
        translate(long_mode(t), 0x40_0000, "write", t.read)


def test_user_access_to_supervisor_page_and_smep_smap() -> None:
    t = Tables()
    build_4k(t, 0x40_0000, 0x5000, 0x3)  # supervisor page
    with pytest.raises(PageFault) as info:
        translate(long_mode(t), 0x40_0000, "read", t.read, user=True)
    assert info.value.error_code == 0x5  # P | U
    build_4k(t, 0x40_0000, 0x5000, 0x7)  # user page
    with pytest.raises(PageFault) as info:
        translate(long_mode(t, smep=True), 0x40_0000, "fetch", t.read)
    assert info.value.error_code == 0x11
    with pytest.raises(PageFault):
        translate(long_mode(t, smap=True), 0x40_0000, "read", t.read)
    assert translate(long_mode(t, smap=True), 0x40_0000, "read", t.read, ac=True).physical == 0x5000


def test_nx_bit() -> None:
    t = Tables()
    build_4k(t, 0x40_0000, 0x5000, 0x3 | 1 << 63)
    with pytest.raises(PageFault) as info:
        translate(long_mode(t), 0x40_0000, "fetch", t.read)
    assert info.value.error_code == 0x11  # P | I/D
    assert translate(long_mode(t), 0x40_0000, "read", t.read).physical == 0x5000
    with pytest.raises(PageFault) as info:  # XD with EFER.NXE clear is a reserved bit
        translate(long_mode(t, nx=False), 0x40_0000, "read", t.read)
    assert info.value.error_code == 0x9  # P | RSVD


def test_reserved_physical_bits_and_ps_in_pml4() -> None:
    t = Tables()
    build_4k(t, 0x40_0000, 0x5000 | 1 << 47, 0x3)  # bit 47 above MAXPHYADDR 46
    with pytest.raises(PageFault) as info:
        translate(long_mode(t, phys_bits=46), 0x40_0000, "read", t.read)
    assert info.value.error_code & 0x9 == 0x9
    t = Tables()
    t.put(0x1000, 0x2000 | 0x87)
    with pytest.raises(PageFault) as info:
        translate(long_mode(t), 0x1234, "read", t.read)
    assert info.value.error_code == 0x9


def test_non_canonical_address() -> None:
    t = Tables()
    with pytest.raises(NonCanonical):
        translate(long_mode(t), 0x0000_8000_0000_0000, "read", t.read)
    assert t.reads == []


def test_five_level_paging() -> None:
    t = Tables()
    va = 0x0002_0000_0000_1234  # PML5 index 2 (bits 56:48)
    t.put(0x1000 + 2 * 8, 0x2000 | 7)  # PML5
    t.put(0x2000, 0x3000 | 7)  # PML4
    t.put(0x3000, 0x4000 | 7)
    t.put(0x4000, 0x5000 | 7)
    t.put(0x5000 + 1 * 8, 0x9000 | 3)
    ctx = PagingContext(PagingMode.LONG5, 0x1000, True, True)
    assert translate(ctx, va, "read", t.read).physical == 0x9234
    with pytest.raises(NonCanonical):
        translate(ctx, 1 << 57, "read", t.read)


def test_pae_paging() -> None:
    t = Tables()
    t.put(0x1020 + 3 * 8, 0x2000 | 1)  # CR3 = 0x1020 (32-byte aligned); PDPTE for [3G, 4G)
    t.put(0x2000 + 1 * 8, 0x3000 | 7)  # PDE for [3G+2M, 3G+4M) -> page table
    t.put(0x3000 + 5 * 8, 0xAB000 | 3)
    t.put(0x2000 + 2 * 8, 0x40_0000 | 0x83)  # 2 MiB page for [3G+4M, 3G+6M)
    ctx = PagingContext(PagingMode.PAE, 0x1020, True, True)
    assert translate(ctx, 0xC020_5ABC, "write", t.read).physical == 0xAB_ABC
    big = translate(ctx, 0xC041_0000, "read", t.read)
    assert big.physical == 0x41_0000 and big.page_size == 2 << 20
    with pytest.raises(PageFault):
        translate(ctx, 0x1000, "read", t.read)  # PDPTE 0 not present


def test_32bit_paging_with_4m_pages() -> None:
    t = Tables()
    t.put(0x1000 + 1 * 4, 0x2000 | 7, 4)  # PDE for [4M, 8M) -> page table at 0x2000
    t.put(0x2000 + 2 * 4, 0x9000 | 5, 4)  # user, read-only
    t.put(0x1000 + 3 * 4, 0x0080_0000 | 0x83 | (0x1 << 13), 4)  # 4 MiB page, PSE-36 bit 32
    ctx = PagingContext(PagingMode.LEGACY32, 0x1000, True, False, pse=True, phys_bits=36)
    assert translate(ctx, 0x40_2345, "read", t.read, user=True).physical == 0x9345
    with pytest.raises(PageFault) as info:
        translate(ctx, 0x40_2345, "write", t.read, user=True)
    assert info.value.error_code == 0x7
    big = translate(ctx, 0xC1_2345, "write", t.read)
    assert big.physical == 0x1_0081_2345 and big.page_size == 4 << 20
    no_pse = ctx._replace(pse=False)  # without CR4.PSE, PS is ignored: the PDE points at a table
    with pytest.raises(PageFault):
        walk(no_pse, 0xC0_0000, "read", t.read)
    assert t.reads[-1] == 0x80_2000  # bits 31:12 of the PDE as a table address, entry 0


def test_paging_off_is_identity() -> None:
    ctx = PagingContext.from_registers(cr0=0x11, cr3=0, cr4=0, efer=0)
    assert ctx.mode is PagingMode.OFF
    assert translate(ctx, 0x1234_5678, "write", lambda a, s: 1 / 0).physical == 0x1234_5678


def test_mode_from_registers() -> None:
    pg = 1 << 31
    assert PagingContext.from_registers(pg, 0, 0, 0).mode is PagingMode.LEGACY32
    assert PagingContext.from_registers(pg, 0, 0x20, 0).mode is PagingMode.PAE
    assert PagingContext.from_registers(pg, 0, 0x20, 0x500).mode is PagingMode.LONG4
    assert PagingContext.from_registers(pg, 0, 0x1020, 0x500).mode is PagingMode.LONG5
    ctx = PagingContext.from_registers(pg | 1 << 16, 0, 0x30_0020, 0xD00)
    assert ctx.write_protect and ctx.nx and ctx.smep and ctx.smap


ENTRY = st.integers(0, (1 << 64) - 1) | st.integers(0, 1 << 20).map(lambda v: v & ~0xFFF | 0x7)


@settings(max_examples=300, deadline=None)
@given(st.lists(ENTRY, min_size=1, max_size=16), st.integers(0, (1 << 64) - 1),
       st.sampled_from(["read", "write", "fetch"]), st.booleans(),
       st.sampled_from(list(PagingMode)))
def test_random_tables_never_escape(entries: list[int], va: int, access: str, user: bool,
                                    mode: PagingMode) -> None:
    """Random page-table entries: the walk answers with a translation or a fault, and reads
    only through the reader it was given (which refuses addresses past 1 MiB)."""
    def read(address: int, size: int) -> int:
        if address + size > 1 << 20:
            raise IndexError(address)
        return entries[(address // 8) % len(entries)] & ((1 << (8 * size)) - 1)

    ctx = PagingContext(mode, 0x1000, True, True, True, False, False, 40)
    try:
        found = translate(ctx, va, access, read, user=user)
    except (PageFault, NonCanonical, IndexError):
        return
    assert found.physical < 1 << 52
    assert found.page_size in (4096, 2 << 20, 4 << 20, 1 << 30)
