"""What Linux needs from the platform, on real KVM: an ACPI S5 power-off, several vCPUs started
by the guest with INIT-SIPI-SIPI, and ACPI tables handed over in both direct-boot modes."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason

REPORT_PORT = 0x700  # where the smp guest's APs report (marker, x2APIC id, APIC id)


# --- power-off ---------------------------------------------------------------------------
def test_guest_powers_off_through_pm1a_control(guest) -> None:
    with Machine(memory="16M", guest=guest("poweroff")) as vm:
        result = vm.run(timeout=30)
    console = vm.console.decode()
    assert result.reason is StopReason.POWEROFF, (result.detail, console)
    assert result.detail == "the guest powered off (ACPI S5)" and result.exit_code == 0
    assert "still running" not in console
    match = re.search(r"pm1a_cnt 0x0*1 timer (\d+) (\d+)", console)
    assert match, console  # SCI_EN reads as 1
    assert int(match[2]) > int(match[1])  # the PM timer runs


def test_leanvm_run_exits_0_on_power_off(guest) -> None:
    done = subprocess.run([sys.executable, "-m", "leanvm", "run", "--guest",
                           str(guest("poweroff")), "--timeout", "30"], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert "guest stopped: poweroff: the guest powered off (ACPI S5)" in done.stderr


# --- SMP ---------------------------------------------------------------------------------
class Reports:
    """A port device recording what each AP writes, and on which host thread."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.seen.append((value, threading.get_ident()))


@pytest.mark.parametrize("cpus", [2, 3, 4])
def test_the_bsp_starts_every_ap_and_each_runs_on_its_own_thread(guest, cpus: int) -> None:
    reports = Reports()
    with Machine(memory="32M", guest=guest("smp"), smp=cpus) as vm:
        assert len(vm.vcpus) == cpus and vm.vcpus[0] is vm.vcpu
        assert [v.id for v in vm.vcpus] == list(range(cpus))
        vm.add_pio_device(REPORT_PORT, 4, reports, "ap-reports")
        result = vm.run(timeout=120)
        accesses = vm.pio_bus.accesses + vm.mmio_bus.accesses
    console = vm.console.decode()
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0, (result.detail, console)
    assert f"bsp apic 0 cpuid 0 cpus {cpus}\r\n" in console  # CPUID leaf 0xB: N cores
    assert f"aps {cpus - 1}\r\n" in console
    for apic in range(1, cpus):  # leaf 1 APIC id == leaf 0xB x2APIC id == vCPU index
        assert f"ap {apic} report 0x00000000a500{apic:02x}{apic:02x}" in console
    values = sorted(value for value, _ in reports.seen)
    assert values == [0xA5000000 | apic << 8 | apic for apic in range(1, cpus)]
    threads = {thread for _, thread in reports.seen}
    assert len(threads) == cpus - 1 and threading.get_ident() not in threads
    # every vCPU's exits are counted: each port/MMIO access was one exit, but for the
    # console writes KVM queued (coalesced I/O, no exit); besides, an AP's KVM_RUN returns
    # EAGAIN once when its SIPI arrives, and each vCPU may be interrupted once when the VM
    # stops (or by the flusher)
    exited = accesses - result.coalesced
    kicks = (result.exit_kinds or {}).get("interrupted", 0)
    assert exited <= result.exits <= exited + 2 * cpus + kicks


def test_an_ap_can_stop_the_vm_while_the_bsp_spins(guest) -> None:
    with Machine(memory="32M", guest=guest("smp"), smp=2, args="ap-exit") as vm:
        started = time.monotonic()
        result = vm.run(timeout=60)
    assert result.reason is StopReason.GUEST_EXIT and result.status == 0x41, result.detail
    assert time.monotonic() - started < 30


def test_a_triple_fault_on_an_ap_stops_the_whole_vm(guest) -> None:
    """(Which vCPU KVM reports the shutdown on is KVM's choice: here it is vCPU 0.)"""
    with Machine(memory="32M", guest=guest("smp"), smp=3, args="ap-fault") as vm:
        result = vm.run(timeout=60)
    assert result.reason is StopReason.SHUTDOWN and result.exit_code == 3, result.detail
    assert not [t for t in threading.enumerate() if t.name.startswith("leanvm-vcpu")]


