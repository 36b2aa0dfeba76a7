"""QMP: the round trip of query-status against QEMU's, and what a polling client costs a
guest that exits all the time.

Round trip: leanvm (`leanvm run -qmp`, a bare guest that spins) and QEMU 7.2 (`-M pc
-accel kvm`, SeaBIOS at "No bootable device"), both running, each driven by the same raw
client (one JSON line out, one reply line in, over the Unix socket): ROUNDS rounds of
REQUESTS round trips each, the two VMMs interleaved; per round the median round trip, then
over the rounds the median and range of those medians and of the leanvm/QEMU ratio
(target <= 2x).

Polling cost: the guest tests/guests/programs/portloop.c makes EXITS port writes (one exit
each) and exits; its exit rate (exits over first guest entry to stop, from --stats-json)
with no client connected, and with a client sending query-status at 100 Hz the whole
time. The cost is 1 - rate(polled) / rate(alone), per round, interleaved (target < 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import (LEANVM_CMD, QEMU_X86, build_guest, have, leanvm_env, save_and_hand_back,
                     spread)

SEABIOS = Path("/usr/share/seabios/bios.bin")
QUERY = b'{"execute": "query-status"}\n'


class Raw:
    """The same minimal client for both: connect, negotiate, then a line out, a line in."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(30)
        self.file = self.sock.makefile("rb")
        assert b"QMP" in self.file.readline()
        self.ask(b'{"execute": "qmp_capabilities"}\n')

    def ask(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        while True:
            reply = self.file.readline()
            if not reply:
                raise RuntimeError("the QMP server closed the connection")
            if b'"event"' not in reply:
                return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def wait_for(path: Path, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not open its QMP socket")
        time.sleep(0.02)


def start_vms(tmp: Path) -> tuple[subprocess.Popen, Path, subprocess.Popen, Path]:
    ours, theirs = tmp / "leanvm.sock", tmp / "qemu.sock"
    leanvm = subprocess.Popen([*LEANVM_CMD, "run", "--guest", str(build_guest("spin")), "-q",
                               "-serial", "none", "-m", "64M",
                               "-qmp", f"unix:{ours},server=on,wait=off"], env=leanvm_env(),
                              stdout=subprocess.DEVNULL)
    qemu = subprocess.Popen([QEMU_X86, "-M", "pc", "-accel", "kvm", "-m", "64", "-nodefaults",
                             "-display", "none", "-bios", str(SEABIOS), "-no-reboot",
                             "-qmp", f"unix:{theirs},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(ours, leanvm, "leanvm")
    wait_for(theirs, qemu, "QEMU")
    return leanvm, ours, qemu, theirs


def round_trips(client: Raw, count: int) -> float:
    """The median of ``count`` query-status round trips, in microseconds."""
    times = []
    for _ in range(count):
        start = time.perf_counter_ns()
        client.ask(QUERY)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def measure_round_trips(rounds: int, count: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        leanvm, ours, qemu, theirs = start_vms(Path(tmp))
        try:
            lean_client, qemu_client = Raw(str(ours)), Raw(str(theirs))
            assert b'"running"' in lean_client.ask(QUERY) and b'"running"' in qemu_client.ask(QUERY)
            lean_us, qemu_us, ratios = [], [], []
            for _ in range(rounds):
                lean_us.append(round_trips(lean_client, count))
                qemu_us.append(round_trips(qemu_client, count))
                ratios.append(lean_us[-1] / qemu_us[-1])
            for client in (lean_client, qemu_client):
                client.ask(b'{"execute": "quit"}\n')
                client.close()
        finally:
            for process in (leanvm, qemu):
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
    return {"requests": count, "leanvm_us": spread(lean_us), "qemu_us": spread(qemu_us),
            "ratio": spread(ratios)}


def exit_rate(exits: int, poll_hz: float) -> tuple[float, int]:
    """(exits per second, queries answered) of one portloop run, polled at ``poll_hz``."""
    with tempfile.TemporaryDirectory() as tmp:
        sock, stats = Path(tmp) / "q.sock", Path(tmp) / "stats.json"
        process = subprocess.Popen([*LEANVM_CMD, "run", "--guest", str(build_guest("portloop")),
                                    "--args", str(exits), "-q", "-serial", "none", "-S",
                                    "-qmp", f"unix:{sock},server=on,wait=off",
                                    "--stats-json", str(stats)], env=leanvm_env())
        wait_for(sock, process, "leanvm")
        control = Raw(str(sock))
        done = threading.Event()
        answered = [0]

        def poll() -> None:
            poller = Raw(str(sock))
            period, next_at = 1.0 / poll_hz, time.monotonic()
            try:
                while not done.is_set():
                    poller.ask(QUERY)
                    answered[0] += 1
                    next_at += period
                    time.sleep(max(0.0, next_at - time.monotonic()))
            except (OSError, RuntimeError):
                pass  # the VM ended
            finally:
                poller.close()

        thread = threading.Thread(target=poll, daemon=True) if poll_hz else None
        if thread is not None:
            thread.start()
            time.sleep(0.1)
        control.ask(b'{"execute": "cont"}\n')  # the guest starts with the poller polling
        if process.wait(300) != 0:
            raise SystemExit("the portloop guest failed")
        done.set()
        if thread is not None:
            thread.join(10)
        control.close()
        data = json.loads(stats.read_text())
        seconds = (data["stopped_ns"] - data["first_entry_ns"]) / 1e9
        return data["exits"] / seconds, answered[0]


def measure_polling(rounds: int, exits: int) -> dict:
    alone, polled, costs, answered = [], [], [], []
    for _ in range(rounds):
        base, _ = exit_rate(exits, 0)
        rate, queries = exit_rate(exits, 100.0)
        alone.append(base)
        polled.append(rate)
        costs.append(1 - rate / base)
        answered.append(queries)
    return {"exits": exits, "alone_per_s": spread(alone), "polled_per_s": spread(polled),
            "cost": spread(costs), "queries": spread(answered)}


def _mr(figure: dict, digits: int = 1, scale: float = 1.0) -> str:
    return (f"{figure['median'] * scale:.{digits}f} "
            f"({figure['min'] * scale:.{digits}f}-{figure['max'] * scale:.{digits}f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--exits", type=int, default=500000)
    args = parser.parse_args()
    missing = [name for name in (QEMU_X86, "gcc") if not have(name)]
    if missing or not SEABIOS.exists() or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print(f"bench/qmp.py needs {', '.join(missing) or 'SeaBIOS and /dev/kvm'}: make bench "
              "installs them", file=sys.stderr)
        return 1
    trips = measure_round_trips(args.rounds, args.requests)
    polling = measure_polling(args.rounds, args.exits)
    print(f"query-status round trip, median of {args.requests}, over {args.rounds} rounds: "
          "median (min-max)")
    print(f"  leanvm {_mr(trips['leanvm_us'])} us   QEMU {_mr(trips['qemu_us'])} us   "
          f"ratio {_mr(trips['ratio'], 2)}x (target <= 2x)")
    print(f"guest exit rate, {args.exits} port writes, alone and with a client polling at "
          "100 Hz")
    print(f"  alone {_mr(polling['alone_per_s'], 0)} exits/s   polled "
          f"{_mr(polling['polled_per_s'], 0)} exits/s   cost {_mr(polling['cost'], 2, 100)} % "
          f"(target < 5%), {polling['queries']['median']:.0f} queries per run")
    save_and_hand_back("qmp", {"round_trip": trips, "polling": polling})
    return 0


if __name__ == "__main__":
    sys.exit(main())
