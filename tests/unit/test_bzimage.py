"""bzImage setup headers, and where firmware is told to put kernel, command line and initrd."""

from __future__ import annotations

import glob
import re
import struct
from pathlib import Path

import pytest
from hypothesis import event, given, settings, strategies as st

from leanvm.errors import ImageError
from leanvm.loader.bzimage import parse_setup_header
from leanvm.loader.files import map_readonly
from leanvm.loader.fwcfg_kernel import FIRMWARE_RESERVE, plan_firmware_kernel

MiB = 1 << 20


def make_bzimage(protocol: int = 0x20F, setup_sects: int = 1, loadflags: int = 1,
                 kernel: bytes = b"K" * 5000, initrd_max: int = 0x7FFFFFFF,
                 xloadflags: int = 0, cmdline_size: int = 2047) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_max)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<I", setup, 0x1F4, -(-len(kernel) // 16))  # syssize, 16-byte units
    return bytes(setup) + kernel


def test_stock_debian_kernel_header() -> None:
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not found:
        pytest.skip("Debian's linux-image-cloud-amd64 is not installed (make test installs it)")
    data = Path(found[-1]).read_bytes()
    header = parse_setup_header(data, found[-1])
    assert header.protocol >= 0x20F and header.loads_high and header.relocatable
    assert header.xloadflags & 0x3 == 0x3  # 64-bit entry, may load above 4 GiB
    assert header.version.startswith(Path(found[-1]).name.removeprefix("vmlinuz-"))
    assert header.payload_length > 0 and header.init_size > len(data) - header.setup_size


