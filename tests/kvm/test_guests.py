"""Bare guests on real KVM: console, RAM, MMIO, read-only memslots, reset, internal errors."""

from __future__ import annotations

import os
import struct

import pytest

from leanvm.machine.machine import Machine, RunState
from leanvm.machine.vcpu_loop import StopReason
from leanvm.memory.host import map_anonymous

MiB = 1 << 20


def test_guest_prints_through_the_uart(guest) -> None:
    with Machine(memory="32M", guest=guest("hello"), args="alpha beta") as vm:
        result = vm.run(timeout=30)
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0
    text = vm.console.decode()
    assert "hello from a bare guest" in text
    assert f"args=[alpha beta] len=10 ram={32 * MiB} magic=0x00000000424d564c" in text
    assert vm.state is RunState.CLOSED


def test_elf_guest_runs_the_same(guest) -> None:
    with Machine(memory="16M", guest=guest("hello", "elf"), args="elf") as vm:
        result = vm.run(timeout=30)
        assert result.status == 0 and "args=[elf]" in vm.console.decode()
        assert vm.image.kind == "elf"


def test_host_and_guest_see_each_others_ram_writes(guest) -> None:
    with Machine(memory="16M", guest=guest("ram")) as vm:
        vm.memory.write(0x200000, struct.pack("<Q", 0x1122334455667788))
        result = vm.run(timeout=30)
        assert result.status == 0, "the guest did not see the host's write"
        assert vm.memory.read_u64(0x200008) == 0x1122334455667788 ^ (2**64 - 1)
        assert vm.memory.read(0x200010, 5) == b"tseug"  # "guest" as a little-endian u64


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return (0x0807060504030201 + offset) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_mmio_of_every_size_reaches_the_device_at_its_offset(guest) -> None:
    dev = Recorder()
    with Machine(memory="16M", guest=guest("mmio")) as vm:
        vm.add_mmio_device(0xD0000000, 0x1000, dev, "test-device")
        result = vm.run(timeout=30)
        assert result.status == 0, f"guest saw wrong read values (failure bits {result.status:#x})"
        assert dev.writes == [(0x01, 1, 0x11), (0x12, 2, 0x2222), (0x24, 4, 0x33333333),
                              (0x48, 8, 0x4444444444444444)]
        assert dev.reads == [(0x03, 1), (0x14, 2), (0x28, 4), (0x50, 8)]
        assert vm.mmio_bus.unclaimed_reads == 1  # the read past the device's end


def test_write_to_a_readonly_memslot_arrives_as_mmio(guest) -> None:
    dev = Recorder()
    rom = map_anonymous(64 * 1024)
    view = rom.view()
    view[:] = b"\x5a" * len(view)
    view[0:8] = struct.pack("<Q", 0x1122334455667788)
    view.release()
    with Machine(memory="16M", guest=guest("romwrite")) as vm:
        vm.add_region("rom", 0xE0000000, rom, readonly=True)
        vm.add_mmio_device(0xE0000000, 64 * 1024, dev, "rom-writes")
        result = vm.run(timeout=30)
        assert result.status == 0, f"failure bits {result.status:#x}"
        assert dev.writes == [(0x10, 1, 0xAB), (0x20, 4, 0xDEADBEEF)]
        assert dev.reads == []  # reads were served from memory, without exits
        assert vm.memory.read(0xE0000010, 1) == b"\x5a"


def test_i8042_reset_stops_the_vm_cleanly(guest) -> None:
    with Machine(memory="16M", guest=guest("reset")) as vm:
        result = vm.run(timeout=30)
        assert result.reason is StopReason.RESET and result.exit_code == 0
        assert vm.platform.i8042.resets == 1
        assert "resetting" in vm.console.decode()
        assert vm.state is RunState.STOPPED


def test_internal_error_is_reported_with_the_instruction_bytes(guest) -> None:
    """INT3 at CPL 0 with no IDT. On this host's KVM, which emulates supervisor code, that
    is an emulation failure; on hardware KVM the #BP with no IDT ends in a triple fault."""
    with Machine(memory="16M", guest=guest("int3"), emulation_fallback="off") as vm:
        result = vm.run(timeout=30)
    assert "before int3" in vm.console.decode() and "after" not in vm.console.decode()
    if result.reason is StopReason.SHUTDOWN:
        pytest.skip("this host's KVM delivers INT3 itself (triple fault with no IDT)")
    assert result.reason is StopReason.INTERNAL_ERROR
    assert result.detail.startswith("KVM internal error (emulation failure) at RIP 0x10")
    assert "instruction bytes cc" in result.detail
    assert result.rip is not None and result.exit_code == 3


