"""The emulation fallback: what the vCPU loop calls on KVM_EXIT_INTERNAL_ERROR.

A host whose KVM emulates guest supervisor code cannot emulate some instructions and
returns an emulation failure with the instruction bytes (docs/emulation.md). The fallback
runs that one instruction in Unicorn (engine.py) over the vCPU's registers and the guest
memory it touches, writes the results back and lets the vCPU go on. Where the architecture
answers with an exception (INT3, a page fault, #GP, ...) it injects that exception instead.
Whatever it cannot do faithfully (port I/O, HLT, device memory, system instructions, modes
other than 64-bit and 32-bit protected mode) stops the VM with one line naming the
instruction. Every use is counted per mnemonic, with the time spent.

One Fallback serves all vCPUs of a machine: each vCPU gets its own Unicorn instances, and a
lock serialises steps so that a locked read-modify-write done here is atomic against the
other vCPUs' fallback steps (not against guest code running natively on them: the emulated
CPU profile hides CX16, the one locked instruction seen to need this).
"""

from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING, Any

from leanvm.errors import GuestError, LeanvmError

if TYPE_CHECKING:  # the rest loads on the first emulation failure (start-up time matters)
    from leanvm.kvm.exits import InternalError
    from leanvm.machine.fallback.decode import Decoded, Decoder
    from leanvm.machine.fallback.device_pages import Backing, MmioBus
    from leanvm.machine.fallback.engine import Done, Engine, Fault, FpuState, Halt
    from leanvm.memory.guest import GuestMemory
    from leanvm.memory.paging import PagingContext

MAX_PHYS_BITS = 52  # MAXPHYADDR when CPUID does not say

# Control-register and flag bits (Intel SDM vol. 3, 2.5 and 2.3)
CR0_PE, CR0_MP, CR0_EM, CR0_TS = 1 << 0, 1 << 1, 1 << 2, 1 << 3
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
RFLAGS_VM = 1 << 17
MXCSR_MASK = 0xFFFF  # MXCSR bits a CPU with DAZ accepts; others make LDMXCSR/FXRSTOR #GP(0)
FETCH_BYTES = 15  # the longest x86 instruction

# Exception vectors (Intel SDM vol. 3, table 6-1)
BP, UD, NM, GP, PF = 3, 6, 7, 13, 14
VECTOR_NAMES = {0: "#DE", 1: "#DB", BP: "#BP", 4: "#OF", 5: "#BR", UD: "#UD", NM: "#NM",
                8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", GP: "#GP", PF: "#PF", 16: "#MF",
                17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}
# Exceptions Unicorn raises that are delivered to the guest (with error code 0 for #GP);
# anything else (#UD: Unicorn may simply not implement the instruction) stops the VM.
DELIVERED = {0: None, GP: 0, 16: None, 19: None}