def test_a_device_error_on_an_ap_thread_reaches_the_caller(guest) -> None:
    class Failing(Reports):
        def write(self, offset: int, size: int, value: int) -> None:
            raise RuntimeError("device model bug")

    with Machine(memory="32M", guest=guest("smp"), smp=3, args="ap-exit") as vm:
        vm.add_pio_device(REPORT_PORT, 4, Failing(), "failing")
        with pytest.raises(RuntimeError, match="device model bug"):
            vm.run(timeout=60)
        assert vm.state.value == "stopped"
    assert not [t for t in threading.enumerate() if t.name.startswith("leanvm-vcpu")]


@pytest.mark.parametrize("mode", ["spin", "halt"])
def test_timeout_stops_a_spinning_bsp_and_aps_waiting_for_sipi(guest, mode: str) -> None:
    with Machine(memory="32M", guest=guest("spin"), smp=3, args=mode) as vm:
        started = time.monotonic()
        result = vm.run(timeout=0.5)
        elapsed = time.monotonic() - started
    assert result.reason is StopReason.TIMEOUT and result.exit_code == 124
    assert elapsed < 10
    assert not [t for t in threading.enumerate() if t.name.startswith("leanvm-vcpu")]


def test_stop_from_another_thread_reaches_every_vcpu(guest) -> None:
    with Machine(memory="32M", guest=guest("spin"), smp=2, args="halt") as vm:
        vm.start()
        time.sleep(0.3)
        vm.stop("enough")
        result = vm.wait(timeout=10)
    assert result.reason is StopReason.INTERRUPTED and result.detail == "enough"


def test_ctrl_c_stops_every_vcpu(guest) -> None:
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "leanvm", "run", "--guest", str(guest("spin")), "--smp", "3",
         "--args", "halt"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited SIG_IGN
    try:
        for _ in range(200):  # until the guest runs: it prints first
            if process.stdout is not None and process.stdout.readline():
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted by the user (Ctrl-C)" in err


def test_one_vcpu_machines_have_no_extra_threads(guest) -> None:
    with Machine(memory="16M", guest=guest("hello")) as vm:
        assert len(vm.vcpus) == 1
        result = vm.run(timeout=30)
    assert result.status == 0


# --- the RSDP the test kernel is given -----------------------------------------------------
def check_tables(vm: Machine, rsdp: int, cpus: int) -> None:
    """Read the tables from guest memory, as the kernel would."""
    memory = vm.memory
    header = memory.read(rsdp, 36)
    assert header[:8] == b"RSD PTR " and sum(header[:20]) % 256 == 0 and sum(header) % 256 == 0
    xsdt_address = struct.unpack_from("<Q", header, 24)[0]

    def table(address: int) -> bytes:
        length = struct.unpack("<I", memory.read(address + 4, 4))[0]
        data = memory.read(address, length)
        assert sum(data) % 256 == 0, data[:4]
        return data

    xsdt = table(xsdt_address)
    pointed = [table(a) for a in struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)]
    assert [t[:4] for t in pointed] == [b"FACP", b"APIC"]
    fadt, madt = pointed
    assert table(struct.unpack_from("<Q", fadt, 140)[0])[:4] == b"DSDT"
    assert madt.count(bytes([0, 8])) >= cpus  # one Processor Local APIC entry per vCPU
    lapics = [madt[i + 3] for i in range(44, len(madt), 8) if madt[i:i + 2] == bytes([0, 8])]
    assert lapics[:cpus] == list(range(cpus))


@pytest.mark.parametrize("boot", ["bzimage", "pvh"])
def test_the_test_kernel_is_given_the_rsdp(test_kernel: Path, boot: str, tmp_path: Path,
                                           monkeypatch) -> None:
    monkeypatch.setenv("LEANVM_CACHE", str(tmp_path))
    kwargs = {"kernel_boot": "bzimage"} if boot == "bzimage" else {}
    with Machine(memory="64M", kernel=test_kernel, cmdline="acpi", smp=2, **kwargs) as vm:
        assert vm.direct_boot is not None and vm.direct_boot.mode == boot
        result = vm.run(timeout=60)
        console = vm.console.decode(errors="replace")
        assert result.status == 0, (result.detail, console)
        assert ("entry pvh" in console) == (boot == "pvh")
        match = re.search(r"rsdp: 0x([0-9a-f]{16})", console)
        assert match, console
        rsdp = int(match[1], 16)
        assert rsdp == 0xE0000
        check_tables(vm, rsdp, 2)


def test_bare_guests_get_no_tables(guest) -> None:
    with Machine(memory="16M", guest=guest("hello")) as vm:
        vm.run(timeout=30)
        assert vm.memory.read(0xE0000, 8) == bytes(8)