def test_serial_input_reaches_the_guest(guest) -> None:
    with Machine(memory="16M", guest=guest("echo")) as vm:
        vm.send_input(b"leanvm rocks\n")
        result = vm.run(timeout=30)
    assert result.status == len("leanvm rocks")
    assert "LEANVM ROCKS" in vm.console.decode()


@pytest.mark.parametrize("mode", ["spin", "halt"])
def test_timeout_stops_a_guest_that_never_exits(guest, mode: str) -> None:
    with Machine(memory="16M", guest=guest("spin"), args=mode) as vm:
        result = vm.run(timeout=0.5)
    assert result.reason is StopReason.TIMEOUT and result.exit_code == 124
    assert 0.4 < (result.stopped_ns - result.first_entry_ns) / 1e9 < 10


def test_ioeventfd_counts_guest_writes_without_exits(guest) -> None:
    with Machine(memory="16M", guest=guest("portloop"), args="50") as vm:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            vm.vm.ioeventfd(0x80, 4, fd, pio=True)
            result = vm.run(timeout=30)
            assert result.status == 0
            assert os.eventfd_read(fd) == 50
            assert vm.pio_bus.unclaimed[0x80] == 0  # none of them reached user space
        finally:
            os.close(fd)


def test_without_ioeventfd_the_same_writes_exit(guest) -> None:
    with Machine(memory="16M", guest=guest("portloop"), args="50") as vm:
        result = vm.run(timeout=30)
        assert vm.pio_bus.unclaimed[0x80] == 50 and result.exits >= 50


def test_exits_are_counted_by_kind_port_and_device(guest) -> None:
    with Machine(memory="16M", guest=guest("portloop"), args="50") as vm:
        result = vm.run(timeout=30)
        figures = result.stats()
    assert result.exit_kinds["pio-out"] == sum(
        row["out"] for row in figures["exits_by"]["ports"]) >= 51  # 50 + the exit port
    ports = {row["port"]: row for row in figures["exits_by"]["ports"]}
    assert ports["0x80"]["out"] == 50 and ports["0x80"]["device"] is None  # nothing there
    assert ports["0xf4"]["device"] == "debug-exit" and ports["0xf4"]["out"] == 1
    assert sum(result.exit_kinds.values()) == result.exits
    assert result.busiest[0] == ("port 0x80", 50)


def test_console_writes_queued_by_kvm_arrive_in_order_and_cut_the_exits(guest) -> None:
    """With coalesced I/O the UART's transmit writes do not exit: the demo's bytes reach
    the console at its next exit (its line-status polls), in order, with half the exits."""
    counts = {}
    for coalesced in (True, False):
        with Machine(memory="32M", guest=guest("hello"), args="x",
                     coalesced_io=coalesced) as vm:
            result = vm.run(timeout=30)
            kicks = (result.exit_kinds or {}).get("interrupted", 0)  # the flusher's, if any
            counts[coalesced] = (result.exits - kicks, result.coalesced, vm.console)
    (with_exits, queued, text), (without_exits, none, plain) = counts[True], counts[False]
    assert text == plain and b"hello from a bare guest" in text
    assert none == 0
    if queued:  # KVM here queues port writes (KVM_CAP_COALESCED_PIO)
        assert queued == len(text) and without_exits - with_exits == queued


def test_queued_writes_reach_the_console_when_the_guest_stops_exiting(guest) -> None:
    """A guest that fills the UART without polling and then halts makes no exit: the
    flusher kicks it, so its bytes still arrive (machine/flusher.py)."""
    with Machine(memory="32M", guest=guest("quietwrite"), args="no exit after this") as vm:
        vm.start(timeout=20)
        vm.wait_for_console("no exit after this", timeout=10)
        vm.stop("seen")
        result = vm.wait(10)
    assert result.reason is StopReason.INTERRUPTED


def test_the_tsc_frequency_is_reported_and_set_only_where_kvm_can(guest) -> None:
    from leanvm.abi.kvm import KVM_CAP_TSC_CONTROL
    from leanvm.errors import ConfigError
    from leanvm.kvm.system import Kvm

    with Machine(memory="16M", guest=guest("hello")) as vm:
        host_khz = vm.run(timeout=30).stats()["tsc_khz"]
    assert host_khz and host_khz > 100_000  # a TSC of some hundred MHz at least
    with Kvm() as kvm:
        can_set = bool(kvm.check_extension(KVM_CAP_TSC_CONTROL))
    wanted = host_khz // 2
    if not can_set:
        with pytest.raises(ConfigError, match="cannot set the guest's TSC frequency"):
            with Machine(memory="16M", guest=guest("hello"), tsc_khz=wanted):
                pass  # refused while building; the with-block gives everything back
        return
    with Machine(memory="16M", guest=guest("hello"), tsc_khz=wanted) as vm:
        assert vm.run(timeout=30).stats()["tsc_khz"] == wanted
