"""LZO-compressed kernels: the lzop container (ours) over the system's LZO1X codec.

A kernel built with CONFIG_KERNEL_LZO carries its payload as an lzop file (``lzop -9``).
Layout, big-endian: the 9-byte magic; version (2), library version (2), version needed (2),
method (1), level (1, from version 0x0940); flags (4) and, with F_H_FILTER, a filter (4);
mode (4), mtime low (4), mtime high (4, from 0x0940); a file name (length byte, bytes); the
header checksum (4). Then blocks: uncompressed size (4; 0 ends the file), compressed size
(4), a checksum of the uncompressed data (4) if the flags ask for one, a checksum of the
compressed data (4) if they ask and the block is compressed, then the data. A block whose
two sizes are equal is stored. Adler-32 checksums of the uncompressed data are checked.

No maintained Python library decodes LZO1X without a compiler; liblzo2 (Debian's
liblzo2-2) does, and ctypes calls its lzo1x_decompress_safe, which bounds-checks both
buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import zlib

from leanvm.errors import ImageError

MAGIC = b"\x89LZO\x00\r\n\x1a\n"
BLOCK_LIMIT = 64 << 20  # lzop writes 256 KiB blocks; anything far larger is corrupt
F_ADLER32_D, F_ADLER32_C, F_H_FILTER, F_CRC32_D, F_CRC32_C = 0x1, 0x2, 0x800, 0x100, 0x200
_LIBRARY: list = []  # the loaded liblzo2, once


def _codec(path: str):  # type: ignore[no-untyped-def]
    if not _LIBRARY:
        name = ctypes.util.find_library("lzo2") or "liblzo2.so.2"
        try:
            library = ctypes.CDLL(name)
        except OSError:
            raise ImageError(f"{path}: the kernel is LZO-compressed and liblzo2 is not "
                             "installed (apt-get install liblzo2-2, or run "
                             "scripts/install-deps)") from None
        function = library.lzo1x_decompress_safe
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
        _LIBRARY.append(function)
    return _LIBRARY[0]


def _header(data: bytes, path: str) -> tuple[int, int]:
    """(flags, offset of the first block) of an lzop file."""
    try:
        if not data.startswith(MAGIC):
            raise ImageError(f"{path}: not an lzop stream (bad magic)")
        at = len(MAGIC)
        version = struct.unpack_from(">H", data, at)[0]
        at += 7 + (1 if version >= 0x0940 else 0)
        flags = struct.unpack_from(">I", data, at)[0]
        at += 8 if flags & F_H_FILTER else 4
        at += 8 + (4 if version >= 0x0940 else 0)
        at += 1 + data[at] + 4
    except (struct.error, IndexError):
        raise ImageError(f"{path}: the lzop header is cut short") from None
    if at > len(data):
        raise ImageError(f"{path}: the lzop header is cut short")
    return flags, at


def decompress_lzop(data: bytes, path: str) -> tuple[bytes, int]:
    """(the decompressed contents of the lzop file at the start of ``data``, the bytes of
    ``data`` it used)."""
    flags, at = _header(data, path)
    decode = None
    out = bytearray()
    while True:
        if at + 4 > len(data):
            raise ImageError(f"{path}: the lzo stream is cut short (no end marker)")
        size = struct.unpack_from(">I", data, at)[0]
        at += 4
        if size == 0:
            return bytes(out), at
        if at + 4 > len(data):
            raise ImageError(f"{path}: the lzo stream is cut short")
        packed = struct.unpack_from(">I", data, at)[0]
        at += 4
        if size > BLOCK_LIMIT or packed == 0 or packed > size:
            raise ImageError(f"{path}: corrupt lzo block at {at - 8:#x} (sizes {packed} of "
                             f"{size}, expected 0 < compressed <= uncompressed <= "
                             f"{BLOCK_LIMIT})")
        expected = None
        if flags & (F_ADLER32_D | F_CRC32_D):
            expected = struct.unpack_from(">I", data, at)[0] if at + 4 <= len(data) else None
            at += 4
        if flags & (F_ADLER32_C | F_CRC32_C) and packed < size:
            at += 4
        if at + packed > len(data):
            raise ImageError(f"{path}: the lzo stream is cut short")
        block = data[at:at + packed]
        at += packed
        if packed == size:
            plain = block
        else:
            decode = decode or _codec(path)
            buffer = ctypes.create_string_buffer(size)
            got = ctypes.c_size_t(size)
            status = decode(block, packed, buffer, ctypes.byref(got), None)
            if status != 0 or got.value != size:
                raise ImageError(f"{path}: corrupt lzo block at {at - packed:#x} "
                                 f"(liblzo2 status {status}, {got.value} of {size} bytes)")
            plain = buffer.raw
        if flags & F_ADLER32_D and expected is not None and zlib.adler32(plain) != expected:
            raise ImageError(f"{path}: lzo block at {at - packed:#x} fails its Adler-32 "
                             "checksum")
        out += plain
