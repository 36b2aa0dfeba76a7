"""Exit cost: a guest doing N port writes (default 100k), each one a vCPU exit.

Side by side, alternating, in one run:
  C reference   bench/c/exit_loop.c: raw /dev/kvm, same guest, same long-mode set-up; the floor
  Python floor  the bare KVM_RUN ioctl from Python with no decoding or dispatch
  leanvm        Machine.run(): typed exits, bus dispatch to a device
  firmware      the tiny firmware `outloop` (tests/guests/firmware: OUT to port 0x80 in a
                loop, then the exit port) booted as a BIOS by `leanvm run --bios` and by
                `qemu-system-x86_64 -M pc -accel kvm -bios`, whole processes timed from spawn
                to exit for two loop counts N1 < N2 (default 20k and 200k); the cost per exit
                is (t(N2) - t(N1)) / (N2 - N1), so start-up and tear-down cancel
Prints, as median (min-max) over the rounds, the cost per exit, exits per second, leanvm's
ratio to the C loop (target <= 2x) and leanvm's ratio to QEMU for the same OUT loop; each
ratio is taken within a round, then summarised.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import struct
import subprocess
import time

from _common import (LEANVM_CMD, QEMU_X86, build_c, build_firmware, build_guest, have,
                     leanvm_env, median, qemu_pc_command, save, spread)

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


def time_process(cmd: list[str], expected: int, env: dict[str, str] | None = None) -> float:
    """Seconds from spawn to exit of ``cmd``, which must exit with ``expected``."""
    start = time.monotonic_ns()
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
    seconds = (time.monotonic_ns() - start) / 1e9
    if done.returncode != expected:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{cmd[0]} exited with {done.returncode}, expected {expected}: {last}")
    return seconds


def leanvm_outloop(image) -> float:
    return time_process([*LEANVM_CMD, "run", "-q", "-m", "16M", "--bios", str(image)], 0,
                        leanvm_env())


def qemu_outloop(image) -> float:
    return time_process(qemu_pc_command("-bios", str(image)), 1)  # isa-debug-exit: (0 << 1) | 1


def counts(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N1,N2 (two loop counts)") from None
    if not 0 <= low < high < 1 << 32:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= N1 < N2 < 2**32")
    return low, high


def show(figure: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return (f"{figure['median'] * scale:.{digits}f} ({figure['min'] * scale:.{digits}f}-"
            f"{figure['max'] * scale:.{digits}f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="port writes per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--firmware-counts", type=counts, default=(20_000, 200_000),
                        metavar="N1,N2", help="outloop's two loop counts (default 20000,200000)")
    args = parser.parse_args()
    if args.rounds < 1 or args.n < 1:
        parser.error("-n and --rounds must be at least 1")
    guest = build_guest("portloop")
    c_loop = build_c("exit_loop")
    low, high = args.firmware_counts
    images = {low: build_firmware("outloop", low), high: build_firmware("outloop", high)}
    peers = {"leanvm --bios": leanvm_outloop}
    if have(QEMU_X86) and os.access("/dev/kvm", os.W_OK):
        peers["QEMU -M pc"] = qemu_outloop
    runs: dict[str, list[float]] = {"C reference": [], "Python floor": [], "leanvm": []}
    firmware: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(args.rounds):
        for name, func in (("C reference", lambda: run_c(c_loop, guest, args.n)),
                           ("Python floor", lambda: run_python_floor(guest, args.n)),
                           ("leanvm", lambda: run_leanvm(guest, args.n))):
            exits, seconds = func()
            runs[name].append(seconds / exits)
        for name, run in peers.items():
            t_low, t_high = run(images[low]), run(images[high])
            firmware[name].append((t_high - t_low) / (high - low))
    rounds = args.rounds
    print(f"exit cost: {args.n} port writes, {rounds} alternating rounds, median (min-max)")
    print(f"{'':14} {'us/exit':>20} {'exits/s':>10} {'vs C':>18}")
    figures: dict[str, dict] = {}
    for name, values in runs.items():
        per = median(values)
        ratios = spread([v / c for v, c in zip(values, runs["C reference"])])
        figures[name] = {"us_per_exit": round(per * 1e6, 2), "exits_per_s": round(1 / per),
                         "ratio_to_c": round(ratios["median"], 2),
                         "us_per_exit_range": [round(min(values) * 1e6, 2),
                                               round(max(values) * 1e6, 2)],
                         "ratio_to_c_range": [round(ratios["min"], 2), round(ratios["max"], 2)]}
        print(f"{name:14} {show(spread(values), 1e6):>20} {1 / per:10.0f} "
              f"{show(ratios) + 'x':>18}")
    ratio = figures["leanvm"]["ratio_to_c"]
    low_r, high_r = figures["leanvm"]["ratio_to_c_range"]
    print(f"leanvm / C = {ratio:.2f}x ({low_r:.2f}-{high_r:.2f}x over {rounds} rounds; target "
          f"<= 2x): {'met' if ratio <= 2 else 'NOT met'} at the median")
    print(f"\nsame OUT loop in firmware (outloop, real mode then 32-bit, port 0x80), whole "
          f"processes: (t({high}) - t({low})) / {high - low}")
    print(f"{'':14} {'us/exit':>20} {'exits/s':>10}")
    fw_figures: dict[str, dict] = {}
    for name, values in firmware.items():
        figure = spread(values)
        fw_figures[name] = {"us_per_exit": round(figure["median"] * 1e6, 2),
                            "us_per_exit_range": [round(figure["min"] * 1e6, 2),
                                                  round(figure["max"] * 1e6, 2)],
                            "exits_per_s": round(1 / figure["median"])}
        print(f"{name:14} {show(figure, 1e6):>20} {1 / figure['median']:10.0f}")
    result: dict = {"n": args.n, "rounds": rounds, "figures": figures,
                    "firmware_counts": [low, high], "firmware": fw_figures}
    if "QEMU -M pc" in firmware:
        ratios = spread([a / b for a, b in zip(firmware["leanvm --bios"], firmware["QEMU -M pc"])])
        result["ratio_leanvm_to_qemu"] = {"median": round(ratios["median"], 2),
                                          "range": [round(ratios["min"], 2),
                                                    round(ratios["max"], 2)]}
        print(f"leanvm / QEMU = {show(ratios)}x per exit over {rounds} rounds "
              f"(QEMU {QEMU_X86} -M pc, KVM)")
    else:
        print(f"{QEMU_X86} not installed or /dev/kvm unusable: no QEMU row "
              "(scripts/install-deps bench installs it)")
    save("exit_cost", result)


if __name__ == "__main__":
    main()
