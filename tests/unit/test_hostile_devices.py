"""Hostile guests against every device model in leanvm.devices, through the bus as the vCPU
loop drives it: random (offset, size 1..8, value, read/write) traffic.

Each test asserts that nothing raises (not even a LeanvmError: these devices have no
deliberate error to give a guest), that every read fits its access, that every callback a
device makes (interrupt line, reset, exit, probe, power-off, PAM, ROMD, array writes) is
called with values in range, and that every table the guest can grow stays bounded.
fw_cfg DMA descriptors point anywhere: guest memory outside the descriptor and its target
range is compared before and after, and every read and write of guest memory the device
makes is recorded and checked against those ranges.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from leanvm.devices import bus as busmod
from leanvm.devices import fw_cfg, i8042, pflash, probe, serial
from leanvm.devices.acpi_pm import PORT_SIZE as ACPI_SIZE, AcpiPm
from leanvm.devices.bus import Bus
from leanvm.devices.cmos import Cmos
from leanvm.devices.debug_exit import DebugExit
from leanvm.devices.debugcon import DebugCon
from leanvm.devices.fw_cfg import FwCfg
from leanvm.devices.pci import PAM0, PAM_COUNT, PciHost
from leanvm.devices.pflash import CfiFlash
from leanvm.devices.port92 import Port92
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous
from leanvm.machine.platform import PORT as PLATFORM_PORTS

FW_CFG_PORT = PLATFORM_PORTS["fw_cfg"].base
PROBE_PORT = PLATFORM_PORTS["probe"].base

KiB, MiB = 1 << 10, 1 << 20
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def accesses(span: int, max_size: int = 80) -> st.SearchStrategy:
    """(is_write, offset, size, value): offsets a little outside the device as well."""
    return st.lists(st.tuples(st.booleans(), st.integers(-4, span + 3), st.integers(1, 8),
                              st.one_of(st.integers(0, 0xFF), st.integers(0, 2**64 - 1))),
                    max_size=max_size)


def drive(bus: Bus, base: int, ops: list[tuple[bool, int, int, int]]) -> None:
    """Put the traffic on the bus; every read must fit its access."""
    for is_write, offset, size, value in ops:
        address = base + offset
        if address < 0:
            continue
        if is_write:
            bus.write(address, size, value)
        else:
            assert 0 <= bus.read(address, size) < 1 << (8 * size)


def assert_bus_bounded(bus: Bus) -> None:
    assert len(bus.unclaimed) <= busmod.UNCLAIMED_LIMIT
    assert len(bus._reads) <= busmod._CACHE_LIMIT and len(bus._writes) <= busmod._CACHE_LIMIT


def assert_edges(levels: list[bool]) -> None:
    """An interrupt line reported only on changes, starting from low."""
    assert all(isinstance(level, bool) for level in levels)
    assert all(a != b for a, b in zip(levels, levels[1:]))
    assert not levels or levels[0] is True


# --- every device answers within the access's width -----------------------------------
def _devices(memory: GuestMemory) -> list[tuple[str, object, int]]:
    flash_pc = CfiFlash(memoryview(bytearray(64 * KiB)), pflash.PC_GEOMETRY,
                        image_size=64 * KiB, writable=True)
    virt = pflash.VIRT_GEOMETRY
    flash_virt = CfiFlash(memoryview(bytearray(2 * virt.sector_size)), virt,
                          image_size=2 * virt.sector_size, writable=True)
    return [("serial", serial.Serial16550(lambda data: None), 8),
            ("i8042", i8042.I8042(lambda: None), 5),
            ("cmos", Cmos(64 * MiB, 0, clock=lambda: 0.0), 2),
            ("pci", PciHost(), 8), ("port92", Port92(lambda: None), 1),
            ("debug-exit", DebugExit(lambda status: None), 4),
            ("debugcon", DebugCon(lambda data: None), 1), ("probe", probe.ProbePort(), 8),
            ("acpi-pm", AcpiPm(lambda: None), ACPI_SIZE), ("fw_cfg", FwCfg(memory), 12),
            ("flash-pc", flash_pc, 0x400), ("flash-virt", flash_virt, 0x400)]


@pytest.mark.parametrize("state", ["reset", "commands"])
def test_every_device_read_fits_its_access(memory: GuestMemory, state: str) -> None:
    """The bus refuses a read value wider than the access (DeviceError): no device model
    may return one, at any offset and size its range allows."""
    for name, device, span in _devices(memory):
        if state == "commands":  # put the modal devices in their other modes
            if name.startswith("flash"):
                device.write(0, 1, 0x90)  # read identifier
            elif name == "pci":
                device.write(0, 4, 0x8000_0000)
            elif name == "cmos":
                device.write(0, 1, 0x0F)
        for size in (1, 2, 4, 8):
            for offset in range(0, span - size + 1):
                value = device.read(offset, size)
                assert 0 <= value < 1 << (8 * size), (name, offset, size, hex(value))


# --- legacy PC devices ------------------------------------------------------------------
@FAST
@given(accesses(8), st.binary(max_size=64), st.integers(0, 3))
def test_serial(ops: list, received: bytes, floods: int) -> None:
    levels: list[bool] = []
    out = bytearray()
    uart = serial.Serial16550(out.extend, levels.append)
    bus = Bus("pio", 0x10000)
    bus.register(0x3F8, 8, uart, "com1")
    uart.receive(received)
    for _ in range(floods):
        uart.receive(bytes(serial.RX_QUEUE_LIMIT // 2))
    drive(bus, 0x3F8, ops)
    assert_edges(levels)
    assert uart.pending_input <= serial.RX_QUEUE_LIMIT
    assert len(out) <= uart.transmitted
    assert_bus_bounded(bus)


@FAST
@given(accesses(5, 200))
def test_i8042(ops: list) -> None:
    resets: list[tuple] = []
    levels: list[bool] = []
    dev = i8042.I8042(lambda *args: resets.append(args), levels.append)
    bus = Bus("pio", 0x10000)
    bus.register(0x60, 5, dev, "i8042")
    drive(bus, 0x60, ops)
    assert all(args == () for args in resets) and dev.resets == len(resets)
    assert_edges(levels)
    assert len(dev._out) <= i8042.OUTPUT_LIMIT
    assert_bus_bounded(bus)


@FAST
@given(accesses(2, 120))
def test_cmos(ops: list) -> None:
    dev = Cmos(3 * 1024 * MiB, 2 * 1024 * MiB, cpus=4, clock=lambda: 1.7e9)
    bus = Bus("pio", 0x10000)
    bus.register(0x70, 2, dev, "cmos")
    drive(bus, 0x70, ops)
    assert len(dev.ram) == 128 and 0 <= dev.index < 128
    assert dev.ram[0x0D] == 0x80  # status D stays read-only: battery good


@FAST
@given(st.lists(st.tuples(st.booleans(), st.integers(-4, 11), st.integers(1, 8),
                          st.one_of(st.integers(0, 2**64 - 1),
                                    st.builds(lambda d, f, r: 0x8000_0000 | d << 11 | f << 8 | r,
                                              st.integers(0, 31), st.integers(0, 7),
                                              st.integers(0, 255)))), max_size=100))
def test_pci_config_space(ops: list) -> None:
    pams: list[tuple[int, int]] = []
    host = PciHost(lambda register, value: pams.append((register, value)))
    bus = Bus("pio", 0x10000)
    bus.register(0xCF8, 8, host, "pci")
    drive(bus, 0xCF8, ops)
    assert all(PAM0 <= register < PAM0 + PAM_COUNT and 0 <= value <= 0xFF
               for register, value in pams)
    assert sorted(host.functions) == [(0, 0), (1, 0)]  # nothing the guest can add
    assert all(len(f.config) == 256 for f in host.functions.values())
    assert host.host_bridge.read(0, 4) == 0x1237_8086  # identity is read-only


@FAST
@given(accesses(1, 40), accesses(4, 40), accesses(1, 40))
def test_port92_debug_exit_and_debugcon(port92_ops: list, exit_ops: list,
                                        con_ops: list) -> None:
    resets: list[tuple] = []
    exits: list[int] = []
    out = bytearray()
    bus = Bus("pio", 0x10000)
    port92 = Port92(lambda *args: resets.append(args))
    bus.register(0x92, 1, port92, "port92")
    bus.register(0xF4, 4, DebugExit(exits.append), "debug-exit")
    con = DebugCon(out.extend)
    bus.register(0x402, 1, con, "debugcon")
    drive(bus, 0x92, port92_ops)
    drive(bus, 0xF4, exit_ops)
    drive(bus, 0x402, con_ops)
    assert all(args == () for args in resets)
    assert port92.value & 0x02 and 0 <= port92.value <= 0xFF  # A20 stays on
    assert all(0 <= status < 1 << 32 for status in exits)
    assert len(out) == con.written  # one byte per write, whatever its width


@FAST
@given(accesses(probe.PORT_SIZE, 100), st.booleans())
def test_probe_port_and_mmio_twin(ops: list, mmio: bool) -> None:
    fired: list[tuple[int, tuple[int, ...]]] = []
    dev = probe.ProbePort(lambda value, args: fired.append((value, args)))
    bus = Bus("mmio" if mmio else "pio", 1 << 40 if mmio else 0x10000)
    base = 0xFEB0_0000 if mmio else PROBE_PORT
    bus.register(base, probe.PORT_SIZE, dev, "probe")
    drive(bus, base, ops)
    assert len(fired) == dev.fired
    for value, args in fired:
        assert 0 <= value < 1 << 64 and len(args) <= probe.MAX_ARGS
        assert all(0 <= arg < 1 << 64 for arg in args)
    assert len(dev._args) <= probe.MAX_ARGS


@FAST
@given(accesses(ACPI_SIZE, 100), st.integers(0, 3))
def test_acpi_pm(ops: list, presses: int) -> None:
    poweroffs: list[tuple] = []
    levels: list[bool] = []
    clock = iter(range(0, 10**12, 7_919)).__next__
    dev = AcpiPm(lambda *args: poweroffs.append(args), levels.append, clock_ns=clock)
    bus = Bus("pio", 0x10000)
    bus.register(0x600, ACPI_SIZE, dev, "acpi-pm")
    for _ in range(presses):
        dev.press_power_button()
    drive(bus, 0x600, ops)
    assert all(args == () for args in poweroffs) and dev.poweroffs == len(poweroffs)
    assert_edges(levels)
    assert 0 <= dev.status <= 0xFFFF and 0 <= dev.enable <= 0xFFFF and 0 <= dev.control <= 0xFFFF


# --- flash, both geometries -------------------------------------------------------------
CFI_VALUES = [0x00, 0x01, 0x10, 0x20, 0x40, 0x50, 0x60, 0x70, 0x90, 0x98, 0xD0, 0xE8, 0xF0, 0xFF]


def flash_ops(span: int) -> st.SearchStrategy:
    command = st.sampled_from(CFI_VALUES).map(lambda c: c * 0x0001_0001)  # both x16 chips
    return st.lists(st.tuples(st.booleans(), st.integers(-8, span + 8), st.integers(1, 8),
                              st.one_of(command, st.integers(0, 2**64 - 1),
                                        st.integers(0, 0xFF))), max_size=150)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["pc", "virt"]), st.booleans(), st.data())
def test_flash_command_streams_through_the_bus(geometry: str, writable: bool,
                                               data: st.DataObject) -> None:
    geo = pflash.GEOMETRIES[geometry]
    blocks = 4
    size = blocks * geo.sector_size
    image = size // 2
    array = bytearray(b"\x11" * image + b"\xff" * (size - image))
    romd: list[bool] = []
    writes: list[tuple[int, int]] = []
    dev = CfiFlash(memoryview(array), geo, image_size=image, writable=writable,
                   on_romd=romd.append, on_write=lambda o, n: writes.append((o, n)))
    bus = Bus("mmio", 1 << 40)
    base = 0xFFC0_0000
    bus.register(base, size, dev, "flash0")
    # traffic near the start of each block and near the bank's end
    ops = data.draw(flash_ops(0x800))
    tail_ops = data.draw(flash_ops(0x40))
    drive(bus, base, ops)
    drive(bus, base + size - 0x40, tail_ops)
    assert bytes(array[image:]) == b"\xff" * (size - image)  # erased flash stays erased
    assert all(0 <= o and o + n <= image for o, n in writes)
    if not writable:
        assert writes == [] and bytes(array[:image]) == b"\x11" * image
    assert all(isinstance(on, bool) for on in romd)
    assert all(a != b for a, b in zip(romd, romd[1:])) and (not romd or romd[0] is False)
    assert dev.romd == (romd[-1] if romd else True)
    assert 0 <= dev.status <= 0xFF
    assert len(dev.locked) <= blocks and all(0 <= b < blocks for b in dev.locked)
    assert dev.buffer is None or len(dev.buffer) == geo.buffer_size()
    assert_bus_bounded(bus)


# --- fw_cfg and its DMA -----------------------------------------------------------------
RAM = 1 * MiB
ROM_BASE, ROM_SIZE = 2 * MiB, 64 * KiB


class SpyMemory(GuestMemory):
    """Guest memory that records every range the device reads or writes."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []

    def read(self, address: int, length: int) -> bytes:
        data = super().read(address, length)
        self.reads.append((address, length))
        return data

    def write(self, address: int, data: "bytes | memoryview", *, force: bool = False) -> None:
        super().write(address, data, force=force)
        self.writes.append((address, len(data)))


