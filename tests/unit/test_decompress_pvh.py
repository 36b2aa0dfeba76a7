"""Host-side decompression of bzImage payloads (every format the kernel build uses; LZO in
test_lzop.py; damaged payloads in test_decompress_fuzz.py) and the PVH loader."""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import re
import shutil
import struct
import subprocess
from pathlib import Path

import lz4.block
import pytest
import zstandard

from leanvm.errors import ImageError
from leanvm.loader.decompress import (CACHE_VERSION, cached_vmlinux, extract_vmlinux, payload,
                                      read_payload)
from leanvm.loader.pvh import START_INFO, load_pvh, pvh_entry
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous
from tests.unit.test_bzimage import make_bzimage

MiB = 1 << 20
ELF_PHDR = struct.Struct("<IIQQQQQQ")


def make_elf(body: bytes = bytes(range(256)) * 64, *, phoff: int = 64, phnum: int = 1,
             filesz: int | None = None) -> bytes:
    """A minimal x86-64 ELF64 kernel: its header, one PT_LOAD over ``body``, then ``body``."""
    start = 64 + ELF_PHDR.size
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # 64-bit, little-endian, version 1
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, 0x1000000, phoff, 0, 0, 64,
                         ELF_PHDR.size, phnum, 64, 0, 0)
    size = len(body) if filesz is None else filesz
    segment = ELF_PHDR.pack(1, 5, start, 0x1000000, 0x1000000, size, size, 0x1000)
    return header + segment + body


ELF = make_elf()


def size_append(data: bytes) -> bytes:
    """scripts/Makefile.lib's size_append: the uncompressed size as a little-endian u32."""
    return struct.pack("<I", len(data) & 0xFFFFFFFF)


def lz4_legacy(data: bytes) -> bytes:
    """lz4 -l: the legacy frame, 8 MiB blocks (no size appended: the kernel build adds it)."""
    out = b"\x02\x21\x4c\x18"
    for i in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[i:i + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


# Payloads as arch/x86/boot/compressed/Makefile makes them: gzip's own trailer ends with the
# size (ISIZE); every other format gets it appended.
COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "bzip2": lambda d: bz2.compress(d) + size_append(d),
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE) + size_append(d),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    + size_append(d),
    "zstd": lambda d: zstandard.ZstdCompressor(write_checksum=True).compress(d)
    + size_append(d),
    "lz4": lambda d: lz4_legacy(d) + size_append(d),
}
# The kernel build's own commands (scripts/Makefile.lib), when the tool is installed.
TOOLS = {
    "gzip": ["gzip", "-n", "-f", "-9"], "bzip2": ["bzip2", "-9"], "lzma": ["lzma", "-9"],
    "xz": ["xz", "--check=crc32", "--lzma2=dict=1MiB"], "lz4": ["lz4", "-l", "-c9"],
    "zstd": ["zstd", "-22", "--ultra", "-q"], "lzo": ["lzop", "-9"],
}


def with_payload(body: bytes, kernel: bytes = b"K" * 1000) -> bytes:
    image = bytearray(make_bzimage(kernel=kernel + body))
    struct.pack_into("<II", image, 0x248, len(kernel), len(body))
    return bytes(image)


def one_line_naming(error: ImageError, path: str) -> str:
    """The error's text, after checking it is one line that names the file and no Python
    exception."""
    text = str(error)
    assert text.startswith(f"{path}: ") and "\n" not in text, text
    assert not re.search(r"[A-Z][a-z]+(Error|Exception)\b|Traceback", text), text
    return text


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_every_format_round_trips(kind: str) -> None:
    image = with_payload(COMPRESSORS[kind](ELF))
    found = read_payload(image, "k")
    assert (found.kind, found.declared) == (kind, len(ELF))
    assert payload(image, "k")[0] == kind
    assert extract_vmlinux(image, "k") == ELF


@pytest.mark.parametrize("kind", sorted(TOOLS))
def test_payloads_made_by_the_kernel_builds_tools(kind: str) -> None:
    tool = TOOLS[kind]
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed")
    elf = make_elf(bytes(range(256)) * 400 + b"kernel" * 5000)
    stream = subprocess.run(tool, input=elf, capture_output=True, check=True).stdout
    body = stream if kind == "gzip" else stream + size_append(elf)
    assert extract_vmlinux(with_payload(body), "vmlinuz") == elf


def test_lz4_blocks_of_8_mib_then_a_shorter_last_one() -> None:
    elf = make_elf(bytes(range(256)) * (33 * 1024 + 7))  # a full block, then 256 KiB more
    frame = lz4_legacy(elf)
    assert extract_vmlinux(with_payload(frame + size_append(elf)), "k") == elf
    if shutil.which("lz4"):  # the real tool agrees on the block size
        tool = subprocess.run(["lz4", "-l", "-c9"], input=elf, capture_output=True,
                              check=True).stdout
        first = struct.unpack_from("<I", tool, 4)[0]
        assert len(lz4.block.decompress(tool[8:8 + first], uncompressed_size=8 << 20)) == 8 << 20
        assert extract_vmlinux(with_payload(tool + size_append(elf)), "k") == elf
    # the first block cut in two: a short block that is not the last one
    half = lz4.block.compress(elf[:1 << 20], store_size=False)
    rest = lz4.block.compress(elf[1 << 20:], store_size=False)
    split = (frame[:4] + struct.pack("<I", len(half)) + half + struct.pack("<I", len(rest))
             + rest + size_append(elf))
    with pytest.raises(ImageError, match="ends with a block of 1048576 bytes, but .* follow it"):
        extract_vmlinux(with_payload(split), "k")


