"""Tracing cost: what one recorded probe event costs, measured directly, and what tracing
costs a guest that fires probes as fast as it can.

Direct: the port bus with the probe device wired exactly as a machine wires it (tracing on:
the device hands (id, args) to the tracer; off: it has no callback), written 1,000,000 times
per run, on and off alternating, 7 runs. Per-event cost = (on - off) / events, per run; the
median and range over the runs. A guest exit costs 10-20 us here, so an end-to-end figure
cannot resolve a cost of a few hundred ns: this one can.

End to end: a guest fires 100k probes on port 0x404, with the timeline off and on, in the
same process, alternating; the ratio on/off per pair of runs, median and range. Target: at
most 1.10x.
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import build_guest, median, save

from leanvm.devices.bus import Bus
from leanvm.devices.probe import PORT_SIZE, ProbePort
from leanvm.machine.machine import Machine
from leanvm.machine.platform import PORT as PLATFORM_PORTS
from leanvm.machine.tracing import BootTrace
from leanvm.trace.events import Tracer

PLATFORM = 0xD0FF_F000
PROBE_ID = 5000
PORT = PLATFORM_PORTS["probe"].base


def direct_once(events: int, trace: bool) -> float:
    """Seconds for ``events`` probe writes through the port bus."""
    tracer = Tracer(trace)
    probe = ProbePort(BootTrace(tracer).probe if trace else None)
    bus = Bus("pio", 0x10000)
    bus.register(PORT, PORT_SIZE, probe, "probe")
    write = bus.write
    start = time.perf_counter_ns()
    for _ in range(events):
        write(PORT, 4, PROBE_ID)
    elapsed = time.perf_counter_ns() - start
    assert probe.fired == events
    if trace:
        assert sum(1 for e in tracer.events if e.cat == "probe") == events
    return elapsed / 1e9


def guest_once(binary: str, probes: int, trace: bool) -> tuple[float, int]:
    with Machine(memory="16M", guest=binary, args=f"{PLATFORM:#x} {probes:#x}",
                 trace=trace) as vm:
        start = time.perf_counter_ns()
        result = vm.run(timeout=600)
        elapsed = time.perf_counter_ns() - start
        assert result.status == 0, result.detail
        recorded = sum(1 for e in vm.tracer.events if e.cat == "probe")
    return elapsed / 1e9, recorded


def spread(values: list[float], fmt: str) -> str:
    return f"{format(median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="direct: per run")
    parser.add_argument("--direct-runs", type=int, default=7)
    parser.add_argument("--probes", type=int, default=100_000, help="guest: per run")
    parser.add_argument("--runs", type=int, default=5, help="guest: pairs of runs")
    args = parser.parse_args()

    per_event_ns, bare_ns = [], []
    for _ in range(args.direct_runs):
        off = direct_once(args.events, False)
        on = direct_once(args.events, True)
        per_event_ns.append((on - off) / args.events * 1e9)
        bare_ns.append(off / args.events * 1e9)
    print(f"direct, {args.events} probe writes x {args.direct_runs} runs: a recorded event "
          f"costs {spread(per_event_ns, '.0f')} ns over the bus write itself "
          f"({spread(bare_ns, '.0f')} ns)")

    binary = str(build_guest("probes"))
    ratios, off_s, on_s = [], [], []
    for _ in range(args.runs):
        off = guest_once(binary, args.probes, False)[0]
        on, recorded = guest_once(binary, args.probes, True)
        assert recorded == args.probes, recorded
        off_s.append(off)
        on_s.append(on)
        ratios.append(on / off)
    per_exit = [t / args.probes * 1e6 for t in off_s]
    print(f"guest, {args.probes} probes x {args.runs} pairs: {spread(per_exit, '.1f')} us per "
          f"exit with tracing off; on/off {spread(ratios, '.3f')} (target <= 1.10)")
    path = save("trace_overhead", {
        "direct_events": args.events, "direct_runs": args.direct_runs,
        "ns_per_event": per_event_ns, "ns_per_event_median": median(per_event_ns),
        "ns_per_bus_write_off": bare_ns,
        "probes": args.probes, "runs": args.runs, "off_s": off_s, "on_s": on_s,
        "us_per_exit_off_median": median(per_exit), "ratios": ratios,
        "ratio_median": median(ratios)})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
