"""Holding every vCPU still, from a thread that is not a vCPU's: the VMM kicks each vCPU
out of KVM_RUN and each parks in the gate until the last holder lets go.

Holders: a live dump copies the VM (fork) in a hold of a few milliseconds; QMP's ``stop``
holds until ``cont``; ``-S`` (start paused) holds before any vCPU has run, and each vCPU
parks as its loop starts. Holds nest (a dump of a paused VM, a pause during a dump): the
vCPUs run again when the count drops to zero. A stop requested while vCPUs are parked
frees them, so a paused VM can always be stopped (QMP ``quit``)."""

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
    __slots__ = ("_cond", "_holds", "_parked")

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holds = 0
        self._parked: set[int] = set()

    @property
    def held(self) -> bool:
        return self._holds > 0

    def park(self, vcpu: "Vcpu", control: "LoopControl") -> None:
        """On a vCPU's thread (after a kick, and as its loop starts): wait here while the
        gate is held and no stop has been requested."""
        with self._cond:
            if not self._holds:
                return
            self._parked.add(vcpu.id)
            self._cond.notify_all()
            while self._holds and control.stop is None:
                self._cond.wait()
            self._parked.discard(vcpu.id)

    def wake(self) -> None:
        """A stop was requested: parked vCPUs look again (and leave, to stop)."""
        with self._cond:
            self._cond.notify_all()

    def hold_before_start(self) -> None:
        """Hold a VM whose vCPUs have not run yet: each parks as its loop starts."""
        with self._cond:
            self._holds += 1

    def hold(self, control: "LoopControl", timeout: float = PAUSE_TIMEOUT) -> None:
        """Return once no vCPU of ``control`` runs guest code: each is parked here, or its
        loop has ended. LeanvmError if called on a vCPU's own thread or on timeout (the
        hold is then given back)."""
        if threading.get_ident() in control.running().values():
            raise LeanvmError("a vCPU cannot pause the VM it runs (call from another thread)")
        with self._cond:
            self._holds += 1
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
            if self._holds:
                self._holds -= 1
            if not self._holds:
                self._cond.notify_all()
