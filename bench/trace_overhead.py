"""Tracing overhead: a guest fires 100k probes on port 0x404; exits per second with the
boot timeline off and on, in the same process, alternating. Per-event cost is the extra
time per probe with tracing on; the target is at most 10% over the bare exit.
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import build_guest, median, save

from leanvm.machine.machine import Machine

PLATFORM = 0xD0FF_F000


def once(binary: str, probes: int, trace: bool) -> tuple[float, int]:
    with Machine(memory="16M", guest=binary, args=f"{PLATFORM:#x} {probes:#x}",
                 trace=trace) as vm:
        start = time.perf_counter_ns()
        result = vm.run(timeout=600)
        elapsed = time.perf_counter_ns() - start
        assert result.status == 0, result.detail
        recorded = sum(1 for e in vm.tracer.events if e.cat == "probe")
    return elapsed / 1e9, recorded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    binary = str(build_guest("probes"))
    off, on = [], []
    for _ in range(args.runs):
        off.append(once(binary, args.probes, False)[0])
        seconds, recorded = once(binary, args.probes, True)
        assert recorded == args.probes, recorded
        on.append(seconds)
    t_off, t_on = median(off), median(on)
    per_exit_off = t_off / args.probes * 1e6
    per_event = (t_on - t_off) / args.probes * 1e6
    ratio = t_on / t_off
    print(f"{args.probes} probes: tracing off {t_off:.3f} s ({args.probes / t_off / 1e3:.1f}k exits/s, "
          f"{per_exit_off:.1f} us/exit); on {t_on:.3f} s ({args.probes / t_on / 1e3:.1f}k exits/s); "
          f"tracing costs {per_event:.2f} us/event, ratio {ratio:.3f} (target <= 1.10)")
    path = save("trace_overhead", {"probes": args.probes, "runs": args.runs,
                                   "off_s": t_off, "on_s": t_on, "us_per_exit_off": per_exit_off,
                                   "us_per_event": per_event, "ratio": ratio})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
