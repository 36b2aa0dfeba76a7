"""LZO-compressed kernels: the lzop container (ours) over the system's LZO1X codec.

A kernel built with CONFIG_KERNEL_LZO carries its payload as an lzop file (``lzop -9``).
Layout, big-endian: the 9-byte magic; version (2), library version (2), version needed (2),
method (1), level (1, from version 0x0940); flags (4) and, with F_H_FILTER, a filter (4);
mode (4), mtime low (4), mtime high (4, from 0x0940); a file name (length byte, bytes); the
header checksum (4: Adler-32 of everything after the magic, or CRC-32 with F_H_CRC32), and
with F_H_EXTRA_FIELD an extra field (length, bytes, checksum). Then blocks: uncompressed
size (4; 0 ends the file), compressed size (4), the uncompressed data's Adler-32 and/or
CRC-32 (4 each) if the flags ask for them, the compressed data's (4 each) if they ask and
the block is compressed, then the data. A block whose two sizes are equal is stored. Every
checksum present is checked.

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
F_ADLER32_D, F_ADLER32_C, F_H_EXTRA_FIELD = 0x1, 0x2, 0x40  # lzop's header flags
F_CRC32_D, F_CRC32_C, F_MULTIPART, F_H_FILTER, F_H_CRC32 = 0x100, 0x200, 0x400, 0x800, 0x1000
LZO1X_METHODS = (1, 2, 3)  # M_LZO1X_1, M_LZO1X_1_15, M_LZO1X_999: one decoder for all
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
    """(flags, offset of the first block) of an lzop file, after its header checksum."""
    if not data.startswith(MAGIC):
        raise ImageError(f"{path}: not an lzop stream (bad magic)")
    try:
        at = len(MAGIC)
        version = struct.unpack_from(">H", data, at)[0]
        at += 4 + (2 if version >= 0x0940 else 0)  # version, library, version needed
        method = data[at]
        at += 1 + (1 if version >= 0x0940 else 0)  # method, level
        flags = struct.unpack_from(">I", data, at)[0]
        at += 8 if flags & F_H_FILTER else 4
        at += 8 + (4 if version >= 0x0940 else 0)  # mode, mtime (low, high)
        at += 1 + data[at]  # the file name
        stored = struct.unpack_from(">I", data, at)[0]
    except (struct.error, IndexError):
        raise ImageError(f"{path}: the lzop header is cut short") from None
    if method not in LZO1X_METHODS:
        raise ImageError(f"{path}: lzop method {method} (expected LZO1X: 1, 2 or 3)")
    if flags & F_MULTIPART:
        raise ImageError(f"{path}: a multi-part lzop file (not one the kernel build writes)")
    check = zlib.crc32 if flags & F_H_CRC32 else zlib.adler32
    if check(data[len(MAGIC):at]) != stored:
        raise ImageError(f"{path}: the lzop header fails its "
                         f"{'CRC-32' if flags & F_H_CRC32 else 'Adler-32'} checksum")
    at += 4
    if flags & F_H_EXTRA_FIELD:  # length, bytes, checksum: skipped
        if at + 4 > len(data):
            raise ImageError(f"{path}: the lzop header is cut short")
        at += 4 + struct.unpack_from(">I", data, at)[0] + 4
    if at > len(data):
        raise ImageError(f"{path}: the lzop header is cut short")
    return flags, at


def _field(data: bytes, at: int, path: str) -> int:
    if at + 4 > len(data):
        raise ImageError(f"{path}: the lzo stream is cut short at byte {at:#x}")
    return struct.unpack_from(">I", data, at)[0]


def _checks(flags: int, adler: int, crc: int) -> list[tuple[str, int]]:
    """The checksums a block carries for one of its two forms, in file order."""
    return [(name, flag) for name, flag in (("Adler-32", adler), ("CRC-32", crc)) if flags & flag]


def _verify(data: bytes, at: int, expected: list[tuple[str, int]], what: str,
            path: str) -> None:
    for name, value in expected:
        got = zlib.adler32(data) if name == "Adler-32" else zlib.crc32(data)
        if got != value:
            raise ImageError(f"{path}: lzo block at {at:#x} fails its {name} checksum "
                             f"({what} data)")


def decompress_lzop(data: bytes, path: str) -> tuple[bytes, int]:
    """(the decompressed contents of the lzop file at the start of ``data``, the bytes of
    ``data`` it used). Every checksum the file carries is checked."""
    flags, at = _header(data, path)
    plain_checks = _checks(flags, F_ADLER32_D, F_CRC32_D)
    packed_checks = _checks(flags, F_ADLER32_C, F_CRC32_C)
    decode = None
    out = bytearray()
    while True:
        if at + 4 > len(data):
            raise ImageError(f"{path}: the lzo stream is cut short at byte {at:#x} (no end "
                             "marker)")
        size = _field(data, at, path)
        at += 4
        if size == 0:
            return bytes(out), at
        packed = _field(data, at, path)
        at += 4
        if size > BLOCK_LIMIT or packed == 0 or packed > size:
            raise ImageError(f"{path}: corrupt lzo block at {at - 8:#x} (sizes {packed} of "
                             f"{size}, expected 0 < compressed <= uncompressed <= "
                             f"{BLOCK_LIMIT})")
        block_at = at - 8
        expected_plain = [(name, _field(data, at + 4 * i, path))
                          for i, (name, _) in enumerate(plain_checks)]
        at += 4 * len(plain_checks)
        expected_packed: list[tuple[str, int]] = []
        if packed < size:  # stored blocks carry no checksum of their compressed form
            expected_packed = [(name, _field(data, at + 4 * i, path))
                               for i, (name, _) in enumerate(packed_checks)]
            at += 4 * len(packed_checks)
        if at + packed > len(data):
            raise ImageError(f"{path}: the lzo stream is cut short (block at {block_at:#x} "
                             f"needs {packed} bytes, {len(data) - at} remain)")
        block = data[at:at + packed]
        at += packed
        if packed == size:
            plain = block
        else:
            _verify(block, block_at, expected_packed, "compressed", path)
            decode = decode or _codec(path)
            buffer = ctypes.create_string_buffer(size)
            got = ctypes.c_size_t(size)
            status = decode(block, packed, buffer, ctypes.byref(got), None)
            if status != 0 or got.value != size:
                raise ImageError(f"{path}: corrupt lzo block at {block_at:#x} "
                                 f"(liblzo2 status {status}, {got.value} of {size} bytes)")
            plain = buffer.raw
        _verify(plain, block_at, expected_plain, "uncompressed", path)
        out += plain