def _inside(rng: tuple[int, int], allowed: list[tuple[int, int]]) -> bool:
    start, length = rng
    return length == 0 or any(a <= start and start + length <= a + n for a, n in allowed)


def _be32(value: int) -> int:
    """What outl(cpu_to_be32(value)) puts on the bus."""
    return int.from_bytes(value.to_bytes(4, "big"), "little")


descriptor_at = st.one_of(st.integers(0, RAM + 32), st.integers(RAM - 32, RAM + 32),
                          st.integers(ROM_BASE - 16, ROM_BASE + 16), st.integers(0, 2**64 - 1))
target_at = st.one_of(st.integers(0, RAM), st.integers(RAM - 64, RAM + 64),
                      st.integers(ROM_BASE - 64, ROM_BASE + 64), st.integers(0, 2**64 - 1))
lengths = st.one_of(st.integers(0, 64), st.integers(0, 2 * RAM), st.integers(0, 2**32 - 1))
controls = st.one_of(st.integers(0, 2**32 - 1), st.builds(
    lambda key, bits: key << 16 | bits,
    st.sampled_from([fw_cfg.SIGNATURE, fw_cfg.FILE_DIR, fw_cfg.KERNEL_DATA, 0x20, 0x21, 0x7777]),
    st.integers(0, 0x1F)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(descriptor_at, controls, lengths, target_at), min_size=1, max_size=6),
       st.booleans(), accesses(12, 40))
