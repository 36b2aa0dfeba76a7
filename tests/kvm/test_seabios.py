"""Real firmware from Debian's seabios package, booted from leanvm's flash (issue #5, in
progress): SeaBIOS runs from the reset vector, talks through the debug console and finds
fw_cfg with DMA and leanvm's e820 map."""

from __future__ import annotations

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
        result = vm.run(timeout=8)
        log = vm.debug_console.decode(errors="replace")
    assert log.startswith("SeaBIOS (version ")
    assert "Found QEMU fw_cfg" in log
    assert "QEMU fw_cfg DMA interface supported" in log
    assert "qemu/e820: addr 0x0000000000000000 len 0x0000000008000000 [RAM]" in log
    # until the i440FX bridge and its PAM registers exist, SeaBIOS cannot shadow itself
    assert result.reason in (StopReason.TIMEOUT, StopReason.RESET, StopReason.SHUTDOWN)