class Fallback:
    """Counts (``counts``, ``total``, ``seconds``, ``exceptions``) and the handler
    (``handle``) of one machine's emulation fallback."""

    def __init__(self, memory: "GuestMemory", phys_bits: int = MAX_PHYS_BITS, *,
                 mmio: "MmioBus | None" = None, backing: "Backing | None" = None) -> None:
        self.memory = memory
        self.phys_bits = phys_bits
        # Where guest accesses go that find no RAM: the machine's MMIO bus (a locked one
        # with several vCPUs), and what KVM maps right now (device_pages.memslot_backing).
        # Without them pages outside guest memory stop the VM, and a page is read from its
        # GuestMemory region even when KVM would send the access to a device.
        self.mmio = mmio
        self.backing = backing
        self.counts: dict[str, int] = {}  # Capstone mnemonic -> instructions handled
        self.exceptions: dict[str, int] = {}  # "#PF" -> exceptions delivered instead
        self.total = 0
        self.seconds = 0.0
        self.stopped: str | None = None  # the detail of the stop it asked for, if any
        self._lock = threading.Lock()
        self._engines: dict[tuple[int, int], Engine] = {}
        self._decoder: "Decoder | None" = None

    # --- the vCPU loop's hook -------------------------------------------------------------
    def handle(self, vcpu: Any, exit_: "InternalError") -> str | None:
        """Handle one emulation failure of ``vcpu``: None when the vCPU can go on, else the
        one-line reason to stop the VM."""
        start = time.perf_counter()
        with self._lock:
            try:
                name, detail = self._handle(vcpu, exit_)
            except LeanvmError as exc:
                name, detail = None, f"emulation fallback: {exc}"
            if name is not None:
                self.counts[name] = self.counts.get(name, 0) + 1
                self.total += 1
            if detail is not None:
                self.stopped = detail
            self.seconds += time.perf_counter() - start
        return detail

    def _handle(self, vcpu: Any, exit_: "InternalError") -> tuple[str | None, str | None]:
        from leanvm.machine.fallback.decode import Decoder, refusal
        from leanvm.memory.paging import PagingContext

        if self._decoder is None:
            self._decoder = Decoder()
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        rip = regs.rip
        bits, why = _code_size(regs, sregs)
        if bits is None:
            return None, f"emulation fallback: cannot run code at RIP {rip:#x} in {why}"
        paging = PagingContext.from_registers(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer,
                                              self.phys_bits)
        user = sregs.cs.selector & 3 == 3
        code = exit_.instruction or self._fetch(paging, sregs.cs.base + rip, user)
        insn = self._decoder.decode(code, bits) if code else None
        if insn is None:
            shown = code.hex(" ") if code else "unreadable"
            return None, (f"emulation fallback: cannot decode the instruction at RIP {rip:#x} "
                          f"(bytes {shown})")
        where = f"'{insn.text}' ({insn.data.hex(' ')}) at RIP {rip:#x}"
        reason = refusal(insn)
        if reason is None:
            reason = _segment_problem(insn, sregs, bits)
        if reason is not None:
            return None, f"emulation fallback refused {where}: it {reason}"
        if insn.base == "int3":  # a trap: the handler sees RIP after the 0xCC
            regs.rip = rip + insn.size
            vcpu.set_regs(regs)
            self._deliver(vcpu, sregs, BP)
            return insn.mnemonic, None
        fpu_regs = None
        if insn.uses_fpu:
            cr0 = sregs.cr0
            if cr0 & CR0_EM:
                return None, f"emulation fallback refused {where}: CR0.EM is set"
            if cr0 & CR0_TS and (insn.base not in ("wait", "fwait") or cr0 & CR0_MP):
                self._deliver(vcpu, sregs, NM)  # device not available: lazy FPU switching
                return insn.mnemonic, None
            fpu_regs = vcpu.get_xsave()  # KVM_GET_FPU leaves MXCSR out
        outcome = self._engine(vcpu.id, bits).execute(_step_input(
            regs, sregs, fpu_regs, paging, user, rip, insn))
        return self._finish(vcpu, regs, sregs, fpu_regs, insn, where, outcome)

    def _finish(self, vcpu: Any, regs: Any, sregs: Any, fpu_regs: Any, insn: "Decoded",
                where: str, outcome: "Done | Fault | Halt") -> tuple[str | None, str | None]:
        from leanvm.machine.fallback.engine import Fault, Halt

        if isinstance(outcome, Halt):
            return None, f"emulation fallback stopped at {where}: {outcome.detail}"
        if isinstance(outcome, Fault):
            return self._fault(vcpu, sregs, insn, where, outcome)
        if outcome.fpu is not None and outcome.fpu.mxcsr & ~MXCSR_MASK:
            return self._fault(vcpu, sregs, insn, where, Fault(GP, 0))  # reserved MXCSR bits
        memory = self.memory
        try:
            for address, data in outcome.writes:
                memory.write(address, data)
        except GuestError as exc:
            return None, f"emulation fallback stopped at {where}: {exc}"
        if outcome.device_writes:
            assert self.mmio is not None  # the engine makes device pages only with a bus
            for address, size, value in outcome.device_writes:
                self.mmio.write(address, size, value)
        _set_flags(memory, outcome.flag_updates)
        for name, value in outcome.registers.items():
            setattr(regs, name, value)
        vcpu.set_regs(regs)
        if (outcome.fs_base, outcome.gs_base) != (sregs.fs.base, sregs.gs.base):
            sregs.fs.base, sregs.gs.base = outcome.fs_base, outcome.gs_base
            vcpu.set_sregs(sregs)
        if outcome.fpu is not None and outcome.fpu != _fpu_state(fpu_regs):
            _store_fpu(fpu_regs, outcome.fpu)
            vcpu.set_xsave(fpu_regs)
        return insn.mnemonic, None

    def _fault(self, vcpu: Any, sregs: Any, insn: "Decoded", where: str,
               fault: "Fault") -> tuple[str | None, str | None]:
        vector = fault.vector
        if vector == PF:
            self._deliver(vcpu, sregs, PF, fault.error_code, fault.cr2)
        elif vector in DELIVERED:
            code = fault.error_code if fault.error_code is not None else DELIVERED[vector]
            self._deliver(vcpu, sregs, vector, code)
        else:
            name = VECTOR_NAMES.get(vector, f"vector {vector}")
            return None, (f"emulation fallback stopped at {where}: Unicorn raised {name} "
                          "(it may not implement this instruction)")
        return insn.mnemonic, None

    def _deliver(self, vcpu: Any, sregs: Any, vector: int, error_code: int | None = None,
                 cr2: int | None = None) -> None:
        """Inject exception ``vector`` (KVM_SET_VCPU_EVENTS, measured to work on this host
        for #BP at CPL 0); CR2 first for a page fault."""
        if cr2 is not None:
            sregs.cr2 = cr2
            vcpu.set_sregs(sregs)
        events = vcpu.get_events()
        events.exception_injected = 1
        events.exception_nr = vector
        events.exception_has_error_code = int(error_code is not None)
        events.exception_error_code = error_code or 0
        events.exception_pending = 0
        events.flags = 0  # leave NMI, SIPI, SMM and interrupt-shadow state alone
        vcpu.set_events(events)
        name = VECTOR_NAMES.get(vector, str(vector))
        self.exceptions[name] = self.exceptions.get(name, 0) + 1

    def _fetch(self, paging: "PagingContext", linear: int, user: bool) -> bytes:
        """The instruction bytes at ``linear`` when KVM did not supply them ("" if they
        cannot be read)."""
        from leanvm.memory.paging import translate

        out = b""
        try:
            while len(out) < FETCH_BYTES:
                address = linear + len(out)
                found = translate(paging, address, "fetch", self.memory.read_int, user=user)
                piece = min(FETCH_BYTES - len(out), 4096 - (address & 0xFFF))
                out += self.memory.read(found.physical, piece)
        except GuestError:
            pass
        return out

    def _engine(self, vcpu_id: int, bits: int) -> "Engine":
        engine = self._engines.get((vcpu_id, bits))
        if engine is None:
            from leanvm.machine.fallback.engine import Engine

            engine = self._engines[(vcpu_id, bits)] = Engine(bits, self.memory, self.mmio,
                                                             self.backing)
        return engine

    # --- reporting ----------------------------------------------------------------------
    def summary(self) -> str:
        """One line: "emulation fallback 123 instructions in 0.1 s: popcnt 100, ..."."""
        by_count = sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))
        text = (f"emulation fallback {self.total} instructions in {self.seconds:.1f} s"
                + (": " + ", ".join(f"{name} {count}" for name, count in by_count)
                   if by_count else ""))
        if self.exceptions:
            text += "; exceptions delivered: " + ", ".join(
                f"{name} {count}" for name, count in sorted(self.exceptions.items()))
        return text

    def to_json(self) -> dict[str, object]:
        return {"total": self.total, "seconds": round(self.seconds, 6),
                "counts": dict(self.counts), "exceptions": dict(self.exceptions),
                "per_instruction_us": round(self.seconds / self.total * 1e6, 1)
                if self.total else None}

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()


