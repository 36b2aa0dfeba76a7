"""Host-side decompression of bzImage payloads (every format the kernel build uses; LZO in
test_lzop.py) and the PVH loader."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from pathlib import Path

import lz4.block
import pytest
import zstandard

from leanvm.errors import ImageError
from leanvm.loader.decompress import cached_vmlinux, extract_vmlinux, payload
from leanvm.loader.pvh import START_INFO, load_pvh, pvh_entry
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous
from tests.unit.test_bzimage import make_bzimage

MiB = 1 << 20
ELF = b"\x7fELF" + bytes(range(256)) * 64


def lz4_legacy(data: bytes) -> bytes:
    out = b"\x02\x21\x4c\x18"
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i:i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out + struct.pack("<I", len(data))  # the kernel appends the size


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, mtime=0) + struct.pack("<I", len(d)),
    "bzip2": bz2.compress,
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "lz4": lz4_legacy,
}


def with_payload(body: bytes, kernel: bytes = b"K" * 1000) -> bytes:
    image = bytearray(make_bzimage(kernel=kernel + body))
    struct.pack_into("<II", image, 0x248, len(kernel), len(body))
    return bytes(image)


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_every_format_round_trips(kind: str) -> None:
    image = with_payload(COMPRESSORS[kind](ELF))
    assert payload(image, "k")[0] == kind
    assert extract_vmlinux(image, "k") == ELF


@pytest.mark.parametrize("body, message", [
    (b"\x89LZO" + bytes(20), "not an lzop stream"),
    (b"\x1f\x8b" + bytes(20), "corrupt gzip data"),
    (b"JUNKJUNK", "unknown payload compression"),
    (gzip.compress(b"not an elf"), "does not hold an ELF kernel"),
])
def test_bad_payloads(body: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        extract_vmlinux(with_payload(body), "k")


def test_no_payload_fields() -> None:
    with pytest.raises(ImageError, match="no payload fields"):
        payload(make_bzimage(protocol=0x207), "k")


def test_cache_is_keyed_by_content(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path))
    image = with_payload(COMPRESSORS["gzip"](ELF))
    first, hit = cached_vmlinux(image, "k")
    assert not hit and first.read_bytes() == ELF
    again, hit = cached_vmlinux(image, "k")
    assert hit and again == first
    other, hit = cached_vmlinux(with_payload(COMPRESSORS["xz"](ELF)), "k")
    assert not hit and other != first


def test_pvh_entry_and_layout(test_kernel: Path) -> None:
    vmlinux = test_kernel.with_name("vmlinux").read_bytes()
    entry = pvh_entry(vmlinux, "vmlinux")
    assert 0x100000 < entry < 0x100000 + len(vmlinux)
    memory = GuestMemory()
    memory.add(GuestRegion("ram-low", 0, map_anonymous(32 * MiB), RegionKind.RAM))
    try:
        e820 = [(0, 0x9FC00, 1), (0x100000, 31 * MiB, 1)]
        loaded = load_pvh(memory, vmlinux, "v", b"I" * 5000, "i", "a=b", e820, 32 * MiB)
        assert loaded.entry == entry and loaded.boot.ebx == 0x6000
        info = START_INFO.unpack(memory.read(0x6000, START_INFO.size))
        assert info[:4] == (0x336EC578, 1, 0, 1) and info[5] == 0x20000 and info[8] == 2
        assert memory.read(0x20000, 4) == b"a=b\0"
        module = struct.unpack("<QQ", memory.read(info[4], 16))
        assert module == (loaded.initrd_address, 5000)
        assert memory.read(loaded.initrd_address, 5000) == b"I" * 5000
        with pytest.raises(ImageError, match="does not fit in RAM"):
            load_pvh(memory, vmlinux, "v", b"I" * (32 * MiB), "i", "", e820, 32 * MiB)
    finally:
        memory.close()


def test_elf_without_pvh_note(guest) -> None:
    with pytest.raises(ImageError, match="without a PVH entry note"):
        pvh_entry(guest("hello", "elf").read_bytes(), "hello.elf")
    with pytest.raises(ImageError, match="junk: 14 bytes is too short for an ELF header"):
        pvh_entry(b"\x7fELF" + bytes(10), "junk")


def test_guest_decompression_is_recorded_and_reported(tmp_path: Path, monkeypatch) -> None:
    from leanvm.loader.decompress import guest_decompression_seconds, kernel_digest
    from leanvm.machine.direct_boot import DirectBoot, note_guest_decompression
    from leanvm.trace.events import Tracer

    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path))
    image = with_payload(COMPRESSORS["gzip"](ELF))
    digest = kernel_digest(image)
    assert guest_decompression_seconds(digest) is None
    tracer = Tracer(True, origin=0)
    boot = DirectBoot(None, "bzimage", "", None, False)  # type: ignore[arg-type]
    phases = {"kernel decompression": 1_000_000_000, "kernel decompressed": 63_500_000_000}
    assert note_guest_decompression(boot, image, phases, tracer) == 62.5
    assert guest_decompression_seconds(digest) == 62.5
    [span] = [e for e in tracer.sorted_events() if e.name == "decompress kernel (guest)"]
    # a PVH boot, or a boot whose stub printed nothing, records nothing
    assert note_guest_decompression(boot._replace(mode="pvh"), image, phases, tracer) is None
    assert note_guest_decompression(boot, image, {"kernel decompression": 5}, tracer) is None
    (tmp_path / "kernels" / f"guest-decompression-{digest[:32]}.json").write_text("{junk")
    assert guest_decompression_seconds(digest) is None  # a damaged record is ignored