def test_a_corrupted_lz4_kernel_is_refused_not_shortened() -> None:
    """Issue 13: a damaged LZ4 payload used to come out as a shorter vmlinux."""
    elf = make_elf(bytes(range(256)) * (33 * 1024 + 7))
    body = lz4_legacy(elf) + size_append(elf)
    first = struct.unpack_from("<I", body, 4)[0]
    last_block = 8 + first
    dropped = body[:last_block] + body[-4:]  # the last block lost, the size kept
    with pytest.raises(ImageError, match=r"decompresses to 8388608 bytes, but its last 4 "
                                         rf"bytes declare {len(elf)}"):
        extract_vmlinux(with_payload(dropped), "vmlinuz")
    grown = bytearray(body)
    struct.pack_into("<I", grown, last_block, struct.unpack_from("<I", body, last_block)[0]
                     + 100)  # the last block's size now runs past the payload
    with pytest.raises(ImageError, match="cut short"):
        extract_vmlinux(with_payload(bytes(grown)), "vmlinuz")


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_declared_size_and_stream_end_are_checked(kind: str) -> None:
    body = COMPRESSORS[kind](ELF)
    wrong = body[:-4] + struct.pack("<I", len(ELF) + 1)
    with pytest.raises(ImageError) as caught:
        extract_vmlinux(with_payload(wrong), "vmlinuz")
    assert re.search("declare|ISIZE|corrupt", one_line_naming(caught.value, "vmlinuz"))
    padded = body[:-4] + b"\0" * 8 + body[-4:] if kind != "gzip" else body + b"\0" * 4
    with pytest.raises(ImageError) as caught:
        extract_vmlinux(with_payload(padded), "vmlinuz")
    assert re.search("follow it|corrupt|block size", one_line_naming(caught.value, "vmlinuz"))
    with pytest.raises(ImageError) as caught:
        extract_vmlinux(with_payload(body[:len(body) // 2] + body[-4:]), "vmlinuz")
    one_line_naming(caught.value, "vmlinuz")


@pytest.mark.parametrize("elf, message", [
    (make_elf(phoff=1 << 20), "program header table .* does not fit the file"),
    (make_elf(filesz=1 << 20), r"segment 0 \[0x78, 0x100078\) runs past its"),
    (b"\x7fELF" + bytes(60), "not a 64-bit little-endian ELF file"),
])
def test_the_decompressed_kernel_must_be_a_whole_elf(elf: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message) as caught:
        extract_vmlinux(with_payload(COMPRESSORS["zstd"](elf)), "vmlinuz")
    one_line_naming(caught.value, "vmlinuz")


@pytest.mark.parametrize("body, message", [
    (b"\x89LZO" + bytes(20), "not an lzop stream"),
    (b"\x1f\x8b" + bytes(20), "the gzip payload is corrupt"),
    (b"JUNKJUNK", "unknown payload compression"),
    (gzip.compress(b"not an elf"), "does not hold an ELF kernel"),
    (b"\x1f\x8b\x08", "too short to hold a stream and its size"),
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
    assert not hit and first.read_bytes() == ELF and first.name.endswith(f"-v{CACHE_VERSION}")
    again, hit = cached_vmlinux(image, "k")
    assert hit and again == first
    other, hit = cached_vmlinux(with_payload(COMPRESSORS["xz"](ELF)), "k")
    assert not hit and other != first
    first.write_bytes(ELF[:100])  # a damaged cache entry is not trusted: made again
    again, hit = cached_vmlinux(image, "k")
    assert not hit and again.read_bytes() == ELF


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_a_corrupt_payload_never_lands_in_the_cache(kind: str, tmp_path: Path,
                                                    monkeypatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path))
    body = COMPRESSORS[kind](ELF)
    with pytest.raises(ImageError):
        cached_vmlinux(with_payload(body[:len(body) - 40] + body[-4:]), "k")
    assert not list(tmp_path.rglob("vmlinux-*"))


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


def leanvm(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def kernel_files(tmp_path: Path) -> list[Path]:
    """A synthetic xz bzImage, and Debian's LZ4 kernel when it is installed."""
    made = tmp_path / "bzImage"
    made.write_bytes(with_payload(COMPRESSORS["xz"](ELF)))
    return [made] + [Path(p) for p in sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))[-1:]]


def test_kernel_info_and_extract_report_the_same_figures(tmp_path: Path) -> None:
    for kernel in kernel_files(tmp_path):
        found = read_payload(kernel.read_bytes(), str(kernel))
        figures = (f"{found.kind} payload: {len(found.body)} bytes compressed, "
                   f"{found.declared} bytes uncompressed (declared)")
        info = leanvm("kernel", "info", str(kernel))
        assert info.returncode == 0 and f"\n  {figures}\n" in info.stdout, info.stdout
        out = tmp_path / "vmlinux"
        done = leanvm("kernel", "extract", str(kernel), str(out))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        written = out.stat().st_size
        assert len(lines) == 2 and lines[0] == f"{kernel}: {figures}"
        assert lines[1].startswith(f"{out}: {written} bytes of ELF vmlinux written")
        assert written == found.declared


def test_kernel_extract_of_a_corrupt_payload_writes_nothing(tmp_path: Path) -> None:
    elf = make_elf(bytes(range(256)) * (33 * 1024 + 7))
    body = COMPRESSORS["lz4"](elf)
    first = struct.unpack_from("<I", body, 4)[0]
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(with_payload(body[:8 + first] + body[-4:]))  # the last block lost
    out = tmp_path / "vmlinux"
    done = leanvm("kernel", "extract", str(kernel), str(out))
    assert done.returncode == 2 and not out.exists() and not done.stdout
    assert done.stderr == (f"leanvm: error: {kernel}: the lz4 payload decompresses to 8388608 "
                           f"bytes, but its last 4 bytes declare {len(elf)}\n")
