"""Direct-boot loader: what it writes where, and what it refuses."""

from __future__ import annotations

import struct

import pytest

from leanvm.errors import ImageError
from leanvm.loader.linux64 import linux_e820, load_linux64
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous
from tests.unit.test_bzimage import make_bzimage

MiB = 1 << 20


@pytest.fixture
def memory():
    mem = GuestMemory()
    mem.add(GuestRegion("ram-low", 0, map_anonymous(32 * MiB), RegionKind.RAM))
    yield mem
    mem.close()


def test_layout(memory: GuestMemory) -> None:
    image = make_bzimage(xloadflags=1, kernel=b"\x90" * 8192)
    e820 = linux_e820([(0, 32 * MiB)], [(0xFEFFC000, 0x4000)])
    loaded = load_linux64(memory, image, "k", b"RD" * 100, "i", "console=ttyS0", e820, 32 * MiB)
    assert loaded.entry == 0x100200 and loaded.boot.rsi == 0x7000
    assert (loaded.boot.code_selector, loaded.boot.data_selector) == (0x10, 0x18)
    assert memory.read(0x100000, 8192) == b"\x90" * 8192
    assert memory.read(0x20000, 14) == b"console=ttyS0\0"
    assert loaded.initrd_address == (32 * MiB - 200) & ~4095
    assert memory.read(loaded.initrd_address, 200) == b"RD" * 100
    zero = memory.read(0x7000, 4096)
    assert struct.unpack_from("<I", zero, 0x228)[0] == 0x20000
    assert struct.unpack_from("<II", zero, 0x218) == (loaded.initrd_address, 200)
    assert zero[0x1E8] == 3 and zero[0x210] == 0xFF
    gdt = struct.unpack_from("<4Q", memory.read(0x500, 32))
    assert gdt[2] == 0x00AF9B000000FFFF and gdt[3] == 0x00CF93000000FFFF
    assert e820 == [(0, 0x9FC00, 1), (0x100000, 31 * MiB, 1), (0xFEFFC000, 0x4000, 2)]


@pytest.mark.parametrize("image, initrd, cmdline, message", [
    (make_bzimage(xloadflags=0), b"", "", "no 64-bit entry point"),
    (make_bzimage(protocol=0x20B, xloadflags=1), b"", "", "no 64-bit entry point"),
    (make_bzimage(xloadflags=1, kernel=bytes(40 * MiB)), b"", "", "give the VM more memory"),
    (make_bzimage(xloadflags=1), b"x" * (31 * MiB), "", "i: initrd of 32505856 bytes does not fit"),
    (make_bzimage(xloadflags=1, cmdline_size=10), b"", "x" * 11, "accepts at most 10"),
])
def test_refusals(memory: GuestMemory, image: bytes, initrd: bytes, cmdline: str,
                  message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_linux64(memory, image, "k", initrd, "i", cmdline, [], 32 * MiB)
