"""Flash image analysis, unpad and the flash options, without KVM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leanvm.errors import ConfigError, ImageError
from leanvm.firmware.image import FVH, analyze
from leanvm.firmware.unpad import unpad
from leanvm.machine.flash import parse_drive_option, parse_flash_option

KiB = 1 << 10
NVRAM_GUID = bytes.fromhex("8d2bf1ff96768b4ca9852747075b4f50")  # fff12b8d-7696-4c8b-a985-...


def volume(length: int, guid: bytes) -> bytes:
    header = FVH.pack(bytes(16), guid, length, b"_FVH", 0x4FEFF, 0x48, 0, 0, 0, 2)
    return header + b"\xff" * (length - len(header))


def make_image(path: Path) -> bytes:
    data = bytearray(256 * KiB)  # zeros
    data[0:64 * KiB] = volume(64 * KiB, NVRAM_GUID)
    data[64 * KiB:80 * KiB] = os.urandom(16 * KiB)
    data[80 * KiB:96 * KiB] = b"\xff" * (16 * KiB)
    path.write_bytes(bytes(data))
    return bytes(data)


def test_analysis_finds_runs_volumes_and_content(tmp_path: Path) -> None:
    image = tmp_path / "vars.fd"
    make_image(image)
    info = analyze(image)
    assert info.size == 256 * KiB
    assert [(v.offset, v.length, v.kind) for v in info.volumes] == [(0, 64 * KiB, "nvram")]
    assert info.trailing_zero == 160 * KiB
    assert (80 * KiB, 16 * KiB) in [(r.offset, r.length) for r in info.ff_runs]
    assert info.content == 4 * KiB + 16 * KiB  # the header page and the random data


def test_unpad_keeps_content_and_punches_holes(tmp_path: Path) -> None:
    image, out = tmp_path / "a.fd", tmp_path / "b.fd"
    data = make_image(image)
    size, allocated = unpad(image, out)
    assert out.read_bytes() == data and size == len(data)
    assert allocated <= 100 * KiB  # the 160 KiB of zero padding is a hole now
    holes = analyze(out)
    assert holes.allocated < holes.size
    with pytest.raises(ImageError, match="different OUT"):
        unpad(image, image)


def leanvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True, text=True,
                          timeout=60)


def test_inspect_command(tmp_path: Path) -> None:
    image = tmp_path / "vars.fd"
    make_image(image)
    done = leanvm("flash", "inspect", str(image))
    assert done.returncode == 0, done.stderr
    assert "UEFI firmware volumes: 1" in done.stdout and "nvram" in done.stdout
    assert "trailing padding 160 KiB" in done.stdout
    as_json = json.loads(leanvm("flash", "inspect", str(image), "--json").stdout)
    assert as_json["volumes"][0]["kind"] == "nvram" and as_json["size"] == 256 * KiB
    missing = leanvm("flash", "inspect", str(tmp_path / "none.fd"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "none.fd: no such file" in missing.stderr


def test_unpad_command(tmp_path: Path) -> None:
    image = tmp_path / "vars.fd"
    make_image(image)
    done = leanvm("flash", "unpad", str(image), str(tmp_path / "sparse.fd"))
    assert done.returncode == 0 and "left as holes" in done.stdout


def test_flash_options() -> None:
    spec = parse_flash_option("vars=/x/v.fd,mode=ephemeral,geometry=virt,size=64M")
    assert (spec.role, str(spec.path), spec.mode, spec.geometry, spec.size) == (
        "vars", "/x/v.fd", "ephemeral", "virt", 64 << 20)
    assert parse_flash_option("code=/c.fd").mode == "readonly"
    assert parse_flash_option("vars=/v.fd").mode == "persistent"
    drive = parse_drive_option("if=pflash,format=raw,file=/c.fd,readonly=on", 0)
    assert (drive.role, drive.mode) == ("code", "readonly")
    assert parse_drive_option("if=pflash,file=/v.fd", 1).role == "vars"
    for bad, message in [("rom=/x", "expected code=FILE"), ("code=/x,mode=rw", "bad flash mode"),
                         ("code=/x,geometry=arm", "bad flash geometry"),
                         ("code=/x,colour=red", "bad --flash option 'colour'")]:
        with pytest.raises(ConfigError, match=message):
            parse_flash_option(bad)
    for bad, message in [("if=ide,file=/x", "only if=pflash"), ("if=pflash", "file= is required"),
                         ("if=pflash,file=/x,format=qcow2", "only format=raw")]:
        with pytest.raises(ConfigError, match=message):
            parse_drive_option(bad, 0)


def test_run_rejects_bad_flash_in_one_line(tmp_path: Path) -> None:
    odd = tmp_path / "odd.fd"
    odd.write_bytes(bytes(5000))
    done = subprocess.run([sys.executable, "-m", "leanvm", "run", "--flash", f"code={odd}"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LEANVM_KVM_DEVICE": "/dev/kvm"})
    if done.returncode == 2 and "KVM" in done.stderr and "odd.fd" not in done.stderr:
        pytest.skip("no KVM here: the flash check runs while the machine is built")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "odd.fd: size 5000 is not a non-zero multiple of the 4096-byte flash sector" in done.stderr


def test_directories_are_not_images(tmp_path: Path) -> None:
    for args in (["flash", "inspect", str(tmp_path)], ["flash", "unpad", str(tmp_path), str(tmp_path / "x")]):
        done = leanvm(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert "not a regular file" in done.stderr
