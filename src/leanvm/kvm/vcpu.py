"""A vCPU fd and its mmap'd kvm_run page. run() returns a typed exit (see exits.py)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from leanvm.abi import kvm as abi
from leanvm.errors import KvmError
from leanvm.kvm import exits as ex
from leanvm.kvm._ioctl import ioctl
from leanvm.kvm.cpuid import CpuidTable

if TYPE_CHECKING:
    from leanvm.kvm.coalesced import CoalescedRing

_U32 = struct.Struct("<I")
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
_INTERNAL = struct.Struct("<IIQB15s")  # suberror, ndata, flags, insn_size, insn_bytes
_FAIL_ENTRY = struct.Struct("<QI")
_U64 = struct.Struct("<Q")
_U = abi.RUN_UNION
_KVM_RUN = abi.KVM_RUN
_HLT, _SHUTDOWN = ex.Hlt(), ex.Shutdown()
_INTERRUPTED = ex.Interrupted()
# The exit reason and, for KVM_EXIT_IO, its header, in one unpack from RUN_EXIT_REASON (the
# vCPU loop's fast path for single port writes reads it straight after KVM_RUN).
EXIT_HEADER = struct.Struct(f"<I{_U - abi.RUN_EXIT_REASON - 4}xBBHIQ")


class Vcpu:
    """One virtual CPU. Not thread-safe: run it from one thread."""

    def __init__(self, vm_fd: int, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self.vm_fd = vm_fd
        self.id = vcpu_id
        self.fd = fd
        self.run_page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self._run = memoryview(self.run_page)
        self.run_view = self._run  # the kvm_run page, for the vCPU loop's fast path
        self._kick_signal: int | None = None  # see bind_kick_signal
        self._rings: "list[CoalescedRing]" = []

    # --- running ---------------------------------------------------------------------
    def run(self) -> ex.Exit:
        """Enter the guest until the next exit and return it decoded."""
        try:
            fcntl.ioctl(self.fd, _KVM_RUN, 0)
        except OSError as exc:
            return self.run_failed(exc)
        return self.decode()

    def run_failed(self, exc: OSError) -> ex.Exit:
        """What a KVM_RUN that raised means: a signal or a stop request interrupted it
        (Interrupted), or KVM refused (KvmError)."""
        if exc.errno in (errno.EINTR, errno.EAGAIN):
            self._run[abi.RUN_IMMEDIATE_EXIT] = 0
            if self._kick_signal is not None:  # consume a kick, or every run would end at once
                signal.sigtimedwait((self._kick_signal,), 0)
            return _INTERRUPTED
        raise KvmError("KVM_RUN", exc.errno or 0) from None

    def decode(self) -> ex.Exit:
        """The exit the last KVM_RUN left in the run page."""
        run = self._run
        reason = _U32.unpack_from(run, abi.RUN_EXIT_REASON)[0]
        if reason == abi.KVM_EXIT_IO:
            direction, size, port, count, offset = _IO.unpack_from(run, _U)
            if direction == abi.KVM_EXIT_IO_OUT:
                return ex.IoOut(port, size, count, bytes(run[offset:offset + size * count]))
            return ex.IoIn(port, size, count, offset)
        if reason == abi.KVM_EXIT_MMIO:
            address, data, length, is_write = _MMIO.unpack_from(run, _U)
            if is_write:
                return ex.MmioWrite(address, length, data[:length])
            return ex.MmioRead(address, length)
        return self._decode_rare(reason)

    def _decode_rare(self, reason: int) -> ex.Exit:
        run = self._run
        if reason == abi.KVM_EXIT_HLT:
            return _HLT
        if reason == abi.KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == abi.KVM_EXIT_INTR:
            return _INTERRUPTED
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            return decode_internal_error(bytes(run[_U:_U + 8 + 16 * 8]))
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            hw, cpu = _FAIL_ENTRY.unpack_from(run, _U)
            return ex.FailEntry(hw, cpu)
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            kind, ndata = struct.unpack_from("<II", run, _U)
            data = struct.unpack_from(f"<{min(ndata, 16)}Q", run, _U + 8)
            return ex.SystemEvent(kind, data)
        return ex.Unknown(reason, _U64.unpack_from(run, _U)[0])

    def complete_io_in(self, exit_: ex.IoIn, data: bytes) -> None:
        """Hand the bytes of an IN back to the guest (applied on the next run())."""
        n = exit_.size * exit_.count
        self._run[exit_.data_offset:exit_.data_offset + n] = data[:n].ljust(n, b"\xff")

    def complete_mmio_read(self, data: bytes) -> None:
        """Hand the bytes of an MMIO read back to the guest (applied on the next run())."""
        off = _U + 8
        self._run[off:off + 8] = data[:8].ljust(8, b"\x00")

    def bind_kick_signal(self, signum: int) -> Callable[[], None]:
        """Let ``signum``, sent to the calling thread, interrupt this vCPU's KVM_RUN, whatever
        the signal's disposition and whichever thread this is. The thread blocks ``signum``;
        KVM unblocks it only while the guest runs (KVM_SET_SIGNAL_MASK), so a kick makes
        KVM_RUN return EINTR and then stays pending, blocked, until run_failed consumes it:
        no handler ever runs, and a kick sent just before KVM_RUN still interrupts it.
        Returns the function that undoes this (call it on the same thread, once no more
        kicks can be sent)."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
        self.set_signal_mask(set(old) - {signum})
        self._kick_signal = signum

        def unbind() -> None:
            self._kick_signal = None
            while signal.sigtimedwait((signum,), 0) is not None:
                pass
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

        return unbind

    def set_signal_mask(self, blocked: "set[int] | set[signal.Signals]") -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is in KVM_RUN."""
        bits = 0
        for signum in blocked:
            bits |= 1 << (int(signum) - 1)
        mask = abi.kvm_signal_mask_64(abi.KVM_SIGSET_BYTES, bits)
        ioctl(self.fd, abi.KVM_SET_SIGNAL_MASK, "KVM_SET_SIGNAL_MASK", mask)

    def coalesced_ring(self, offset: int) -> "CoalescedRing | None":
        """The coalesced I/O ring at ``offset`` in this vCPU's mapping (None if it is not
        mapped there)."""
        from leanvm.kvm.coalesced import CoalescedRing

        if not offset or offset + 4096 > len(self._run):
            return None
        ring = CoalescedRing(self._run[offset:offset + 4096])
        self._rings.append(ring)  # released with the mapping (close)
        return ring

    def request_stop(self) -> None:
        """Make the current or next KVM_RUN return at once (safe from another thread)."""
        self._run[abi.RUN_IMMEDIATE_EXIT] = 1

    # --- state -----------------------------------------------------------------------
    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        ioctl(self.fd, abi.KVM_GET_REGS, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, "KVM_SET_REGS", regs)

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, "KVM_SET_SREGS", sregs)

    def get_fpu(self) -> abi.kvm_fpu:
        fpu = abi.kvm_fpu()
        ioctl(self.fd, abi.KVM_GET_FPU, "KVM_GET_FPU", fpu)
        return fpu

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, "KVM_SET_FPU", fpu)

    def get_xsave(self) -> abi.kvm_xsave:
        """x87, SSE (with MXCSR, which KVM_GET_FPU leaves out) and extended state."""
        xsave = abi.kvm_xsave()
        ioctl(self.fd, abi.KVM_GET_XSAVE, "KVM_GET_XSAVE", xsave)
        return xsave

    def set_xsave(self, xsave: abi.kvm_xsave) -> None:
        ioctl(self.fd, abi.KVM_SET_XSAVE, "KVM_SET_XSAVE", xsave)

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        buf = abi.kvm_msrs_with(len(indices))()
        buf.nmsrs = len(indices)
        for slot, index in zip(buf.entries, indices):
            slot.index = index
        done = ioctl(self.fd, abi.KVM_GET_MSRS, "KVM_GET_MSRS", buf)
        if done != len(indices):
            bad = indices[done]
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {bad:#x} is not supported")
        return {e.index: e.data for e in buf.entries}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        buf = abi.kvm_msrs_with(len(values))()
        buf.nmsrs = len(values)
        for slot, (index, data) in zip(buf.entries, values.items()):
            slot.index, slot.data = index, data
        done = ioctl(self.fd, abi.KVM_SET_MSRS, "KVM_SET_MSRS", buf)
        if done != len(values):
            bad = list(values)[done]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {bad:#x} was refused")

    def set_cpuid(self, table: CpuidTable) -> None:
        ioctl(self.fd, abi.KVM_SET_CPUID2, "KVM_SET_CPUID2", table.to_struct())

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: this vCPU's TSC frequency in kHz."""
        return ioctl(self.fd, abi.KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ: the frequency the guest's TSC runs at (KVM scales it)."""
        ioctl(self.fd, abi.KVM_SET_TSC_KHZ, "KVM_SET_TSC_KHZ", khz)

    def get_events(self) -> abi.kvm_vcpu_events:
        events = abi.kvm_vcpu_events()
        ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", events)
        return events

    def set_events(self, events: abi.kvm_vcpu_events) -> None:
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", events)

    def close(self) -> None:
        if self.fd >= 0:
            for ring in self._rings:
                ring.release()
            self._run.release()
            self.run_page.close()
            os.close(self.fd)
            self.fd = -1


def decode_internal_error(union: bytes) -> ex.InternalError:
    """Decode kvm_run.internal / emulation_failure from the union's bytes."""
    suberror, ndata, flags, insn_size, insn = _INTERNAL.unpack_from(union.ljust(136, b"\0"), 0)
    ndata = min(ndata, 16)
    data = struct.unpack_from(f"<{ndata}Q", union.ljust(136, b"\0"), 8)
    instruction = None
    if (suberror == abi.KVM_INTERNAL_ERROR_EMULATION and ndata >= 3
            and flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES):
        instruction = insn[:min(insn_size, 15)]
    return ex.InternalError(suberror, data, instruction)
