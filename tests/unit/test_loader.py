from __future__ import annotations

import struct
from pathlib import Path

import pytest

from leanvm.errors import ConfigError, ImageError
from leanvm.loader import bare
from leanvm.loader.image import FLAT_LOAD_ADDRESS, load_image
from leanvm.memory.guest import GuestMemory

MiB = 1 << 20


def test_flat_binary_loads_at_one_mib(tmp_path: Path, memory: GuestMemory) -> None:
    image_file = tmp_path / "prog.bin"
    image_file.write_bytes(b"\x90\x90\xf4")
    image = load_image(image_file)
    assert (image.kind, image.entry, image.end) == ("flat", FLAT_LOAD_ADDRESS, FLAT_LOAD_ADDRESS + 3)
    state = bare.load_bare(memory, image, "a=1 b")
    assert memory.read(FLAT_LOAD_ADDRESS, 3) == b"\x90\x90\xf4"
    assert (state.rip, state.rsp, state.rdi, state.rsi, state.rdx) == (
        FLAT_LOAD_ADDRESS, bare.STACK_TOP, bare.BOOT_INFO_ADDRESS, bare.ARGS_ADDRESS, 5)
    assert memory.read(bare.ARGS_ADDRESS, 6) == b"a=1 b\0"
    magic, version, ram, args_addr, args_len, end = bare.BOOT_INFO.unpack(
        memory.read(bare.BOOT_INFO_ADDRESS, bare.BOOT_INFO.size))
    assert (magic, version, ram, args_addr, args_len, end) == (
        0x424D564C, 1, 4 * MiB, bare.ARGS_ADDRESS, 5, FLAT_LOAD_ADDRESS + 3)


def test_page_tables_identity_map_four_gib(memory: GuestMemory, tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"\xf4")
    state = bare.load_bare(memory, load_image(tmp_path / "p"))
    pml4 = memory.read_u64(state.cr3)
    pdpt = pml4 & ~0xFFF
    for gib in range(4):
        pd = memory.read_u64(pdpt + 8 * gib) & ~0xFFF
        for index in (0, 1, 511):
            entry = memory.read_u64(pd + 8 * index)
            assert entry & 0x81 == 0x81  # present, 2 MiB page
            assert entry & ~0xFFF == (gib << 30) + (index << 21)
    gdt = struct.unpack("<3Q", memory.read(state.gdt_base, 24))
    assert gdt[1] >> 53 & 1 == 1  # L bit: 64-bit code segment


def test_elf_segments_load_at_their_physical_addresses(guest, memory: GuestMemory) -> None:
    image = load_image(guest("hello", "elf"))
    assert image.kind == "elf" and image.entry == FLAT_LOAD_ADDRESS
    flat = load_image(guest("hello"))
    bare.load_bare(memory, image)
    assert memory.read(FLAT_LOAD_ADDRESS, 64) == flat.segments[0].data[:64]


@pytest.mark.parametrize("content,message", [
    (b"", "empty file"),
    (b"\x7fELF" + bytes(12), "malformed ELF"),
])
def test_bad_images_are_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "absent.bin")


def test_wrong_architecture_elf(tmp_path: Path) -> None:
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 1, 1, 1  # 32-bit, little-endian, version 1
    struct.pack_into("<HHI", header, 16, 2, 40, 1)  # ET_EXEC, EM_ARM
    struct.pack_into("<H", header, 40, 52)
    path = tmp_path / "arm.elf"
    path.write_bytes(bytes(header[:52]))
    with pytest.raises(ImageError, match="expected an x86-64 ELF"):
        load_image(path)


def test_truncated_elf(guest, tmp_path: Path) -> None:
    data = guest("hello", "elf").read_bytes()
    path = tmp_path / "cut.elf"
    path.write_bytes(data[:200])
    with pytest.raises(ImageError):
        load_image(path)


def test_image_must_fit_in_ram_and_avoid_the_boot_area(memory: GuestMemory, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(4 * MiB))
    with pytest.raises(ImageError, match="does not fit in 4 MiB"):
        bare.load_bare(memory, load_image(big))
    with pytest.raises(ConfigError, match="at most"):
        bare.load_bare(memory, load_image(_small(tmp_path)), "x" * 5000)


def _small(tmp_path: Path) -> Path:
    path = tmp_path / "small.bin"
    path.write_bytes(b"\xf4")
    return path
