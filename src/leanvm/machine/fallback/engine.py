"""One Unicorn instance that runs one guest instruction at a time over copied guest state.

Unicorn runs here with its own paging off: its address space stands for the guest's linear
addresses. Pages are mapped into it only when the instruction touches them
(UC_HOOK_MEM_UNMAPPED), after a walk of the guest's own page tables (memory/paging.py) has
found the guest-physical page and checked the access; each page is a copy of guest RAM, and
the writes Unicorn makes (UC_HOOK_MEM_WRITE) are handed back as (guest-physical address,
bytes) to be written through GuestMemory only if the instruction completes. Every page is
unmapped again after the step (the guest's memory and page tables change between steps),
which also drops Unicorn's translated code for it.

A page is copied from where KVM maps it: given ``backing`` (the machine's memslots), from
the memslot's host memory, else from the GuestMemory region. A page that is not RAM-backed
at the moment (no memslot: a flash bank in a command mode, the kernel-entry trap's page,
device windows; without ``backing``, any page outside guest memory) is served through the
MMIO bus when the engine has one (device_pages.py), exactly as a plain guest load or store
would be; without a bus the step stops. Code is never run from such a page.

With its paging off Unicorn keeps only the low 52 bits of a 64-bit linear address, so guest
pages are mapped at ``linear & UC_ADDRESS_MASK`` and hook addresses are sign-extended back.
Unicorn cannot map its topmost page (linear 0xFFFFFFFFFFFFF000) from inside a hook (the
access then fails with UC_ERR_MAP), so a step that needs it runs again with that page
mapped before it starts.
"""

from __future__ import annotations

import ctypes
from typing import Any

from leanvm.errors import GuestError
from leanvm.machine.fallback.device_pages import Backing, DevicePages, MmioBus
from leanvm.machine.fallback.steps import Done, Fault, FpuState, Halt, Mapped, StepInput
from leanvm.memory.guest import GuestMemory, RegionKind
from leanvm.memory.paging import (FETCH, READ, WRITE, NonCanonical, PageFault, Translation,
                                  violation, walk)

PAGE = 4096
UC_ADDRESS_MASK = (1 << 52) - 1  # Unicorn's physical address width (paging off)
MAX_PAGES = 64  # pages one step may map; a REP string instruction is cut short before this
MAX_REP_ITERATIONS = 4096  # iterations of a REP instruction per step (the guest resumes it)
TOP_PAGE = UC_ADDRESS_MASK & ~(PAGE - 1)  # Unicorn's last page: mapped before a step starts
MAX_ATTEMPTS = 3  # runs of one step (a retry maps the top page first)

GPRS_64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
GPRS_32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp")


