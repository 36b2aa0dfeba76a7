"""The minimal kernel (kernels/minimal.config) boots through leanvm's PVH path, with the
int 0x80 test init (tests/guests/init/init.c) and with the default busybox initramfs.

One boot per initramfs serves the tests of this module (about 30 s each here, where every
kernel instruction is emulated). The kernel is built on first use (about 3 minutes) and
cached; the tests are skipped only when it cannot be built on this machine.

On this project's hosts no system call from guest user mode reaches the guest kernel:
SYSCALL jumps to LSTAR but stays at CPL 3 and faults there, INT 0x80 raises #UD
(docs/facts.md#user-mode-cannot-enter-the-kernel). The tests check that much exactly (the
fault is at init's first system call instruction), and expect the marker, the probes and the
power-off only where system calls work.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from leanvm.errors import GuestError, LeanvmError
from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason

pytestmark = pytest.mark.slow

# On this host the emulated CPU profile adds noxsave and clearcpuid= itself (docs/emulation.md).
# rodata=off: no read-only remapping of the kernel image after init (3.7 s of emulated
# page-table work).
CMDLINE = "console=ttyS0 rodata=off"
BOOT_TIMEOUT = 420  # s, to the end; "Run /init" comes after about 25 s here
RUN_INIT = b"Run /init as init process"
# What ends a boot: a power-off (or a halt, with no power-off method), a fatal fault in
# init (a trap or a segfault report), or a panic.
END = re.compile(rb"reboot: (?:Power down|System halted)|\S+\[1\]:? (?:trap|segfault) "
                 rb"[^\r\n]*\r?\n|Kernel panic[^\r\n]*\r?\n")
INIT_TRAP = re.compile(rb"traps: init\[1\] trap (?P<what>[a-z ]+) ip:(?P<ip>[0-9a-f]+)")
SEGFAULT = re.compile(rb"\S+\[1\]: segfault at (?P<addr>[0-9a-f]+) ip (?P<ip>[0-9a-f]+)")
TEST_MARKER = "leanvm-test-init: user space is up (int 0x80)"
BUSYBOX_MARKER = "leanvm-init: user space is up"
NO_SYSCALLS = ("this host does not let guest user mode enter the guest kernel (SYSCALL stays "
               "at CPL 3, INT 0x80 raises #UD; docs/facts.md#user-mode-cannot-enter-the-kernel)"
               ": no system call works")


class Boot(NamedTuple):
    console: str
    raw: bytes
    mode: str  # how leanvm entered the kernel: "pvh" or "bzimage"
    first_serial: float | None  # s after the first vCPU entry
    run_init: float  # s after the first vCPU entry
    probes: list[int]  # probe ids fired, in order
    stop: StopReason
    fallbacks: str


def boot(kernel: Path, initrd: Path) -> Boot:
    with Machine(kernel=kernel, initrd=initrd, cmdline=CMDLINE, memory="512M",
                 trace=True) as vm:
        assert vm.direct_boot is not None
        mode = vm.direct_boot.mode
        vm.start(timeout=BOOT_TIMEOUT + 30)
        try:
            vm.wait_for_console(RUN_INIT, timeout=BOOT_TIMEOUT)
            run_init = time.monotonic_ns()
            vm.wait_for_console(END, timeout=BOOT_TIMEOUT)
        except GuestError:
            pass  # it stopped by itself (ACPI power-off, or a failure the result names)
        try:
            result = vm.wait(2)  # a power-off stops the VM; a halt or a panic does not
        except LeanvmError:
            vm.stop("the test saw the end of the boot")
            result = vm.wait(60)
        events = vm.trace_events
        fallback = vm.fallback
        fallbacks = str(dict(fallback.counts)) if fallback is not None else "off"
        raw = vm.console
    console = raw.decode(errors="replace")
    if RUN_INIT not in raw:
        pytest.fail(f"the minimal kernel stopped before 'Run /init' ({result.reason.value}: "
                    f"{result.detail}):\n{console[-3000:]}")
    entry = next(e.ts for e in events if e.name == "first vCPU entry")
    first = next((e.ts for e in events if e.name == "first serial byte"), None)
    run_init = next((e.ts for e in events if e.name == "run /init"), run_init)
    probes = [e.args["id"] for e in events if e.cat == "probe" and e.args]
    return Boot(console, raw, mode, None if first is None else (first - entry) / 1e9,
                (run_init - entry) / 1e9, probes, result.reason, fallbacks)


@pytest.fixture(scope="module")
def test_init_boot(minimal_kernel: Path, test_init_initrd: Path) -> Boot:
    return boot(minimal_kernel, test_init_initrd)


@pytest.fixture(scope="module")
def busybox_boot(minimal_kernel: Path, busybox_initrd: Path) -> Boot:
    return boot(minimal_kernel, busybox_initrd)


def kernel_clock(console: str, text: str) -> float:
    """The printk timestamp (kernel clock, s) of the line holding ``text``."""
    match = re.search(r"\[\s*(\d+\.\d+)\][^\n]*" + re.escape(text), console)
    assert match, f"no timestamped line with {text!r}"
    return float(match.group(1))


def test_minimal_kernel_reaches_run_init_through_pvh(test_init_boot: Boot) -> None:
    run = test_init_boot
    assert run.mode == "pvh"  # decompressed on the host, entered through PVH
    assert "Decompressing Linux" not in run.console  # the kernel's own stub never ran
    assert "Linux version 6.1" in run.console and "-leanvm-minimal" in run.console
    if "ACPI: RSDP" in run.console:  # leanvm gave tables: the kernel must be able to use them
        assert "ACPI: Interpreter enabled" in run.console and "(supports S0 S5)" in run.console
    clock = kernel_clock(run.console, RUN_INIT.decode())
    assert run.first_serial is not None and run.first_serial < run.run_init
    print(f"\nminimal kernel, after the first vCPU entry: first serial byte "
          f"{run.first_serial:.1f} s, 'Run /init' {run.run_init:.1f} s (kernel clock "
          f"{clock:.1f} s); end: {run.stop.value}; fallbacks: {run.fallbacks}")


def test_test_init_runs_in_user_mode(test_init_boot: Boot) -> None:
    """init's code ran at CPL 3: its marker is out, or the kernel reports a trap exactly at
    one of its `int 0x80` instructions, which its code reached by running."""
    if TEST_MARKER in test_init_boot.console:
        return
    trap = INIT_TRAP.search(test_init_boot.raw)
    assert trap, f"init neither printed its marker nor trapped:\n{test_init_boot.console[-2000:]}"
    ip = int(trap["ip"], 16)
    addresses = int80_addresses()
    assert addresses and ip in addresses, (f"init trapped ({trap['what']!r}) at {ip:#x}, not "
                                           f"at one of its int 0x80 instructions")


@pytest.mark.userspace
def test_test_init_prints_fires_probes_and_powers_off(test_init_boot: Boot) -> None:
    run = test_init_boot
    trap = INIT_TRAP.search(run.raw)
    if TEST_MARKER not in run.console and trap and trap["what"] == b"invalid opcode":
        pytest.xfail(NO_SYSCALLS)
    assert TEST_MARKER in run.console, run.console[-2000:]
    assert "leanvm-test-init: ioperm(0x404) ok" in run.console
    assert run.probes == [3001, 3003]
    assert run.stop is StopReason.POWEROFF or "reboot: System halted" in run.console


def test_busybox_init_runs_in_user_mode(busybox_boot: Boot, minimal_kernel: Path) -> None:
    """The kernel ran /init (a script) with busybox's sh: its marker is out, or busybox
    faulted exactly at the kernel's SYSCALL entry, reached by its first system call."""
    if BUSYBOX_MARKER in busybox_boot.console:
        return
    fault = SEGFAULT.search(busybox_boot.raw)
    assert fault, f"busybox neither printed the marker nor faulted:\n{busybox_boot.console[-2000:]}"
    entry = kernel_symbol(minimal_kernel.with_name("vmlinux"), "entry_SYSCALL_64")
    assert int(fault["ip"], 16) == entry, (f"busybox faulted at {fault['ip'].decode()}, not at "
                                           f"entry_SYSCALL_64 ({entry:#x})")


