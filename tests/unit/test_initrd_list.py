"""The initramfs member walk (loader/initrd.py over loader/newc.py and loader/compression.py):
what `leanvm initrd list` shows and what host-side unpacking writes, on multi-segment and
compressed images, damaged ones included."""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard
from hypothesis import event, given, settings
from hypothesis import strategies as st

from leanvm.errors import ImageError
from leanvm.loader.initramfs import Initramfs, read_newc
from leanvm.loader.initrd import CACHE_VERSION, entries, members, unpacked_initrd
from tests.unit.test_decompress_pvh import lz4_legacy, one_line_naming

COMPRESS = {  # as initramfs tools write them (no size appended)
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "bzip2": bz2.compress,
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "zstd": lambda d: zstandard.ZstdCompressor(write_checksum=True).compress(d),
    "lz4": lz4_legacy,
}
if shutil.which("lzop"):
    COMPRESS["lzo"] = lambda d: subprocess.run(["lzop", "-9", "-c"], input=d,
                                               capture_output=True, check=True).stdout
CHECKED = {"gzip", "bzip2", "xz", "zstd", "lzo"}  # a success is the original, byte for byte


def early_archive() -> Initramfs:
    image = Initramfs()
    image.file("kernel/x86/microcode/GenuineIntel.bin", b"ucode" * 300)
    return image


def main_archive() -> Initramfs:
    image = Initramfs()
    image.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    image.symlink("bin/sh", "/bin/busybox")
    image.char_device("dev/console", 5, 1)
    image.file("lib/big", random.Random(3).randbytes(3000) * 20)
    return image


def multi_segment(kind: str) -> bytes:
    """An early uncompressed cpio, zero padding, then the main archive compressed."""
    return early_archive().to_bytes() + bytes(512) + COMPRESS[kind](main_archive().to_bytes())


EXPECTED = early_archive().entries + main_archive().entries


def leanvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_every_member_of_a_multi_segment_image_is_listed(kind: str) -> None:
    image = multi_segment(kind)
    assert [member.kind for member in members(image, "i")] == ["cpio", kind]
    assert read_newc(image, "i") == EXPECTED
    listed = entries(image, "i")
    assert [record.name.decode() for _, record in listed] == [e.path for e in EXPECTED]
    assert listed[0][0].offset == 0
    assert listed[-1][0].offset == len(early_archive().to_bytes()) + 512


def test_cli_lists_an_early_cpio_followed_by_a_zstd_one(tmp_path: Path) -> None:
    path = tmp_path / "initrd.img"
    path.write_bytes(multi_segment("zstd"))
    done = leanvm("initrd", "list", str(path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" /", 1)[1].split(" -> ")[0] for line in lines] == \
        [e.path for e in EXPECTED]
    assert lines[0].startswith("drwxr-xr-x") and lines[0].endswith(" /kernel")
    assert any(line.startswith("crw-------") and line.endswith("5,1 /dev/console")
               for line in lines)
    assert any(line.endswith(" /bin/sh -> /bin/busybox") for line in lines)
    assert any(line.startswith("-rwxr-xr-x") and line.endswith(" 18 /init") for line in lines)
    segments = leanvm("initrd", "list", "--segments", str(path)).stdout.splitlines()
    heads = [line for line in segments if line.startswith("#")]
    early, main = len(early_archive().to_bytes()), len(main_archive().to_bytes())
    assert heads == [f"# cpio member at byte 0x0, {early} bytes of cpio",
                     f"# zstd member at byte {early + 512:#x}, {main} bytes of cpio"]


