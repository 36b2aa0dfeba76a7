"""kdump-compressed dumps: makedumpfile's diskdump format, header version 6 as QEMU's
dump-guest-memory writes it, read by crash, makedumpfile and libkdumpfile (drgn).

Layout in blocks of one page (makedumpfile diskdump_mod.h; QEMU include/sysemu/dump.h):

    block 0        struct disk_dump_header ("KDUMP   ", version 6, utsname, status, sizes)
    block 1..      struct kdump_sub_header (phys_base, dump_level, vmcoreinfo and note
                   offsets, 64-bit pfn range and max_mapnr), then the ELF notes
    then           two bitmaps of max_mapnr bits each, bit n = pfn n, LSB first: the first
                   marks guest RAM, the second the pages the dump holds
    then           a page descriptor for each page the second bitmap marks, in pfn order:
                   struct page_desc { off_t offset; u32 size; u32 flags; u64 page_flags; }
    then           the page data, each page compressed on its own (or raw where that is no
                   smaller), flags naming the method

Pages the guest never populated (and memory it has unplugged) are left out: cleared in the
second bitmap, dump_level 1 ("zero pages excluded": such pages read as zeros). Populated
pages of zeros stay in, all pointing at one shared compressed zero page (24 bytes of
descriptor each), as QEMU writes them: crash refuses to read an excluded page ("page
excluded"), and a kernel does read zeroed pages it allocated.

The flattened layout (makedumpfile -F, QEMU's kdump-* default on a pipe) wraps the same
bytes in records that name their offset, so it can be written without seeking: a 4 KiB
header "makedumpfile", type 1, version 1 (big-endian), then {be64 offset, be64 size, data}
records, then an end record of offsets -1, -1. ``makedumpfile -R`` turns it into the raw
layout; crash reads both.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from enum import Enum
from typing import Protocol

from leanvm.dump.cpu_notes import notes
from leanvm.dump.source import PAGE, UTS_FIELDS, DumpSource, chunks, utsname
from leanvm.errors import ConfigError


class Compression(Enum):
    ZLIB = ("zlib", 0x01)  # DUMP_DH_COMPRESSED_ZLIB
    LZO = ("lzo", 0x02)  # DUMP_DH_COMPRESSED_LZO (lzo1x_1, no header)
    SNAPPY = ("snappy", 0x04)  # DUMP_DH_COMPRESSED_SNAPPY (raw snappy, no framing)
    ZSTD = ("zstd", 0x20)  # DUMP_DH_COMPRESSED_ZSTD (makedumpfile 1.7.1+, crash 8.0.1+)

    @property
    def flag(self) -> int:
        return self.value[1]


def compressor(method: Compression) -> Callable[[bytes], bytes]:
    """A one-page compressor. ConfigError where the library is missing."""
    try:
        if method is Compression.ZLIB:
            # QEMU's Z_BEST_SPEED; a 4 KiB window (wbits 12) is all a page needs and halves
            # the set-up each call pays (72 -> 40 us a page here)
            return lambda page: zlib.compress(page, 1, 12)
        if method is Compression.LZO:
            import lzo  # python-lzo

            return lambda page: lzo.compress(page, 1, False)
        if method is Compression.SNAPPY:
            import cramjam

            return lambda page: bytes(cramjam.snappy.compress_raw(page))
        import zstandard

        zc = zstandard.ZstdCompressor(level=1)
        return zc.compress
    except ImportError as exc:
        raise ConfigError(f"kdump-{method.value[0]} needs the Python module {exc.name}, "
                          "which is not installed (make install)") from None


SIGNATURE = b"KDUMP   "
HEADER_VERSION = 6
DL_EXCLUDE_ZERO = 0x01  # dump_level bit: pages of zeros are not in the dump
# struct disk_dump_header: signature, header_version, struct new_utsname (6 x 65 bytes),
# 6 bytes of padding, struct timeval (two 64-bit fields), status, block_size, sub_hdr_size,
# bitmap_blocks, max_mapnr (32-bit, obsolete), total_ram_blocks, device_blocks,
# written_blocks, current_cpu, nr_cpus
HEADER = struct.Struct("<8si65s65s65s65s65s65s6xqqIiiIIIIIIi")
assert HEADER.size == 464
# struct kdump_sub_header (64-bit): phys_base, dump_level, split, start_pfn, end_pfn,
# offset_vmcoreinfo, size_vmcoreinfo, offset_note, size_note, offset_eraseinfo,
# size_eraseinfo, start_pfn_64, end_pfn_64, max_mapnr_64
SUB_HEADER = struct.Struct("<QiiQQQQQQQQQQQ")
assert SUB_HEADER.size == 104
PAGE_DESC = struct.Struct("<qIIQ")
assert PAGE_DESC.size == 24
FLAT_SIGNATURE = b"makedumpfile"
FLAT_HEADER_SIZE = 4096
FLAT_RECORD = struct.Struct(">qq")
ZERO_PAGE = bytes(PAGE)
_ZERO_CHUNK = bytes(1 << 21)


class Sink(Protocol):
    def write(self, data: "bytes | memoryview", /) -> int | None: ...


class SeekableSink(Sink, Protocol):
    def seek(self, offset: int, whence: int = 0, /) -> int: ...


def dumped_pfns(source: DumpSource) -> tuple[bytearray, int]:
    """The second bitmap (the pages the dump holds: every page of every run) and its count."""
    max_mapnr = _max_mapnr(source)
    bitmap = bytearray(-(-max_mapnr // 8))
    count = 0
    for run in source.runs:
        _set_bits(bitmap, run.paddr // PAGE, run.end // PAGE)
        count += len(run.data) // PAGE
    return bitmap, count


def _set_bits(bitmap: bytearray, first: int, last: int) -> None:
    """Set bits [first, last): whole bytes at once, single bits at the edges."""
    while first < last and first & 7:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1
    whole = (last - first) // 8
    bitmap[first >> 3:(first >> 3) + whole] = b"\xff" * whole
    first += whole * 8
    while first < last:
        bitmap[first >> 3] |= 1 << (first & 7)
        first += 1


def _max_mapnr(source: DumpSource) -> int:
    ends = [end for _, end in source.ram] + [run.end for run in source.runs]
    return -(-max(ends, default=PAGE) // PAGE)


def _ram_bitmap(source: DumpSource, max_mapnr: int) -> bytearray:
    bitmap = bytearray(-(-max_mapnr // 8))
    for start, end in list(source.ram) + [(run.paddr, run.end) for run in source.runs]:
        _set_bits(bitmap, start // PAGE, -(-end // PAGE))
    return bitmap


class _Raw:
    """Writes at offsets of a seekable file."""

    def __init__(self, out: SeekableSink) -> None:
        self.out = out

    def put(self, offset: int, data: "bytes | memoryview") -> None:
        self.out.seek(offset)
        self.out.write(data)

    def finish(self) -> None:
        pass


class _Flat:
    """makedumpfile's flattened records: no seeking."""

    def __init__(self, out: Sink) -> None:
        self.out = out
        header = FLAT_SIGNATURE.ljust(16, b"\0") + struct.pack(">qq", 1, 1)
        out.write(header.ljust(FLAT_HEADER_SIZE, b"\0"))

    def put(self, offset: int, data: "bytes | memoryview") -> None:
        self.out.write(FLAT_RECORD.pack(offset, len(data)))
        self.out.write(data)

    def finish(self) -> None:
        self.out.write(FLAT_RECORD.pack(-1, -1))


