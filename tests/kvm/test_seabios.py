"""Real firmware from Debian's seabios package, booted from leanvm's flash: SeaBIOS runs
from the reset vector, shadows itself through the i440FX PAM registers, finds fw_cfg with
DMA and leanvm's e820 map, and with nothing to boot reaches "No bootable device", where
leanvm stops the VM cleanly."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason

SEABIOS = Path("/usr/share/seabios/bios.bin")


@pytest.mark.slow
def test_seabios_starts_from_flash_and_finds_fw_cfg() -> None:
    if not SEABIOS.exists():
        pytest.skip("Debian's seabios package is not installed (make test installs it)")
    with Machine(memory="128M", bios=SEABIOS) as vm:
        assert vm.flash_banks[0].base == (1 << 32) - SEABIOS.stat().st_size
        result = vm.run(timeout=120)
        log = vm.debug_console.decode(errors="replace")
        assert vm.bios_area is not None and vm.bios_area.pam[0] & 0x30  # shadowed, then locked
        segment = vm.memory.read(0xF0000, 0x10000)
        anchor = segment.find(b"_SM_")
        assert anchor >= 0 and anchor % 16 == 0
        length, address = struct.unpack_from("<HI", segment, anchor + 0x16)
        smbios = vm.memory.read(address, length)
    assert log.startswith("SeaBIOS (version ")
    assert "Running on QEMU (i440fx)" in log
    assert "QEMU fw_cfg DMA interface supported" in log
    assert "3: 0000000000100000 - 0000000008000000 = 1 RAM" in log
    assert "4: 00000000feffc000 - 00000000ff000000 = 2 RESERVED" in log
    assert b"leanvm\0" in smbios and smbios[0] == 0  # SeaBIOS's type 0, then leanvm's tables
    assert "PS2 keyboard initialized" in log and "Timeout at ps2" not in log
    assert result.reason is StopReason.NO_BOOT_DEVICE and result.exit_code == 0
    assert "No bootable device" in result.detail


@pytest.mark.slow
def test_seabios_counts_every_vcpu_and_boots_with_the_aps_parked() -> None:
    if not SEABIOS.exists():
        pytest.skip("Debian's seabios package is not installed (make test installs it)")
    with Machine(memory="64M", bios=SEABIOS, smp=3) as vm:
        result = vm.run(timeout=120)
        log = vm.debug_console.decode(errors="replace")
    # SeaBIOS wakes the APs with INIT-SIPI-SIPI (the in-kernel LAPIC, one host thread each)
    # and counts them against fw_cfg's CPU count.
    assert "Found 3 cpu(s) max supported 3 cpu(s)" in log, log[-2000:]
    assert result.reason is StopReason.NO_BOOT_DEVICE and result.exit_code == 0
