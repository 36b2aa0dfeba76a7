"""The RIP sampler on real KVM: a guest spinning in one function is found there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from leanvm.machine.machine import Machine
from leanvm.machine.vcpu_loop import StopReason


def test_a_spinning_guest_is_sampled_in_its_loop(guest) -> None:
    binary = guest("spin")
    with Machine(memory="16M", guest=binary, args="spin", sample_hz=100,
                 symbols=binary.with_suffix(".elf"), trace=True) as vm:
        result = vm.run(timeout=1.5)
        sampler = vm.sampler
        events = [e for e in vm.trace_events if e.cat == "sample"]
    assert result.reason is StopReason.TIMEOUT  # sampling kicks never stop the guest
    assert sampler is not None and 50 <= len(sampler.samples) <= 200, len(sampler.samples)
    assert sampler.symbol_note.endswith("spin.elf")
    (where, count), *_ = sampler.top()
    assert where == "main" and count >= 0.9 * len(sampler.samples), sampler.top()
    assert len(events) == len(sampler.samples) and events[0].name in ("main", "puts", "_start")


def test_leanvm_run_prints_and_saves_the_profile(guest, tmp_path: Path) -> None:
    binary = guest("spin")
    stats = tmp_path / "stats.json"
    done = subprocess.run(
        [sys.executable, "-m", "leanvm", "run", "--guest", str(binary), "--args", "spin",
         "--timeout", "1", "--sample-rip", "50", "--symbols", str(binary.with_suffix(".elf")),
         "--stats-json", str(stats)], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)
    assert done.returncode == 124, done.stderr
    assert "guest RIP samples" in done.stderr and "\nmain " in done.stderr, done.stderr
    data = json.loads(stats.read_text())["rip_samples"]
    assert data["hz"] == 50 and data["top"][0]["where"] == "main"
    assert data["count"] == sum(item["samples"] for item in data["top"])


def test_symbols_without_sampling_is_a_usage_error(guest) -> None:
    done = subprocess.run([sys.executable, "-m", "leanvm", "run", "--guest", str(guest("spin")),
                           "--symbols", "/etc/hostname", "--timeout", "1"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode != 0 and "give --sample-rip HZ too" in done.stderr
    assert "Traceback" not in done.stderr


def test_samples_get_their_own_track_and_stay_out_of_the_phase_table(guest,
                                                                      tmp_path: Path) -> None:
    from leanvm.trace.files import TID_SAMPLES, read_trace
    from leanvm.trace.render import table

    binary = guest("spin")
    with Machine(memory="16M", guest=binary, args="spin", sample_hz=50, trace=True) as vm:
        vm.run(timeout=0.5)
        vm.write_trace(tmp_path / "t.json")
        origin = vm.tracer.origin
    data = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    samples = [item for item in data if item.get("cat") == "sample"]
    assert samples and all(item["tid"] == TID_SAMPLES for item in samples)
    assert all(item["name"].startswith("page 0x") for item in samples)  # no symbols given
    assert not [item for item in data if item.get("cat") == "phase"
                and item["name"].startswith("page 0x")]
    events, _ = read_trace(tmp_path / "t.json")
    assert len([e for e in events if e.cat == "sample"]) == len(samples)
    assert "page 0x" not in table(events, origin) and "page 0x" in table(events, origin, True)
