"""The platform table (machine/platform.py) is the one place ports, MMIO windows and IRQs
are written: the buses hold exactly its rows, and `leanvm memmap` shows them and the flash
banks the planner placed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from leanvm.layout.x86 import plan_x86_layout
from leanvm.machine.memory_manager import build_ram
from leanvm.machine.platform import IRQ, MMIO, PORTS, Hooks, build_platform, mmio_address

SRC = Path(__file__).resolve().parents[2] / "src"


def leanvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(SRC)})


def test_the_buses_hold_exactly_the_tables_rows_and_irqs_reach_their_lines() -> None:
    plan = plan_x86_layout(64 << 20)
    memory = build_ram(plan)
    raised: list[tuple[int, bool]] = []
    try:
        hooks = Hooks(lambda data: None, lambda data: None,
                      lambda irq, level: raised.append((irq, level)), lambda: None,
                      lambda status: None, lambda: None)
        platform = build_platform(plan, memory, hooks)
        ports = {(m.name, m.base, m.size) for m in platform.pio.mappings}
        assert ports == {(row.name, row.base, row.size) for row in PORTS}
        probe = [m for m in platform.mmio.mappings if m.name == "probe"]
        assert [(m.base, m.size) for m in probe] == [(mmio_address("probe", plan), 8)]
        assert mmio_address("probe", plan) == plan.get("platform").end - 0x1000
        platform.serial.write(1, 1, 0x02)  # IER: transmitter-empty interrupt on
        assert (IRQ["com1"], True) in raised and IRQ["com1"] == 4
    finally:
        memory.close()
    assert {w.name for w in MMIO} == {"bios-area", "virtio", "probe"}
    assert mmio_address("virtio", plan) == plan.get("platform").base  # slots from the start


def test_memmap_shows_flash_banks_where_run_puts_them_and_the_platform(tmp_path: Path) -> None:
    code, store = tmp_path / "code.fd", tmp_path / "vars.fd"
    code.write_bytes(b"\x90" * (128 << 10))
    store.write_bytes(b"\xff" * (64 << 10))
    done = leanvm("memmap", "--pa-bits", "40", "--flash", f"code={code}", "--flash",
                  f"vars={store}", "--json")
    assert done.returncode == 0, done.stderr
    banks = {r["name"]: r for r in json.loads(done.stdout)["regions"] if r["role"] == "flash"}
    assert banks["flash0"]["base"] == (1 << 32) - (128 << 10)
    assert banks["flash1"]["base"] == (1 << 32) - (192 << 10)
    assert (banks["flash0"]["reason"], banks["flash1"]["reason"]) == ("code", "vars")
    shown = leanvm("memmap", "--pa-bits", "40", "--bios", str(code), "--platform")
    assert shown.returncode == 0, shown.stderr
    assert "flash0" in shown.stdout and "0xfffe0000" in shown.stdout
    assert "com1        0x3f8-0x3ff, IRQ 4" in shown.stdout
    assert "probe       0xd0fff000-0xd0fff007" in shown.stdout


def test_virtio_irqs_are_isa_lines_no_platform_device_uses() -> None:
    from leanvm.machine.platform import VIRTIO_IRQS

    assert len(set(VIRTIO_IRQS)) == len(VIRTIO_IRQS) == 8
    assert not set(VIRTIO_IRQS) & set(IRQ.values())
    assert all(0 < irq < 16 and irq not in (2, 3, 8, 12) for irq in VIRTIO_IRQS)
