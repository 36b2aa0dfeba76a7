"""Holding every vCPU still for a moment, from a thread that is not a vCPU's: the VMM kicks
each vCPU out of KVM_RUN and each parks in the gate until it is released. A live dump
copies the VM (fork) in that moment, so the guest stops for milliseconds whatever the
dump's size."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from leanvm.errors import LeanvmError

if TYPE_CHECKING:
    from leanvm.kvm.vcpu import Vcpu
    from leanvm.machine.vcpu_loop import LoopControl

PAUSE_TIMEOUT = 5.0  # seconds to wait for every vCPU to come out of the guest


class PauseGate:
    __slots__ = ("_cond", "_held", "_parked")

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._parked: set[int] = set()

    def park(self, vcpu: "Vcpu") -> None:
        """On a vCPU's thread after a kick: wait here while the gate is held."""
        with self._cond:
            if not self._held:
                return
            self._parked.add(vcpu.id)
            self._cond.notify_all()
            while self._held:
                self._cond.wait()
            self._parked.discard(vcpu.id)

    def hold(self, control: "LoopControl", timeout: float = PAUSE_TIMEOUT) -> None:
        """Return once no vCPU of ``control`` runs guest code: each is parked here, or its
        loop has ended. LeanvmError if called on a vCPU's own thread or on timeout."""
        if threading.get_ident() in control.running().values():
            raise LeanvmError("a vCPU cannot pause the VM it runs (call from another thread)")
        with self._cond:
            if self._held:
                raise LeanvmError("the VM is already held by another pause")
            self._held = True
        deadline = time.monotonic() + timeout
        while True:
            control.kick()
            with self._cond:
                if set(control.running()) <= self._parked:
                    return
                self._cond.wait(0.002)
            if time.monotonic() > deadline:
                self.release()
                raise LeanvmError(f"the vCPUs did not pause within {timeout:g} s")

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()