def _code_size(regs: Any, sregs: Any) -> tuple[int | None, str]:
    """64 or 32 for the code the vCPU runs, or None and the name of the mode refused."""
    if not sregs.cr0 & CR0_PE:
        return None, "real mode"
    if regs.rflags & RFLAGS_VM:
        return None, "virtual-8086 mode"
    if sregs.cr4 & CR4_LA57:
        return None, "5-level paging (not supported by the fallback)"
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64, ""
    if sregs.cs.db:
        return 32, ""
    return None, "16-bit protected mode"


def _segment_problem(insn: "Decoded", sregs: Any, bits: int) -> str | None:
    """32-bit code: the fallback models flat segments (base 0) only."""
    if bits == 64:
        return None
    for name in ("cs", "ds", "es", "ss", "fs", "gs"):
        base = getattr(sregs, name).base
        if base and (name in ("cs", "ds", "es", "ss") or f"{name}:" in insn.operands):
            return f"uses segment {name.upper()} with base {base:#x} (only flat segments)"
    return None


def _step_input(regs: Any, sregs: Any, fpu_regs: Any, paging: "PagingContext", user: bool,
                rip: int, insn: "Decoded") -> Any:
    from leanvm.machine.fallback.engine import GPRS_64, StepInput

    registers = {name: getattr(regs, name) for name in (*GPRS_64, "rip", "rflags")}
    return StepInput(registers, sregs.fs.base, sregs.gs.base,
                     _fpu_state(fpu_regs) if fpu_regs is not None else None,
                     paging, user, rip, insn.size)


