"""Host-side decompression of initramfs images, checked with GNU cpio."""

from __future__ import annotations

import glob
import gzip
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from leanvm.errors import ImageError
from leanvm.loader.initrd import members, unpacked_initrd
from tests.unit.test_decompress_pvh import lz4_legacy

pytestmark = pytest.mark.skipif(shutil.which("cpio") is None,
                                reason="GNU cpio is needed (make test installs it)")


def cpio_archive(tmp: Path, files: dict[str, bytes]) -> bytes:
    root = tmp / f"root-{len(list(tmp.iterdir()))}"
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body)
    names = "\n".join(files) + "\n"
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=names.encode(),
                          cwd=root, capture_output=True, check=True).stdout


def listing(path: Path) -> list[str]:
    done = subprocess.run(["cpio", "-it", "--quiet"], stdin=open(path, "rb"),
                          capture_output=True, check=True)
    return done.stdout.decode().split()


COMPRESS = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "lz4": lz4_legacy,  # lz4 -l: no size appended in an initramfs
}


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_early_cpio_plus_compressed_main_archive(kind: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path / "cache"))
    early = cpio_archive(tmp_path, {"kernel/x86/microcode/GenuineIntel.bin": b"ucode" * 100})
    main = cpio_archive(tmp_path, {"init": b"#!/bin/sh\necho hi\n", "bin/tool": bytes(5000)})
    image = early + bytes(512) + COMPRESS[kind](main)  # zero padding between members
    source = tmp_path / "initrd.img"
    source.write_bytes(image)
    unpacked = unpacked_initrd(image, str(source))
    assert unpacked is not None and not unpacked.cached and unpacked.formats == (kind,)
    assert [member.kind for member in members(image, "i")] == ["cpio", kind]
    assert set(listing(unpacked.path)) >= {"kernel/x86/microcode/GenuineIntel.bin"}
    # GNU cpio stops at the first trailer (and pads archives to 512 bytes): the early archive
    # comes first, then the main one, decompressed, 4-byte aligned
    out = unpacked.path.read_bytes()
    assert out.startswith(early.rstrip(b"\0")) and unpacked.size == len(out)
    second = out.index(main.rstrip(b"\0"))
    assert second % 4 == 0 and not out[len(early.rstrip(b"\0")):second].strip(b"\0")
    again = unpacked_initrd(image, str(source))
    assert again is not None and again.cached and again.path == unpacked.path


def test_nothing_compressed_means_nothing_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path / "cache"))
    plain = cpio_archive(tmp_path, {"init": b"x"})
    assert unpacked_initrd(plain, "i") is None
    assert unpacked_initrd(b"", "i") is None


@pytest.mark.parametrize("image, message", [
    (b"\xde\xad\xbe\xef" * 64, "starts neither a cpio archive nor a compressed stream"),
    (gzip.compress(b"not a cpio archive at all"), "does not hold a cpio archive"),
    (gzip.compress(b"070701" + bytes(200))[:-9], "cut short|corrupt"),
    (b"070701" + b"zz" * 60, "bad hex field in the cpio header at offset 0x0"),
])
def test_images_that_are_not_initramfs_are_refused(image: bytes, message: str, tmp_path: Path,
                                                   monkeypatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ImageError, match=message):
        unpacked_initrd(image, "initrd.img")


def test_debian_initrd(tmp_path: Path, monkeypatch) -> None:
    found = sorted(glob.glob("/boot/initrd.img-*"))
    if not found:
        pytest.skip("no Debian initrd in /boot (make test installs linux-image-cloud-amd64)")
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path / "cache"))
    data = Path(found[-1]).read_bytes()
    unpacked = unpacked_initrd(data, found[-1])
    assert unpacked is not None and unpacked.size > 2 * len(data)
    assert "init" in listing(unpacked.path)
