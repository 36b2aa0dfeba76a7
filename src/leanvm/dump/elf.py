"""ELF core dumps of guest memory, laid out as QEMU's dump-guest-memory writes them:
ET_CORE for EM_X86_64; program header 0 is the PT_NOTE (NT_PRSTATUS and a "QEMU"
CPU-state note per vCPU, then VMCOREINFO), then one PT_LOAD per populated guest-physical
run, its address in p_paddr (p_vaddr 0). With guest-virtual ranges (``paging``), the
PT_LOADs describe those instead, p_vaddr and p_paddr both set, several of them pointing at
the same file bytes where the guest maps memory twice. Over 0xfffe program headers the
count goes to section header 0 (PN_XNUM). Written front to back: the output may be a pipe.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Protocol

from leanvm.abi import elf
from leanvm.dump.cpu_notes import notes
from leanvm.dump.source import DumpSource, MemoryRun, VirtualRange, chunks

CHUNK = 1 << 20  # bytes handed to write() at a time


class Sink(Protocol):
    def write(self, data: "bytes | memoryview", /) -> int | None: ...


Progress = Callable[[int], None]  # called with the bytes of guest memory written so far


def _virtual_loads(runs: Sequence[MemoryRun], offsets: list[int],
                   ranges: Sequence[VirtualRange]) -> list[tuple[int, int, int, int]]:
    """(file offset, vaddr, paddr, size) for the parts of ``ranges`` whose memory is in
    ``runs`` (each split where runs end)."""
    starts = [run.paddr for run in runs]
    loads = []
    for vr in ranges:
        vaddr, paddr, size = vr.vaddr, vr.paddr, vr.size
        while size > 0:
            index = bisect.bisect_right(starts, paddr) - 1
            if index < 0 or paddr >= runs[index].end:
                nxt = starts[index + 1] if index + 1 < len(starts) else None
                if nxt is None or nxt >= paddr + size:
                    break
                skip = nxt - paddr  # not dumped: skip to the next run
                vaddr, paddr, size = vaddr + skip, paddr + skip, size - skip
                continue
            run = runs[index]
            part = min(size, run.end - paddr)
            loads.append((offsets[index] + paddr - run.paddr, vaddr, paddr, part))
            vaddr, paddr, size = vaddr + part, paddr + part, size - part
    return loads


def write_elf(source: DumpSource, out: Sink, progress: Progress | None = None) -> int:
    """Write the dump; the bytes written."""
    note_blob, _ = notes(source)
    runs = list(source.runs)
    # the loads' count decides where the data starts, and the data where the loads point:
    # with paging, count the loads first against provisional offsets (the count does not
    # depend on them), then place them
    provisional = [0] * len(runs)
    count = (len(_virtual_loads(runs, provisional, source.virtual)) if source.virtual is not None
             else len(runs))
    phnum = 1 + count
    xnum = phnum >= elf.PN_XNUM
    header_size = elf.EHDR.size + phnum * elf.PHDR.size + (elf.SHDR.size if xnum else 0)
    note_offset = header_size
    data_offset = note_offset + len(note_blob)
    offsets, cursor = [], data_offset
    for run in runs:
        offsets.append(cursor)
        cursor += len(run.data)
    if source.virtual is not None:
        loads = _virtual_loads(runs, offsets, source.virtual)
    else:
        loads = [(offsets[i], 0, run.paddr, len(run.data)) for i, run in enumerate(runs)]
    assert len(loads) == count
    shoff = elf.EHDR.size + phnum * elf.PHDR.size if xnum else 0
    out.write(elf.EHDR.pack(elf.ident(), elf.ET_CORE, elf.EM_X86_64, elf.EV_CURRENT, 0,
                            elf.EHDR.size, shoff, 0, elf.EHDR.size, elf.PHDR.size,
                            elf.PN_XNUM if xnum else phnum, elf.SHDR.size if xnum else 0,
                            1 if xnum else 0, 0))
    headers = [elf.PHDR.pack(elf.PT_NOTE, 0, note_offset, 0, 0, len(note_blob), len(note_blob), 0)]
    flags = elf.PF_R | elf.PF_W | elf.PF_X
    headers += [elf.PHDR.pack(elf.PT_LOAD, flags, offset, vaddr, paddr, size, size, 0)
                for offset, vaddr, paddr, size in loads]
    out.write(b"".join(headers))
    if xnum:  # section header 0: sh_info holds the program header count
        out.write(elf.SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0))
    out.write(note_blob)
    done = 0
    for run in runs:
        for piece in chunks(run.data, CHUNK):
            out.write(piece)
            done += len(piece)
            if progress is not None:
                progress(done)
    return cursor