class Engine:
    """Unicorn in one mode (64 or 32 bits), for one vCPU: not thread-safe."""

    def __init__(self, bits: int, memory: GuestMemory, mmio: MmioBus | None = None,
                 backing: Backing | None = None) -> None:
        import unicorn
        from unicorn import x86_const as x86

        self.bits = bits
        self.memory = memory
        self.backing = backing
        self._uc_error = unicorn.UcError
        mode = unicorn.UC_MODE_64 if bits == 64 else unicorn.UC_MODE_32
        uc = self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, mode)
        # A model with SMAP (CLAC/STAC), MOVBE, POPCNT, CX16 and SSE4: what TCG implements
        uc.ctl_set_cpu_model(x86.UC_CPU_X86_SKYLAKE_CLIENT)
        self._prot = (unicorn.UC_PROT_READ, unicorn.UC_PROT_WRITE, unicorn.UC_PROT_EXEC)
        self._access_of = {unicorn.UC_MEM_READ_UNMAPPED: READ, unicorn.UC_MEM_WRITE_UNMAPPED: WRITE,
                           unicorn.UC_MEM_FETCH_UNMAPPED: FETCH, unicorn.UC_MEM_READ_PROT: READ,
                           unicorn.UC_MEM_WRITE_PROT: WRITE, unicorn.UC_MEM_FETCH_PROT: FETCH}
        uc.hook_add(unicorn.UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        uc.hook_add(unicorn.UC_HOOK_MEM_PROT, self._on_protection)
        uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, self._on_write)
        uc.hook_add(unicorn.UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(unicorn.UC_HOOK_CODE, self._on_code)
        gprs = GPRS_64 if bits == 64 else GPRS_32
        names = [*gprs, "rip" if bits == 64 else "eip", "eflags"]
        if bits == 64:
            names += ["fs_base", "gs_base"]
        self._names = names
        self._regs = _RegisterBank(uc, [getattr(x86, f"UC_X86_REG_{n.upper()}") for n in names])
        self._xmm_count = 16 if bits == 64 else 8
        # one batch: XMM registers, physical x87 registers R0-R7, MXCSR, FCW, FSW, FTW
        self._fpu = _RegisterBank(uc, [getattr(x86, f"UC_X86_REG_XMM{i}")
                                       for i in range(self._xmm_count)]
                                  + [getattr(x86, f"UC_X86_REG_FP{i}") for i in range(8)]
                                  + [x86.UC_X86_REG_MXCSR, x86.UC_X86_REG_FPCW,
                                     x86.UC_X86_REG_FPSW, x86.UC_X86_REG_FPTAG], width=16)
        # page copies Unicorn maps with mem_map_ptr (half the cost of mem_map + mem_write)
        self._pool = ctypes.create_string_buffer(PAGE * (MAX_PAGES + 1))
        first = (ctypes.addressof(self._pool) + PAGE - 1) & ~(PAGE - 1)
        self._buffers = [first + PAGE * i for i in range(MAX_PAGES)]
        self._mapped: dict[int, Mapped] = {}
        self._devices = DevicePages(uc, mmio, self._mapped, unicorn.UC_HOOK_MEM_READ) \
            if mmio is not None else None
        self._premap: list[tuple[int, str, int]] = []
        self._reset()

    def _reset(self) -> None:
        self._mapped.clear()
        self._writes: list[tuple[int, int]] = []
        self._result: Fault | Halt | None = None
        self._interrupt: int | None = None
        self._start = 0
        self._iterations = 0
        self._step: StepInput | None = None
        self._retry: tuple[int, str, int] | None = None  # the top page, to map up front

    # --- one step ------------------------------------------------------------------------
    def execute(self, step: StepInput) -> Done | Fault | Halt:
        """Run the instruction at ``step.rip``; the outcome (nothing is written to the guest
        here: Done carries the writes)."""
        self._premap = []
        for _ in range(MAX_ATTEMPTS):
            outcome = self._attempt(step)
            if outcome is not None:
                return outcome
        return Halt("Unicorn could not map the top page of the address space")

    def _attempt(self, step: StepInput) -> Done | Fault | Halt | None:
        """One run of the step; None when it must run again with ``_premap`` grown."""
        self._reset()
        self._step = step
        uc = self.uc
        devices = self._devices
        if devices is not None:
            devices.begin(step)
        try:
            self._load(step)
            for page, kind, address in self._premap:
                if not self._map(page, kind, address):
                    return self._result
            mask = (1 << self.bits) - 1
            self._start = step.rip & mask
            try:
                uc.emu_start(self._start, (self._start + step.size) & mask)
            except self._uc_error as exc:
                if self._retry is not None:
                    self._premap.append(self._retry)
                    return None
                if self._result is not None:
                    return self._result
                if devices is not None and devices.fault is not None:
                    return Fault(*devices.fault)
                if self._interrupt is not None:
                    return Fault(self._interrupt)
                return Halt(f"Unicorn could not execute it ({exc})")
            if self._result is not None:
                return self._result
            if devices is not None and devices.fault is not None:
                return Fault(*devices.fault)
            if self._interrupt is not None:
                return Fault(self._interrupt)
            return self._collect(step)
        finally:
            for page in self._mapped:
                uc.mem_unmap(page, PAGE)
            self._mapped.clear()
            if devices is not None:
                devices.end()
            self._step = None

    def _load(self, step: StepInput) -> None:
        values = [step.registers[n] for n in (GPRS_64 if self.bits == 64 else GPRS_64[:8])]
        values += [step.rip, step.registers["rflags"]]
        if self.bits == 64:
            values += [step.fs_base, step.gs_base]
        else:
            values = [v & 0xFFFFFFFF for v in values]
        self._regs.write(values)
        fpu = step.fpu
        if fpu is not None:
            top = (fpu.fsw >> 11) & 7
            physical = [b""] * 8
            for i, value in enumerate(fpu.st):  # ST(i) lives in physical register TOP+i
                physical[(top + i) & 7] = value[:10]  # 64-bit mantissa, sign and exponent
            self._fpu.write_bytes([v.to_bytes(16, "little") for v in fpu.xmm[:self._xmm_count]]
                                  + physical
                                  + [v.to_bytes(4, "little") for v in (
                                      fpu.mxcsr, fpu.fcw, fpu.fsw, _full_tag(fpu.ftw))])

    def _collect(self, step: StepInput) -> Done:
        values = self._regs.read()
        named = dict(zip(self._names, values))
        registers = dict(step.registers)
        if self.bits == 64:
            for name in GPRS_64:
                registers[name] = named[name]
            registers["rip"] = named["rip"]
            fs_base, gs_base = named["fs_base"], named["gs_base"]
        else:  # 32-bit code: the upper halves of the 64-bit registers are undefined; keep 0
            for name64, name32 in zip(GPRS_64, GPRS_32):
                registers[name64] = named[name32]
            registers["rip"] = named["eip"]
            fs_base, gs_base = step.fs_base, step.gs_base
        registers["rflags"] = named["eflags"] | 0x2  # bit 1 is always set
        fpu = self._read_fpu(step.fpu) if step.fpu is not None else None
        writes: list[tuple[int, bytes]] = []
        for address, size in self._writes:
            end = address + size
            while address < end:
                page = address & ~(PAGE - 1)
                piece = min(end, page + PAGE) - address
                entry = self._mapped[page]
                if entry.buffer:  # device pages' writes come from their callbacks
                    writes.append((entry.physical + (address - page),
                                   ctypes.string_at(entry.buffer + (address - page), piece)))
                address += piece
        written = {page for page, _ in ((a & ~(PAGE - 1), s) for a, s in self._writes)}
        written |= {(a + s - 1) & ~(PAGE - 1) for a, s in self._writes}
        updates: list[tuple[int, int]] = []
        for page, entry in self._mapped.items():
            updates += entry.translation.updates(WRITE if page in written else READ)
        device_writes = self._devices.writes() if self._devices is not None else []
        return Done(registers, fs_base, gs_base, fpu, writes, updates, device_writes)

    def _read_fpu(self, before: FpuState) -> FpuState:
        slots = self._fpu.read_bytes()
        count = self._xmm_count
        xmm = tuple(int.from_bytes(v, "little") for v in slots[:count]) + before.xmm[count:]
        physical = slots[count:count + 8]
        mxcsr, fcw, fsw, ftw = (int.from_bytes(v[:4], "little") for v in slots[count + 8:])
        fcw, fsw, ftw = fcw & 0xFFFF, fsw & 0xFFFF, ftw & 0xFFFF
        top = (fsw >> 11) & 7
        st = tuple(physical[(top + i) & 7][:10] + before.st[i][10:] for i in range(8))
        return FpuState(xmm, mxcsr, fcw, fsw, _abridged_tag(ftw), st)

    # --- hooks (called by Unicorn during emu_start) --------------------------------------
    def _on_code(self, uc: Any, address: int, size: int, _data: object) -> None:
        if address != self._start:
            uc.emu_stop()  # the instruction branched: stop before the next one runs
            return
        self._iterations += 1
        if self._iterations > 1 and (self._iterations > MAX_REP_ITERATIONS
                                     or len(self._mapped) > MAX_PAGES - 8):
            uc.emu_stop()  # a long REP: stop between iterations; the guest resumes it

    def _on_interrupt(self, uc: Any, vector: int, _data: object) -> None:
        self._interrupt = vector
        uc.emu_stop()

    def _on_write(self, _uc: Any, _access: int, address: int, size: int, _value: int,
                  _data: object) -> None:
        self._writes.append((address, size))
        if self._devices is not None:
            self._devices.note_write(address, size)

    def _on_unmapped(self, uc: Any, access: int, address: int, size: int, _value: int,
                     _data: object) -> bool:
        kind = self._access_of.get(access, READ)
        first = address & ~(PAGE - 1)
        wrap = UC_ADDRESS_MASK if self.bits == 64 else 0xFFFFFFFF  # past the top: page 0
        last = ((address + max(size, 1) - 1) & wrap) & ~(PAGE - 1)
        for page in (first,) if last == first else (first, last):
            if page in self._mapped:
                continue
            if page == TOP_PAGE and self.bits == 64:  # see the module docstring
                self._retry = (page, kind, address)
                return False
            if not self._map(page, kind, address):
                return False
        return True

    def _on_protection(self, _uc: Any, access: int, address: int, _size: int, _value: int,
                       _data: object) -> bool:
        kind = self._access_of.get(access, READ)
        entry = self._mapped.get(address & ~(PAGE - 1))
        step = self._step
        if entry is None or step is None:
            self._result = Halt(f"unexpected {kind} protection fault at {address:#x}")
            return False
        if not entry.buffer:  # Unicorn never runs code from an MMIO mapping
            self._result = Halt(f"it runs code from guest-physical {entry.physical:#x}, which "
                                "is device memory at the moment (not RAM-backed)")
            return False
        code = violation(step.paging, entry.translation, kind, user=step.user,
                         ac=bool(step.registers["rflags"] & AC_FLAG))
        linear = entry.linear + (address & (PAGE - 1))
        if code:
            self._result = Fault(PF_VECTOR, code, linear)
        else:  # the page tables allow it: the target is not writable RAM
            self._result = Halt(f"it writes to {entry.physical + (address & (PAGE - 1)):#x}, "
                                "which is not writable RAM (ROM or device memory)")
        return False

    def _map(self, page: int, kind: str, address: int) -> bool:
        """Map the guest page Unicorn calls ``page``; False (with self._result set) if the
        guest should fault or the VM must stop."""
        step = self._step
        assert step is not None
        if len(self._mapped) >= MAX_PAGES:
            self._result = Halt(f"it touches more than {MAX_PAGES} pages")
            return False
        linear = self._linear(page)
        if linear is None:
            self._result = Fault(GP_VECTOR, 0)  # non-canonical
            return False
        fault_address = linear + (address & (PAGE - 1)) if page == address & ~(PAGE - 1) else linear
        paging = step.paging
        reader = self.memory.read_int
        try:
            found = walk(paging, linear, kind, reader, user=step.user)
        except PageFault as fault:
            self._result = Fault(PF_VECTOR, fault.error_code, fault_address)
            return False
        except NonCanonical:
            self._result = Fault(GP_VECTOR, 0)
            return False
        except GuestError as exc:
            self._result = Halt(f"the guest's page tables point outside guest RAM ({exc})")
            return False
        ac = bool(step.registers["rflags"] & AC_FLAG)
        code = violation(paging, found, kind, user=step.user, ac=ac)
        if code:
            self._result = Fault(PF_VECTOR, code, fault_address)
            return False
        physical = found.physical & ~(PAGE - 1)
        readable = not violation(paging, found, READ, user=step.user, ac=ac)
        writable = not violation(paging, found, WRITE, user=step.user, ac=ac)
        executable = not violation(paging, found, FETCH, user=step.user, ac=ac)
        host, ram = self._ram_page(physical)
        if host is None or (not ram and kind != FETCH and self._devices is not None):
            return self._map_device(page, linear, physical, found, writable, kind, host)
        read, write, execute = self._prot
        perms = ((read if readable else 0) | (write if writable and ram else 0)
                 | (execute if executable else 0))
        buffer = self._buffers[len(self._mapped)]
        ctypes.memmove(buffer, host, PAGE)  # a whole page of guest memory (region or memslot)
        self.uc.mem_map_ptr(page, PAGE, perms, buffer)
        self._mapped[page] = Mapped(linear, physical, found, writable, ram, buffer)
        return True

    def _ram_page(self, physical: int) -> tuple[int | None, bool]:
        """(host address of the page's bytes, writable RAM) where a guest access finds RAM
        or ROM right now; (None, False) where it would exit to the MMIO bus."""
        try:
            region = self.memory.find(physical, PAGE)
        except GuestError:
            region = None
        host: int | None = None
        writable = False
        if region is not None:
            offset = physical - region.base
            host = region.mapping.address + offset
            writable = (region.kind is not RegionKind.ROM and not region.readonly
                        and offset + PAGE <= region.mapping.writable_limit)
        if self.backing is None:
            return host, writable
        slot = self.backing(physical)
        if slot is None:
            return None, False
        # writes are committed through GuestMemory: only where it holds the same bytes
        return slot[0], writable and not slot[1] and slot[0] == host

    def _map_device(self, page: int, linear: int, physical: int, found: Translation,
                    writable: bool, kind: str, host: int | None) -> bool:
        """A page whose accesses go to the MMIO bus (reads from ``host`` if KVM maps it
        read-only); code never runs from it."""
        if self._devices is None or kind == FETCH:
            if self._devices is not None:
                what = "device memory at the moment (code never runs from it here)"
            elif self.backing is not None:
                what = "not RAM-backed at the moment (device memory is never emulated)"
            else:
                what = "not RAM (device memory is never emulated)"
            self._result = Halt(f"it accesses guest-physical {physical:#x} (linear {linear:#x}), "
                                f"which is {what}")
            return False
        self._mapped[page] = Mapped(linear, physical, found, writable, False, 0)
        self._devices.map(page, host)
        return True

    def _linear(self, page: int) -> int | None:
        """The guest linear address Unicorn's ``page`` stands for (None: non-canonical)."""
        if self.bits == 32:
            return page  # 32-bit linear addresses pass unchanged
        high = page >> 47  # bits 51:47 of a 52-bit Unicorn address
        if high == 0:
            return page
        if high == 0x1F:
            return page | ~UC_ADDRESS_MASK & ((1 << 64) - 1)
        return None

    def close(self) -> None:
        self.uc = None


AC_FLAG = 1 << 18  # RFLAGS.AC
GP_VECTOR, PF_VECTOR = 13, 14


def _full_tag(abridged: int) -> int:
    """FXSAVE's abridged tag (1 = valid) -> the x87 tag word (00 valid, 11 empty)."""
    return sum(0 if abridged >> i & 1 else 3 << (2 * i) for i in range(8))


def _abridged_tag(full: int) -> int:
    return sum(1 << i for i in range(8) if (full >> (2 * i)) & 3 != 3)


class _RegisterBank:
    """Reads and writes a fixed list of registers in one call: Unicorn's batch API through
    ctypes, each register in a ``width``-byte little-endian slot (8 for general registers,
    16 for XMM and the 10-byte x87 registers). One reg_write per register costs ~2.3 us
    here, a batch of 20 ~4 us. The batch entry points are part of Unicorn's C API; the
    binding's handle is not public, so this checks for it and says so if it moved."""

    def __init__(self, uc: Any, ids: list[int], width: int = 8) -> None:
        try:
            from unicorn.unicorn_py3.unicorn import uclib

            self._lib: Any = uclib
            self._handle: Any = uc._uch
        except (ImportError, AttributeError):
            raise GuestError("this Unicorn's Python binding has no uclib/_uch: leanvm needs "
                             "unicorn 2.1 (pip install 'unicorn>=2.1,<3')") from None
        count = len(ids)
        self._count, self._width = count, width
        self._buffer = (ctypes.c_uint64 * (count * width // 8))()
        base = ctypes.addressof(self._buffer)
        self._ids = (ctypes.c_int * count)(*ids)
        self._pointers = (ctypes.c_void_p * count)(*[base + width * i for i in range(count)])

    def write(self, values: list[int]) -> None:
        """64-bit values (width 8)."""
        self._buffer[:] = values
        if self._lib.uc_reg_write_batch(self._handle, self._ids, self._pointers, self._count):
            raise GuestError("Unicorn refused a register write")

    def read(self) -> list[int]:
        if self._lib.uc_reg_read_batch(self._handle, self._ids, self._pointers, self._count):
            raise GuestError("Unicorn refused a register read")
        return self._buffer[:]

    def write_bytes(self, values: list[bytes]) -> None:
        width = self._width
        ctypes.memmove(self._buffer, b"".join(v.ljust(width, b"\0") for v in values),
                       self._count * width)
        if self._lib.uc_reg_write_batch(self._handle, self._ids, self._pointers, self._count):
            raise GuestError("Unicorn refused a register write")

    def read_bytes(self) -> list[bytes]:
        self._buffer[:] = [0] * len(self._buffer)
        if self._lib.uc_reg_read_batch(self._handle, self._ids, self._pointers, self._count):
            raise GuestError("Unicorn refused a register read")
        raw = bytes(self._buffer)
        width = self._width
        return [raw[i:i + width] for i in range(0, len(raw), width)]
