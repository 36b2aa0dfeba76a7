"""ELF and kdump writers (dump/), checked by independent readers: pyelftools, readelf and
makedumpfile (which reassembles a flattened kdump file into the raw layout we also write)."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from leanvm.abi import elf as abi
from leanvm.dump.elf import write_elf
from leanvm.dump.kdump import (HEADER, PAGE_DESC, SUB_HEADER, Compression, compressor,
                               write_kdump)
from leanvm.dump.source import CpuState, DumpSource, MemoryRun, Segment, VirtualRange, clip
from leanvm.errors import ConfigError

PAGE = 4096
VMCOREINFO = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nNUMBER(phys_base)=0x200000\n"


def pattern(pages: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(pages * PAGE))


def cpu(index: int) -> CpuState:
    regs = {name: 0x1000 * index + n for n, name in enumerate(abi.QEMU_REGS)}
    segments = {name: Segment(0x10 + n, 0xFFFF0000 + n, 0xFFFFF, 0xA09B00)
                for n, name in enumerate(abi.QEMU_SEGMENTS)}
    return CpuState(index, regs, segments, (0x80050033, 0, 0x1234, 0x9000, 0x20), 0xD01, 0x77)


def source(**extra: object) -> DumpSource:
    runs = [MemoryRun(0x1000, pattern(2, 1)), MemoryRun(0x10000, bytes(PAGE) + pattern(1, 2)),
            MemoryRun(0x100000000, pattern(3, 3))]
    return DumpSource(runs, [cpu(0), cpu(1)], [(0, 0x80000), (0x100000000, 0x100004000)],
                      VMCOREINFO, **extra)  # type: ignore[arg-type]


def elf_bytes(src: DumpSource) -> bytes:
    out = io.BytesIO()
    size = write_elf(src, out)
    assert size == len(out.getvalue())
    return out.getvalue()


def test_elf_core_as_pyelftools_reads_it() -> None:
    src = source()
    data = elf_bytes(src)
    core = ELFFile(io.BytesIO(data))
    assert core["e_type"] == "ET_CORE" and core["e_machine"] == "EM_X86_64"
    segments = list(core.iter_segments())
    assert segments[0]["p_type"] == "PT_NOTE"
    loads = [s for s in segments[1:] if s["p_type"] == "PT_LOAD"]
    assert [(s["p_paddr"], s["p_filesz"]) for s in loads] == [
        (run.paddr, len(run.data)) for run in src.runs]
    for segment, run in zip(loads, src.runs):
        assert segment.data() == bytes(run.data)
        assert segment["p_vaddr"] == 0  # physical only, as QEMU's without paging
    notes = list(segments[0].iter_notes())
    prstatus = [n for n in notes if n["n_type"] == "NT_PRSTATUS"]
    # pr_pid sits at byte 32 of struct elf_prstatus (after siginfo, cursig, sigpend, sighold)
    assert [struct.unpack_from("<i", n["n_descdata"], 32)[0] for n in prstatus] == [1, 2]
    assert all(len(n["n_descdata"]) == 336 for n in prstatus)
    # pr_reg: rip is user_regs_struct field 16
    rip = struct.unpack_from("<Q", notes[1]["n_descdata"], abi.PRSTATUS_REG_OFFSET + 16 * 8)[0]
    assert rip == src.cpus[1].regs["rip"]
    qemu = [n for n in notes if n["n_name"] == "QEMU"]
    assert len(qemu) == 2
    version, size = struct.unpack_from("<II", qemu[0]["n_descdata"])
    assert (version, size) == (1, abi.QEMU_CPU_STATE_SIZE)
    cr3 = struct.unpack_from("<Q", qemu[0]["n_descdata"], 8 + 18 * 8 + 10 * 24 + 3 * 8)[0]
    assert cr3 == 0x9000
    vmcoreinfo = [n for n in notes if n["n_name"] == "VMCOREINFO"]
    assert vmcoreinfo[0]["n_descdata"] == VMCOREINFO


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_readelf_reads_every_header_without_complaint(tmp_path: Path) -> None:
    path = tmp_path / "core"
    path.write_bytes(elf_bytes(source()))
    done = subprocess.run(["readelf", "-a", "-n", "-W", str(path)], capture_output=True,
                          text=True, check=True)
    assert "readelf: Warning" not in done.stderr and "Error" not in done.stderr, done.stderr
    assert "NT_PRSTATUS" in done.stdout and "VMCOREINFO" in done.stdout
    assert done.stdout.count("LOAD ") == 3


def test_more_than_65535_program_headers_through_pn_xnum(tmp_path: Path) -> None:
    runs = [MemoryRun(i * 2 * PAGE, bytes([i & 0xFF]) * PAGE) for i in range(70_000)]
    src = DumpSource(runs, [cpu(0)], [(0, 140_000 * PAGE)], None)
    data = elf_bytes(src)
    assert struct.unpack_from("<H", data, 56)[0] == abi.PN_XNUM  # e_phnum
    core = ELFFile(io.BytesIO(data))
    assert core.num_segments() == 70_001
    last = core.get_segment(70_000)
    assert last["p_paddr"] == 69_999 * 2 * PAGE and last.data() == bytes([69_999 & 0xFF]) * PAGE
    if shutil.which("readelf"):
        path = tmp_path / "core"
        path.write_bytes(data)
        done = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True)
        assert "There are 70001 program headers" in done.stdout, done.stdout[:500]


def test_paging_loads_share_the_bytes_of_physical_runs() -> None:
    direct = 0xFFFF888000000000
    virtual = [VirtualRange(direct + 0x1000, 0x1000, 0x2000),  # both pages of run 0
               VirtualRange(0xFFFFFFFF81000000, 0x1000, PAGE),  # mapped a second time
               VirtualRange(direct + 0x8000, 0x8000, 0x9000)]  # a hole, then run 1
    data = elf_bytes(source(virtual=virtual))
    core = ELFFile(io.BytesIO(data))
    loads = [s for s in core.iter_segments() if s["p_type"] == "PT_LOAD"]
    described = [(s["p_vaddr"], s["p_paddr"], s["p_filesz"]) for s in loads]
    assert described == [(direct + 0x1000, 0x1000, 0x2000), (0xFFFFFFFF81000000, 0x1000, PAGE),
                         (direct + 0x10000, 0x10000, 0x1000)]
    assert loads[0]["p_offset"] == loads[1]["p_offset"]
    assert loads[1].data() == pattern(2, 1)[:PAGE]
    assert loads[2].data() == bytes(PAGE)
    assert len(data) < 64 * 1024  # each byte of memory written once


def test_clip_keeps_whole_pages_of_the_window() -> None:
    runs = clip(source().runs, 0x2000, 0x10000)
    assert [(r.paddr, len(r.data)) for r in runs] == [(0x2000, PAGE), (0x10000, 0x2000)]
    with pytest.raises(ConfigError, match="page-aligned"):
        clip(source().runs, 0x10, 0x1000)


def parse_kdump(data: bytes) -> dict[int, bytes]:
    """pfn -> page, following the layout; a cross-check of our own (the proof is crash,
    makedumpfile and drgn in tests/kvm/test_dump_linux.py)."""
    fields = HEADER.unpack_from(data)
    assert fields[0] == b"KDUMP   " and fields[1] == 6
    block, sub_blocks, bitmap_blocks = fields[11], fields[12], fields[13]
    sub = SUB_HEADER.unpack_from(data, block)
    max_mapnr = sub[13]
    bitmap_at = (1 + sub_blocks) * block
    half = bitmap_blocks * block // 2
    second = data[bitmap_at + half:bitmap_at + 2 * half]
    desc_at = (1 + sub_blocks + bitmap_blocks) * block
    pages, index = {}, 0
    decompress = {0x1: __import__("zlib").decompress}
    for pfn in range(max_mapnr):
        if second[pfn >> 3] >> (pfn & 7) & 1:
            offset, size, flags, _ = PAGE_DESC.unpack_from(data, desc_at + index * 24)
            raw = data[offset:offset + size]
            pages[pfn] = decompress[flags](raw) if flags else raw
            index += 1
    return pages


def test_kdump_holds_every_populated_page_and_shares_one_zero_page() -> None:
    src = source()
    out = io.BytesIO()
    write_kdump(src, out, Compression.ZLIB)
    data = out.getvalue()
    pages = parse_kdump(data)
    expect = {}
    for run in src.runs:
        for offset in range(0, len(run.data), PAGE):
            expect[(run.paddr + offset) // PAGE] = bytes(run.data[offset:offset + PAGE])
    assert pages == expect
    sub = SUB_HEADER.unpack_from(data, PAGE)
    assert sub[0] == 0x200000  # phys_base from VMCOREINFO
    assert data[sub[5]:sub[5] + sub[6]] == VMCOREINFO  # offset_vmcoreinfo, size_vmcoreinfo
    assert HEADER.unpack_from(data)[2].rstrip(b"\0") == b"Linux"


@pytest.mark.parametrize("method", list(Compression))
def test_every_compression_round_trips_one_page(method: Compression) -> None:
    page = pattern(1, 9)[:2048] + bytes(2048)
    packed = compressor(method)(page)
    assert len(packed) < PAGE
    if method is Compression.ZLIB:
        import zlib

        assert zlib.decompress(packed) == page
    elif method is Compression.LZO:
        import lzo

        assert lzo.decompress(packed, False, PAGE) == page
    elif method is Compression.SNAPPY:
        import cramjam

        assert bytes(cramjam.snappy.decompress_raw(packed)) == page
    else:
        import zstandard

        assert zstandard.ZstdDecompressor().decompress(packed) == page


@pytest.mark.skipif(shutil.which("makedumpfile") is None, reason="makedumpfile is not installed")
def test_makedumpfile_reassembles_our_flattened_file_into_our_raw_file(tmp_path: Path) -> None:
    src = source()
    raw, flat = io.BytesIO(), io.BytesIO()
    write_kdump(src, raw, Compression.ZLIB)
    write_kdump(src, flat, Compression.ZLIB, flat=True)
    (tmp_path / "flat").write_bytes(flat.getvalue())
    with open(tmp_path / "flat", "rb") as stdin:
        subprocess.run(["makedumpfile", "-R", str(tmp_path / "out")], stdin=stdin, check=True,
                       capture_output=True)
    rebuilt = (tmp_path / "out").read_bytes()
    mine = raw.getvalue()
    # the timestamps differ by the time between the two writes
    assert rebuilt[:408] == mine[:408] and rebuilt[424:] == mine[424:]


def kdump_bytes(src: DumpSource) -> bytes:
    out = io.BytesIO()
    write_kdump(src, out, Compression.ZLIB)
    return out.getvalue()


def uts_source(blob: bytes, symbol: str = "ffffffff81000100") -> DumpSource:
    """A guest whose init_uts_ns (at physical 0x1000100, phys_base 0) holds ``blob``."""
    memory = bytearray(0x2000)
    memory[0x100:0x100 + len(blob)] = blob[:0x2000 - 0x100]
    info = (f"OSRELEASE=6.1.0-test\nSYMBOL(init_uts_ns)={symbol}\n"
            "OFFSET(uts_namespace.name)=0\nNUMBER(phys_base)=0\n").encode()
    return DumpSource(runs=[MemoryRun(0x1000000, memoryview(bytes(memory)))], cpus=[cpu(0)],
                      ram=[(0, 0x2000000)], vmcoreinfo=info)


def test_the_kdump_header_carries_the_guests_own_utsname() -> None:
    names = [b"Linux", b"sandbox-7", b"6.1.0-test", b"#1 SMP", b"x86_64", b"(none)"]
    header = HEADER.unpack_from(kdump_bytes(uts_source(b"".join(n.ljust(65, b"\0")
                                                                 for n in names))))
    assert [field.rstrip(b"\0") for field in header[2:8]] == names


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=6 * 65 + 8),
       symbol=st.sampled_from(["ffffffff81000100", "ffffffff81001ff0", "ffffffffffffffff",
                               "0", "zz", "ffffffff80000000"]))
def test_a_hostile_utsname_gives_fixed_size_placeholders(blob: bytes, symbol: str) -> None:
    """Whatever the guest left there, the header gets six NUL-terminated 65-byte strings,
    every one non-empty (libkdumpfile's sanity rule), and sysname "Linux"."""
    header = HEADER.unpack_from(kdump_bytes(uts_source(blob, symbol)))
    fields = header[2:8]
    assert all(len(f) == 65 and f[-1] == 0 and f[0] != 0 for f in fields)
    assert fields[0].rstrip(b"\0") == b"Linux"


def test_lazy_runs_write_the_same_files_as_bytes_and_read_only_what_is_written(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from leanvm.dump.source import LazyBytes

    monkeypatch.setattr("leanvm.dump.kdump.time.time", lambda: 1.7e9)  # the header's date
    memory = pattern(40, 9)
    reads: list[tuple[int, int]] = []

    def read(start: int, size: int) -> bytes:
        reads.append((start, size))
        return memory[start:start + size]

    plain = [MemoryRun(0x100000, memory[:20 * PAGE]), MemoryRun(0x400000, memory[20 * PAGE:])]
    lazy = [MemoryRun(0x100000, LazyBytes(read, 0, 20 * PAGE)),
            MemoryRun(0x400000, LazyBytes(read, 20 * PAGE, 20 * PAGE))]
    window = clip(lazy, 0x104000, 0x300000)  # a window reads nothing yet
    assert [(r.paddr, len(r.data)) for r in window] == [
        (r.paddr, len(r.data)) for r in clip(plain, 0x104000, 0x300000)]
    assert reads == []
    assert bytes(window[1].data) == memory[20 * PAGE:24 * PAGE]  # (0x400000-0x404000)
    reads.clear()
    for kind in ("elf", "kdump"):
        files = []
        for runs in (plain, lazy):
            out = io.BytesIO()
            src = DumpSource(runs, [cpu(0)], [(0x100000, 0x500000)], VMCOREINFO)
            if kind == "elf":
                write_elf(src, out)
            else:
                write_kdump(src, out, Compression.ZLIB)
            files.append(out.getvalue())
        assert files[0] == files[1], kind
    assert sum(size for _, size in reads) == 2 * len(memory)  # each byte once per file
