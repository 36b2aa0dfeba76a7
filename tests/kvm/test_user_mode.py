"""How guest user mode enters the guest kernel on this host (tests/guests/programs/usermode.c).

On a host with working KVM every entry lands at CPL 0. On this project's nested host,
exceptions from CPL 3 (#PF, #BP, #UD) are delivered properly, but SYSCALL jumps to LSTAR
still at CPL 3 with the host's own user selectors (CS 0x33, SS 0x2b: not the guest's STAR
values), and INT 0x80 arrives as #UD. That is why a stock init dies at its first system call
here (docs/linux.md). These tests pin both behaviours down exactly, so a change in the host
shows up."""

from __future__ import annotations

import re

import pytest

from leanvm.machine.machine import Machine

USER_CS, USER_SS, KERNEL_CS = 0x2B, 0x23, 0x08


def run(guest, action: str) -> dict[str, dict[str, int]]:
    with Machine(memory="64M", guest=guest("usermode"), args=action) as vm:
        result = vm.run(timeout=30)
    console = vm.console.decode(errors="replace")
    assert result.reason.value == "guest-exit", (result.detail, console)
    records = {}
    for name, fields in re.findall(r"^(syscall|trap): (.*?)\r?$", console, re.M):
        records[name] = {k: int(v, 16) for k, v in re.findall(r"(\w+)=(0x[0-9a-f]+)", fields)}
    assert re.search(r"user steps: 0x0+1\b", console), console  # user mode ran, once
    return records


@pytest.mark.parametrize("action, vector, error", [("fault", 14, 0x4), ("bp", 3, 0)])
def test_exceptions_from_user_mode_reach_the_kernel(guest, action: str, vector: int,
                                                    error: int) -> None:
    trap = run(guest, action)["trap"]
    assert trap["cs"] == KERNEL_CS and trap["vector"] == vector and trap["error"] == error
    assert trap["rcx"] == USER_CS  # the interrupted CS: the guest's own user selector


def test_syscall_enters_the_kernel_or_shows_this_hosts_known_defect(guest) -> None:
    records = run(guest, "syscall")
    seen = records["syscall"]
    assert seen["vector"] == 0x100 and seen["r11"] & 0x2  # reached LSTAR with RFLAGS in R11
    if seen["cs"] == KERNEL_CS:  # a host with working KVM
        assert "trap" not in records
        return
    # this host: still CPL 3, with selectors that are not the guest's
    assert (seen["cs"], seen["ss"]) == (0x33, 0x2B), seen
    trap = records["trap"]  # the entry code's UD2 then faulted into the kernel properly
    assert trap["vector"] == 6 and trap["rcx"] == USER_CS  # the host says CS was the guest's
    assert seen["rip"] < trap["rip"] < seen["rip"] + 0x80  # the UD2 in the entry code


def test_int80_enters_the_kernel_or_arrives_as_invalid_opcode(guest) -> None:
    trap = run(guest, "int80")["trap"]
    assert trap["cs"] == KERNEL_CS and trap["rcx"] == USER_CS
    assert trap["vector"] in (0x80, 6), trap  # 6 (#UD) on this project's nested host
