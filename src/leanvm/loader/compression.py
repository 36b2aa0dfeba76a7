"""Compressed streams as Linux's build and initramfs tools write them, decoded on the host
with every check their containers carry; anything that does not match is one ImageError line.

What each format declares, and who checks it:
  gzip   CRC-32 and ISIZE (uncompressed size mod 2**32) in its trailer: zlib checks both.
  bzip2  a CRC per block and one over the stream: the bz2 module checks them.
  lzma   (.lzma, "alone") the uncompressed size in its header, or all ones when unknown
         (then an end marker); checked here. No checksum.
  xz     a check (CRC-32 for the kernel's xz_wrap.sh) per block, sizes in its index:
         liblzma checks them.
  zstd   frame content size (optional) and XXH64 checksum (optional; the zstd tool writes
         it by default): libzstd checks the checksum, the size is checked here too.
  lz4    the legacy frame (lz4 -l): magic 0x184C2102, then blocks each prefixed by their
         compressed size (little-endian u32), each decoding to exactly 8 MiB except the
         last, which is shorter or equal. No checksum; the block sizes are checked here.
  lzo    lzop's container (loader/lzop.py): header and block checksums.
"""

from __future__ import annotations

import struct

from leanvm.errors import ImageError

MAGICS = (
    (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\x5d\x00\x00", "lzma"),
    (b"\xfd7zXZ\x00", "xz"), (b"\x89LZO", "lzo"), (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # lz4 -l: every block but the last decodes to this
LZ4_BLOCK_BOUND = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16  # LZ4_compressBound
LZMA_SIZE_UNKNOWN = (1 << 64) - 1  # .lzma header: size not recorded, an end marker follows


def sniff(head: "bytes | memoryview") -> str | None:
    """The compression format whose magic ``head`` starts with, if any."""
    start = bytes(head[:6])
    return next((name for magic, name in MAGICS if start.startswith(magic)), None)


def decompress_stream(kind: str, data: "bytes | memoryview", path: str, what: str = "",
                      whole: bool = False) -> tuple[bytes, int]:
    """(the ``kind`` stream at the start of ``data`` decompressed, the bytes it used), after
    every check its container carries. ``whole``: the stream must fill ``data`` exactly.
    ``what`` names the stream in errors ("payload", "member at byte 0x200")."""
    label = f"{kind} {what or 'stream'}"
    try:
        out, used = _decode(kind, data, path, label, whole)
    except ImageError:
        raise
    except Exception as exc:  # each library has its own error types
        raise ImageError(f"{path}: the {label} is corrupt ({_detail(exc)})") from None
    if whole and used != len(data):
        raise ImageError(f"{path}: the {label} ends at byte {used} of {len(data)}: "
                         f"{len(data) - used} bytes follow it (expected none)")
    return out, used


def _detail(exc: Exception) -> str:
    text = str(exc).strip() or "undecodable data"
    for noise in ("Error -3 while decompressing data: ", "zstd decompressor error: "):
        text = text.replace(noise, "")
    return {"incorrect data check": "its CRC-32 does not match the data",
            "incorrect length check": "its ISIZE does not match the data"}.get(text, text)


def _decode(kind: str, data: "bytes | memoryview", path: str, label: str,
            whole: bool) -> tuple[bytes, int]:
    if kind == "gzip":
        import zlib

        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = stream.decompress(data)
        return out, _used(stream.eof, len(data), stream.unused_data, label, path)
    if kind in ("bzip2", "lzma", "xz"):
        import bz2
        import lzma

        if kind == "bzip2":
            stream = bz2.BZ2Decompressor()
        else:
            stream = lzma.LZMADecompressor(
                format=lzma.FORMAT_ALONE if kind == "lzma" else lzma.FORMAT_XZ)
        out = stream.decompress(data)
        used = _used(stream.eof, len(data), stream.unused_data, label, path)
        if kind == "lzma":
            _check_size(struct.unpack_from("<Q", data, 5)[0], len(out), "header", label, path)
        return out, used
    if kind == "zstd":
        import zstandard

        stream = zstandard.ZstdDecompressor().decompressobj()
        out = stream.decompress(bytes(data))
        used = _used(stream.eof, len(data), stream.unused_data, label, path)
        declared = zstandard.get_frame_parameters(bytes(data[:18])).content_size
        if declared != zstandard.CONTENTSIZE_UNKNOWN:
            _check_size(declared, len(out), "frame header", label, path)
        return out, used
    if kind == "lz4":
        return lz4_legacy(bytes(data), path, label, whole)
    if kind == "lzo":
        from leanvm.loader.lzop import decompress_lzop

        return decompress_lzop(bytes(data), path)
    raise ImageError(f"{path}: {kind}-compressed data: leanvm cannot decompress {kind} on "
                     "the host")


def _used(done: bool, size: int, unused: bytes, label: str, path: str) -> int:
    if not done:
        raise ImageError(f"{path}: the {label} is cut short (no end of stream)")
    return size - len(unused)


def _check_size(declared: int, got: int, where: str, label: str, path: str) -> None:
    if declared != LZMA_SIZE_UNKNOWN and declared != got:
        raise ImageError(f"{path}: the {label} decompresses to {got} bytes, but its {where} "
                         f"declares {declared}")


def lz4_legacy(data: bytes, path: str, label: str = "lz4 stream",
               whole: bool = False) -> tuple[bytes, int]:
    """(the decoded legacy frame(s) at the start of ``data``, the bytes used). Blocks follow
    one another; a block shorter than 8 MiB is the last of its frame, which may be followed
    by another frame's magic. With ``whole`` the frames fill ``data`` exactly; otherwise
    (an initramfs member) they end at the data's end, at a zero size (padding), or at a
    size that cannot be a block after a full one."""
    import lz4.block

    if not data.startswith(struct.pack("<I", LZ4_LEGACY_MAGIC)):
        raise ImageError(f"{path}: the {label} does not start with the legacy magic")
    out = bytearray()
    at, last = 4, LZ4_LEGACY_BLOCK  # size of the block before: full, or short (frame end)
    while at < len(data):
        if at + 4 > len(data):
            if whole:
                raise ImageError(f"{path}: the {label} is cut short at byte {at} "
                                 "(a partial block size)")
            break
        size = struct.unpack_from("<I", data, at)[0]
        if size == LZ4_LEGACY_MAGIC:  # another frame follows
            at, last = at + 4, LZ4_LEGACY_BLOCK
            continue
        fits = 0 < size <= LZ4_BLOCK_BOUND and at + 4 + size <= len(data)
        if last < LZ4_LEGACY_BLOCK or not fits:
            if whole:
                raise ImageError(_lz4_stray(path, label, at, size, last, len(data)))
            break
        block = lz4.block.decompress(data[at + 4:at + 4 + size],
                                     uncompressed_size=LZ4_LEGACY_BLOCK)
        if not block:
            raise ImageError(f"{path}: the {label} holds an empty block at byte {at}")
        out += block
        at, last = at + 4 + size, len(block)
    if not out:
        raise ImageError(f"{path}: the {label} holds no data")
    return bytes(out), at


def _lz4_stray(path: str, label: str, at: int, size: int, last: int, end: int) -> str:
    if last < LZ4_LEGACY_BLOCK:
        return (f"{path}: the {label} ends with a block of {last} bytes, but {end - at} bytes "
                f"follow it at byte {at} (every block but the last decodes to "
                f"{LZ4_LEGACY_BLOCK})")
    if not 0 < size <= LZ4_BLOCK_BOUND:
        return (f"{path}: the {label} has a block size of {size} at byte {at} (expected 1 "
                f"to {LZ4_BLOCK_BOUND})")
    return f"{path}: the {label} is cut short: a block of {size} bytes at byte {at} of {end}"
