"""virtio-mem on the minimal kernel (it has virtio_mmio and virtio_mem built in): Linux finds
the device through leanvm's ACPI DSDT (or through virtio_mmio.device= on its command line),
plugs the requested size at boot, unplugs after a resize to less (the VMM discards: the
region's host pages go) and plugs again after a resize to more.

This host cannot run guest system calls, so the guest's init (tests/guests/init/spin.c)
spins in user mode and the kernel's virtio-mem worker does the rest. Nothing in the guest
writes the plugged memory here, so the test makes its pages present from the VMM's side by
reading them (each maps the host's zero page: present in pagemap, and harmless to the
guest); an unplug must make every page of the unplugged blocks absent again. The nested
tier (tests/kvm/test_userspace.py) has a guest that fills the memory itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from leanvm.machine.machine import Machine

pytestmark = pytest.mark.slow

MB = 1 << 20
CMDLINE = "console=ttyS0 rodata=off"
PROBED = "virtio_mem virtio0: start address: 0x"
WAIT = 240  # s for the guest to reach a size (about 25 s at boot here, 5-20 s after a resize)


def wait_plugged(vm: Machine, size: int) -> float:
    handle = vm.virtio_mem[0]
    start = time.monotonic()
    while handle.plugged_size != size:
        if time.monotonic() - start > WAIT:
            pytest.fail(f"the guest plugged {handle.plugged_size >> 20}M, not {size >> 20}M, "
                        f"in {WAIT} s:\n{vm.console[-3000:].decode(errors='replace')}")
        time.sleep(0.2)
    return time.monotonic() - start


def test_guest_plugs_unplugs_and_the_host_gets_the_pages_back(minimal_kernel: Path,
                                                               spin_initrd: Path) -> None:
    with Machine(memory="256M,maxmem=1280M", kernel=minimal_kernel, initrd=spin_initrd,
                 cmdline=CMDLINE, virtio_mem=("size=512M,requested=128M",)) as vm:
        handle = vm.virtio_mem[0]
        assert handle.address == 1 << 32 and handle.plugged_size == 0
        sizes: list[dict] = []  # QMP's MEMORY_DEVICE_SIZE_CHANGE, at most one a second
        vm.events.listen(lambda event: sizes.append(event.data)
                         if event.name == "MEMORY_DEVICE_SIZE_CHANGE" else None)
        vm.start(timeout=900)
        wait_plugged(vm, 128 * MB)
        deadline = time.monotonic() + 5
        while (not sizes or sizes[-1]["size"] != 128 * MB) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sizes and sizes[-1] == {"id": handle.name, "size": 128 * MB,
                                       "qom-path": f"/machine/peripheral/{handle.name}"}, sizes
        console = vm.console.decode(errors="replace")
        assert f"{PROBED}{handle.address:x}" in console  # found through ACPI
        assert "virtio_mmio.device" not in vm.kernel_cmdline
        state = handle.state()
        assert sum(state) * handle.block_size == 128 * MB
        for index, plugged in enumerate(state):  # make every plugged page present
            if plugged:
                vm.memory.read(handle.address + index * handle.block_size, handle.block_size)
        assert handle.resident() >= 128 * MB
        handle.resize("64M")
        seconds = wait_plugged(vm, 64 * MB)
        assert handle.resident() <= 64 * MB  # the unplugged half went back to the host
        assert handle.resident_unplugged() == 0
        unplugged = next(i for i, b in enumerate(handle.state()) if not b)
        before = handle.resident_unplugged()
        assert vm.memory.read(handle.address + unplugged * handle.block_size, 4096) == bytes(4096)
        assert handle.resident_unplugged() == before == 0  # a debug read populated nothing
        handle.resize(192 * MB)
        wait_plugged(vm, 192 * MB)
        stats = vm.virtio.stats()[0]
        vm.stop("test done")
        result = vm.wait(60)
    assert stats["requests"].get("plug ack", 0) >= 2 and stats["requests"].get("unplug ack")
    assert not stats.get("errors"), stats
    assert stats["wiring"] == "eventfd"
    # notifications came through ioeventfd: the only MMIO writes are the driver's set-up
    assert result.exit_kinds.get("mmio-write", 0) < stats["notifies"] + 40
    print(f"\nvirtio-mem: plugged 128M at boot, 64M {seconds:.1f} s after the resize; "
          f"unplug {stats['unplug_ns_per_block'] / 1000:.1f} us per block; requests "
          f"{stats['requests']}")


def test_linux_finds_the_device_from_its_command_line(minimal_kernel: Path,
                                                       spin_initrd: Path) -> None:
    with Machine(memory="256M,maxmem=768M", kernel=minimal_kernel, initrd=spin_initrd,
                 cmdline=CMDLINE, virtio_mem=("size=256M,requested=64M",),
                 virtio_discovery="cmdline") as vm:
        assert "virtio_mmio.device=512@0xd0000000:5" in vm.kernel_cmdline
        vm.start(timeout=900)
        wait_plugged(vm, 64 * MB)
        vm.stop("test done")
        vm.wait(60)
        assert PROBED in vm.console.decode(errors="replace")


def test_a_guest_reset_touches_no_unplugged_memory() -> None:
    """The bundled demo guest ends with an i8042 reset, which stops a leanvm VM (it does not
    reboot in place): across the reset and the stop nothing writes or reads the region, so
    its host pages stay absent, plugged or not."""
    with Machine(memory="128M,maxmem=1152M", virtio_mem=("size=1G,requested=512M",)) as vm:
        handle = vm.virtio_mem[0]
        result = vm.run(timeout=60)
        stats = vm.virtio.stats()[0]
        assert handle.resident() == 0
    assert result.reason.value == "reset", result.detail
    assert stats["resident"] == stats["resident_unplugged"] == 0
    assert stats["plugged_size"] == 0 and stats["requests"] == {}  # no driver in this guest