def write_kdump(source: DumpSource, out: Sink, method: Compression, *, flat: bool = False,
                progress: Callable[[int], None] | None = None) -> int:
    """Write the dump (``flat``: the flattened layout, ``out`` need not seek); the size of
    the raw layout's file."""
    compress = compressor(method)
    writer: _Raw | _Flat = _Flat(out) if flat else _Raw(out)  # type: ignore[arg-type]
    desc_offset, data_offset = _write_headers(source, writer, method)
    descs = bytearray()
    cursor = _write_pages(source, writer, compress, method.flag, descs, data_offset, progress)
    if descs:
        writer.put(desc_offset, descs)
    writer.finish()
    return cursor


def header_utsname(source: DumpSource) -> list[bytes]:
    """The header's six utsname strings: the guest's own (init_uts_ns in the dump) where
    VMCOREINFO leads to it, else Linux's placeholders, "(none)" as an unset hostname reads.
    libkdumpfile (drgn) takes the architecture from here only when every one but the
    domain name is non-empty."""
    found = utsname(source) or {}
    fallback = {"sysname": b"Linux", "nodename": b"(none)",
                "release": source.release.encode() or b"unknown", "version": b"unknown",
                "machine": b"x86_64", "domainname": b"(none)"}
    return [found.get(name, b"")[:64] or fallback[name][:64] for name in UTS_FIELDS]


