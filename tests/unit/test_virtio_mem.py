"""virtio-mem: requests answered as the spec (5.15) and QEMU answer them, checked against a
model under random request streams; unplugged blocks given back to the host at once (host
RSS of the region falls); hostile request buffers mark the device NEEDS_RESET."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from leanvm.devices.virtio import mem as vm_
from leanvm.devices.virtio import mmio as m
from leanvm.errors import ConfigError
from leanvm.memory.discard import DiscardManager
from leanvm.memory.guest import GuestRegion, RegionKind
from leanvm.memory.host import ReleasePages, map_anonymous
from leanvm.memory.residency import measure

from virtio_driver import Driver, guest_ram

MB = 1 << 20
BLOCK = 2 * MB
BASE = 1 << 32
BLOCKS = 16


@pytest.fixture()
def rig():
    memory = guest_ram()
    discard = DiscardManager("vmem0", BLOCKS * BLOCK, BLOCK)
    region = memory.add(GuestRegion("vmem0", BASE, map_anonymous(BLOCKS * BLOCK),
                                    RegionKind.RAM, discard=discard))
    release = ReleasePages(region.mapping)
    discard.add_listener(release)
    device = vm_.VirtioMem("vmem0", BASE, discard, requested_size=8 * BLOCK)
    transport = m.MmioTransport(device, memory, lambda: None)
    device.transport = transport
    driver = Driver(transport)
    assert driver.start()
    yield device, driver, region, release
    memory.close()


def request(driver: Driver, kind: int, address: int = 0, blocks: int = 0) -> tuple[int, int]:
    [out] = driver.submit([vm_.REQUEST.pack(kind, address, blocks)], [vm_.RESPONSE.size])
    [(_, written)] = driver.used()
    assert written == vm_.RESPONSE.size
    return vm_.RESPONSE.unpack(driver.memory.read(out, vm_.RESPONSE.size))


def config(driver: Driver) -> tuple:
    raw = b"".join(driver.t.read(m.CONFIG_OFFSET + i, 4).to_bytes(4, "little")
                   for i in range(0, vm_.CONFIG.size, 4))
    return vm_.CONFIG.unpack(raw)


def test_config_space_describes_the_region(rig) -> None:
    device, driver, *_ = rig
    assert driver.reg(m.DEVICE_ID) == 24
    assert driver.features() & vm_.F_UNPLUGGED_INACCESSIBLE
    block, node, addr, size, usable, plugged, requested = config(driver)
    assert (block, node, addr, size, usable, plugged, requested) == \
        (BLOCK, 0, BASE, BLOCKS * BLOCK, BLOCKS * BLOCK, 0, 8 * BLOCK)


def test_plug_unplug_state_and_host_pages(rig) -> None:
    device, driver, region, release = rig
    assert request(driver, vm_.REQ_PLUG, BASE, 4) == (vm_.RESP_ACK, 0)
    assert device.plugged_size == 4 * BLOCK
    driver.memory.write(BASE, b"\x55" * (4 * BLOCK))  # the guest uses the memory
    resident = measure([("r", region.mapping.address, region.size)])[0].resident
    assert resident == 4 * BLOCK
    assert request(driver, vm_.REQ_STATE, BASE, 4) == (vm_.RESP_ACK, vm_.STATE_PLUGGED)
    assert request(driver, vm_.REQ_STATE, BASE, 5) == (vm_.RESP_ACK, vm_.STATE_MIXED)
    assert request(driver, vm_.REQ_STATE, BASE + 4 * BLOCK, 2) == \
        (vm_.RESP_ACK, vm_.STATE_UNPLUGGED)
    assert request(driver, vm_.REQ_UNPLUG, BASE + 2 * BLOCK, 2) == (vm_.RESP_ACK, 0)
    resident = measure([("r", region.mapping.address, region.size)])[0].resident
    assert resident == 2 * BLOCK and release.released == 2 * BLOCK
    assert driver.memory.read(BASE + 2 * BLOCK, 16) == bytes(16)  # reads as zeros, untouched
    assert request(driver, vm_.REQ_UNPLUG_ALL) == (vm_.RESP_ACK, 0)
    assert measure([("r", region.mapping.address, region.size)])[0].resident == 0
    assert device.plugged_size == 0
    assert device.stats()["unplugged_blocks"] == 4


@pytest.mark.parametrize("kind, address, blocks, answer", [
    (vm_.REQ_PLUG, BASE + 1, 1, vm_.RESP_ERROR),  # unaligned
    (vm_.REQ_PLUG, BASE - BLOCK, 1, vm_.RESP_ERROR),  # below the region
    (vm_.REQ_PLUG, BASE + 15 * BLOCK, 2, vm_.RESP_ERROR),  # past its end
    (vm_.REQ_PLUG, BASE, 0, vm_.RESP_ERROR),  # no blocks
    (vm_.REQ_PLUG, BASE, 9, vm_.RESP_NACK),  # beyond the requested size
    (vm_.REQ_UNPLUG, BASE, 1, vm_.RESP_ERROR),  # not plugged
    (vm_.REQ_STATE, BASE + BLOCKS * BLOCK, 1, vm_.RESP_ERROR),
    (7, BASE, 1, vm_.RESP_ERROR),  # unknown request
    (vm_.REQ_PLUG, 2**64 - BLOCK, 0xFFFF, vm_.RESP_ERROR),  # wraps
])
def test_bad_requests_get_the_spec_answer(rig, kind, address, blocks, answer) -> None:
    device, driver, *_ = rig
    assert request(driver, kind, address, blocks)[0] == answer
    assert device.plugged_size == 0


def test_overlapping_plug_is_an_error(rig) -> None:
    device, driver, *_ = rig
    assert request(driver, vm_.REQ_PLUG, BASE, 2)[0] == vm_.RESP_ACK
    assert request(driver, vm_.REQ_PLUG, BASE + BLOCK, 2)[0] == vm_.RESP_ERROR
    assert device.plugged_size == 2 * BLOCK


def test_resize_changes_config_and_interrupts(rig) -> None:
    device, driver, *_ = rig
    generation = driver.reg(m.CONFIG_GENERATION)
    device.set_requested(2 * BLOCK)
    assert config(driver)[6] == 2 * BLOCK
    assert driver.reg(m.CONFIG_GENERATION) == generation + 1
    assert driver.reg(m.INTERRUPT_STATUS) & m.CONFIG_CHANGE
    with pytest.raises(ConfigError, match="multiple of the block size"):
        device.set_requested(BLOCK + 1)
    with pytest.raises(ConfigError, match="from 0 to the region"):
        device.set_requested((BLOCKS + 1) * BLOCK)


def test_short_buffers_break_the_protocol(rig) -> None:
    device, driver, *_ = rig
    driver.submit([b"\0" * 8], [vm_.RESPONSE.size])
    assert driver.reg(m.STATUS) & m.DEVICE_NEEDS_RESET
    assert driver.start()
    driver.submit([vm_.REQUEST.pack(vm_.REQ_PLUG, BASE, 1)], [4])
    assert "needs 24 and 10" in driver.t.errors[-1]


def test_answer_into_unplugged_memory_is_refused(rig) -> None:
    """A hostile driver points the answer buffer at an unplugged block: refused, no page of
    the region is populated by the device."""
    device, driver, region, _ = rig
    driver.submit([vm_.REQUEST.pack(vm_.REQ_STATE, BASE, 1)], [vm_.RESPONSE.size])
    [(_, _)] = driver.used()
    from leanvm.devices.virtio.queue import DESC
    driver.memory.write(0x1000 + 16, DESC.pack(BASE + BLOCK, 10, 2, 0))  # descriptor 1
    driver.memory.write_int(0x3000 + 4 + 2, 2, 0)
    driver.avail_idx += 1
    driver.memory.write_int(0x3000 + 2, 2, driver.avail_idx)
    driver.set(m.QUEUE_NOTIFY, 0)
    assert driver.reg(m.STATUS) & m.DEVICE_NEEDS_RESET
    assert measure([("r", region.mapping.address, region.size)])[0].resident == 0


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 5]), st.integers(-2, BLOCKS + 2),
                          st.integers(0, BLOCKS + 2), st.integers(0, BLOCKS)), max_size=30))
def test_random_requests_match_a_model(rig, ops) -> None:
    """Any request stream: the device's answers and state follow the spec's rules (a model
    written from 5.15.6 here, independently of the device's code)."""
    device, driver, region, _ = rig
    request(driver, vm_.REQ_UNPLUG_ALL)
    device.set_requested(8 * BLOCK)
    plugged = [False] * BLOCKS
    for kind, first, count, requested in ops:
        if kind == 5:  # the host resizes
            device.set_requested(requested * BLOCK)
            continue
        answer, state = request(driver, kind, BASE + first * BLOCK, count)
        valid = count > 0 and first >= 0 and first + count <= BLOCKS
        blocks = plugged[first:first + count] if valid else []
        if kind == vm_.REQ_UNPLUG_ALL:
            expected, plugged = (vm_.RESP_ACK, 0), [False] * BLOCKS
        elif not valid:
            expected = (vm_.RESP_ERROR, 0)
        elif kind == vm_.REQ_STATE:
            expected = (vm_.RESP_ACK, vm_.STATE_PLUGGED if all(blocks) else
                        vm_.STATE_UNPLUGGED if not any(blocks) else vm_.STATE_MIXED)
        elif kind == vm_.REQ_PLUG and (sum(plugged) + count) * BLOCK > device.requested_size:
            expected = (vm_.RESP_NACK, 0)
        elif (kind == vm_.REQ_PLUG and any(blocks)) or (kind == vm_.REQ_UNPLUG and
                                                        not all(blocks)):
            expected = (vm_.RESP_ERROR, 0)
        else:
            expected = (vm_.RESP_ACK, 0)
            plugged[first:first + count] = [kind == vm_.REQ_PLUG] * count
        assert (answer, state) == expected, (kind, first, count)
        assert device.plugged_size == sum(plugged) * BLOCK
    assert device.discard.bitmap() == bytes(plugged)