def test_test_kernel_header(test_kernel: Path) -> None:
    data = test_kernel.read_bytes()
    header = parse_setup_header(data, str(test_kernel))
    assert header.version == "leanvm-test-kernel 1.0"
    assert header.setup_size == (data[0x1F1] + 1) * 512
    syssize = struct.unpack_from("<I", data, 0x1F4)[0]
    assert syssize * 16 >= len(data) - header.setup_size > (syssize - 1) * 16


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d[:0x200], "too short for a Linux kernel"),
    (lambda d: d[:0x202] + b"XXXX" + d[0x206:], "no 'HdrS' signature"),
    (lambda d: d[:0x206] + b"\x01\x01" + d[0x208:], "boot protocol 1.01 is too old"),
    (lambda d: d[:0x1FE] + b"\0\0" + d[0x200:], "boot flag at 0x1fe"),
    (lambda d: d[:1024], "truncated: 1024 bytes, but the setup code alone is 1024 bytes"),
    (lambda d: d[:-32], r"truncated: \d+ bytes, but the setup header says \d+ \(setup and "),
])
def test_malformed_headers_are_named(mutate, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_setup_header(mutate(make_bzimage()), "k.img")


# Setup-header fields (Documentation/arch/x86/boot.rst): (offset, size) of the ones the
# loaders read, plus the signature, the boot flag and the protocol version.
HEADER_FIELDS = [(0x1F1, 1), (0x1F4, 4), (0x1FE, 2), (0x202, 4), (0x206, 2), (0x20E, 2),
                 (0x211, 1), (0x214, 4), (0x22C, 4), (0x230, 4), (0x234, 1), (0x236, 2),
                 (0x238, 4), (0x248, 4), (0x24C, 4), (0x258, 8), (0x260, 4)]


@st.composite
def mutated_bzimages(draw: st.DrawFn) -> bytes:
    """A valid bzImage (random protocol, setup size, kernel, a payload of a known format),
    then a few header fields set to random or edge values, and perhaps cut short."""
    kernel = draw(st.binary(min_size=0, max_size=600))
    body = draw(st.sampled_from([b"", b"\x1f\x8b\x08\x00" + bytes(12), b"BZh9" + bytes(8),
                                 b"\x02\x21\x4c\x18" + bytes(8)]))
    image = bytearray(make_bzimage(
        protocol=draw(st.sampled_from([0x200, 0x201, 0x202, 0x204, 0x208, 0x20A, 0x20C,
                                       0x20F])),
        setup_sects=draw(st.integers(1, 6)), loadflags=draw(st.integers(0, 255)),
        kernel=kernel + body, xloadflags=draw(st.integers(0, 3))))
    struct.pack_into("<II", image, 0x248, len(kernel), len(body))
    for _ in range(draw(st.integers(0, 4))):
        offset, size = draw(st.sampled_from(HEADER_FIELDS))
        top = (1 << (8 * size)) - 1
        value = draw(st.one_of(st.integers(0, top), st.sampled_from([0, 1, top, top >> 1])))
        image[offset:offset + size] = value.to_bytes(size, "little")
    if draw(st.integers(0, 3)) == 0:  # cut short, mostly near the end
        end = len(image)
        del image[draw(st.one_of(st.integers(max(0, end - 64), end), st.integers(0, end))):]
    return bytes(image)


def named_one_line(error: ImageError, path: str) -> None:
    text = str(error)
    assert text.startswith(f"{path}: ") and "\n" not in text, text
    assert "Error" not in text.replace("ImageError", "") and "Traceback" not in text, text


@settings(max_examples=400, deadline=None)
@given(mutated_bzimages())
def test_mutated_headers_are_read_in_bounds_or_refused_by_name(data: bytes) -> None:
    from leanvm.loader.decompress import read_payload

    try:
        header = parse_setup_header(data, "k.img")
    except ImageError as exc:
        named_one_line(exc, "k.img")
        event(f"header refused: {re.sub('[0-9]+', 'N', str(exc).split(': ', 1)[1][:24])}")
        return
    event("header read")
    assert data[0x202:0x206] == b"HdrS" and data[0x1FE:0x200] == b"\x55\xaa"
    assert header.protocol >= 0x200 and len(data) >= 0x280
    assert header.setup_size < len(data)  # some protected-mode code follows the setup
    assert header.setup_size + header.syssize * 16 <= len(data) + 15
    assert header.version in ("", header.version)  # decoded text, never a crash
    try:
        found = read_payload(data, "k.img")
    except ImageError as exc:
        named_one_line(exc, "k.img")
        event("payload refused")
    else:
        event("payload found")
        start = header.setup_size + header.payload_offset
        assert len(found.body) == header.payload_length and start + len(found.body) <= len(data)
        assert bytes(found.body) == data[start:start + header.payload_length]
    try:
        planned = plan_firmware_kernel(data, "k.img", b"I" * 4096, "i.img", "console=ttyS0",
                                       64 * MiB)
    except ImageError as exc:
        assert str(exc).split(": ", 1)[0] in ("k.img", "i.img"), str(exc)
        named_one_line(exc, str(exc).split(": ", 1)[0])
    else:
        assert len(planned.setup) == header.setup_size
        assert planned.kernel_addr + len(planned.kernel) <= 64 * MiB
        kernel_end = planned.kernel_addr + max(len(planned.kernel), header.init_size)
        assert kernel_end <= planned.initrd_addr
        assert planned.initrd_addr + 4096 <= 64 * MiB - FIRMWARE_RESERVE


def test_layout_of_a_modern_kernel_matches_qemu() -> None:
    image = make_bzimage()
    initrd = b"I" * 10000
    planned = plan_firmware_kernel(image, "k", initrd, "i", "console=ttyS0", 128 * MiB)
    assert (planned.setup_addr, planned.cmdline_addr, planned.kernel_addr) == \
        (0x10000, 0x20000, 0x100000)
    assert planned.entry == 0x10200
    assert bytes(planned.kernel) == b"K" * 5000 and len(planned.setup) == 1024
    assert planned.cmdline == b"console=ttyS0\0"
    top = 128 * MiB - FIRMWARE_RESERVE
    assert planned.initrd_addr == (top - len(initrd)) & ~4095
    setup = planned.setup
    assert struct.unpack_from("<I", setup, 0x228)[0] == 0x20000
    assert setup[0x210] == 0xB0 and setup[0x211] == 0x81
    assert struct.unpack_from("<H", setup, 0x224)[0] == 0x20000 - 0x10000 - 0x200
    assert struct.unpack_from("<II", setup, 0x218) == (planned.initrd_addr, len(initrd))


def test_initrd_max_from_the_header_and_the_4g_flag() -> None:
    image = make_bzimage(initrd_max=0x1000000 - 1)
    planned = plan_firmware_kernel(image, "k", b"x", "i", "", 128 * MiB)
    assert planned.initrd_addr == 0x1000000 - 4096
    image = make_bzimage(initrd_max=0x1000000 - 1, xloadflags=0x2)  # may go above 4 GiB
    planned = plan_firmware_kernel(image, "k", b"x", "i", "", 128 * MiB)
    assert planned.initrd_addr == (128 * MiB - FIRMWARE_RESERVE - 1) & ~4095


def test_old_protocols_use_the_low_layout() -> None:
    planned = plan_firmware_kernel(make_bzimage(protocol=0x201), "k", b"", "i", "ro", 64 * MiB)
    assert (planned.setup_addr, planned.cmdline_addr, planned.kernel_addr) == \
        (0x90000, 0x9A000, 0x100000)
    assert struct.unpack_from("<HH", planned.setup, 0x20) == (0xA33F, 0xA000)
    planned = plan_firmware_kernel(make_bzimage(loadflags=0), "k", b"", "i", "", 64 * MiB)
    assert planned.kernel_addr == 0x10000 and planned.initrd_addr == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"cmdline": "x" * 300, "image": make_bzimage(cmdline_size=255)},
     "k: the kernel command line is 300 bytes; this kernel accepts at most 255"),
    ({"cmdline": "a\0b"}, "k: the kernel command line contains a NUL byte"),
    ({"initrd": b"i" * (63 * MiB), "ram": 64 * MiB}, "i: initrd of 66060288 bytes does not fit"),
    ({"image": make_bzimage(kernel=bytes(20 * MiB)), "ram": 16 * MiB},
     "does not fit in 16 MiB of RAM"),
])
def test_impossible_loads_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        plan_firmware_kernel(kwargs.get("image", make_bzimage()), "k", kwargs.get("initrd", b""),
                             "i", kwargs.get("cmdline", ""), kwargs.get("ram", 64 * MiB))


def test_map_readonly_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="nothing: no such kernel file"):
        map_readonly(tmp_path / "nothing", "kernel")
    with pytest.raises(ImageError, match="is a directory; the initrd must be a regular file"):
        map_readonly(tmp_path, "initrd")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert map_readonly(empty, "initrd") == b""
    full = tmp_path / "full"
    full.write_bytes(b"abc")
    assert map_readonly(full, "initrd")[:] == b"abc"
