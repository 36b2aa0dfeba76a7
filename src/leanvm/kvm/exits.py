"""Typed vCPU exits: what KVM_RUN returned, decoded from kvm_run into frozen values."""

from __future__ import annotations

from dataclasses import dataclass

from leanvm.abi import kvm as abi


@dataclass(frozen=True, slots=True)
class IoOut:
    """OUT/OUTS: ``count`` items of ``size`` bytes each, in ``data``."""

    port: int
    size: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    """IN/INS: the VMM must supply ``count * size`` bytes with Vcpu.complete_io_in."""

    port: int
    size: int
    count: int
    data_offset: int


@dataclass(frozen=True, slots=True)
class MmioRead:
    """A guest read of unbacked (or device) memory; answer with Vcpu.complete_mmio_read."""

    address: int
    size: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    address: int
    size: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Hlt:
    """HLT with no in-kernel irqchip to wait on."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The vCPU hit a triple fault (or equivalent): the guest cannot continue."""


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned early: a signal arrived or immediate_exit was set."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    hardware_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class SystemEvent:
    type: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not go on; for emulation failures, the instruction bytes at RIP."""

    suberror: int
    data: tuple[int, ...]
    instruction: bytes | None

    SUBERRORS = {
        abi.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
        abi.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
        abi.KVM_INTERNAL_ERROR_DELIVERY_EV: "error while delivering an event",
        abi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
    }

    def describe(self, rip: int | None = None) -> str:
        """One line: what failed, where, and the instruction bytes if KVM gave them."""
        what = self.SUBERRORS.get(self.suberror, f"suberror {self.suberror}")
        text = f"KVM internal error ({what})"
        if rip is not None:
            text += f" at RIP {rip:#x}"
        if self.instruction is not None:
            text += f": instruction bytes {self.instruction.hex(' ')}"
            if self.suberror == abi.KVM_INTERNAL_ERROR_EMULATION:
                text += " (the host's KVM cannot emulate this instruction)"
        elif self.data:
            text += ": data " + " ".join(f"{d:#x}" for d in self.data)
        return text


@dataclass(frozen=True, slots=True)
class Unknown:
    """An exit reason leanvm does not handle; ``reason`` is KVM_EXIT_*."""

    reason: int
    hardware_reason: int


Exit = (IoOut | IoIn | MmioRead | MmioWrite | Hlt | Shutdown | Interrupted | FailEntry
        | SystemEvent | InternalError | Unknown)