# The legacy (FXSAVE) area of an XSAVE image (Intel SDM vol. 1, 10.5.1) and its header
_LEGACY = struct.Struct("<HHB")  # FCW, FSW, abridged FTW at bytes 0-4
MXCSR_OFFSET, ST_OFFSET, XMM_OFFSET, XSTATE_BV_OFFSET = 24, 32, 160, 512
XSTATE_X87_SSE = 0x3  # XSTATE_BV bits: the x87 and SSE components are in the image


def _fpu_state(xsave: Any) -> "FpuState":
    from leanvm.machine.fallback.engine import FpuState

    image = bytes(xsave)
    fcw, fsw, ftw = _LEGACY.unpack_from(image, 0)
    (mxcsr,) = struct.unpack_from("<I", image, MXCSR_OFFSET)
    xmm = tuple(int.from_bytes(image[XMM_OFFSET + 16 * i:XMM_OFFSET + 16 * i + 16], "little")
                for i in range(16))
    st = tuple(image[ST_OFFSET + 16 * i:ST_OFFSET + 16 * i + 16] for i in range(8))
    return FpuState(xmm, mxcsr, fcw, fsw, ftw, st)


def _store_fpu(xsave: Any, state: "FpuState") -> None:
    """Put ``state`` into the XSAVE image and mark x87 and SSE as present in XSTATE_BV, so
    KVM_SET_XSAVE loads them rather than their initial values."""
    view = memoryview(xsave).cast("B")
    _LEGACY.pack_into(view, 0, state.fcw, state.fsw, state.ftw)
    struct.pack_into("<I", view, MXCSR_OFFSET, state.mxcsr)
    for i, value in enumerate(state.st):
        view[ST_OFFSET + 16 * i:ST_OFFSET + 16 * i + 16] = value
    for i, value in enumerate(state.xmm):
        view[XMM_OFFSET + 16 * i:XMM_OFFSET + 16 * i + 16] = value.to_bytes(16, "little")
    (present,) = struct.unpack_from("<Q", view, XSTATE_BV_OFFSET)
    struct.pack_into("<Q", view, XSTATE_BV_OFFSET, present | XSTATE_X87_SSE)


def _set_flags(memory: "GuestMemory", updates: list[tuple[int, int]]) -> None:
    """Set accessed/dirty bits in page-table entries, one byte each (bits 5 and 6 are in the
    low byte), as the CPU would have; entries in ROM are left alone."""
    for address, bits in updates:
        try:
            byte = memory.read(address, 1)[0]
            if byte & bits != bits:
                memory.write(address, bytes((byte | bits,)))
        except GuestError:
            continue