def test_debian_initrd_is_listed_like_gnu_cpio_reads_it() -> None:
    found = sorted(glob.glob("/boot/initrd.img-*-cloud-amd64"))
    if not found:
        pytest.skip("Debian's initrd is not in /boot (make test installs linux-image-cloud-amd64)")
    done = leanvm("initrd", "list", "--segments", found[-1])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    names = [line.split(" /", 1)[1].split(" -> ")[0] for line in lines if line[0] != "#"]
    assert "init" in names and len(names) > 100
    assert any(line.startswith("# zstd member") for line in lines)
    if shutil.which("cpio") is None:
        return
    image = Path(found[-1]).read_bytes()
    listed = entries(image, found[-1])
    for member in members(image, found[-1]):  # GNU cpio, member by member
        gnu = subprocess.run(["cpio", "-t", "--quiet"], input=bytes(member.data),
                             capture_output=True, check=True).stdout.decode().split("\n")[:-1]
        ours = [record.name.decode() for m, record in listed if m.offset == member.offset]
        assert ours[:len(gnu)] == gnu and gnu  # GNU cpio stops at the member's first trailer


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_a_damaged_member_is_one_line_naming_the_file(kind: str, tmp_path: Path,
                                                      monkeypatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path / "cache"))
    image = multi_segment(kind)
    start = len(early_archive().to_bytes()) + 512
    cut = image[:start + (len(image) - start) // 2]
    for bad in (cut, cut + bytes(64)):
        with pytest.raises(ImageError) as caught:
            unpacked_initrd(bad, "initrd.img")
        one_line_naming(caught.value, "initrd.img")
    assert not list((tmp_path / "cache").rglob("initramfs-*"))  # nothing cached
    path = tmp_path / "initrd.img"
    path.write_bytes(cut)
    done = leanvm("initrd", "list", str(path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"leanvm: error: {path}: ") and "Traceback" not in done.stderr


def test_a_compressed_member_must_hold_whole_archives() -> None:
    archive = main_archive().to_bytes()
    trailer = 124  # its header, "TRAILER!!!" and the NUL, padded to 4 bytes
    assert archive[-trailer:].startswith(b"070701") and b"TRAILER!!!" in archive[-trailer:]
    inside_a_file = archive.index(b"lib/big\0") + 500
    for inner, message in [(archive[:-trailer], "no TRAILER!!!"),
                           (archive + b"junk", "not a newc cpio archive at offset"),
                           (archive[:inside_a_file], "runs past the end of the data")]:
        with pytest.raises(ImageError, match=f"i.img: the gzip member at byte 0x0, "
                                             f"decompressed: .*{re.escape(message)}"):
            members(gzip.compress(inner), "i.img")


def test_crc_format_checksums_are_checked() -> None:
    plain = main_archive().to_bytes()
    crc = bytearray(plain.replace(b"070701", b"070702"))  # our writer's check fields are 0
    with pytest.raises(ImageError, match="fails its data checksum"):
        read_newc(bytes(crc), "i.img")
    at = crc.index(b"init\0") - 110  # give /init its right checksum: the sum of its bytes
    data = b"#!/bin/sh\necho hi\n"
    crc[at + 102:at + 110] = b"%08X" % (sum(data) & 0xFFFFFFFF)
    damaged = bytes(crc)
    with pytest.raises(ImageError, match="'lib/big' at offset"):  # /init passes, lib/big not
        read_newc(damaged, "i.img")


def test_an_archive_must_start_on_a_4_byte_boundary() -> None:
    image = early_archive().to_bytes() + b"\0" + main_archive().to_bytes()
    with pytest.raises(ImageError, match="not on a 4-byte boundary"):
        members(image, "i.img")


def test_the_cache_is_checked_and_versioned(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path))
    image = multi_segment("zstd")
    made = unpacked_initrd(image, "i")
    assert made is not None and not made.cached and made.path.name.endswith(
        f"-v{CACHE_VERSION}.cpio")
    assert made.size == made.path.stat().st_size
    assert read_newc(made.path.read_bytes(), "cached") == EXPECTED
    again = unpacked_initrd(image, "i")
    assert again is not None and again.cached and again.formats == ("zstd",)
    made.path.write_bytes(made.path.read_bytes()[:100])  # damaged: made again, not trusted
    remade = unpacked_initrd(image, "i")
    assert remade is not None and not remade.cached and remade.size == made.size


@st.composite
def damaged_images(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    """(format, a valid multi-segment image, the same with its compressed member damaged)."""
    kind = draw(st.sampled_from(sorted(COMPRESS)))
    image = bytearray(multi_segment(kind))
    start = len(early_archive().to_bytes()) + 512
    valid = bytes(image)
    how = draw(st.sampled_from(["flip", "flip", "cut", "drop", "tail"]))
    place = draw(st.one_of(st.integers(start, start + 24),
                           st.integers(len(image) - 24, len(image) - 1),
                           st.integers(start, len(image) - 1)))
    if how == "flip":
        image[place] ^= draw(st.integers(1, 255))
    elif how == "cut":
        del image[place:]
    elif how == "drop":
        del image[place:place + draw(st.integers(1, 40))]
    else:
        image += draw(st.binary(min_size=1, max_size=16))
    event(f"{kind} {how}")
    return kind, valid, bytes(image)


@settings(max_examples=300, deadline=None)
@given(damaged_images())
def test_damaged_images_are_refused_by_name_or_read_in_bounds(
        case: tuple[str, bytes, bytes]) -> None:
    kind, valid, image = case
    try:
        listed = entries(image, "initrd.img")
    except ImageError as exc:
        one_line_naming(exc, "initrd.img")
        return
    for member, record in listed:
        assert member.offset < len(image)
        assert record.offset + 110 < record.start <= record.end <= len(member.data)
    if kind in CHECKED:  # its compressed member, if still there, is exactly the original
        early, main = members(valid, "i")
        for member in members(image, "i"):
            if member.offset == main.offset:
                assert member.kind == kind and bytes(member.data) == bytes(main.data)
            elif member.offset == 0:
                assert bytes(member.data) == bytes(early.data)