def test_fw_cfg_dma_descriptors_pointing_anywhere(descriptors: list, wide: bool,
                                                  port_ops: list) -> None:
    memory = SpyMemory()
    memory.add(GuestRegion("ram", 0, map_anonymous(RAM), RegionKind.RAM))
    memory.add(GuestRegion("rom", ROM_BASE, map_anonymous(ROM_SIZE), RegionKind.ROM,
                           readonly=True))
    try:
        transfers: list[fw_cfg.Transfer] = []
        dev = FwCfg(memory, transfers.append)
        dev.add(fw_cfg.KERNEL_DATA, bytes(range(256)) * 3)
        dev.add_file("etc/fixed", b"F" * 40)
        dev.add_file("etc/writable", bytes(24), writable=True)
        sizes = {key: len(item.data) for key, item in dev.items.items()}
        bus = Bus("pio", 0x10000)
        bus.register(FW_CFG_PORT, fw_cfg.PORT_SIZE, dev, "fw_cfg")
        ram = memory.regions[0].view
        for at, control, length, target in descriptors:
            in_ram = 0 <= at and at + 16 <= RAM
            if in_ram:
                ram[at:at + 16] = fw_cfg.DESCRIPTOR.pack(control, length, target)
            else:  # outside RAM the descriptor is unreadable, or in the ROM (all zeros)
                length = target = 0
            before = bytes(ram)
            memory.reads.clear()
            memory.writes.clear()
            at &= (1 << 64) - 1
            if wide:  # one 64-bit write of the whole register (as an MMIO fw_cfg takes it)
                bus.write(FW_CFG_PORT + fw_cfg.DMA_ADDRESS, 8,
                          int.from_bytes(at.to_bytes(8, "big"), "little"))
            else:  # high half, then the low half starts the transfer
                bus.write(FW_CFG_PORT + fw_cfg.DMA_ADDRESS, 4, _be32(at >> 32))
                bus.write(FW_CFG_PORT + fw_cfg.DMA_ADDRESS + 4, 4, _be32(at & 0xFFFFFFFF))
            # the device reads only the descriptor and the target, and writes only the
            # descriptor's control word and the target
            assert all(_inside(r, [(at, 16), (target, length)]) for r in memory.reads)
            assert all(_inside(w, [(at, 4), (target, length)]) for w in memory.writes)
            after = bytearray(ram)
            for start, count in ((at, 4), (target, length)):  # put back what may change
                start, stop = min(start, RAM), min(start + count, RAM)
                after[start:stop] = before[start:stop]
            assert after == before  # nothing else in guest memory changed
            if in_ram:
                assert struct.unpack(">I", ram[at:at + 4])[0] in (0, fw_cfg.CTL_ERROR)
        drive(bus, FW_CFG_PORT, port_ops)
        assert bytes(memory.regions[1].view) == bytes(ROM_SIZE)  # read-only memory untouched
        assert {key: len(item.data) for key, item in dev.items.items()} == sizes  # no growth
        assert all(t.bytes >= 0 and t.key in sizes for t in transfers)
        assert dev.file("etc/fixed") == b"F" * 40
    finally:
        memory.close()


