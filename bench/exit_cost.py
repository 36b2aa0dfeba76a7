"""Exit cost: a guest doing N port writes (default 100k), each one a vCPU exit.

Side by side, alternating, in one run:
  C reference   bench/c/exit_loop.c: raw /dev/kvm, same guest, same long-mode set-up; the floor
  Python floor  the bare KVM_RUN ioctl from Python with no decoding or dispatch
  leanvm        Machine.run(): typed exits, bus dispatch to a device
Prints the cost per exit, exits per second and leanvm's ratio to the C loop (target <= 2x).
"""

from __future__ import annotations

import argparse
import fcntl
import struct
import subprocess
import time

from _common import build_c, build_guest, median, save

from leanvm.abi import kvm as abi
from leanvm.machine.machine import Machine


class Sink:
    """A port device that does nothing: the cost measured is leanvm's, not a device's."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def run_c(binary, guest, n: int) -> tuple[int, float]:
    out = subprocess.run([str(binary), str(guest), str(n)], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), int(out[2]) / 1e9


def run_leanvm(guest, n: int) -> tuple[int, float]:
    with Machine(memory="16M", guest=guest, args=str(n)) as vm:
        vm.add_pio_device(0x80, 4, Sink(), "sink")
        result = vm.run()
        assert result.status == 0, result
        return result.exits, (result.stopped_ns - result.first_entry_ns) / 1e9


def run_python_floor(guest, n: int) -> tuple[int, float]:
    with Machine(memory="16M", guest=guest, args=str(n)) as vm:
        fd, page = vm.vcpu.fd, vm.vcpu._run
        io = struct.Struct("<BBHIQ")
        exits, start = 0, time.monotonic_ns()
        while True:
            fcntl.ioctl(fd, abi.KVM_RUN, 0)
            exits += 1
            if io.unpack_from(page, abi.RUN_UNION)[2] == 0xF4:
                break
        return exits, (time.monotonic_ns() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="port writes per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    guest = build_guest("portloop")
    c_loop = build_c("exit_loop")
    runs: dict[str, list[float]] = {"C reference": [], "Python floor": [], "leanvm": []}
    for _ in range(args.rounds):
        for name, func in (("C reference", lambda: run_c(c_loop, guest, args.n)),
                           ("Python floor", lambda: run_python_floor(guest, args.n)),
                           ("leanvm", lambda: run_leanvm(guest, args.n))):
            exits, seconds = func()
            runs[name].append(seconds / exits)
    base = median(runs["C reference"])
    print(f"exit cost: {args.n} port writes, median of {args.rounds} alternating rounds")
    print(f"{'':14} {'us/exit':>9} {'exits/s':>10} {'vs C':>6}")
    figures = {}
    for name, values in runs.items():
        per = median(values)
        figures[name] = {"us_per_exit": round(per * 1e6, 2), "exits_per_s": round(1 / per),
                         "ratio_to_c": round(per / base, 2)}
        print(f"{name:14} {per * 1e6:9.2f} {1 / per:10.0f} {per / base:5.2f}x")
    ratio = figures["leanvm"]["ratio_to_c"]
    print(f"leanvm / C = {ratio:.2f}x (target <= 2x): {'met' if ratio <= 2 else 'NOT met'}")
    save("exit_cost", {"n": args.n, "rounds": args.rounds, "figures": figures})


if __name__ == "__main__":
    main()
