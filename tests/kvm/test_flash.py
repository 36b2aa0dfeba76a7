"""Flash banks on KVM: a guest drives the CFI01 command set through real MMIO."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanvm.machine.flash import FlashSpec
from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason

KiB = 1 << 10
FOUR_GIB = 1 << 32


def results(console: str) -> dict[str, int]:
    out = {}
    for line in console.splitlines():
        key, eq, value = line.strip().partition("=")
        if eq:
            out[key] = int(value, 16)
    return out


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path, bytes]:
    code = tmp_path / "code.fd"
    pattern = bytes((i * 7) & 0xFF for i in range(128 * KiB))
    code.write_bytes(pattern)
    vars_ = tmp_path / "vars.fd"
    vars_.write_bytes(b"\x11" * (64 * KiB))
    return code, vars_, pattern


def run_flash_guest(guest, code: Path, vars_: Path, mode: str) -> tuple[dict[str, int], Machine]:
    specs = (FlashSpec("code", code, "readonly"), FlashSpec("vars", vars_, mode, size=128 * KiB))
    vars_base = FOUR_GIB - 128 * KiB - 128 * KiB
    vm = Machine(memory="16M", guest=guest("flash"), args=f"{vars_base:#x} {64 * KiB:#x}",
                 flash=specs)
    with vm:
        before = vm.vm.memslot_changes
        result = vm.run(timeout=60)
        assert result.reason is StopReason.GUEST_EXIT and result.status == 0, result.detail
        vm.memslot_changes_during_run = vm.vm.memslot_changes - before  # type: ignore[attr-defined]
        vm.romd_switches = vm.flash_banks[1].device.romd_switches  # type: ignore[attr-defined]
        vm.flushes = vm.flash_banks[1].flushes  # type: ignore[attr-defined]
    return results(vm.console.decode()), vm


def test_command_set_through_mmio_and_persistence(guest, images) -> None:
    code, vars_, pattern = images
    seen, vm = run_flash_guest(guest, code, vars_, "persistent")
    assert seen["array0"] == 0x11 and seen["array0_after_query"] == 0x11
    assert seen["qry"] == int.from_bytes(b"QRY", "big") and seen["pri"] == int.from_bytes(b"PRI", "big")
    assert seen["size_log2"] == 17  # a 128 KiB bank
    assert seen["blocks_minus_1"] == 31 and seen["block_size_256"] == 0x10
    assert seen["buffer_log2"] == 8 and seen["id"] == 0
    assert (seen["program_status"], seen["programmed"]) == (0x80, 0x5A)
    assert (seen["buffer_status"], seen["buffered"]) == (0x80, int.from_bytes(b"leanvm!!", "little"))
    assert (seen["erase_status"], seen["erased"]) == (0x80, 0xFFFF)
    assert (seen["locked_status"], seen["lock_kept"]) == (0x92, 0x11)
    assert (seen["past_status"], seen["past_read"]) == (0x90, 0xFF)
    assert seen["isa_window"] == seen["top_of_4g"] == pattern[-0x10]

    data = vars_.read_bytes()
    assert len(data) == 64 * KiB
    assert data[0x100] == 0x5A and data[0x200:0x208] == b"leanvm!!"
    assert data[0x3000:0x4000] == b"\xff" * 4096
    expected = bytearray(b"\x11" * (64 * KiB))
    expected[0x100] = 0x5A
    expected[0x200:0x208] = b"leanvm!!"
    expected[0x3000:0x4000] = b"\xff" * 4096
    assert data == bytes(expected)
    assert code.read_bytes() == pattern
    assert not (vars_.parent / "vars.fd.journal").exists()
    # each command sequence unmaps the bank once and maps it back once: no churn
    assert vm.memslot_changes_during_run == vm.romd_switches == 16  # 8 sequences x 2
    assert vm.flushes == 3  # program, buffer, erase: each persisted when it ended


def test_ephemeral_store_accepts_writes_and_forgets_them(guest, images) -> None:
    code, vars_, _ = images
    seen, _ = run_flash_guest(guest, code, vars_, "ephemeral")
    assert seen["programmed"] == 0x5A and seen["erased"] == 0xFFFF
    assert vars_.read_bytes() == b"\x11" * (64 * KiB)


def test_readonly_store_refuses_writes(guest, images) -> None:
    code, vars_, _ = images
    seen, _ = run_flash_guest(guest, code, vars_, "readonly")
    assert seen["program_status"] == 0x92 and seen["programmed"] == 0x11
    assert seen["erase_status"] & 0x22 == 0x22 and seen["erased"] == 0x1111
    assert vars_.read_bytes() == b"\x11" * (64 * KiB)


def test_flash_configuration_errors_name_the_file(tmp_path: Path) -> None:
    from leanvm.errors import ConfigError

    odd = tmp_path / "odd.fd"
    odd.write_bytes(bytes(1000))
    big = tmp_path / "big.fd"
    big.write_bytes(bytes(12 << 20))
    cases = [
        ((FlashSpec("code", tmp_path / "missing.fd"),), "missing.fd: no such flash image"),
        ((FlashSpec("code", odd),), "odd.fd: size 1000 is not a non-zero multiple"),
        ((FlashSpec("code", big),), "combined size of system firmware exceeds 8388608 bytes"),
        ((FlashSpec("code", odd, size=4096),), "odd.fd: size 1000"),
        ((FlashSpec("vars", odd),), "needs a code flash"),
    ]
    for specs, message in cases:
        with pytest.raises(ConfigError, match=message):
            Machine(memory="16M", flash=specs).build()


def test_a_bank_0_sequence_costs_four_memslot_changes(guest, tmp_path: Path) -> None:
    """Bank 0 shows through the BIOS area at 0xE0000-0xFFFFF as an alias, so that window
    follows the bank into a command mode and back: two changes for the bank, two for the
    alias (bank 1 costs two: test_command_set_through_mmio_and_persistence)."""
    code = tmp_path / "code.fd"
    code.write_bytes(bytes([0x0F, 0xF0, 0x33, 0x01]) * (32 * KiB))  # 128 KiB
    base = FOUR_GIB - 128 * KiB
    with Machine(memory="32M", guest=guest("flashpop"), args=f"{base:#x}",
                 flash=(FlashSpec("code", code, "readonly"),)) as vm:
        before = vm.vm.memslot_changes
        result = vm.run(timeout=60)
        changes = vm.vm.memslot_changes - before
        switches = vm.flash_banks[0].device.romd_switches
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0, result.detail
    assert switches == 2  # one command sequence: read status, then read array
    assert changes == 2 * switches