def _write_headers(source: DumpSource, writer: "_Raw | _Flat",
                   method: Compression) -> tuple[int, int]:
    """Header, sub-header with the notes, both bitmaps; (descriptors' offset, data's)."""
    note_blob, vmcoreinfo_at = notes(source)
    max_mapnr = _max_mapnr(source)
    dumpable, count = dumped_pfns(source)
    ram = _ram_bitmap(source, max_mapnr)
    bitmap_bytes = -(-len(ram) // PAGE) * PAGE
    sub_hdr_blocks = -(-(SUB_HEADER.size + len(note_blob)) // PAGE)
    bitmap_blocks = 2 * bitmap_bytes // PAGE
    note_offset = PAGE + SUB_HEADER.size
    desc_offset = (1 + sub_hdr_blocks + bitmap_blocks) * PAGE
    now = time.time()
    uts = header_utsname(source)
    header = HEADER.pack(SIGNATURE, HEADER_VERSION, *uts, int(now), int(now % 1 * 1e6),
                         method.flag, PAGE,
                         sub_hdr_blocks, bitmap_blocks, min(max_mapnr, 0xFFFFFFFF), count,
                         0, 0, 0, len(source.cpus))
    vmci_offset = note_offset + vmcoreinfo_at if vmcoreinfo_at is not None else 0
    vmci_size = len(source.vmcoreinfo or b"") if vmcoreinfo_at is not None else 0
    sub = SUB_HEADER.pack(source.phys_base, DL_EXCLUDE_ZERO, 0, 0, max_mapnr, vmci_offset,
                          vmci_size, note_offset, len(note_blob), 0, 0, 0, max_mapnr, max_mapnr)
    writer.put(0, header.ljust(PAGE, b"\0"))
    writer.put(PAGE, (sub + note_blob).ljust(sub_hdr_blocks * PAGE, b"\0"))
    bitmaps_at = (1 + sub_hdr_blocks) * PAGE
    writer.put(bitmaps_at, bytes(ram).ljust(bitmap_bytes, b"\0"))
    writer.put(bitmaps_at + bitmap_bytes, bytes(dumpable).ljust(bitmap_bytes, b"\0"))
    return desc_offset, desc_offset + count * PAGE_DESC.size


def _write_pages(source: DumpSource, writer: "_Raw | _Flat", compress: Callable[[bytes], bytes],
                 flag: int, descs: bytearray, data_offset: int,
                 progress: Callable[[int], None] | None) -> int:
    """Every page of every run, compressed, with its descriptor appended to ``descs``; the
    end of the data. Pages of zeros share one copy of a zero page (as QEMU's dumps do): a
    reader asking for one gets zeros, where an excluded page would be an error to crash."""
    zero_packed = compress(ZERO_PAGE)
    zero_desc = PAGE_DESC.pack(data_offset, len(zero_packed), flag, 0)
    pending, pending_at = bytearray(zero_packed), data_offset
    cursor, done = data_offset + len(zero_packed), 0
    for run in source.runs:
        for piece in chunks(run.data, len(_ZERO_CHUNK)):
            done += len(piece) // PAGE
            # compared as bytes: memoryview == bytes goes byte by byte (8 us a zero page)
            if bytes(piece) == _ZERO_CHUNK[:len(piece)]:  # 2 MiB of zeros at a time
                descs += zero_desc * (len(piece) // PAGE)
                continue
            for offset in range(0, len(piece), PAGE):
                raw = bytes(piece[offset:offset + PAGE])
                if raw == ZERO_PAGE:
                    descs += zero_desc
                    continue
                packed, flags = compress(raw), flag
                if len(packed) >= PAGE:
                    packed, flags = raw, 0
                descs += PAGE_DESC.pack(cursor, len(packed), flags, 0)
                pending += packed
                cursor += len(packed)
                if len(pending) >= 1 << 20:
                    writer.put(pending_at, pending)
                    pending_at, pending = cursor, bytearray()
            if progress is not None:
                progress(done * PAGE)
    if pending:
        writer.put(pending_at, pending)
    if progress is not None:
        progress(done * PAGE)
    return cursor