@pytest.mark.userspace
def test_busybox_init_prints_fires_probes_and_powers_off(busybox_boot: Boot,
                                                         minimal_kernel: Path) -> None:
    run = busybox_boot
    fault = SEGFAULT.search(run.raw)
    if BUSYBOX_MARKER not in run.console and fault and int(fault["ip"], 16) == kernel_symbol(
            minimal_kernel.with_name("vmlinux"), "entry_SYSCALL_64"):
        pytest.xfail(NO_SYSCALLS)
    assert BUSYBOX_MARKER in run.console, run.console[-2000:]
    assert run.probes == [3001, 3002, 3003]
    assert run.stop is StopReason.POWEROFF or "reboot: System halted" in run.console


def kernel_symbol(vmlinux: Path, name: str) -> int:
    from elftools.elf.elffile import ELFFile

    with open(vmlinux, "rb") as stream:
        symtab = ELFFile(stream).get_section_by_name(".symtab")
        assert symtab is not None, f"{vmlinux} has no symbol table"
        symbols = symtab.get_symbol_by_name(name)
        assert symbols, f"{vmlinux} has no symbol {name}"
        return int(symbols[0]["st_value"])


def int80_addresses() -> set[int]:
    """Virtual addresses of every `int 0x80` (cd 80) in the test init's executable segment."""
    from elftools.elf.elffile import ELFFile

    from kernel_fixtures import user_program

    found = set()
    with open(user_program("init"), "rb") as stream:
        for segment in ELFFile(stream).iter_segments():
            if segment["p_type"] == "PT_LOAD" and segment["p_flags"] & 1:  # PF_X
                data = segment.data()
                found |= {segment["p_vaddr"] + m.start() for m in re.finditer(rb"\xcd\x80", data)}
    return found
