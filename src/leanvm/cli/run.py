"""`leanvm run`: boot a guest (the bundled demo by default) and summarise how it went."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "run", help="boot a guest (with no arguments: the bundled demo guest)",
        description="Boot a bare guest program in 64-bit long mode (with no --guest, the "
                    "bundled demo), or firmware from flash (--bios), which can load a Linux "
                    "kernel given with -kernel/-initrd/-append. Serial output goes to the "
                    "terminal; a summary follows on stderr. Exit status: 0 after a guest reset, "
                    "when the firmware finds no boot device or --until matched; the guest's "
                    "status after a write to the exit port; 124 on timeout; 3 if the guest "
                    "failed.")
    parser.add_argument("-m", "--memory", default="128M", metavar="SIZE[,maxmem=SIZE][,slots=N]",
                        help="guest RAM as QEMU's -m, e.g. 512M or 2G,maxmem=8G,slots=2; a bare "
                             "number is MiB (default 128M)")
    parser.add_argument("--machine", default="leanvm", metavar="NAME",
                        help="memory-map version: leanvm (newest) or leanvm-1")
    parser.add_argument("--pa-bits", type=int, metavar="N",
                        help="guest physical address bits (default: the vCPU's CPUID)")
    parser.add_argument("--set", action="append", default=[], metavar="PROP=VALUE",
                        help="memory-map switch, e.g. compact=off or pcie-ecam=off (see "
                             "leanvm memmap)")
    parser.add_argument("--guest", type=Path, metavar="FILE",
                        help="bare guest program: flat binary (loaded at 1 MiB) or x86-64 ELF")
    parser.add_argument("--args", default="", metavar="STRING",
                        help="argument string handed to the guest (see docs/guest-abi.md)")
    parser.add_argument("-serial", "--serial", default="stdio", metavar="MODE",
                        help="COM1: stdio (default), file:PATH or none")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="stop the guest after this many seconds")
    parser.add_argument("--until", metavar="TEXT",
                        help="stop the guest (exit status 0) once its serial output contains TEXT")
    parser.add_argument("--cpu-hide", default="", metavar="FEATURES",
                        help="comma-separated CPUID features to hide, e.g. xsave,avx")
    parser.add_argument("--flash", action="append", default=[], metavar="ROLE=FILE[,OPT=V...]",
                        help="firmware flash bank: code=FILE (bank 0, read-only by default) or "
                             "vars=FILE (bank 1, mode=persistent by default); options mode="
                             "readonly|persistent|ephemeral, geometry=pc|virt, size=SIZE")
    parser.add_argument("-drive", action="append", default=[], metavar="if=pflash,file=F,...",
                        help="QEMU-style flash: if=pflash,format=raw,file=FILE[,readonly=on]; "
                             "the first is bank 0 (code), the second bank 1 (vars)")
    parser.add_argument("--bios", type=Path, metavar="FILE",
                        help="boot firmware (e.g. /usr/share/seabios/bios.bin) from flash bank 0 "
                             "at the reset vector instead of a bare guest")
    parser.add_argument("-kernel", "--kernel", type=Path, metavar="BZIMAGE",
                        help="Linux kernel (bzImage): with --bios or a code flash bank the "
                             "firmware loads it through fw_cfg; without, leanvm loads it and "
                             "enters its 64-bit entry point")
    parser.add_argument("-initrd", "--initrd", type=Path, metavar="FILE",
                        help="initial RAM disk for -kernel")
    parser.add_argument("-append", "--append", default="", metavar="CMDLINE",
                        help="kernel command line for -kernel")
    parser.add_argument("--kernel-boot", default="auto", choices=("auto", "pvh", "bzimage"),
                        help="direct boot (no firmware): pvh = an ELF, or a bzImage decompressed "
                             "on the host (cached), entered through PVH; bzimage = the 64-bit "
                             "boot protocol, the guest decompresses; auto (default) = pvh when "
                             "possible")
    parser.add_argument("--no-zero-copy", dest="zero_copy", action="store_false",
                        help="copy the kernel and initrd into guest RAM instead of mapping "
                             "their pages copy-on-write from the files (direct boot)")
    parser.add_argument("--no-initrd-unpack", dest="initrd_unpack", action="store_false",
                        help="boot a compressed initramfs as it is (by default leanvm "
                             "decompresses it on the host once, cached, for direct boots)")
    parser.add_argument("-smp", "--smp", type=int, default=1, metavar="N",
                        help="virtual CPUs, one host thread each (default 1)")
    parser.add_argument("--cpu-profile", default="auto", choices=("auto", "host", "emulated"),
                        help="CPUID the guest sees: host = all KVM offers; emulated = without "
                             "the features a host that emulates supervisor code cannot run "
                             "(docs/emulation.md); auto (default) = emulated on such hosts")
    parser.add_argument("--emulation-fallback", default="auto", choices=("auto", "on", "off"),
                        help="run instructions the host's KVM cannot emulate in a user-mode "
                             "emulator and go on (counted in the summary); auto (default) = on "
                             "hosts that need it")
    parser.add_argument("-debugcon", "--debugcon", default="none", metavar="MODE",
                        help="firmware debug console (port 0x402): stdio, file:PATH or none "
                             "(default: kept in memory)")
    parser.add_argument("--max-fw-size", default="8M", metavar="SIZE",
                        help="combined limit of pc flash banks (default 8M, at most 16M)")
    parser.add_argument("-S", dest="paused", action="store_true",
                        help="build the VM but do not start the vCPU; wait for SIGTERM or Ctrl-C "
                             "(as QEMU's -S), e.g. to measure what an idle VM costs")
    parser.add_argument("--timeline", action="store_true",
                        help="record the boot timeline and print it at exit (time since the "
                             "process start, delta, phase)")
    parser.add_argument("--trace", type=Path, metavar="FILE",
                        help="record the boot timeline and write it to FILE: Chrome/Perfetto "
                             "trace-event JSON if FILE ends in .json, else JSON lines")
    parser.add_argument("--probes", type=Path, metavar="FILE",
                        help="names for probe ids fired on port 0x404: lines 'ID NAME'")
    parser.add_argument("--sample-rip", type=float, default=0.0, metavar="HZ",
                        help="sample vCPU 0's instruction pointer HZ times a second and show "
                        "where the guest spent its time, by kernel function (with --trace, "
                        "each sample is on the timeline)")
    parser.add_argument("--symbols", type=Path, metavar="FILE",
                        help="the guest kernel's System.map or ELF with symbols, for "
                        "--sample-rip (default: looked for beside the kernel and in "
                        "/usr/lib/debug/boot)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary")
    parser.add_argument("--stats-json", type=Path, metavar="FILE",
                        help="write the run's figures (timestamps on CLOCK_MONOTONIC, exits) "
                             "as JSON to FILE")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from leanvm.machine.config import MachineConfig
    from leanvm.machine.machine import Machine

    import os

    from leanvm.cli.memmap import parse_settings

    hidden = tuple(f.strip() for f in args.cpu_hide.split(",") if f.strip())
    from leanvm.machine.flash import parse_drive_option, parse_flash_option

    flash = [parse_flash_option(text) for text in args.flash]
    flash += [parse_drive_option(text, unit) for unit, text in enumerate(args.drive)]
    config = MachineConfig(memory=args.memory, flash=tuple(flash), max_fw_size=args.max_fw_size,
                           bios=args.bios, debugcon=args.debugcon, guest=args.guest,
                           kernel=args.kernel, initrd=args.initrd, cmdline=args.append,
                           trace=bool(args.timeline or args.trace), kernel_boot=args.kernel_boot,
                           smp=args.smp, cpu_profile=args.cpu_profile, zero_copy=args.zero_copy,
                           initrd_unpack=args.initrd_unpack, sample_hz=args.sample_rip,
                           symbols=args.symbols,
                           emulation_fallback=args.emulation_fallback,
                           probe_names=_probe_table(args.probes) if args.probes else (),
                           machine=args.machine,
                           pa_bits=args.pa_bits, args=args.args, serial=args.serial,
                           hide_cpu_features=hidden, layout=tuple(parse_settings(args.set).items()),
                           kvm_path=os.environ.get("LEANVM_KVM_DEVICE", "/dev/kvm"))
    if args.timeout is not None and args.timeout <= 0:
        from leanvm.errors import ConfigError

        raise ConfigError(f"bad --timeout {args.timeout}: expected a positive number of seconds")
    if args.symbols is not None and not os.access(args.symbols, os.R_OK):
        from leanvm.errors import ConfigError

        raise ConfigError(f"{args.symbols}: cannot read the symbols file")
    if args.symbols is not None and not args.sample_rip:
        from leanvm.errors import ConfigError

        raise ConfigError("--symbols names sampled addresses: give --sample-rip HZ too")
    if args.trace is not None and not os.access(args.trace.parent or Path("."), os.W_OK):
        from leanvm.errors import ConfigError

        raise ConfigError(f"{args.trace}: cannot write the trace there (no writable directory "
                          f"{args.trace.parent})")
    with Machine(config) as machine:
        if args.paused:
            return _wait_paused(machine, args.quiet)
        result = machine.run(timeout=args.timeout, until=args.until)
        if args.stats_json:
            _write_stats(args.stats_json, result, machine)
        if not args.quiet:
            from leanvm.cli.summary import print_summary

            print_summary(machine, result, sys.stderr)
        if args.trace:
            machine.write_trace(args.trace)
        if args.timeline:
            from leanvm.trace.render import table

            sys.stderr.write(table(machine.trace_events, machine.tracer.origin))
    return result.exit_code


def _probe_table(path: Path) -> tuple[tuple[int, str], ...]:
    """'ID NAME' lines (ID decimal or 0x-hex; # starts a comment) -> ((id, name), ...)."""
    from leanvm.errors import ConfigError

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the probe table ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the probe table is not text") from None
    table = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        ident, _, name = line.partition(" ")
        try:
            value = int(ident, 0)
        except ValueError:
            value = -1
        if not 0 <= value < 1 << 64 or not name.strip():
            raise ConfigError(f"{path}:{number}: expected 'ID NAME' with a number ID, got {raw!r}")
        table.append((value, name.strip()))
    return tuple(table)


def _write_stats(path: Path, result: object, machine: object) -> None:
    import json

    from leanvm.errors import ConfigError

    fields = ("reason", "detail", "status", "exits", "process_start_ns", "first_entry_ns",
              "stopped_ns", "exit_code")
    data = {name: getattr(result, name) for name in fields}
    data["reason"] = data["reason"].value
    entry = result.kernel_entry  # type: ignore[attr-defined]
    data["kernel_entry"] = None if entry is None else {
        "address": entry.address, "cs": entry.cs, "rip": entry.rip, "time_ns": entry.time_ns}
    data["memmap"] = machine.plan.to_json()  # type: ignore[attr-defined]
    data["ram_regions"] = [{"name": r.name, "base": r.base, "size": r.size}
                           for r in machine.memory.regions]  # type: ignore[attr-defined]
    data["host_memory"] = _host_memory(machine)
    data["kernel_cmdline"] = getattr(machine, "kernel_cmdline", None)  # with what leanvm added
    fallback = getattr(machine, "fallback", None)  # docs/emulation.md
    data["cpu_profile"] = getattr(machine, "cpu_profile", None)
    data["emulation_fallback"] = fallback.to_json() if fallback is not None else None
    sampler = getattr(machine, "sampler", None)
    data["rip_samples"] = None if sampler is None else {
        "hz": sampler.hz, "count": len(sampler.samples), "symbols": sampler.symbol_note,
        "top": [{"where": where, "samples": count} for where, count in sampler.top(50)]}
    try:
        path.write_text(json.dumps(data, indent=1) + "\n")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write stats ({exc.strerror})") from None


def _host_memory(machine: object) -> dict[str, int]:
    """What this VM costs the host at the stop, in bytes. Guest memory: resident, and
    private = anonymous pages this VM alone owns (pagemap; file pages it maps from the page
    cache are shared). The VMM's own overhead: written private memory (Private_Dirty) outside
    guest memory; clean private pages (libraries, page cache only this process maps now) are
    left out, as another VM would share them."""
    from leanvm.memory.residency import mapping_memory, process_memory

    rows = machine.residency()  # type: ignore[attr-defined]
    regions = machine.memory.regions  # type: ignore[attr-defined]
    guest = mapping_memory("self", [(r.mapping.address, r.mapping.address + r.size)
                                    for r in regions])
    process = process_memory()
    return {"guest_resident": sum(r.resident for r in rows),
            "guest_private": sum(r.private for r in rows),
            "process_rss": process.rss, "process_pss": process.pss,
            "process_private": process.private,
            "vmm_private": max(0, process.private_dirty - guest.private_dirty)}


def _wait_paused(machine: object, quiet: bool) -> int:
    import signal

    if not quiet:
        print("leanvm: VM built, vCPU not started (-S); waiting for SIGTERM or Ctrl-C",
              file=sys.stderr, flush=True)
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)
    return 0
