"""fw_cfg: directory, port reads, DMA, and hostile descriptors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from leanvm.devices import fw_cfg
from leanvm.devices.fw_cfg import FwCfg
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous

MiB = 1 << 20
RAM = 2 * MiB


@pytest.fixture
def memory():
    mem = GuestMemory()
    mem.add(GuestRegion("ram", 0, map_anonymous(RAM), RegionKind.RAM))
    yield mem
    mem.close()


def port_read(dev: FwCfg, key: int, count: int) -> bytes:
    dev.write(fw_cfg.SELECTOR, 2, key)
    return bytes(dev.read(fw_cfg.DATA, 1) for _ in range(count))


def dma(dev: FwCfg, memory: GuestMemory, control: int, length: int, address: int,
        at: int = 0x1000) -> int:
    memory.write(at, fw_cfg.DESCRIPTOR.pack(control, length, address))
    be32 = lambda v: int.from_bytes(v.to_bytes(4, "big"), "little")  # what outl(cpu_to_be32(v)) puts on the bus
    dev.write(fw_cfg.DMA_ADDRESS, 4, be32(at >> 32))
    dev.write(fw_cfg.DMA_ADDRESS + 4, 4, be32(at & 0xFFFFFFFF))
    return struct.unpack(">I", memory.read(at, 4))[0]


def test_signature_id_and_dma_register(memory: GuestMemory) -> None:
    dev = FwCfg(memory)
    assert port_read(dev, fw_cfg.SIGNATURE, 4) == b"QEMU"
    assert port_read(dev, fw_cfg.ID, 4) == struct.pack("<I", 3)
    assert dev.read(fw_cfg.DMA_ADDRESS, 4).to_bytes(4, "little") == b"QEMU"
    assert dev.read(fw_cfg.DMA_ADDRESS + 4, 4).to_bytes(4, "little") == b" CFG"


def test_file_directory(memory: GuestMemory) -> None:
    dev = FwCfg(memory)
    dev.add_file("genroms/linuxboot_dma.bin", b"\x55\xaa" + bytes(510))
    dev.add_file("bootorder", b"/rom@genroms/linuxboot_dma.bin\n")
    dev.add_file("etc/e820", bytes(40))
    raw = port_read(dev, fw_cfg.FILE_DIR, 4 + 3 * 64)
    (count,) = struct.unpack(">I", raw[:4])
    entries = [fw_cfg.FILE_ENTRY.unpack_from(raw, 4 + 64 * i) for i in range(count)]
    names = [e[3].rstrip(b"\0").decode() for e in entries]
    assert names == sorted(names) == ["bootorder", "etc/e820", "genroms/linuxboot_dma.bin"]
    for size, select, _, name in entries:
        assert port_read(dev, select, size) == dev.file(name.rstrip(b"\0").decode())
    assert {select for _, select, _, _ in entries} == {0x20, 0x21, 0x22}


def test_reads_past_the_end_give_zeros_and_selector_changes_restart(memory: GuestMemory) -> None:
    dev = FwCfg(memory)
    dev.add(fw_cfg.KERNEL_CMDLINE, b"console=ttyS0")
    assert port_read(dev, fw_cfg.KERNEL_CMDLINE, 16) == b"console=ttyS0\0\0\0"
    dev.write(fw_cfg.SELECTOR, 2, fw_cfg.KERNEL_CMDLINE)
    assert dev.read(fw_cfg.DATA, 1) == ord("c")
    dev.write(fw_cfg.SELECTOR, 2, fw_cfg.SIGNATURE)  # a new selection mid-read starts over
    assert dev.read(fw_cfg.DATA, 1) == ord("Q")
    assert port_read(dev, 0x7777, 4) == bytes(4)  # no such item


def test_dma_select_read_skip(memory: GuestMemory) -> None:
    transfers = []
    dev = FwCfg(memory, transfers.append)
    dev.add(fw_cfg.KERNEL_DATA, bytes(range(256)) * 4)
    status = dma(dev, memory, (fw_cfg.KERNEL_DATA << 16) | fw_cfg.CTL_SELECT | fw_cfg.CTL_READ,
                 16, 0x2000)
    assert status == 0 and memory.read(0x2000, 16) == bytes(range(16))
    assert dma(dev, memory, fw_cfg.CTL_SKIP, 100, 0) == 0
    assert dma(dev, memory, fw_cfg.CTL_READ, 4, 0x3000) == 0
    assert memory.read(0x3000, 4) == bytes(range(116, 120))
    # past the end: zeros fill the rest of the buffer
    memory.write(0x4000, b"\xee" * 64)
    assert dma(dev, memory, fw_cfg.CTL_SKIP, 1024 - 120 - 8, 0) == 0
    assert dma(dev, memory, fw_cfg.CTL_READ, 64, 0x4000) == 0
    assert memory.read(0x4000, 64) == bytes(range(248, 256)) + bytes(56)
    assert [t.name for t in transfers] == ["kernel", "kernel", "kernel"]
    assert transfers[0].bytes == 16 and transfers[0].dma


def test_dma_write_only_to_writable_items(memory: GuestMemory) -> None:
    dev = FwCfg(memory)
    key = dev.add_file("etc/writable", bytes(8), writable=True)
    dev.add_file("etc/fixed", bytes(8))
    memory.write(0x5000, b"ABCDEFGH")
    assert dma(dev, memory, (key << 16) | fw_cfg.CTL_SELECT | fw_cfg.CTL_WRITE, 8, 0x5000) == 0
    assert dev.file("etc/writable") == b"ABCDEFGH"
    fixed = dev.files["etc/fixed"]
    assert dma(dev, memory, (fixed << 16) | fw_cfg.CTL_SELECT | fw_cfg.CTL_WRITE, 8, 0x5000) == 1
    assert dev.file("etc/fixed") == bytes(8)
    assert dma(dev, memory, (key << 16) | fw_cfg.CTL_SELECT | fw_cfg.CTL_WRITE, 9, 0x5000) == 1


def test_dma_outside_ram_sets_error_and_touches_nothing(memory: GuestMemory) -> None:
    dev = FwCfg(memory)
    dev.add(fw_cfg.INITRD_DATA, b"x" * 4096)
    control = (fw_cfg.INITRD_DATA << 16) | fw_cfg.CTL_SELECT | fw_cfg.CTL_READ
    assert dma(dev, memory, control, 4096, RAM - 100) == fw_cfg.CTL_ERROR
    assert memory.read(RAM - 100, 100) == bytes(100)  # nothing written
    assert dma(dev, memory, control, 16, 1 << 40) == fw_cfg.CTL_ERROR
    dev.write(fw_cfg.DMA_ADDRESS + 4, 4, int.from_bytes((RAM + 16).to_bytes(4, "big"), "little"))
    assert dev.dma_errors == 3


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
       st.integers(0, RAM + 64))
def test_hostile_descriptors_never_escape_guest_memory(control: int, length: int, address: int,
                                                       at: int) -> None:
    mem = GuestMemory()
    mem.add(GuestRegion("ram", 0, map_anonymous(RAM), RegionKind.RAM))
    try:
        dev = FwCfg(mem)
        dev.add(fw_cfg.KERNEL_DATA, b"k" * 300)
        dev.add_file("etc/w", bytes(16), writable=True)
        length %= 4 * MiB
        if at + 16 <= RAM:
            mem.write(at, fw_cfg.DESCRIPTOR.pack(control, length, address))
        before = mem.read(0, RAM)
        dev.write(fw_cfg.DMA_ADDRESS + 4, 4, int.from_bytes(at.to_bytes(4, "big"), "little"))
        after = mem.read(0, RAM)
        if at + 16 <= RAM:
            status = struct.unpack(">I", mem.read(at, 4))[0]
            assert status in (0, fw_cfg.CTL_ERROR)
        # Only the descriptor's control word and the transfer's own target may change.
        allowed = [(at, at + 4)]
        if control & fw_cfg.CTL_READ and address < RAM:
            allowed.append((address, min(address + length, RAM)))
        changed = [i for i in range(0, RAM, 4096) if before[i:i + 4096] != after[i:i + 4096]]
        for page in changed:
            for offset in range(page, page + 4096):
                if before[offset] != after[offset]:
                    assert any(lo <= offset < hi for lo, hi in allowed), (
                        f"byte {offset:#x} changed outside the descriptor and its target")
    finally:
        mem.close()


def test_kernel_items_as_firmware_reads_them(memory: GuestMemory) -> None:
    from leanvm.loader.fwcfg_kernel import plan_firmware_kernel
    from leanvm.machine.platform import add_firmware_kernel
    from tests.unit.test_bzimage import make_bzimage

    kernel = memoryview(make_bzimage(kernel=bytes(range(256)) * 20))
    planned = plan_firmware_kernel(kernel, "k", b"initrd!", "i", "root=/dev/vda", RAM)
    dev = FwCfg(memory)
    add_firmware_kernel(dev, planned, b"\x55\xaa\x03ROM")
    le32 = lambda key: struct.unpack("<I", port_read(dev, key, 4))[0]
    assert le32(fw_cfg.SETUP_ADDR) == 0x10000 and le32(fw_cfg.SETUP_SIZE) == 1024
    assert le32(fw_cfg.KERNEL_ADDR) == 0x100000 and le32(fw_cfg.KERNEL_SIZE) == 5120
    assert le32(fw_cfg.CMDLINE_SIZE) == 14 and port_read(dev, fw_cfg.CMDLINE_DATA, 14) == b"root=/dev/vda\0"
    assert le32(fw_cfg.INITRD_SIZE) == 7 and le32(fw_cfg.INITRD_ADDR) == planned.initrd_addr
    # the kernel item is a view of the file, served by DMA without a copy in between
    assert isinstance(dev.items[fw_cfg.KERNEL_DATA].data, memoryview)
    control = (fw_cfg.KERNEL_DATA << 16) | fw_cfg.CTL_SELECT | fw_cfg.CTL_READ
    assert dma(dev, memory, control, 5120, 0x100000) == 0
    assert memory.read(0x100000, 5120) == bytes(range(256)) * 20
    assert dev.file("bootorder") == b"/rom@genroms/linuxboot_dma.bin\0"
    assert dev.file("genroms/linuxboot_dma.bin") == b"\x55\xaa\x03ROM"
    directory = port_read(dev, fw_cfg.FILE_DIR, 4 + 2 * 64)
    assert struct.unpack(">I", directory[:4])[0] == 2
    names = [directory[4 + 64 * i + 8:4 + 64 * (i + 1)].rstrip(b"\0") for i in range(2)]
    assert names == [b"bootorder", b"genroms/linuxboot_dma.bin"]


def test_read_only_views_refuse_writes(memory: GuestMemory) -> None:
    dev = FwCfg(memory)
    dev.add(fw_cfg.KERNEL_DATA, memoryview(b"abcd"))
    memory.write(0x3000, b"WXYZ")
    control = (fw_cfg.KERNEL_DATA << 16) | fw_cfg.CTL_SELECT | fw_cfg.CTL_WRITE
    assert dma(dev, memory, control, 4, 0x3000) == fw_cfg.CTL_ERROR
    assert bytes(dev.items[fw_cfg.KERNEL_DATA].data) == b"abcd"
