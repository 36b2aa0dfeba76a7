"""Does this host need the emulated CPU profile and the emulation fallback? Ask it.

A probe guest, assembled here from machine-code bytes (no compiler at run time), runs each
instruction known to defeat a KVM that emulates supervisor code at CPL 0, one KVM_RUN per
instruction in one small VM, and records which end in an emulation failure (what this
project's host does: docs/facts.md#what-it-cannot-emulate). The answer is cached per host
boot (key: /proc/sys/kernel/random/boot_id, the kernel release and the KVM device) in
$LEANVM_CACHE or ~/.cache/leanvm, so only the first VM after a boot pays for the probe.
``auto`` for --cpu-profile and --emulation-fallback follows the finding.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import NamedTuple

PROBE_VERSION = 2  # bump when the probe changes: old cache entries are then ignored
CACHE_FILE = "host-check"

# name -> machine code run at CPL 0 in long mode, followed by HLT. Before each: RSI points
# at 16-byte-aligned data holding 0x1f80 (a valid MXCSR), RBX = 0xff, RSP = a stack.
PROBES: tuple[tuple[str, bytes], ...] = (
    ("add", bytes.fromhex("4801d8")),  # add rax, rbx: the control, any KVM runs it
    ("int3", bytes.fromhex("cc")),
    ("clac", bytes.fromhex("0f01ca")),
    ("stac", bytes.fromhex("0f01cb")),
    ("popcnt", bytes.fromhex("f3480fb8c3")),  # popcnt rax, rbx
    ("popcnt-memory", bytes.fromhex("f3480fb806")),  # popcnt rax, [rsi]
    ("fwait", bytes.fromhex("9b")),
    ("ldmxcsr", bytes.fromhex("0fae16")),  # ldmxcsr [rsi]
    ("stmxcsr", bytes.fromhex("0fae5e10")),  # stmxcsr [rsi+16]
    ("movbe", bytes.fromhex("0f38f006")),  # movbe eax, [rsi]
    ("cmpxchg16b", bytes.fromhex("f0480fc70e")),  # lock cmpxchg16b [rsi]
)
HLT = b"\xf4"

# Probe VM layout (guest-physical, identity-mapped by loader.bare's page tables)
RAM_SIZE = 2 << 20
CODE = 0x10_0000
IDT = 0x9_0000
HANDLERS = 0x9_1000  # 16 bytes per vector: HLT, so RIP after the exit names the vector
DATA = 0x9_2000
STACK_TOP = 0x8_0000
VECTORS = 32
KVM_PRIVATE = 0xFFFB_C000  # identity-map page and TSS for KVM on Intel (not RAM)


class HostFinding(NamedTuple):
    """What the probe found: instructions that ended in emulation failures (``failing``),
    those the CPU itself refused with an exception (``faulting``, e.g. #UD for CLAC
    without SMAP), and features the emulated CPU profile hides that a guest's CPUID shows
    all the same (``unhidden``: this host's KVM passes through the bits it does not list
    in KVM_GET_SUPPORTED_CPUID, whatever KVM_SET_CPUID2 says)."""

    failing: tuple[str, ...]
    faulting: tuple[str, ...] = ()
    cached: bool = False
    seconds: float = 0.0  # the probe's own time (0 when the answer came from the cache)
    error: str | None = None  # why the probe could not run (then nothing is assumed)
    unhidden: tuple[str, ...] = ()

    @property
    def needs_fallback(self) -> bool:
        return bool(self.failing)

    def describe(self) -> str:
        if self.error is not None:
            return f"host check: could not probe this host's KVM ({self.error})"
        if self.failing:
            text = ("this host's KVM emulates supervisor code and cannot emulate: "
                    + ", ".join(self.failing) + "; leanvm uses the emulated CPU profile and "
                    "the fallback by default")
            if self.unhidden:
                text += ("; the guest's CPUID shows these hidden features all the same: "
                         + ", ".join(self.unhidden) + " (Linux: leanvm adds noxsave and clearcpuid= to the command line)")
            return text
        return ("this host's KVM runs every probed instruction at CPL 0; leanvm uses the "
                "host CPU profile and no fallback by default")


def check_host(kvm_path: str = "/dev/kvm", *, use_cache: bool = True) -> HostFinding:
    """The finding for this host: from the cache when this boot already probed it, else
    from a probe (whose answer is then cached)."""
    key = _cache_key(kvm_path)
    path = cache_path()
    if use_cache:
        cached = _read_cache(path, key)
        if cached is not None:
            return cached
    finding = probe(kvm_path)
    if finding.error is None:
        _write_cache(path, key, finding)
    return finding


def cache_path() -> Path:
    root = os.environ.get("LEANVM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "leanvm")
    return Path(root) / CACHE_FILE


def probe(kvm_path: str = "/dev/kvm") -> HostFinding:
    """Run the probe guest now (a few ms on a host that runs it natively)."""
    from leanvm.errors import LeanvmError

    start = time.perf_counter()
    try:
        failing, faulting, unhidden = _run_probes(kvm_path)
    except (LeanvmError, OSError) as exc:
        return HostFinding((), (), False, time.perf_counter() - start, str(exc))
    return HostFinding(failing, faulting, False, time.perf_counter() - start, None, unhidden)


def _run_probes(kvm_path: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    from leanvm.abi import kvm as abi
    from leanvm.kvm import exits as ex
    from leanvm.kvm.system import Kvm
    from leanvm.loader.bare import CODE_SELECTOR, long_mode_state, write_long_mode_tables
    from leanvm.machine.cpu import setup_long_mode
    from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
    from leanvm.memory.host import map_anonymous

    failing: list[str] = []
    faulting: list[str] = []
    with Kvm(kvm_path) as kvm:
        cpuid = kvm.supported_cpuid()
        vm = kvm.create_vm()
        memory = GuestMemory()
        try:
            region = memory.add(GuestRegion("probe", 0, map_anonymous(RAM_SIZE), RegionKind.RAM))
            vm.set_identity_map_addr(KVM_PRIVATE)
            vm.set_tss_addr(KVM_PRIVATE + 0x1000)
            vm.set_memory_region(0, 0, RAM_SIZE, region.mapping.address)
            write_long_mode_tables(memory)
            _write_idt(memory, CODE_SELECTOR)
            boot = long_mode_state(CODE, STACK_TOP)
            unhidden = _visible_hidden_features(vm, memory, boot, cpuid)
            vcpu = vm.create_vcpu(0)
            setup_long_mode(vcpu, boot, cpuid)
            sregs = vcpu.get_sregs()
            sregs.idt.base, sregs.idt.limit = IDT, VECTORS * 16 - 1
            vcpu.set_sregs(sregs)
            base_regs = vcpu.get_regs()
            for index, (name, code) in enumerate(PROBES):
                address = CODE + index * 0x40
                memory.write(address, code + HLT)
                memory.write(DATA, struct.pack("<IIQ", 0x1F80, 0, 0) + bytes(16))
                regs = abi.kvm_regs.from_buffer_copy(base_regs)
                regs.rip, regs.rsp, regs.rsi, regs.rbx = address, STACK_TOP, DATA, 0xFF
                vcpu.set_regs(regs)
                exit_ = vcpu.run()
                if isinstance(exit_, ex.InternalError):
                    if exit_.suberror == abi.KVM_INTERNAL_ERROR_EMULATION:
                        failing.append(name)
                        continue
                    raise _probe_error(f"KVM internal error {exit_.suberror} on {name}")
                if not isinstance(exit_, ex.Hlt):
                    raise _probe_error(f"unexpected exit {exit_!r} on {name}")
                rip = vcpu.get_regs().rip
                if HANDLERS <= rip < HANDLERS + VECTORS * 16 and name != "int3":
                    faulting.append(name)  # the CPU raised an exception: not usable anyway
        finally:
            vm.close()
            memory.close()
    if "add" in failing:
        raise _probe_error("even the control instruction failed")
    return tuple(failing), tuple(faulting), unhidden


CPUID_CODE = CODE + 0x800  # cpuid; hlt
CPUID = bytes.fromhex("0fa2")


def _visible_hidden_features(vm: object, memory: object, boot: object,
                             cpuid: object) -> tuple[str, ...]:
    """Features the emulated profile hides that a vCPU given that profile still sees."""
    from leanvm.kvm import exits as ex
    from leanvm.kvm.cpuid import FEATURES
    from leanvm.machine import cpu_profile
    from leanvm.machine.cpu import setup_long_mode

    table = cpu_profile.apply(cpuid, "emulated")  # type: ignore[arg-type]
    vcpu = vm.create_vcpu(1)  # type: ignore[attr-defined]
    setup_long_mode(vcpu, boot, table)  # type: ignore[arg-type]
    memory.write(CPUID_CODE, CPUID + HLT)  # type: ignore[attr-defined]
    seen: dict[tuple[int, int], dict[str, int]] = {}
    for leaf in (1, 7):
        regs = vcpu.get_regs()
        regs.rip, regs.rax, regs.rcx = CPUID_CODE, leaf, 0
        vcpu.set_regs(regs)
        if not isinstance(vcpu.run(), ex.Hlt):
            raise _probe_error(f"CPUID leaf {leaf} did not run")
        out = vcpu.get_regs()
        seen[(leaf, 0)] = {"eax": out.rax, "ebx": out.rbx, "ecx": out.rcx, "edx": out.rdx}
    hidden = [name for name in cpu_profile.EMULATED_HIDDEN if name != "osxsave"]  # CR4-driven
    hidden += [name for name, (leaf, _, _, _) in FEATURES.items() if leaf == 7]
    return tuple(name for name in hidden
                 if seen[FEATURES[name][:2]][FEATURES[name][2]] >> FEATURES[name][3] & 1)


def _write_idt(memory: object, selector: int) -> None:
    """64-bit interrupt gates for vectors 0-31, each to a HLT of its own."""
    gates = b""
    for vector in range(VECTORS):
        handler = HANDLERS + vector * 16
        gates += struct.pack("<HHBBHII", handler & 0xFFFF, selector, 0, 0x8E,
                             (handler >> 16) & 0xFFFF, handler >> 32, 0)
    memory.write(IDT, gates)  # type: ignore[attr-defined]
    memory.write(HANDLERS, HLT * (VECTORS * 16))  # type: ignore[attr-defined]


def _probe_error(text: str) -> Exception:
    from leanvm.errors import KvmError

    return KvmError("host check", 0, text)


def _cache_key(kvm_path: str) -> str:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown-boot"
    return f"v{PROBE_VERSION} {boot_id} {os.uname().release} {kvm_path}"


def _read_cache(path: Path, key: str) -> HostFinding | None:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    if fields.get("key", "").strip() != key:
        return None
    failing = tuple(fields.get("failing", "").split())
    faulting = tuple(fields.get("faulting", "").split())
    unhidden = tuple(fields.get("unhidden", "").split())
    return HostFinding(failing, faulting, cached=True, unhidden=unhidden)


def _write_cache(path: Path, key: str, finding: HostFinding) -> None:
    """Write-then-rename, so concurrent leanvm processes never read half a file; a cache
    that cannot be written only costs the next process another probe."""
    text = (f"key: {key}\nfailing: {' '.join(finding.failing)}\n"
            f"faulting: {' '.join(finding.faulting)}\nunhidden: {' '.join(finding.unhidden)}\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass
