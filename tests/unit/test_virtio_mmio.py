"""The virtio-mmio transport and the split virtqueue: Linux's probe sequence, feature
negotiation, interrupts, reset; hostile rings (loops, bad indices, buffers outside RAM,
wrapping 64 bits, indirect descriptors) mark the device DEVICE_NEEDS_RESET and never raise
out of the transport; random register traffic never does either."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from leanvm.devices.virtio import mmio as m
from leanvm.devices.virtio.queue import DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

from virtio_driver import AVAIL_AT, DESC_AT, RAM, USED_AT, Driver, guest_ram


class Echo:
    """A device that writes its readable bytes back, reversed."""

    device_id = 0x4242
    features = 1 << 5
    queue_sizes = (16,)

    def __init__(self) -> None:
        self.resets = 0
        self.config = bytearray(range(16))

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = value.to_bytes(size, "little")[:16 - offset]

    def reset(self) -> None:
        self.resets += 1

    def process(self, queue: int, transport: m.MmioTransport) -> None:
        vq = transport.queues[queue]
        while (chain := vq.pop(transport.memory)) is not None:
            data = chain.read_all(transport.memory, 4096)
            vq.push(transport.memory, chain.head, chain.write_all(transport.memory, data[::-1]))
        transport.used()


@pytest.fixture()
def rig():
    memory = guest_ram()
    irqs: list[int] = []
    transport = m.MmioTransport(Echo(), memory, lambda: irqs.append(1))
    yield transport, Driver(transport), irqs
    memory.close()


def test_probe_negotiate_and_echo(rig) -> None:
    transport, driver, irqs = rig
    assert driver.reg(m.DEVICE_ID) == 0x4242
    assert driver.features() == (1 << 5) | m.F_VERSION_1
    assert driver.start()
    [out] = driver.submit([b"hello"], [8])
    assert driver.used() == [(0, 5)]
    assert transport.memory.read(out, 5) == b"olleh"
    assert irqs and driver.reg(m.INTERRUPT_STATUS) == m.USED_BUFFER
    driver.set(m.INTERRUPT_ACK, m.USED_BUFFER)
    assert driver.reg(m.INTERRUPT_STATUS) == 0


def test_features_must_be_offered_and_include_version_1(rig) -> None:
    _, driver, _ = rig
    assert not driver.start(features=1 << 5)  # legacy driver: no VERSION_1
    assert not driver.start(features=m.F_VERSION_1 | 1 << 7)  # not offered
    assert driver.start(features=m.F_VERSION_1)


def test_config_space_and_generation(rig) -> None:
    transport, driver, irqs = rig
    assert transport.read(m.CONFIG_OFFSET + 4, 4) == 0x07060504
    assert transport.read(m.CONFIG_OFFSET + 2, 2) == 0x0302
    assert transport.read(m.CONFIG_OFFSET + 3, 2) == 0  # misaligned
    assert transport.read(m.CONFIG_OFFSET, 8) == 0x0706050403020100
    assert transport.read(m.DEVICE_ID, 2) == 0  # registers are 32 bits wide
    driver.start()
    generation = driver.reg(m.CONFIG_GENERATION)
    transport.config_changed()
    assert driver.reg(m.CONFIG_GENERATION) == generation + 1
    assert driver.reg(m.INTERRUPT_STATUS) & m.CONFIG_CHANGE


def test_reset_clears_the_queue_and_status(rig) -> None:
    transport, driver, _ = rig
    driver.start()
    driver.set(m.STATUS, 0)
    assert driver.reg(m.STATUS) == 0 and driver.reg(m.QUEUE_READY) == 0
    assert transport.device.resets >= 2
    assert driver.start()


def test_notify_before_driver_ok_does_nothing(rig) -> None:
    transport, driver, _ = rig
    driver.submit([b"x"], [1])
    assert driver.used() == []


def _break(driver: Driver, descriptors: list[tuple[int, int, int, int]], head: int = 0) -> None:
    for index, desc in enumerate(descriptors):
        driver.memory.write(DESC_AT + 16 * index, DESC.pack(*desc))
    driver.memory.write_int(AVAIL_AT + 4 + 2 * (driver.avail_idx % driver.size), 2, head)
    driver.avail_idx += 1
    driver.memory.write_int(AVAIL_AT + 2, 2, driver.avail_idx)
    driver.set(m.QUEUE_NOTIFY, 0)


@pytest.mark.parametrize("descriptors, head, why", [
    ([(0x8000, 4, DESC_F_NEXT, 1), (0x8100, 4, DESC_F_NEXT, 0)], 0, "loops"),
    ([(0x8000, 4, 0, 0)], 16, "chain head 16"),
    ([(0x8000, 4, DESC_F_NEXT, 99)], 0, "chains to 99"),
    ([(RAM - 2, 4, 0, 0)], 0, "not in guest RAM"),
    ([(0xD000_0000, 4, 0, 0)], 0, "not in guest RAM"),  # MMIO, not RAM
    ([(2**64 - 2, 4, 0, 0)], 0, "wraps past 2"),
    ([(0x8000, 16, DESC_F_INDIRECT, 0)], 0, "indirect"),
    ([(0x8000, 4, DESC_F_WRITE | DESC_F_NEXT, 1), (0x8100, 4, 0, 0)], 0, "readable after"),
])
def test_hostile_chains_need_reset(rig, descriptors, head, why) -> None:
    transport, driver, irqs = rig
    driver.start()
    _break(driver, descriptors, head)
    assert driver.reg(m.STATUS) & m.DEVICE_NEEDS_RESET
    assert why in transport.errors[-1]
    assert driver.reg(m.INTERRUPT_STATUS) & m.CONFIG_CHANGE
    assert driver.used() == []
    driver.set(m.QUEUE_NOTIFY, 0)  # nothing more happens until a reset
    assert driver.start()  # a reset makes it usable again
    driver.submit([b"ok"], [2])
    assert driver.used()[-1] == (0, 2)


def test_available_index_far_ahead_needs_reset(rig) -> None:
    transport, driver, _ = rig
    driver.start()
    driver.memory.write_int(AVAIL_AT + 2, 2, 1000)
    driver.set(m.QUEUE_NOTIFY, 0)
    assert "ahead" in transport.errors[-1]


@pytest.mark.parametrize("register, value, why", [
    (m.QUEUE_NUM, 12, "power of two"), (m.QUEUE_NUM, 32, "power of two"),
    (m.QUEUE_DESC_LOW, 0x1008, "aligned"), (m.QUEUE_DEVICE_LOW, RAM - 8, "not in guest RAM")])
def test_bad_queue_layout_is_refused(rig, register, value, why) -> None:
    transport, driver, _ = rig
    transport.write(m.QUEUE_SEL, 4, 0)
    for low, address in ((m.QUEUE_DESC_LOW, DESC_AT), (m.QUEUE_DRIVER_LOW, AVAIL_AT),
                         (m.QUEUE_DEVICE_LOW, USED_AT)):
        transport.write(low, 4, address)
    transport.write(register, 4, value)
    transport.write(m.QUEUE_READY, 4, 1)
    assert transport.read(m.QUEUE_READY, 4) == 0
    assert why in transport.errors[-1]


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 0x1FF), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, 2**32 - 1), st.booleans()), max_size=60),
       st.binary(min_size=16 * 16, max_size=16 * 16), st.binary(min_size=36, max_size=36))
def test_random_register_and_ring_traffic_never_escapes(rig, traffic, table, avail) -> None:
    """Random accesses and random ring contents: the transport answers or marks the device
    broken, but nothing raises and nothing is written outside the rings and guest RAM."""
    transport, driver, _ = rig
    driver.start()
    transport.memory.write(DESC_AT, table)
    transport.memory.write(AVAIL_AT, avail)
    for offset, size, value, is_write in traffic:
        if is_write:
            transport.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= transport.read(offset, size) < 1 << (8 * size)
    transport.notify(0)
    transport.notify(7)  # no such queue
    status = transport.read(m.STATUS, 4)
    assert status == 0 or status & (m.DEVICE_NEEDS_RESET | m.DRIVER_OK) or status < 0x100
