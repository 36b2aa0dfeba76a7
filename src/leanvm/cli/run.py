"""`leanvm run`: boot a guest (the bundled demo by default) and summarise how it went."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    from leanvm.machine.config import MachineConfig
    from leanvm.machine.machine import Machine
    from leanvm.machine.result import RunResult


def _seconds(text: str) -> float:
    """--timeout: a finite number of seconds above 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"bad value {text!r}: expected a number of seconds "
                                         "above 0")
    return value


class _NoOp(argparse.Action):
    """A QEMU option leanvm accepts and ignores (its effect is leanvm's only behaviour)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        seen = list(getattr(namespace, self.dest, None) or [])
        seen.append((option_string, QEMU_NO_OPS.get(option_string or "")))
        setattr(namespace, self.dest, seen)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "run", help="boot a guest (with no arguments: the bundled demo guest)",
        description="Boot a bare guest program in 64-bit long mode (with no --guest, the "
                    "bundled demo), or firmware from flash (--bios), which can load a Linux "
                    "kernel given with -kernel/-initrd/-append. Serial output goes to the "
                    "terminal; a summary follows on stderr. Exit status: 0 after a guest reset, "
                    "when the firmware finds no boot device or --until matched; the guest's "
                    "status after a write to the exit port (4 if it does not fit 0-255); 124 on "
                    "timeout; 130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP (each still writes "
                    "the summary, trace and stats); 3 if the guest failed; 2 for a usage "
                    "error. QEMU's -machine, -cpu, -name, -bios, -accel kvm, -enable-kvm, "
                    "-no-reboot and -nographic are accepted where leanvm has the feature.")
    parser.add_argument("-m", "--memory", default="128M", metavar="SIZE[,maxmem=SIZE][,slots=N]",
                        help="guest RAM as QEMU's -m, e.g. 512M or 2G,maxmem=8G,slots=2; a bare "
                             "number is MiB (default 128M)")
    parser.add_argument("--machine", "-machine", "-M", default="leanvm",
                        metavar="NAME[,PROP=VALUE...]",
                        help="memory-map version: leanvm (newest) or leanvm-1, with optional "
                             "memory-map switches as in --set")
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
    parser.add_argument("--timeout", type=_seconds, metavar="SECONDS",
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
    parser.add_argument("--bios", "-bios", type=Path, metavar="FILE",
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
    parser.add_argument("--tsc-khz", type=int, metavar="KHZ",
                        help="the guest's TSC frequency in kHz (KVM_SET_TSC_KHZ; default: "
                             "the host's, which the stats report as tsc_khz)")
    parser.add_argument("--huge-pages", action="store_true",
                        help="back guest RAM with transparent huge pages (MADV_HUGEPAGE, QEMU's "
                             "default): faster live dumps and fewer TLB misses, but the host "
                             "then holds memory in 2 MiB steps (docs/dump.md)")
    parser.add_argument("--no-coalesced-io", dest="coalesced_io", action="store_false",
                        help="exit on every serial console write instead of letting KVM "
                             "queue them until the next exit (docs/linux.md)")
    parser.add_argument("--no-initrd-unpack", dest="initrd_unpack", action="store_false",
                        help="boot a compressed initramfs as it is (by default leanvm "
                             "decompresses it on the host once, cached, for direct boots)")
    parser.add_argument("-smp", "--smp", type=int, default=1, metavar="N",
                        help="virtual CPUs, one host thread each (default 1)")
    parser.add_argument("--cpu-profile", "-cpu", default="auto", choices=("auto", "host", "emulated"),
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
                        help="do not start the vCPUs (QEMU's -S): with -qmp they wait for QMP's "
                             "cont; without, the VM is built and leanvm waits for SIGTERM or "
                             "Ctrl-C, e.g. to measure what an idle VM costs")
    parser.add_argument("-qmp", "--qmp", metavar="unix:PATH,server=on,wait=off",
                        help="a QMP server (docs/qmp.md): unix:PATH or tcp:HOST:PORT with "
                             "server=on and wait=on|off (wait=on, QEMU's default, holds the "
                             "vCPUs until a client connects); a bare PATH does not wait. "
                             "Try `leanvm qmp PATH query-status`")
    parser.add_argument("--timeline", action="store_true",
                        help="record the boot timeline and print it at exit (time since the "
                             "process start, delta, phase)")
    parser.add_argument("--trace", type=Path, metavar="FILE",
                        help="record the boot timeline and write it to FILE: Chrome/Perfetto "
                             "trace-event JSON if FILE ends in .json, else JSON lines")
    parser.add_argument("--probes", type=Path, metavar="FILE",
                        help="names for probe ids fired on port 0x404: lines 'ID NAME'")
    parser.add_argument("--sample-rip", type=float, default=0.0, metavar="HZ",
                        help="sample every vCPU's instruction pointer HZ times a second and show "
                        "where the guest spent its time, by kernel function (with --trace, "
                        "each sample is on the timeline)")
    parser.add_argument("--symbols", type=Path, metavar="FILE",
                        help="the guest kernel's System.map or ELF with symbols, for "
                        "--sample-rip (default: looked for beside the kernel and in "
                        "/usr/lib/debug/boot)")
    parser.add_argument("--virtio-mem", action="append", default=[],
                        metavar="size=SIZE[,requested=SIZE][,block=SIZE][,id=NAME]",
                        help="a virtio-mem device: memory the guest plugs and unplugs in blocks "
                             "(default 2M) inside a region of SIZE placed after RAM (needs -m "
                             "RAM,maxmem=MAX with room for it); requested is what the guest is "
                             "asked to plug (default 0); unplugged memory costs the host nothing")
    parser.add_argument("-object", dest="objects", action="append", default=[],
                        metavar="memory-backend-ram,id=ID,size=SIZE",
                        help="QEMU's memory backend for -device virtio-mem-pci")
    parser.add_argument("-device", dest="devices", action="append", default=[],
                        metavar="virtio-mem-pci,memdev=ID[,requested-size=SIZE][,block-size=SIZE]",
                        help="QEMU's virtio-mem spelling (leanvm's is a virtio-mmio device)")
    parser.add_argument("--virtio-discovery", default="acpi", choices=("acpi", "cmdline"),
                        help="how Linux finds virtio-mmio devices: acpi (default, DSDT "
                             "entries) or cmdline (virtio_mmio.device= parameters added)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary")
    parser.add_argument("-name", "--name", default="", metavar="NAME",
                        help="a name for the VM, shown in the summary and the stats")
    parser.add_argument("-accel", metavar="kvm", help="accepted as QEMU's -accel kvm (leanvm "
                        "runs on KVM only)")
    for option in QEMU_NO_OPS:
        parser.add_argument(option, dest="qemu_no_ops", action=_NoOp, nargs=0, default=[],
                            help=f"accepted for QEMU's {option}: {QEMU_NO_OPS[option] or 'what leanvm always does'}")
    parser.add_argument("--stats-json", type=Path, metavar="FILE",
                        help="write the run's figures as JSON to FILE (every field and unit: "
                             "docs/stats.md)")
    from leanvm.cli.dumps import add_arguments

    add_arguments(parser)
    parser.set_defaults(handler=handle)


QEMU_NO_OPS = {  # QEMU options whose effect is what leanvm always does
    "-enable-kvm": None,
    "-no-reboot": None,  # a guest reset stops leanvm's VM (exit status 0)
    "-nographic": "leanvm has no display: the serial console is on stdio already",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C is: the VM stops, the summary, trace and stats
    are written, and leanvm exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signum)
        self.signum = signum
        self.detail = f"terminated by {signal.Signals(signum).name}"


def handle(args: argparse.Namespace) -> int:
    from leanvm.fileio import check_output_path
    from leanvm.machine.machine import Machine

    for option, note in args.qemu_no_ops:
        if note:
            print(f"leanvm: note: {option} has no effect: {note}", file=sys.stderr)
    config = machine_config(args)
    if args.trace is not None:  # every output is checked before anything is built
        check_output_path(args.trace, "trace")
    if args.stats_json is not None:
        check_output_path(args.stats_json, "stats")
    from leanvm.cli import dumps

    dumps.check(args)
    with _terminating_signals(), Machine(config) as machine:
        _current.append(machine)
        try:
            if args.paused and machine.qmp_server is None:
                return _wait_paused(machine, args.quiet)
            if machine.qmp_server is not None and machine.qmp_server.address.wait \
                    and not args.quiet:
                print(f"leanvm: waiting for a QMP connection on {machine.qmp_address}",
                      file=sys.stderr, flush=True)
            with dumps.signal_dumps(machine, args):
                result = machine.run(timeout=args.timeout, until=args.until,
                                     paused=args.paused)
        finally:
            _current.remove(machine)
        dumped = dumps.after_run(machine, result, args)
        if args.stats_json:
            _write_stats(args.stats_json, result)
        if not args.quiet:
            from leanvm.cli.summary import print_summary

            print_summary(result, sys.stderr)
        if args.trace:
            machine.write_trace(args.trace)
        if args.timeline:
            from leanvm.trace.render import table

            sys.stderr.write(table(machine.trace_events, machine.tracer.origin))
    return result.exit_code if dumped or result.exit_code else 1


def machine_config(args: argparse.Namespace) -> "MachineConfig":
    """The command line as a MachineConfig (which checks every value)."""
    import os

    from leanvm.cli.devices import virtio_mem_specs
    from leanvm.cli.memmap import parse_settings
    from leanvm.errors import ConfigError
    from leanvm.machine.config import MachineConfig
    from leanvm.machine.flash import parse_drive_option, parse_flash_option

    hidden = tuple(f.strip() for f in args.cpu_hide.split(",") if f.strip())
    flash = [parse_flash_option(text) for text in args.flash]
    flash += [parse_drive_option(text, unit) for unit, text in enumerate(args.drive)]
    machine_name, machine_settings = _machine_option(args.machine)
    settings = {**machine_settings, **parse_settings(args.set)}
    if args.accel is not None and args.accel.split(",")[0] != "kvm":
        raise ConfigError(f"bad -accel {args.accel!r}: leanvm runs guests on KVM only "
                          "(-accel kvm)")
    if args.until is not None and not args.until:
        raise ConfigError("bad --until '': give the text to wait for (empty text would "
                          "match at once)")
    return MachineConfig(memory=args.memory, flash=tuple(flash), max_fw_size=args.max_fw_size,
                         bios=args.bios, debugcon=args.debugcon, guest=args.guest,
                         kernel=args.kernel, initrd=args.initrd, cmdline=args.append,
                         trace=bool(args.timeline or args.trace), kernel_boot=args.kernel_boot,
                         smp=args.smp, cpu_profile=args.cpu_profile, zero_copy=args.zero_copy,
                         initrd_unpack=args.initrd_unpack, sample_hz=args.sample_rip,
                         coalesced_io=args.coalesced_io, tsc_khz=args.tsc_khz,
                         symbols=args.symbols, emulation_fallback=args.emulation_fallback,
                         probe_names=_probe_table(args.probes) if args.probes else (),
                         machine=machine_name, name=args.name, pa_bits=args.pa_bits,
                         args=args.args, serial=args.serial, hide_cpu_features=hidden,
                         layout=tuple(settings.items()),
                         virtio_mem=virtio_mem_specs(args.virtio_mem, args.objects, args.devices),
                         virtio_discovery=args.virtio_discovery, qmp=args.qmp,
                         huge_pages=args.huge_pages,
                         kvm_path=os.environ.get("LEANVM_KVM_DEVICE", "/dev/kvm"))


_current: "list[Machine]" = []  # the machine a terminating signal stops (the CLI runs one at a time)


@contextlib.contextmanager
def _terminating_signals() -> "Iterator[None]":
    """SIGTERM and SIGHUP stop a running VM as Ctrl-C does (summary, trace and stats are
    written); before or after the run they end leanvm at once, cleanly."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: object) -> None:
        machine = _current[-1] if _current else None
        if machine is not None and machine.state.value == "running":
            machine.stop(Terminated(signum).detail, signum)
        else:
            raise Terminated(signum)

    saved = {signum: signal.signal(signum, on_signal)
             for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _machine_option(text: str) -> tuple[str, dict[str, str]]:
    """QEMU's -machine: 'NAME[,PROP=VALUE...]' or 'type=NAME,...' -> (name, properties)."""
    from leanvm.errors import ConfigError

    name, settings = "", {}
    for index, part in enumerate(text.split(",")):
        key, eq, value = part.partition("=")
        if not eq and index == 0:
            name = part.strip()
        elif eq and key.strip() == "type":
            name = value.strip()
        elif eq and key.strip():
            settings[key.strip()] = value.strip()
        else:
            raise ConfigError(f"bad -machine {text!r}: expected NAME[,PROPERTY=VALUE...]")
    if not name.startswith("leanvm"):
        raise ConfigError(f"bad machine {name!r}: leanvm runs its own x86 machine, leanvm "
                          "(newest) or a pinned version such as leanvm-1 (see leanvm memmap)")
    return name, settings


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


def _write_stats(path: Path, result: "RunResult") -> None:
    import json

    from leanvm.fileio import write_atomic

    data = result.stats()
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode(), "stats")


def _wait_paused(machine: "Machine", quiet: bool) -> int:
    import signal

    if not quiet:
        print("leanvm: VM built, vCPU not started (-S); waiting for SIGTERM or Ctrl-C",
              file=sys.stderr, flush=True)
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)
    return 0
