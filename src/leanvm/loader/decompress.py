"""Host-side decompression of a bzImage's payload: the ELF vmlinux inside it.

A bzImage carries its kernel compressed (payload_offset/payload_length in the setup header,
protocol 2.08+, offsets from the start of the protected-mode code). The guest would spend a
long time decompressing it; leanvm does it once on the host, caches the result by the
bzImage's content hash, and boots the ELF through PVH (loader/pvh.py).

What the kernel build puts there (arch/x86/boot/compressed/Makefile, scripts/Makefile.lib):
the compressed vmlinux.bin (plus its relocation table with CONFIG_X86_NEED_RELOCS), then the
uncompressed size as a little-endian u32. gzip's own trailer ends with that size (ISIZE);
every other format gets it appended (size_append: bzip2, lzma, xz, lzo, lz4, zstd). So the
stream must end exactly where the payload does (gzip) or 4 bytes before (the rest), and
decompress to exactly the declared size; loader/compression.py checks each container's own
checksums and sizes; the result must be a whole ELF file (headers and segments within it).
A payload that fails any of this is refused with one line and never reaches the cache.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import NamedTuple

from leanvm.errors import ImageError
from leanvm.loader.bzimage import HEADER_END, parse_setup_header
from leanvm.loader.compression import decompress_stream, sniff

SIZE_TRAILER = 4  # the little-endian u32 uncompressed size at the payload's end
CACHE_VERSION = 2  # 2: entries are written only after the declared size and ELF checks


class Payload(NamedTuple):
    kind: str  # compression format
    body: memoryview  # the compressed bytes, size trailer included (payload_length)
    declared: int  # the uncompressed size the build appended (its last 4 bytes)


def read_payload(data: "bytes | memoryview", path: str) -> Payload:
    """The kernel payload of a bzImage: its format, bytes and declared uncompressed size."""
    view = memoryview(data)
    header = parse_setup_header(bytes(view[:HEADER_END]), path, len(view))
    if header.protocol < 0x208 or not header.payload_length:
        raise ImageError(f"{path}: no payload fields in the setup header (boot protocol "
                         f"{header.protocol >> 8}.{header.protocol & 0xFF:02d}): cannot "
                         "decompress it on the host")
    start = header.setup_size + header.payload_offset
    end = start + header.payload_length
    if end > len(view):
        raise ImageError(f"{path}: payload [{start:#x}, {end:#x}) runs past the file's end "
                         f"({len(view):#x})")
    body = view[start:end]
    kind = sniff(body)
    if kind is None:
        raise ImageError(f"{path}: unknown payload compression (magic {bytes(body[:6]).hex()})")
    if len(body) < 2 * SIZE_TRAILER:
        raise ImageError(f"{path}: the {kind} payload is {len(body)} bytes: too short to hold "
                         "a stream and its size")
    declared = struct.unpack_from("<I", body, len(body) - SIZE_TRAILER)[0]
    return Payload(kind, body, declared)


def payload(data: "bytes | memoryview", path: str) -> tuple[str, memoryview]:
    """(format, compressed bytes) of a bzImage's kernel payload."""
    found = read_payload(data, path)
    return found.kind, found.body


def decompress_payload(kind: str, body: "bytes | memoryview", path: str) -> bytes:
    """A bzImage payload (stream, then the size trailer unless gzip's own ends it)
    decompressed, after checking that the stream fills it and yields the declared size."""
    view = memoryview(body)
    if len(view) < 2 * SIZE_TRAILER:
        raise ImageError(f"{path}: the {kind} payload is {len(view)} bytes: too short to hold "
                         "a stream and its size")
    declared = struct.unpack_from("<I", view, len(view) - SIZE_TRAILER)[0]
    stream = view if kind == "gzip" else view[:len(view) - SIZE_TRAILER]
    out, _ = decompress_stream(kind, stream, path, "payload", whole=True)
    if len(out) & 0xFFFFFFFF != declared:
        raise ImageError(f"{path}: the {kind} payload decompresses to {len(out)} bytes, but "
                         f"its last 4 bytes declare {declared}")
    return out


def check_vmlinux(elf: "bytes | memoryview", path: str, kind: str) -> None:
    """A decompressed payload must be a whole x86-64 ELF file: its header tables and every
    segment's file bytes inside it (a relocation table may follow them)."""
    from leanvm.loader.elf64 import Elf64

    if bytes(elf[:4]) != b"\x7fELF":
        raise ImageError(f"{path}: the {kind} payload does not hold an ELF kernel")
    try:
        parsed = Elf64(elf, "ELF")
    except ImageError as exc:
        raise ImageError(f"{path}: the decompressed {kind} payload is not a whole ELF file "
                         f"({str(exc).removeprefix('ELF: ')})") from None
    for index, segment in enumerate(parsed.segments()):
        if segment.filesz and segment.offset + segment.filesz > len(elf):
            raise ImageError(f"{path}: the decompressed {kind} payload is not a whole ELF "
                             f"file: segment {index} [{segment.offset:#x}, "
                             f"{segment.offset + segment.filesz:#x}) runs past its "
                             f"{len(elf)} bytes")


def extract_vmlinux(data: "bytes | memoryview", path: str) -> bytes:
    """The ELF vmlinux a bzImage carries, decompressed and checked."""
    found = read_payload(data, path)
    elf = decompress_payload(found.kind, found.body, path)
    check_vmlinux(elf, path, found.kind)
    return elf


def cache_dir() -> Path:
    base = os.environ.get("LEANVM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "leanvm")
    return Path(base) / "kernels"


def kernel_digest(data: "bytes | memoryview") -> str:
    """The cache key of a kernel image: its SHA-256, in hex."""
    return hashlib.sha256(data).hexdigest()


def cached_vmlinux(data: "bytes | memoryview", path: str,
                   digest: str | None = None) -> tuple[Path, bool]:
    """(path of the decompressed ELF, whether it came from the cache). The cache key is the
    bzImage's SHA-256; files are written then renamed, so concurrent VMs never see half, and
    only after every check of extract_vmlinux passed. A cached file whose size is not the
    size the payload declares is made again."""
    digest = digest or kernel_digest(data)
    target = cache_dir() / f"vmlinux-{digest[:32]}-v{CACHE_VERSION}"
    declared = read_payload(data, path).declared
    try:
        if target.is_file() and target.stat().st_size == declared:
            return target, True
    except OSError:
        pass  # gone in between: make it again
    elf = extract_vmlinux(data, path)
    try:
        _write_atomically(target, elf)
    except OSError as exc:
        raise ImageError(f"cannot write the decompressed kernel to {target.parent} "
                         f"({exc.strerror}); set LEANVM_CACHE to a writable directory") from None
    return target, False


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)


def _guest_record(digest: str) -> Path:
    return cache_dir() / f"guest-decompression-{digest[:32]}.json"


def record_guest_decompression(digest: str, seconds: float) -> None:
    """Remember how long this kernel took to decompress itself in a guest on this host (seen
    in a traced bzImage boot), so PVH boots of it can say what host-side decompression saved.
    Best effort: an unwritable cache only loses the figure."""
    import json

    try:
        _write_atomically(_guest_record(digest), json.dumps({"seconds": seconds}).encode())
    except OSError:
        pass


def guest_decompression_seconds(digest: str) -> float | None:
    """The figure record_guest_decompression stored for this kernel, if any."""
    import json

    try:
        value = json.loads(_guest_record(digest).read_text())["seconds"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None
