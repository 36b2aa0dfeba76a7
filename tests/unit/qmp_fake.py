"""A stand-in for Machine with just what the QMP commands under test read, so the protocol,
session and server are tested without KVM."""

from __future__ import annotations

from types import SimpleNamespace

from leanvm.errors import QmpError
from leanvm.machine.events import MachineEvents


class FakeMachine:
    def __init__(self) -> None:
        self.events = MachineEvents()
        self.config = SimpleNamespace(name="fake", memory=64 << 20)
        self.vcpus = [object()]
        self.loop_control = SimpleNamespace(thread_ids={0: 4242})
        self.virtio_mem: list = []
        self.status = "running"
        self.qmp_dump = {"status": "none", "completed": 0, "total": 0}
        self.calls: list[str] = []

    def pause(self) -> bool:
        self.calls.append("pause")
        if self.status != "running":
            return False
        self.status = "paused"
        self.events.emit("STOP")
        return True

    def resume(self) -> bool:
        self.calls.append("resume")
        if self.status == "shutdown":
            raise QmpError("the VM has stopped (shutdown): it cannot continue")
        if self.status != "paused":
            return False
        self.status = "running"
        self.events.emit("RESUME")
        return True

    def quit(self) -> None:
        self.calls.append("quit")
        self.status = "shutdown"
        self.events.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})

    def powerdown(self) -> None:
        self.calls.append("powerdown")
        self.events.emit("POWERDOWN")

    def reset(self) -> None:
        self.calls.append("reset")
