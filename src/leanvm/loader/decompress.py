"""Host-side decompression of a bzImage's payload: the ELF vmlinux inside it.

A bzImage carries its kernel compressed (payload_offset/payload_length in the setup header,
protocol 2.08+, offsets from the start of the protected-mode code). The guest would spend a
long time decompressing it; leanvm does it once on the host, caches the result by the
bzImage's content hash, and boots the ELF through PVH (loader/pvh.py).

Formats, by their magic bytes: gzip, bzip2, lzma, xz (standard library), zstd (zstandard),
LZ4 in the legacy frame the kernel uses (lz4: magic 0x184C2102, then blocks each prefixed by
their compressed size, the last four bytes of the payload being the uncompressed size), and
LZO in lzop's container (loader/lzop.py, over the system's liblzo2).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from leanvm.errors import ImageError
from leanvm.loader.bzimage import HEADER_END, parse_setup_header

MAGICS = (
    (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"),
    (b"\xfd7zXZ\x00", "xz"), (b"\x89LZO", "lzo"), (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
LZ4_LEGACY_BLOCK = 8 << 20
LZ4_LEGACY_MAGIC = 0x184C2102
CACHE_VERSION = 1


def payload(data: "bytes | memoryview", path: str) -> tuple[str, memoryview]:
    """(format, compressed bytes) of a bzImage's kernel payload."""
    view = memoryview(data)
    header = parse_setup_header(bytes(view[:HEADER_END]), path, len(view))
    if header.protocol < 0x208 or not header.payload_length:
        raise ImageError(f"{path}: no payload fields in the setup header (boot protocol "
                         f"{header.protocol >> 8}.{header.protocol & 0xFF:02d}): cannot "
                         "decompress it on the host")
    start = header.setup_size + header.payload_offset
    end = start + header.payload_length
    if end > len(view):
        raise ImageError(f"{path}: payload [{start:#x}, {end:#x}) runs past the file's end")
    body = view[start:end]
    head = bytes(body[:6])
    for magic, name in MAGICS:
        if head.startswith(magic):
            return name, body
    raise ImageError(f"{path}: unknown payload compression (magic {head.hex()})")


def decompress(kind: str, body: "bytes | memoryview", path: str) -> bytes:
    """The first ``kind`` stream in ``body``, decompressed (trailing bytes are ignored: a
    bzImage appends the uncompressed size)."""
    return decompress_stream(kind, body, path)[0]


def decompress_stream(kind: str, body: "bytes | memoryview", path: str) -> tuple[bytes, int]:
    """(the first ``kind`` stream in ``body`` decompressed, the bytes of ``body`` it used)."""
    try:
        if kind == "gzip":
            import zlib

            stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = stream.decompress(body)
            return out, _used(stream.eof, len(body), stream.unused_data, kind, path)
        if kind in ("bzip2", "lzma", "xz"):
            import bz2
            import lzma

            if kind == "bzip2":
                stream = bz2.BZ2Decompressor()
            else:
                stream = lzma.LZMADecompressor(
                    format=lzma.FORMAT_ALONE if kind == "lzma" else lzma.FORMAT_XZ)
            out = stream.decompress(body)
            return out, _used(stream.eof, len(body), stream.unused_data, kind, path)
        if kind == "zstd":
            import zstandard

            stream = zstandard.ZstdDecompressor().decompressobj()
            out = stream.decompress(bytes(body))
            return out, _used(stream.eof, len(body), stream.unused_data, kind, path)
        if kind == "lz4":
            return _lz4_legacy(bytes(body), path)
        if kind == "lzo":
            from leanvm.loader.lzop import decompress_lzop

            return decompress_lzop(bytes(body), path)
    except ImageError:
        raise
    except Exception as exc:  # each library has its own error types
        raise ImageError(f"{path}: corrupt {kind} data ({exc})") from None
    raise ImageError(f"{path}: {kind}-compressed data: leanvm cannot decompress {kind} on "
                     "the host (no maintained Python library)")


def _used(done: bool, size: int, unused: bytes, kind: str, path: str) -> int:
    if not done:
        raise ImageError(f"{path}: the {kind} stream is cut short")
    return size - len(unused)


def _lz4_legacy(body: bytes, path: str) -> tuple[bytes, int]:
    """The kernel's LZ4 "legacy" frame: magic, then blocks each prefixed by their
    compressed size; it ends at a size of 0 or one that runs past the data (a bzImage's
    appended uncompressed size), or at the next frame's magic."""
    import lz4.block

    out = bytearray()
    offset = 4
    while offset + 4 <= len(body):
        size = struct.unpack_from("<I", body, offset)[0]
        if size == 0 or size == LZ4_LEGACY_MAGIC or offset + 4 + size > len(body):
            break
        block = body[offset + 4:offset + 4 + size]
        out += lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK)
        offset += 4 + size
    if not out:
        raise ImageError(f"{path}: empty LZ4 data")
    return bytes(out), offset


def extract_vmlinux(data: "bytes | memoryview", path: str) -> bytes:
    kind, body = payload(data, path)
    elf = decompress(kind, body, path)
    if not elf.startswith(b"\x7fELF"):
        raise ImageError(f"{path}: the {kind} payload does not hold an ELF kernel")
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
    bzImage's SHA-256; files are written then renamed, so concurrent VMs never see half."""
    digest = digest or kernel_digest(data)
    target = cache_dir() / f"vmlinux-{digest[:32]}-v{CACHE_VERSION}"
    if target.is_file():
        return target, True
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
