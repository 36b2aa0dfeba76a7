"""Damaged kernel payloads (issue 13): whatever bytes are flipped, cut or dropped, host-side
decompression either refuses the payload with one ImageError line naming the file, or
yields exactly the declared number of bytes; for formats with checksums, exactly the
original kernel. Never another exception, never a wrong-length vmlinux."""

from __future__ import annotations

import functools
import random
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from leanvm.errors import ImageError
from leanvm.loader.decompress import decompress_payload, extract_vmlinux
from tests.unit.test_decompress_pvh import (
    COMPRESSORS,
    lz4_legacy,
    make_elf,
    one_line_naming,
    size_append,
    with_payload,
)

# Formats whose container checks the data itself (CRCs, XXH64, Adler-32): a success must
# be the original. lzma and lz4 carry no checksum: a success must have the declared length.
CHECKED = {"gzip", "bzip2", "xz", "zstd", "lzo"}


def code_like(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(1, 12)) for _ in range(200)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) if rng.random() < 0.9 else rng.randbytes(24)
    return bytes(out[:size])


@functools.cache
def kernel(kind: str) -> bytes:
    # lz4's case spans two blocks (8 MiB and a shorter last one), as Debian's kernel does
    size = (8 << 20) + 40_000 if kind == "lz4-2" else 40_000
    return make_elf(code_like(size, len(kind)))


@functools.cache
def compressed(kind: str) -> bytes:
    elf = kernel(kind)
    if kind == "lz4-2":
        return lz4_legacy(elf) + size_append(elf)
    if kind == "lzo":
        stream = subprocess.run(["lzop", "-9", "-c"], input=elf, capture_output=True,
                                check=True).stdout
        return stream + size_append(elf)
    return COMPRESSORS[kind](elf)


KINDS = sorted(COMPRESSORS) + ["lz4-2", "lzo"]


@st.composite
def damaged(draw: st.DrawFn, body: bytes) -> bytes:
    """``body`` with a few bytes flipped (often in its first or last 32 bytes: headers and
    trailers), cut short, a span dropped or bytes inserted; the size trailer sometimes
    kept, as when a stream is cut but the file still ends in its size."""
    out = bytearray(body)
    end = len(out)
    places = st.one_of(st.integers(0, min(32, end - 1)), st.integers(max(0, end - 32), end - 1),
                       st.integers(0, end - 1))
    how = draw(st.sampled_from(["flip", "flip", "cut", "cut and keep the size", "drop",
                                "insert"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 3))):
            out[draw(places)] ^= draw(st.integers(1, 255))
    elif how == "cut":
        del out[draw(st.integers(0, end - 1)):]
    elif how == "cut and keep the size":
        out = out[:draw(st.integers(0, end - 5))] + out[-4:]
    elif how == "drop":
        start = draw(places)
        del out[start:start + draw(st.integers(1, 64))]
    else:
        at = draw(places)
        out[at:at] = draw(st.binary(min_size=1, max_size=8))
    event(how)
    return bytes(out)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_payloads_are_refused_or_exact(kind: str, data: st.DataObject) -> None:
    if kind == "lzo" and shutil.which("lzop") is None:
        pytest.skip("lzop is not installed")
    body = compressed(kind)
    bad = data.draw(damaged(body))
    name = kind.split("-")[0]
    try:
        out = decompress_payload(name, bad, "vmlinuz")
    except ImageError as exc:
        one_line_naming(exc, "vmlinuz")
        event("refused")
        return
    event("decompressed")
    assert len(out) == len(kernel(kind)), "a wrong-length vmlinux"
    if name in CHECKED:
        assert out == kernel(kind)


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(sorted(COMPRESSORS)), data=st.data())
def test_damaged_bzimages_extract_a_whole_elf_or_are_refused(kind: str,
                                                             data: st.DataObject) -> None:
    """The same through extract_vmlinux, which also checks the result is a whole ELF."""
    body = compressed(kind)
    bad = data.draw(damaged(body))
    try:
        elf = extract_vmlinux(with_payload(bad), "bzImage")
    except ImageError as exc:
        one_line_naming(exc, "bzImage")
        return
    assert len(elf) == len(kernel(kind)) and elf[:4] == b"\x7fELF"
    if kind in CHECKED:
        assert elf == kernel(kind)
