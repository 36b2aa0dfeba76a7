"""A small QMP client for `leanvm qmp` and the benchmark: connect, negotiate, send a command,
read its reply (events that arrive meanwhile are kept). It speaks to leanvm and to QEMU
alike; for anything larger use qemu.qmp from PyPI."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from leanvm.errors import ConfigError, LeanvmError, QmpError
from leanvm.machine.qmp.address import parse_qmp_address
from leanvm.machine.qmp.stream import JsonSplitter


class QmpClient:
    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.events: list[dict[str, Any]] = []
        self._splitter = JsonSplitter()
        self._messages: list[dict[str, Any]] = []
        self._timeout = timeout
        self._sock = _connect(address, timeout)
        try:
            self.greeting = self._next()
            if "QMP" not in self.greeting:
                raise LeanvmError(f"{address}: not a QMP server (no greeting)")
            self.command("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """The command's "return" value; QmpError with the server's class and text."""
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._next()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                error = reply["error"]
                raise QmpError(str(error.get("desc", "")), str(error.get("class", "GenericError")))
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("event") == name:
                    self.events.remove(event)
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise LeanvmError(f"no {name} event within {timeout:g} s")
            try:
                self.events.append(self._next(left))
            except LeanvmError:
                if time.monotonic() >= deadline:
                    raise LeanvmError(f"no {name} event within {timeout:g} s") from None
                raise

    def _next(self, timeout: float | None = None) -> dict[str, Any]:
        self._sock.settimeout(timeout if timeout is not None else self._timeout)
        while not self._messages:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise LeanvmError("the QMP server did not answer in time") from None
            if not data:
                raise LeanvmError("the QMP server closed the connection")
            for piece in self._splitter.feed(data):
                if piece.error:
                    raise LeanvmError(f"bad reply from the QMP server: {piece.error}")
                value = json.loads(piece.data)
                if isinstance(value, dict):
                    self._messages.append(value)
        return self._messages.pop(0)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "QmpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _connect(address: str, timeout: float) -> socket.socket:
    where = parse_qmp_address(address, "QMP address")
    if where.kind == "tcp":
        family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
        target: "str | tuple[str, int]" = (where.host, where.port)
    else:
        family, target = socket.AF_UNIX, where.path
    sock = socket.socket(family, socket.SOCK_STREAM)
    # a Unix socket connects blocking (with a timeout set, a full backlog gives EAGAIN)
    sock.settimeout(None if family == socket.AF_UNIX else timeout)
    try:
        sock.connect(target)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot connect to the QMP socket {address} "
                          f"({exc.strerror or exc})") from None
    sock.settimeout(timeout)
    return sock
