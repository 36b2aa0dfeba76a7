"""scripts/nested-kvm's watch on L1: a QEMU that uses no CPU for the stall time counts as a
frozen L1 and is stopped (its state saved for the record), one that works runs to its end,
and one that runs past the time it has is stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from script_loader import load_script

pytestmark = pytest.mark.slow  # about 25 s of waiting on stand-in processes


@pytest.fixture(scope="module")
def nested() -> ModuleType:
    return load_script("nested-kvm")


def test_a_process_that_uses_no_cpu_is_stopped_as_frozen(nested: ModuleType,
                                                          tmp_path: Path) -> None:
    started = time.monotonic()
    why = nested.watch(["sleep", "120"], 60, tmp_path, 2)
    assert why.startswith("L1 froze") and time.monotonic() - started < 30, why
    record = (tmp_path / "l1-stall-1.txt").read_text()
    assert record.startswith("no registers")  # no QMP socket here: said, not raised


def test_a_working_process_runs_to_its_end(nested: ModuleType, tmp_path: Path) -> None:
    busy = "import time\nend = time.monotonic() + 8\nwhile time.monotonic() < end: pass"
    assert nested.watch([sys.executable, "-c", busy], 60, tmp_path, 3) == ""
    assert not list(tmp_path.iterdir())


def test_a_process_past_its_time_is_stopped(nested: ModuleType, tmp_path: Path) -> None:
    busy = "while True: pass"
    started = time.monotonic()
    why = nested.watch([sys.executable, "-c", busy], 6, tmp_path, 100)
    assert why == "L1 did not finish within 6 s" and time.monotonic() - started < 20
