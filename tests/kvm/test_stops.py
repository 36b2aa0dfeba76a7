"""Stops and lifetimes: a VM stops from any thread, terminating signals are handled as Ctrl-C
is, a forgotten Machine gives its descriptors back, any guest status maps to an exit code,
and guest text in the summary is data."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from leanvm.machine.machine import EXIT_STATUS_TOO_LARGE, Machine
from leanvm.machine.vcpu_loop import StopReason


def run_on_a_worker(vm: Machine, **kwargs: object) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(target=lambda: results.append(vm.run(**kwargs)))
    thread.start()
    return thread, results


@pytest.mark.parametrize("smp", [1, 2])
def test_stop_from_the_main_thread_reaches_a_guest_spinning_on_a_worker(guest, smp: int) -> None:
    with Machine(memory="32M", guest=guest("spin"), smp=smp) as vm:
        thread, results = run_on_a_worker(vm)
        time.sleep(0.5)  # the guest is spinning by now
        started = time.monotonic()
        vm.stop("enough")
        thread.join(10)
        assert not thread.is_alive(), "stop() did not reach a vCPU run from a worker thread"
    assert time.monotonic() - started < 5
    assert results[0].reason is StopReason.INTERRUPTED and results[0].detail == "enough"


def test_a_timeout_reaches_a_spinning_guest_run_from_a_worker_thread(guest) -> None:
    with Machine(memory="32M", guest=guest("spin")) as vm:
        started = time.monotonic()
        thread, results = run_on_a_worker(vm, timeout=0.5)
        thread.join(15)
        assert not thread.is_alive(), "the timeout never stopped a guest that makes no exits"
    assert results[0].reason is StopReason.TIMEOUT and time.monotonic() - started < 10


def test_a_machine_never_closed_gives_its_descriptors_back_with_a_warning(guest) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()  # machines other tests left behind go first
    before = fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            vm = Machine(memory="16M", guest=guest("hello"))
            vm.run(timeout=30)
            del vm
            gc.collect()
    assert fds() == before
    leaks = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(leaks) == 3 and "never closed" in str(leaks[0].message)


def test_a_closed_machine_warns_nothing_and_keeps_its_stats(guest) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Machine(memory="16M", guest=guest("hello"), name="web-1") as vm:
            asked = vm.run(timeout=30)
            live = asked.stats()
        with Machine(memory="16M", guest=guest("hello")) as vm:
            late = vm.run(timeout=30)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert live["host_memory"]["guest_resident"] > 0 and live["name"] == "web-1"
    assert asked.stats() == live  # measured while the machine was open, kept
    after = late.stats()  # first asked after close: everything but the host-memory figures
    assert after["host_memory"] is None and after["residency"] is None
    assert after["reason"] == "guest-exit" and after["schema"] == live["schema"]


def leanvm(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanvm", "run", *args], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, **kwargs)


@pytest.mark.parametrize("status,code", [(0xFF, 255), (0x100, EXIT_STATUS_TOO_LARGE),
                                         (0xFFFFFFFF, EXIT_STATUS_TOO_LARGE)])
def test_every_guest_status_maps_to_an_exit_code(guest, status: int, code: int) -> None:
    done = leanvm("--guest", str(guest("status")), "--args", f"|{status:#x}", "-q")
    assert done.returncode == code, done.stderr


def test_the_summary_starts_on_a_line_of_its_own(guest) -> None:
    done = leanvm("--guest", str(guest("status")), "--args", "no newline here|0")
    assert done.stdout.endswith("no newline here")
    assert done.stderr.startswith("\nleanvm: guest stopped"), done.stderr[:80]


def test_guest_text_in_the_stop_line_is_data_not_markup(guest) -> None:
    hostile = "No bootable device. [/x] [bold red]loud[/] :thumbs_up: \x1b]8;;http://e\x1b\\a"
    done = leanvm("--guest", str(guest("status")), "--args", f"@{hostile}|0")
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stderr.splitlines() if "guest stopped" in ln)
    assert "[/x] [bold red]loud[/] :thumbs_up:" in line  # as written, not styled or eaten
    assert "\x1b" not in done.stderr and "\\x1b]8;;http://e" in line


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_cleanly_with_summary_stats_and_trace(
        guest, tmp_path: Path, signum: int) -> None:
    stats, trace = tmp_path / "stats.json", tmp_path / "trace.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "leanvm", "run", "--guest", str(guest("spin")),
         "--stats-json", str(stats), "--trace", str(trace)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline()  # the guest runs
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err
    assert f"guest stopped: interrupted: terminated by {name}" in err
    figures = json.loads(stats.read_text())
    assert figures["reason"] == "interrupted" and figures["exit_code"] == 128 + signum
    assert json.loads(trace.read_text())["traceEvents"]


def test_every_vcpu_is_sampled(guest) -> None:
    with Machine(memory="32M", guest=guest("spin"), smp=2, sample_hz=100) as vm:
        result = vm.run(timeout=1.5)
        sampler = vm.sampler
    assert result.reason is StopReason.TIMEOUT and sampler is not None
    assert set(sampler.sample_vcpus) == {0, 1}, sampler.sample_vcpus[:20]
    ap_rips = {rip for (_, rip), index in zip(sampler.samples, sampler.sample_vcpus) if index}
    assert ap_rips  # the AP, waiting for its start-up IPI, is sampled where it waits


def test_a_device_over_guest_ram_is_refused_but_over_rom_allowed(guest) -> None:
    from leanvm.errors import ConfigError
    from leanvm.memory.host import map_anonymous

    class Device:
        def read(self, offset: int, size: int) -> int:
            return 0

        def write(self, offset: int, size: int, value: int) -> None:
            pass

    with Machine(memory="32M", guest=guest("hello")) as vm:
        with pytest.raises(ConfigError, match="overlaps guest memory ram-low"):
            vm.add_mmio_device(0x100000, 0x1000, Device(), "over-ram")
        vm.add_region("rom", 0xC000_0000, map_anonymous(0x1000), readonly=True)
        vm.add_mmio_device(0xC000_0000, 0x1000, Device(), "rom-writes")  # writes reach it
        vm.add_mmio_device(0xD000_0000, 0x1000, Device(), "plain")
        with pytest.raises(ConfigError, match="overlaps device plain"):
            vm.add_region("ram-over-device", 0xD000_0000, map_anonymous(0x1000))
