"""`leanvm memmap` without KVM: tables, JSON, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def leanvm(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEANVM_KVM_DEVICE": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_table_has_a_row_per_region() -> None:
    done = leanvm("memmap", "-m", "4G,maxmem=8G,slots=1", "--pa-bits", "40")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("machine leanvm-1, 40-bit physical addresses")
    assert lines[1].split() == ["region", "base", "last", "size", "state"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["ram-high"][1:4] == ["0x100000000", "0x13fffffff", "1G"]
    assert rows["device-memory"][3] == "5G"


def test_json_matches_the_planner() -> None:
    from leanvm.layout.x86 import plan_x86_layout

    done = leanvm("memmap", "-m", "1G", "--pa-bits", "36", "--json", "--set", "compact=off")
    data = json.loads(done.stdout)
    assert data == plan_x86_layout(1 << 30, pa_bits=36, settings={"compact": "off"}).to_json()
    assert {r["state"] for r in data["regions"]} >= {"enabled", "disabled"}


@pytest.mark.parametrize("args,message", [
    (["--machine", "pc"], "unknown machine 'pc'"),
    (["--set", "nonsense"], "bad --set 'nonsense'"),
    (["--set", "ecam=off"], "unknown property 'ecam'"),
    (["-m", "4G,maxmem=2G"], "maxmem is smaller"),
    (["-m", "8G", "--pa-bits", "32"], "beyond the 32-bit physical address limit"),
    (["-m", "4G,colour=blue"], "bad -m option 'colour=blue'"),
])
def test_errors_are_one_line(args: list[str], message: str) -> None:
    done = leanvm("memmap", *args)
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.count("\n") == 1


def test_virt_from_the_command_line() -> None:
    done = leanvm("memmap", "--machine", "virt-7.2", "-m", "4G,maxmem=511G",
                  "--set", "highmem-redists=off", "--set", "highmem-ecam=off", "--pa-bits", "40")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert rows["high-pcie-mmio"][1:5] == ["0x8000000000", "0xffffffffff", "512G", "enabled"]
    assert rows["high-pcie-ecam"][4:] == ["disabled", "(highmem-ecam=off)"]
    assert "highest address 0xffffffffff" in done.stdout.splitlines()[0]
    failed = leanvm("memmap", "--machine", "virt", "-m", "1G,maxmem=2000G", "--pa-bits", "40")
    assert failed.returncode == 2
    assert failed.stderr.startswith("leanvm: error: Addressing limited to 40 bits")
