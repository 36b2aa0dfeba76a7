"""The tiny x86 firmware (tests/guests/firmware) is built into a flat image of the bank size,
with the reset vector in its last 16 bytes leading to a real-mode entry that loads a flat
GDT and jumps into the image in 32-bit protected mode; the parameter block sits where the
builder and the firmware expect it."""

from __future__ import annotations

import shutil
import struct

import pytest

import build
from build import (FIRMWARE_MAGIC, FIRMWARE_PARAMS, FIRMWARE_PROGRAMS, FIRMWARE_RESET_VECTOR,
                   FIRMWARE_SIZE, FLASHWORK_ERASE_OFFSET, FLASHWORK_PROGRAM_OFFSET,
                   FLASHWORK_PROGRAM_TEXT, FLASHWORK_VARS_SIZE, GuestBuildError, build_firmware)

FOUR_GIB = 1 << 32
BASE = FOUR_GIB - FIRMWARE_SIZE  # where the image sits: it ends at 4 GiB
CS_BASE = 0xFFFF0000  # CS base after reset


@pytest.fixture(scope="module")
def tools() -> None:
    for tool in ("gcc", "ld", "objcopy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is needed to build the tiny firmware (make test installs it)")


def word_sum(image: bytes) -> int:
    return sum(struct.unpack(f"<{len(image) // 4}I", image)) % (1 << 32)


def entry_of(image: bytes) -> int:
    """Image offset the reset vector's near jump lands on (16-bit displacement, CS base
    0xFFFF0000: an IP is an offset into the image's last 64 KiB)."""
    assert image[FIRMWARE_RESET_VECTOR] == 0xE9, "the reset vector is not a near jmp"
    (disp,) = struct.unpack_from("<h", image, FIRMWARE_RESET_VECTOR + 1)
    ip = (0xFFF0 + 3 + disp) & 0xFFFF
    return CS_BASE + ip - BASE


@pytest.mark.parametrize("name", FIRMWARE_PROGRAMS)
def test_image_is_one_bank_with_the_reset_vector_at_its_end(tools, name: str) -> None:
    image = build_firmware(name).read_bytes()
    assert len(image) == FIRMWARE_SIZE and FIRMWARE_SIZE % 4096 == 0
    assert FIRMWARE_RESET_VECTOR == len(image) - 16
    entry = entry_of(image)
    assert FIRMWARE_SIZE - 256 <= entry < FIRMWARE_PARAMS  # the real-mode entry block
    assert image[entry:entry + 2] == b"\xfa\xfc"  # cli; cld
    # lgdtl %cs:disp16 (32-bit operand: the whole base), then the GDT it names
    assert image[entry + 2:entry + 7] == b"\x2e\x66\x0f\x01\x16"
    (pointer_ip,) = struct.unpack_from("<H", image, entry + 7)
    limit, gdt_base = struct.unpack_from("<HI", image, CS_BASE + pointer_ip - BASE)
    assert limit == 3 * 8 - 1 and BASE <= gdt_base < FOUR_GIB
    null, code, data = struct.unpack_from("<3Q", image, gdt_base - BASE)
    assert (null, code, data) == (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
    # the far jump into 32-bit code: 66 EA offset32 selector16, to the code segment
    far = image.index(b"\x66\xea", entry)
    target, selector = struct.unpack_from("<IH", image, far + 2)
    assert selector == 0x08 and BASE <= target < BASE + FIRMWARE_PARAMS
    assert image[target - BASE:target - BASE + 4] == b"\x66\xb8\x10\x00"  # mov $0x10, %ax


@pytest.mark.parametrize("name", FIRMWARE_PROGRAMS)
def test_parameter_block_and_checksum(tools, name: str) -> None:
    image = build_firmware(name).read_bytes()
    magic, count = struct.unpack_from("<4sI", image, FIRMWARE_PARAMS)
    assert magic == FIRMWARE_MAGIC and count == build.OUTLOOP_DEFAULT_COUNT
    assert word_sum(image) == 0


def test_outloop_count_is_patched_and_cached(tools) -> None:
    base = build_firmware("outloop").read_bytes()
    path = build_firmware("outloop", 123_457)
    image = path.read_bytes()
    assert struct.unpack_from("<I", image, FIRMWARE_PARAMS + 4) == (123_457,)
    assert word_sum(image) == 0
    differing = [i for i in range(FIRMWARE_SIZE) if image[i] != base[i]]
    assert differing and all(FIRMWARE_PARAMS + 4 <= i < FIRMWARE_PARAMS + 12 for i in differing)
    assert build_firmware("outloop", 123_457) == path


def test_bad_requests_are_one_line_errors(tools) -> None:
    with pytest.raises(GuestBuildError, match="no tiny firmware 'nosuch'"):
        build_firmware("nosuch")
    with pytest.raises(GuestBuildError, match="does not fit 32 bits"):
        build_firmware("outloop", 1 << 32)


def test_flashwork_store_and_what_the_firmware_leaves_in_it() -> None:
    store = build.flashwork_vars()
    assert len(store) == FLASHWORK_VARS_SIZE and len(store) % 4096 == 0
    after = build.flashwork_vars_after(store)
    assert len(after) == len(store)
    program = range(FLASHWORK_PROGRAM_OFFSET, FLASHWORK_PROGRAM_OFFSET + len(FLASHWORK_PROGRAM_TEXT))
    assert store[program.start:program.stop] == b"\xff" * len(program)  # programmed when erased
    assert after[program.start:program.stop] == FLASHWORK_PROGRAM_TEXT
    erase = range(FLASHWORK_ERASE_OFFSET, FLASHWORK_ERASE_OFFSET + 4096)
    assert store[erase.start:erase.stop].count(0xFF) < 4096 // 2  # erasing it shows
    assert after[erase.start:erase.stop] == b"\xff" * 4096
    changed = {i for i in range(len(store)) if store[i] != after[i]}
    assert changed and changed <= set(program) | set(erase)
