"""The CFI01 state machine on its own, against QEMU's documented behaviour."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from leanvm.devices import pflash
from leanvm.devices.pflash import PC_GEOMETRY, VIRT_GEOMETRY, CfiFlash

KiB, MiB = 1 << 10, 1 << 20


def make(geometry=PC_GEOMETRY, size=64 * KiB, image_size=None, writable=True):
    array = bytearray(b"\x11" * size)
    romd: list[bool] = []
    writes: list[tuple[int, int]] = []
    image = size if image_size is None else image_size
    array[image:] = b"\xff" * (size - image)
    dev = CfiFlash(memoryview(array), geometry, image_size=image, writable=writable,
                   on_romd=romd.append, on_write=lambda o, n: writes.append((o, n)))
    return dev, array, romd, writes


def test_pc_cfi_query() -> None:
    dev, _, romd, _ = make(size=2 * MiB)
    dev.write(0x55, 1, 0x98)
    assert bytes(dev.read(i, 1) for i in (0x10, 0x11, 0x12)) == b"QRY"
    assert dev.read(0x27, 1) == 0x15  # 2 MiB
    assert [dev.read(i, 1) for i in range(0x2D, 0x31)] == [0xFF, 0x01, 0x10, 0x00]
    assert dev.read(0x2A, 1) == 0x08
    assert bytes(dev.read(i, 1) for i in range(0x31, 0x34)) == b"PRI"
    assert romd == [False]
    dev.write(0, 1, 0x70)  # ignored in query mode: only 0xFF leaves it
    assert dev.read(0x10, 1) == ord("Q")
    dev.write(0, 1, 0xFF)
    assert romd == [False, True] and dev.read(0, 1) == 0x11


def test_virt_query_and_identifier_are_replicated_per_chip() -> None:
    dev, _, _, _ = make(VIRT_GEOMETRY, size=64 * MiB)
    dev.write(0x55 * 4, 4, 0x00980098)
    assert dev.read(0x40, 4) == 0x00510051
    assert dev.read(0x44, 4) == 0x00520052
    assert dev.read(0x48, 4) == 0x00590059
    assert dev.read(0x40, 2) == 0x0051
    assert dev.read(0x27 * 4, 4) & 0xFF == 0x19
    assert [dev.read(i * 4, 4) & 0xFF for i in range(0x2D, 0x31)] == [0xFF, 0x00, 0x00, 0x02]
    dev.write(0, 4, 0xFF)
    dev.write(0, 4, 0x00900090)
    assert (dev.read(0, 4), dev.read(4, 4), dev.read(8, 4)) == (0x00890089, 0x00180018, 0)
    assert dev.read(0, 4) == 0x00890089


def test_program_word_and_status() -> None:
    dev, array, romd, writes = make()
    dev.write(0x100, 1, 0x40)
    dev.write(0x100, 1, 0xAB)
    assert dev.read(0x100, 1) == 0x80 and dev.read(0, 4) == 0x00800080
    dev.write(0, 1, 0xFF)
    assert array[0x100] == 0xAB and writes == [(0x100, 1)]
    assert romd == [False, True]


def test_buffered_write() -> None:
    dev, array, _, writes = make()
    dev.write(0x200, 1, 0xE8)
    dev.write(0x200, 1, 3)  # four bytes follow
    for i, byte in enumerate(b"abcd"):
        dev.write(0x210 + i, 1, byte)
    dev.write(0x200, 1, 0xD0)
    assert dev.read(0, 1) == 0x80
    dev.write(0, 1, 0xFF)
    assert bytes(array[0x210:0x214]) == b"abcd" and array[0x20F] == 0x11
    assert writes == [(0x200, 256)]


def test_one_word_buffered_write_works() -> None:
    dev, array, _, _ = make()
    for value in (0xE8, 0, 0x5A, 0xD0, 0xFF):
        dev.write(0x300, 1, value)
    assert array[0x300] == 0x5A


def test_block_erase_happens_on_confirm() -> None:
    dev, array, _, _ = make()
    dev.write(0x1234, 1, 0x20)
    assert array[0x1000] == 0x11  # nothing yet
    dev.write(0x1234, 1, 0xD0)
    assert dev.read(0, 1) == 0x80
    assert bytes(array[0x1000:0x2000]) == b"\xff" * 4096
    assert array[0xFFF] == 0x11 and array[0x2000] == 0x11
    dev.write(0x5000, 1, 0x20)
    dev.write(0x5000, 1, 0xFF)  # cancelled: read array, nothing erased
    assert array[0x5000] == 0x11 and dev.romd


def test_lock_blocks_program_and_erase() -> None:
    dev, array, _, _ = make()
    dev.write(0x2000, 1, 0x60)
    dev.write(0x2000, 1, 0x01)
    dev.write(0x2000, 1, 0x90)
    assert dev.read(0x2002, 1) == 1 and dev.read(0x3002, 1) == 0
    dev.write(0x2010, 1, 0x40)
    dev.write(0x2010, 1, 0x00)
    assert dev.read(0, 1) == 0x80 | 0x10 | 0x02 and array[0x2010] == 0x11
    dev.write(0, 1, 0x50)  # clear status
    dev.write(0, 1, 0x70)
    assert dev.read(0, 1) == 0x00
    dev.write(0x2000, 1, 0x60)
    dev.write(0x2000, 1, 0xD0)  # unlock all
    for value in (0x40, 0x42, 0xFF):
        dev.write(0x2010, 1, value)
    assert array[0x2010] == 0x42


def test_readonly_bank_refuses_with_locked_error() -> None:
    dev, array, _, writes = make(writable=False)
    dev.write(0x10, 1, 0x40)
    dev.write(0x10, 1, 0x00)
    assert dev.read(0, 1) == 0x92
    dev.write(0, 1, 0x50)
    dev.write(0, 1, 0x20)
    dev.write(0, 1, 0xD0)
    assert dev.read(0, 1) == 0xA2
    assert writes == [] and array[0x10] == 0x11


def test_past_the_image_is_erased_flash_that_errors() -> None:
    dev, array, _, writes = make(size=64 * KiB, image_size=16 * KiB)
    dev.write(0x8000, 1, 0x40)
    dev.write(0x8000, 1, 0x00)
    assert dev.read(0, 1) == 0x90
    dev.write(0, 1, 0x50)
    dev.write(0x9000, 1, 0x20)
    dev.write(0x9000, 1, 0xD0)
    assert dev.read(0, 1) == 0xA0
    dev.write(0, 1, 0xFF)
    assert dev.read(0x8000, 4) == 0xFFFFFFFF and writes == []


def test_unknown_commands_return_to_read_array_without_a_memslot_change() -> None:
    dev, _, romd, _ = make()
    dev.write(0, 1, 0xFF)
    dev.write(0, 1, 0x42)
    assert romd == [] and dev.romd and dev.romd_switches == 0


CMDS = [0x00, 0x01, 0x10, 0x20, 0x40, 0x50, 0x60, 0x70, 0x90, 0x98, 0xD0, 0xE8, 0xF0, 0xFF]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["pc", "virt"]), st.booleans(), st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(-8, 1 << 17), st.sampled_from([1, 2, 4, 8]),
              st.one_of(st.sampled_from(CMDS), st.integers(0, 2**64 - 1))),
    st.tuples(st.just("r"), st.integers(-8, 1 << 17), st.sampled_from([1, 2, 4, 8]), st.just(0)),
), max_size=120))
def test_random_command_streams(geometry: str, writable: bool, ops: list[tuple]) -> None:
    """Hostile traffic never raises, never writes past the image or into a read-only bank,
    and the reported ROMD transitions always alternate."""
    geo = pflash.GEOMETRIES[geometry]
    size = 4 * geo.sector_size if geometry == "virt" else 32 * KiB
    image = size // 2
    dev, array, romd, writes = make(geo, size=size, image_size=image, writable=writable)
    tail = bytes(array[image:])
    for kind, offset, width, value in ops:
        if kind == "w":
            dev.write(offset, width, value & ((1 << (8 * width)) - 1))
        else:
            assert 0 <= dev.read(offset, width) < 1 << (8 * width)
        assert 0 <= dev.status <= 0xFF
    assert bytes(array[image:]) == tail
    assert all(o >= 0 and o + n <= image for o, n in writes)
    if not writable:
        assert writes == [] and bytes(array[:image]) == b"\x11" * image
    assert all(a != b for a, b in zip(romd, romd[1:]))
    assert not romd or romd[0] is False


# Expected values below are written out by hand from QEMU's pflash_cfi01: a read of more
# than 4 bytes is two 4-byte reads (the model's MemoryRegionOps give no impl size, so the
# memory core splits at 4); within 4 bytes each 16-bit chip of the virt bank answers with
# the same table entry, entry = offset >> 2.
Q, R, Y = 0x51, 0x52, 0x59


def test_virt_8_byte_query_reads_carry_two_bank_words() -> None:
    dev, _, _, _ = make(VIRT_GEOMETRY, size=64 * MiB)
    dev.write(0x55 * 4, 4, 0x00980098)
    # bytes: Q 0 Q 0 R 0 R 0  (entries 0x10 and 0x11)
    assert dev.read(0x40, 8) == 0x0052_0052_0051_0051
    assert dev.read(0x44, 8) == 0x0059_0059_0052_0052  # R then Y
    assert dev.read(0x10 * 4 + 0x3C * 4, 8) == 0  # entries 0x4C and 0x4D are zero
    assert dev.read(0x51 * 4, 8) == 0  # entry 0x51, then 0x52: past the table


def test_virt_8_byte_identifier_reads_carry_manufacturer_then_device() -> None:
    dev, _, _, _ = make(VIRT_GEOMETRY, size=64 * MiB)
    dev.write(0, 4, 0x00900090)
    assert dev.read(0, 8) == 0x0018_0018_0089_0089
    assert dev.read(4, 8) == 0x0000_0000_0018_0018  # device id, then entry 2 (not locked)
    sector = VIRT_GEOMETRY.sector_size
    dev.write(sector, 4, 0x00600060)
    dev.write(sector, 4, 0x00010001)  # lock block 1
    dev.write(0, 4, 0x00900090)
    assert dev.read(sector + 8, 8) == 0x0000_0000_0001_0001  # lock status, entry 3 zero
    assert dev.read(sector + 4, 8) == 0x0001_0001_0018_0018


def test_virt_8_byte_status_reads_replicate_per_chip() -> None:
    dev, _, _, _ = make(VIRT_GEOMETRY, size=64 * MiB)
    dev.write(0, 4, 0x00700070)
    assert dev.read(0, 8) == 0x0080_0080_0080_0080
    assert dev.read(0, 2) == 0x0080


def test_pc_8_byte_reads_are_two_legacy_answers() -> None:
    dev, _, _, _ = make(size=2 * MiB)
    dev.write(0x55, 1, 0x98)
    assert dev.read(0x0E, 8) == Y << 32  # entries 0x0E (0) and 0x12 ('Y')
    assert dev.read(0x10, 8) == Q  # entries 0x10 ('Q') and 0x14 (0)
    assert dev.read(0x10, 4) == Q
    dev.write(0, 1, 0xFF)
    dev.write(0, 1, 0x70)
    assert dev.read(0, 8) == 0x0080_0080_0080_0080  # each half: status twice, 16 bits apart


def test_legacy_identifier_pairs_are_cut_to_the_read_width() -> None:
    geometry = PC_GEOMETRY._replace(ids=(0x12, 0x34, 0x56, 0x78))
    dev, _, _, _ = make(geometry)
    dev.write(0, 1, 0x90)
    assert dev.read(0, 1) == 0x34 and dev.read(0, 2) == 0x1234
    assert dev.read(1, 2) == 0x5678 and dev.read(1, 1) == 0x78
    assert dev.read(0, 8) == 0x1234  # entries 0 and 4


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["pc", "virt"]), st.sampled_from([0x70, 0x90, 0x98, 0x40, 0xE8]),
       st.integers(0, 0x400 // 8 - 1))
def test_wide_command_reads_are_two_halves(geometry: str, command: int, word: int) -> None:
    geo = pflash.GEOMETRIES[geometry]
    dev, _, _, _ = make(geo, size=4 * geo.sector_size)
    dev.write(0, geo.bank_width, command * (0x00010001 if geometry == "virt" else 1))
    offset = word * 8
    assert dev.read(offset, 8) == dev.read(offset, 4) | dev.read(offset + 4, 4) << 32
