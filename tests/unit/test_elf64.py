"""leanvm's own ELF64 reader against pyelftools, on real kernels and on damaged files."""

from __future__ import annotations

import glob
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings, strategies as st

from leanvm.errors import ImageError
from leanvm.loader.elf64 import PT_NOTE, Elf64
from leanvm.loader.pvh import pvh_entry


def kernels(test_kernel: Path, tmp_path: Path) -> list[Path]:
    """The test kernel's vmlinux, and Debian's kernel decompressed, when it is installed."""
    from leanvm.loader.decompress import extract_vmlinux

    found = [test_kernel.with_name("vmlinux")]
    stock = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if stock:
        found.append(tmp_path / "vmlinux-stock")
        found[-1].write_bytes(extract_vmlinux(Path(stock[-1]).read_bytes(), stock[-1]))
    return found


def test_segments_and_notes_match_pyelftools(test_kernel: Path, tmp_path: Path) -> None:
    for path in kernels(test_kernel, tmp_path):
        data = path.read_bytes()
        ours = Elf64(data, str(path))
        with open(path, "rb") as stream:
            theirs = ELFFile(stream)
            assert ours.entry == theirs["e_entry"]
            expected = [(s["p_type"], s["p_offset"], s["p_paddr"], s["p_filesz"], s["p_memsz"])
                        for s in theirs.iter_segments()]
            names = {"PT_LOAD": 1, "PT_NOTE": 4}
            got = [(t, s.offset, s.paddr, s.filesz, s.memsz) for s in ours.segments()
                   for t in [next((k for k, v in names.items() if v == s.type), s.type)]]
            assert [g for g in got if isinstance(g[0], str)] == \
                [e for e in expected if e[0] in names]
            notes = [(n["n_name"].encode(), n["n_type"] if isinstance(n["n_type"], int) else None)
                     for seg in theirs.iter_segments() if seg["p_type"] == "PT_NOTE"
                     for n in seg.iter_notes()]
        mine = [(n.name, n.type) for n in ours.notes()]
        assert [m[0] for m in mine] == [n[0] for n in notes]
        assert any(name == b"Xen" and kind == 18 for name, kind in mine)
        assert pvh_entry(data, str(path)) > 0x100000


def test_damaged_tables_are_refused_by_name(test_kernel: Path) -> None:
    data = bytearray(test_kernel.with_name("vmlinux").read_bytes())
    bad = bytearray(data)
    struct.pack_into("<Q", bad, 32, len(data) - 8)  # e_phoff near the end of the file
    with pytest.raises(ImageError, match="k: program header table .* does not fit the file"):
        Elf64(bytes(bad), "k")
    bad = bytearray(data)
    bad[18] = 3  # e_machine EM_386
    with pytest.raises(ImageError, match="k: ELF for machine 3; expected an x86-64"):
        Elf64(bytes(bad), "k")
    bad = bytearray(data)
    bad[4] = 1  # ELFCLASS32
    with pytest.raises(ImageError, match="not a 64-bit little-endian ELF"):
        Elf64(bytes(bad), "k")
    elf = Elf64(bytes(data), "k")
    note = next(s for s in elf.segments() if s.type == PT_NOTE)
    bad = bytearray(data)
    struct.pack_into("<I", bad, note.offset + 4, 1 << 20)  # descsz far past the area
    with pytest.raises(ImageError, match="k: a note runs past its note area"):
        list(Elf64(bytes(bad), "k").notes())


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_damage_never_escapes_as_anything_but_image_error(test_kernel: Path,
                                                                   data: st.DataObject) -> None:
    image = bytearray(test_kernel.with_name("vmlinux").read_bytes()[:4096])
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, 127))
        image[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(image)))
    try:
        elf = Elf64(bytes(image[:cut]), "k")
        segments = list(elf.segments())
        list(elf.notes())
    except ImageError as exc:
        assert str(exc).startswith("k: "), exc  # names the file
        return
    for segment in segments:  # what it does accept lies within the bytes it was given
        assert segment.offset + segment.filesz <= cut, segment