# --- the bus with every PC device at once ------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.one_of(st.integers(0, 0xFFFF),
                                                   st.sampled_from([0x60, 0x64, 0x70, 0x71, 0x92,
                                                                    0xF4, 0x3F8, 0x3FD, 0x402,
                                                                    0x404, 0x510, 0x514, 0x518,
                                                                    0x600, 0xCF8, 0xCFC])),
                          st.integers(1, 8), st.integers(0, 2**64 - 1)), max_size=300))
def test_the_whole_port_space(ops: list) -> None:
    memory = GuestMemory()
    memory.add(GuestRegion("ram", 0, map_anonymous(RAM), RegionKind.RAM))
    try:
        bus = Bus("pio", 0x10000)
        calls: list[str] = []
        for base, size, device, name in [
                (0x3F8, 8, serial.Serial16550(lambda d: None), "com1"),
                (0x60, 5, i8042.I8042(lambda: calls.append("reset")), "i8042"),
                (0xF4, 4, DebugExit(lambda s: calls.append("exit")), "debug-exit"),
                (0x70, 2, Cmos(RAM, 0, clock=lambda: 0.0), "cmos"),
                (0x92, 1, Port92(lambda: calls.append("reset")), "port92"),
                (0x402, 1, DebugCon(lambda d: None), "debugcon"),
                (FW_CFG_PORT, fw_cfg.PORT_SIZE, FwCfg(memory), "fw_cfg"),
                (0xCF8, 8, PciHost(), "pci"), (PROBE_PORT, probe.PORT_SIZE, probe.ProbePort(), "probe"),
                (0x600, ACPI_SIZE, AcpiPm(lambda: calls.append("poweroff")), "acpi-pm")]:
            bus.register(base, size, device, name)
        claimed = 0
        for is_write, port, size, value in ops:
            if bus.lookup(port, size) is not None:
                claimed += 1
            if is_write:
                bus.write(port, size, value)
            else:
                assert 0 <= bus.read(port, size) < 1 << (8 * size)
        assert bus.accesses == len(ops)
        assert bus.unclaimed_reads + bus.unclaimed_writes == len(ops) - claimed
        assert sum(bus.unclaimed.values()) + bus.unclaimed_other == len(ops) - claimed
        assert set(calls) <= {"reset", "exit", "poweroff"}
        assert_bus_bounded(bus)
    finally:
        memory.close()


def test_a_guest_walking_every_port_and_a_million_mmio_addresses_stays_bounded() -> None:
    pio, mmio = Bus("pio", 0x10000), Bus("mmio", 1 << 40)
    for port in range(0x10000):
        pio.read(port, 1)
    for address in range(0, 1 << 20):
        mmio.write(address * 8, 8, 0)
    assert pio.unclaimed_reads == 0x10000 and mmio.unclaimed_writes == 1 << 20
    assert len(pio.unclaimed) == len(mmio.unclaimed) == busmod.UNCLAIMED_LIMIT
    assert pio.unclaimed_other == 0x10000 - busmod.UNCLAIMED_LIMIT
    assert mmio.unclaimed_other == (1 << 20) - busmod.UNCLAIMED_LIMIT
