"""LZO kernel payloads: lzop's container, decoded by loader/lzop.py over liblzo2, checked
against files the real lzop tool wrote."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import zlib

import pytest

from leanvm.errors import ImageError
from leanvm.loader.decompress import extract_vmlinux, payload
from leanvm.loader.lzop import MAGIC, decompress_lzop
from tests.unit.test_decompress_pvh import make_elf, size_append, with_payload

pytestmark = pytest.mark.skipif(shutil.which("lzop") is None,
                                reason="lzop is not installed (scripts/install-deps adds it)")


def lzop(data: bytes, *flags: str) -> bytes:
    """What the kernel build does: lzop -9 over the ELF."""
    return subprocess.run(["lzop", "-9", "-c", *flags], input=data, capture_output=True,
                          check=True).stdout


def kernel_like(size: int) -> bytes:
    """An ELF kernel of ``size`` bytes whose body compresses like code."""
    rng = random.Random(size)
    words = [rng.randbytes(rng.randrange(1, 12)) for _ in range(300)]
    out = bytearray()
    while len(out) < size - len(make_elf(b"")):
        out += rng.choice(words) if rng.random() < 0.9 else rng.randbytes(40)
    return make_elf(bytes(out[:size - len(make_elf(b""))]))


def test_a_multi_block_kernel_round_trips_through_a_bzimage() -> None:
    elf = kernel_like(700_000)  # three of lzop's 256 KiB blocks
    body = lzop(elf) + size_append(elf)  # the kernel appends the size
    image = with_payload(body)
    assert payload(image, "k")[0] == "lzo"
    assert extract_vmlinux(image, "k") == elf


def test_stored_blocks_and_used_length() -> None:
    data = random.Random(1).randbytes(300_000)  # incompressible: blocks stored as they are
    packed = lzop(data)
    out, used = decompress_lzop(packed + b"trailer", "k")
    assert out == data and used == len(packed)


def test_without_checksums() -> None:
    elf = kernel_like(100_000)
    assert decompress_lzop(lzop(elf, "--no-checksum"), "k")[0] == elf


def first_block(packed: bytes) -> int:
    """Offset of the first block's uncompressed-size field in lzop -9 output."""
    name_at = len(MAGIC) + 8 + 4 + 12  # version..level, flags, mode and mtimes
    return name_at + 1 + packed[name_at] + 4


@pytest.mark.parametrize("damage, message", [
    (lambda p, b: p[:b + 6], "cut short"),
    (lambda p, b: p[:-4], "no end marker"),
    (lambda p, b: p[:b + 4] + struct.pack(">I", 0) + p[b + 8:], "corrupt lzo block"),
    (lambda p, b: p[:b] + struct.pack(">I", 1 << 30) + p[b + 4:], "corrupt lzo block"),
    (lambda p, b: p[:b + 12] + bytes(64) + p[b + 76:], "corrupt lzo block|Adler-32"),
    (lambda p, b: p[:b + 8] + b"\x00\x00\x00\x01" + p[b + 12:], "Adler-32"),
    (lambda p, b: b"\x89LZO\x00\r\n\x1a\n\x10", "header is cut short"),
])
def test_damaged_streams_are_refused_with_a_clear_error(damage, message: str) -> None:
    packed = lzop(kernel_like(100_000))
    with pytest.raises(ImageError, match=message):
        decompress_lzop(damage(packed, first_block(packed)), "vmlinuz")


@pytest.mark.parametrize("flags", [(), ("--crc32",), ("--no-checksum",)])
def test_every_checksum_lzop_writes_is_checked(flags: tuple[str, ...]) -> None:
    elf = kernel_like(100_000)
    packed = lzop(elf, *flags)
    assert decompress_lzop(packed, "k")[0] == elf
    if "--no-checksum" in flags:
        return
    at = first_block(packed) + 8  # the first block's checksum of its uncompressed data
    damaged = packed[:at] + bytes([packed[at] ^ 1]) + packed[at + 1:]
    name = "CRC-32" if flags == ("--crc32",) else "Adler-32"
    with pytest.raises(ImageError, match=f"vmlinuz: lzo block at 0x[0-9a-f]+ fails its {name}"):
        decompress_lzop(damaged, "vmlinuz")


def with_compressed_checksums(packed: bytes) -> bytes:
    """lzop -9 output given F_ADLER32_C too: each compressed block also carries the
    Adler-32 of its compressed bytes (the header checksum made again)."""
    at = first_block(packed)
    flags = struct.unpack_from(">I", packed, len(MAGIC) + 8)[0] | 0x2
    header = bytearray(packed[:at - 4])
    struct.pack_into(">I", header, len(MAGIC) + 8, flags)
    out = bytes(header) + struct.pack(">I", zlib.adler32(bytes(header[len(MAGIC):])))
    while True:
        size = struct.unpack_from(">I", packed, at)[0]
        if size == 0:
            return out + packed[at:]
        length = struct.unpack_from(">I", packed, at + 4)[0]
        data_at = at + 12
        block = packed[data_at:data_at + length]
        out += packed[at:data_at]
        if length < size:
            out += struct.pack(">I", zlib.adler32(block))
        out += block
        at = data_at + length


def test_checksums_of_the_compressed_data_are_checked() -> None:
    elf = kernel_like(100_000)
    packed = with_compressed_checksums(lzop(elf))
    assert decompress_lzop(packed, "k")[0] == elf
    at = first_block(packed) + 16 + 40  # inside the first block's compressed bytes
    damaged = packed[:at] + bytes([packed[at] ^ 0x40]) + packed[at + 1:]
    with pytest.raises(ImageError, match=r"fails its Adler-32 checksum \(compressed data\)"):
        decompress_lzop(damaged, "vmlinuz")


def test_the_header_checksum_is_checked() -> None:
    packed = bytearray(lzop(kernel_like(50_000)))
    packed[len(MAGIC) + 20] ^= 0x10  # the mode field
    with pytest.raises(ImageError, match="vmlinuz: the lzop header fails its Adler-32"):
        decompress_lzop(bytes(packed), "vmlinuz")
    packed = bytearray(lzop(kernel_like(50_000)))
    packed[len(MAGIC) + 6] = 9  # the method: not LZO1X
    with pytest.raises(ImageError, match="lzop method 9"):
        decompress_lzop(bytes(packed), "vmlinuz")


def test_a_host_without_liblzo2_is_told_what_to_install(monkeypatch) -> None:
    import ctypes

    from leanvm.loader import lzop as module

    def missing(name: str):  # type: ignore[no-untyped-def]
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(module, "_LIBRARY", [])
    monkeypatch.setattr(ctypes, "CDLL", missing)
    with pytest.raises(ImageError, match="liblzo2 is not installed.*apt-get install liblzo2-2"):
        decompress_lzop(lzop(kernel_like(50_000)), "vmlinuz")
