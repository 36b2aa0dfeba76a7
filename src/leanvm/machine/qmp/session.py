"""One QMP client's side of the protocol (QEMU's docs/interop/qmp-spec): the greeting,
capabilities negotiation, checking each message's members, and the reply, with ``id``
echoed. No sockets here: the server feeds messages in and sends what comes out.

Before ``qmp_capabilities`` every other command gets CommandNotFound, as in QEMU; events
reach a client only after it (``negotiated``). leanvm offers no capabilities (QEMU offers
"oob"); enabling one is an error.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from leanvm.errors import QmpError
from leanvm.machine.qmp.commands import Deferred, dispatch, version_info
from leanvm.machine.qmp.stream import parse

if TYPE_CHECKING:
    from leanvm.machine.machine import Machine

MEMBERS = ("execute", "arguments", "id")


def greeting() -> bytes:
    return encode({"QMP": {"version": version_info(), "capabilities": []}})


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\r\n"


def error_reply(desc: str, error_class: str = "GenericError", ident: Any = None,
                has_id: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        reply["id"] = ident
    return reply


class Session:
    __slots__ = ("negotiated",)

    def __init__(self) -> None:
        self.negotiated = False

    def handle(self, data: bytes, machine: "Machine | None") -> "dict[str, Any] | Pending":
        """The reply to one message, or Pending work whose result is the reply."""
        value, problem = parse(data)
        if problem:
            return error_reply(problem)
        if not isinstance(value, dict):
            return error_reply("QMP input must be a JSON object")
        has_id, ident = "id" in value, value.get("id")
        try:
            result = self._command(value, machine)
        except QmpError as exc:
            return error_reply(exc.desc, exc.error_class, ident, has_id)
        except Exception as exc:  # a bug in a command: its client is told, the server lives
            import logging

            logging.getLogger("leanvm.qmp").exception("QMP command failed")
            return error_reply(f"internal error: {type(exc).__name__}: {exc}", "GenericError",
                               ident, has_id)
        if isinstance(result, Deferred):
            return Pending(result, ident, has_id)
        return reply(result, ident, has_id)

    def _command(self, value: dict[str, Any], machine: "Machine | None") -> Any:
        for member in value:
            if member not in MEMBERS:
                raise QmpError(f"QMP input member '{member}' is unexpected")
        if "execute" not in value:
            raise QmpError("QMP input lacks member 'execute'")
        name, arguments = value["execute"], value.get("arguments", {})
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        if not isinstance(arguments, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if name == "qmp_capabilities":
            return self._negotiate(arguments)
        if not self.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        if machine is None:
            raise QmpError("the machine has been closed")
        return dispatch(machine, name, arguments)

    def _negotiate(self, arguments: dict[str, Any]) -> Any:
        if self.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        for name in arguments:
            if name != "enable":
                raise QmpError(f"Parameter '{name}' is unexpected")
        enable = arguments.get("enable", [])
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            raise QmpError("Invalid parameter type for 'enable', expected: array")
        for capability in enable:
            raise QmpError(f"Capability '{capability}' not available")
        self.negotiated = True
        return {}


def reply(result: Any, ident: Any, has_id: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"return": result}
    if has_id:
        message["id"] = ident
    return message


class Pending:
    """A reply that needs a worker thread (a dump that waits)."""

    __slots__ = ("work", "ident", "has_id")

    def __init__(self, work: Deferred, ident: Any, has_id: bool) -> None:
        self.work, self.ident, self.has_id = work, ident, has_id

    def run(self) -> dict[str, Any]:
        try:
            return reply(self.work.run(), self.ident, self.has_id)
        except QmpError as exc:
            return error_reply(exc.desc, exc.error_class, self.ident, self.has_id)
        except Exception as exc:  # as in Session.handle
            return error_reply(f"internal error: {type(exc).__name__}: {exc}", "GenericError",
                               self.ident, self.has_id)
