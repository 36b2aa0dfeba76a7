"""The QMP server: a socket that QEMU's tools (qemu.qmp, qmp-shell, hand-written JSON) can
drive, served by one thread of its own.

One thread, one selector: it accepts clients, reads and splits their messages
(stream.py), answers each (session.py) and writes replies and events without ever
blocking on a client. The socket is an attack surface, so everything is bounded:
at most MAX_CLIENTS at once (one more is accepted and closed), a message of at most
stream.MAX_MESSAGE bytes (longer: an error, then the connection closes), and at most
MAX_OUTPUT bytes queued for a client that does not read (it stops being read from at
HIGH_WATER, and is dropped beyond MAX_OUTPUT). A client that disconnects mid-command
loses its reply and nothing else. A command that must wait (a dump without detach) runs
on a worker thread; that client's further messages wait their turn (replies stay in
order), other clients are served meanwhile.

Unix sockets are created mode 0600 (the umask is narrowed around bind) and removed at
close; a path that exists and is not a stale socket is refused, never replaced. TCP
listens only on the address the user names.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import stat
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from leanvm.errors import ConfigError
from leanvm.machine.qmp.address import QmpAddress
from leanvm.machine.qmp.session import Pending, Session, encode, error_reply, greeting
from leanvm.machine.qmp.stream import JsonSplitter

if TYPE_CHECKING:
    from leanvm.machine.events import MachineEvent
    from leanvm.machine.machine import Machine

MAX_CLIENTS = 16
HIGH_WATER = 1 << 20  # bytes queued for a client before it stops being read from
MAX_OUTPUT = 8 << 20  # bytes queued for a client before it is dropped
READ_SIZE = 65536
_umask_lock = threading.Lock()


class _Client:
    __slots__ = ("sock", "splitter", "session", "out", "backlog", "busy", "closing", "events")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.splitter = JsonSplitter()
        self.session = Session()
        self.out = bytearray(greeting())
        self.backlog: deque[Any] = deque()  # messages waiting while a command runs
        self.busy = False  # a command of this client runs on a worker thread
        self.closing = False  # close once what is queued has been written
        self.events = 0  # what the selector watches for it now (0: not registered)


class QmpServer:
    def __init__(self, address: QmpAddress, machine: "Machine") -> None:
        self._machine = weakref.ref(machine)
        self._inode: int | None = None
        self._listener, self.address = self._listen(address)
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._listener, self._wake_r, self._wake_w):
            end.setblocking(False)
        self._posted: deque[tuple[_Client | None, bytes]] = deque()  # from other threads
        self._clients: dict[int, _Client] = {}
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._undo_listen = machine.events.listen(self._on_event)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="leanvm-qmp", daemon=True)
        self._thread.start()

    # --- the listening socket ---------------------------------------------------------
    def _listen(self, address: QmpAddress) -> tuple[socket.socket, QmpAddress]:
        if address.kind == "tcp":
            try:
                sock = socket.create_server((address.host, address.port), reuse_port=False)
            except (OSError, OverflowError) as exc:
                raise ConfigError(f"QMP: cannot listen on tcp:{address.host}:{address.port} "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
            return sock, address._replace(port=sock.getsockname()[1])
        path = address.path
        self._clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _umask_lock:
                saved = os.umask(0o177)  # the socket file is born 0600
                try:
                    sock.bind(path)
                finally:
                    os.umask(saved)
            os.chmod(path, 0o600)
            self._inode = os.stat(path).st_ino
            sock.listen(MAX_CLIENTS)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"QMP: cannot create the socket {path} ({exc.strerror})") from None
        return sock, address

    @staticmethod
    def _clear_stale(path: str) -> None:
        """Remove a socket nobody listens on; refuse anything else found at ``path``."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(f"QMP: cannot use {path} ({exc.strerror})") from None
        if not stat.S_ISSOCK(info.st_mode):
            raise ConfigError(f"QMP: {path} exists and is not a socket (leanvm will not "
                              "replace it)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ConfigError(f"QMP: cannot use {path} ({exc.strerror})") from None
            os.unlink(path)  # stale: its server is gone
        else:
            raise ConfigError(f"QMP: {path} is in use by another server")
        finally:
            probe.close()

    # --- from other threads -------------------------------------------------------------
    def _post(self, client: "_Client | None", data: bytes) -> None:
        self._posted.append((client, data))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or the server is closing)

    def _on_event(self, event: "MachineEvent") -> None:
        self._post(None, encode(event.qmp()))

    def wait_for_client(self, give_up: Callable[[], bool], poll: float = 0.1) -> bool:
        """Block until a client connects (wait=on), or ``give_up()`` is true."""
        while not self._connected.wait(poll):
            if give_up() or self._closed.is_set():
                return False
        return True

    @property
    def clients(self) -> int:
        return len(self._clients)

    def close(self, flush_seconds: float = 1.0) -> None:
        """Write what is queued (for up to ``flush_seconds``), close every connection and
        the socket, remove the socket file."""
        if self._closed.is_set():
            return
        self._undo_listen()
        self._closed.set()
        self._post(None, b"")
        self._thread.join(flush_seconds + 1.0)
        self._shut(flush_seconds)

    # --- the server thread --------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._closed.is_set():
                ready = self._selector.select()
                # clients first: the EOFs of those that left free their places before
                # new ones are accepted
                ready.sort(key=lambda item: item[0].fileobj is self._listener)
                for key, events in ready:
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_posted()
                    else:
                        client = key.data
                        if events & selectors.EVENT_WRITE:
                            self._write(client)
                        if events & selectors.EVENT_READ and client.sock.fileno() in self._clients:
                            self._read(client)
        except Exception:  # never take the VM down with it; clients see the socket close
            import logging

            logging.getLogger("leanvm.qmp").exception("QMP server failed")
            self._closed.set()
            self._shut(0.0)

    def _shut(self, flush_seconds: float) -> None:
        import time

        self._drain_posted()
        deadline = time.monotonic() + flush_seconds
        for client in list(self._clients.values()):
            client.sock.setblocking(True)
            client.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if client.out:
                    client.sock.sendall(client.out)
            except OSError:
                pass
            self._drop(client)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()
        if self.address.kind == "unix" and self._inode is not None:
            try:
                if os.stat(self.address.path).st_ino == self._inode:
                    os.unlink(self.address.path)
            except OSError:
                pass

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        if len(self._clients) >= MAX_CLIENTS:  # the one too many is told, then closed
            try:
                sock.send(encode(error_reply(f"too many QMP clients (at most {MAX_CLIENTS})")))
            except OSError:
                pass
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock)
        self._clients[sock.fileno()] = client
        self._update(client)
        self._connected.set()

    def _drain_posted(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._posted:
            target, data = self._posted.popleft()
            if target is None:  # an event, for every negotiated client
                for client in list(self._clients.values()):
                    if client.session.negotiated and data:
                        self._queue(client, data)
            elif target.sock.fileno() in self._clients:  # a worker's reply
                target.busy = False
                self._queue(target, data)
                self._run_backlog(target)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.backlog.extend(client.splitter.feed(data))
        self._run_backlog(client)

    def _run_backlog(self, client: _Client) -> None:
        while client.backlog and not client.busy and not client.closing:
            message = client.backlog.popleft()
            if message.error:
                self._queue(client, encode(error_reply(message.error)))
                if message.fatal:
                    client.closing = True
                continue
            result = client.session.handle(message.data, self._machine())
            if isinstance(result, Pending):
                client.busy = True
                threading.Thread(target=self._work, args=(client, result),
                                 name="leanvm-qmp-work", daemon=True).start()
            else:
                self._queue(client, _encode_reply(result))
        self._update(client)

    def _work(self, client: _Client, pending: Pending) -> None:
        self._post(client, _encode_reply(pending.run()))

    def _queue(self, client: _Client, data: bytes) -> None:
        if len(client.out) + len(data) > MAX_OUTPUT:
            self._drop(client)  # it has not read for megabytes: it is gone or hostile
            return
        if not client.out:  # most replies go out at once, without another trip through
            try:              # the selector
                sent = client.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop(client)
                return
            data = data[sent:]
        client.out += data
        self._update(client)

    def _update(self, client: _Client) -> None:
        """Watch the client for what it can do now: read unless it waits for a command or
        has too much unread output; write while output is queued."""
        if client.sock.fileno() not in self._clients:
            return
        if client.closing and not client.out:
            self._drop(client)
            return
        reading = not client.busy and not client.closing and len(client.out) < HIGH_WATER
        wanted = ((selectors.EVENT_READ if reading else 0)
                  | (selectors.EVENT_WRITE if client.out else 0))
        if wanted == client.events:
            return
        if not wanted:
            self._selector.unregister(client.sock)
        elif not client.events:
            self._selector.register(client.sock, wanted, client)
        else:
            self._selector.modify(client.sock, wanted, client)
        client.events = wanted

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        del client.out[:sent]
        self._update(client)
        if not client.out and not client.busy:
            self._run_backlog(client)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if self._clients.pop(fd, None) is None:
            return
        if client.events:
            try:
                self._selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
            client.events = 0
        client.sock.close()


def _encode_reply(reply: dict[str, Any]) -> bytes:
    try:
        return encode(reply)
    except (TypeError, ValueError) as exc:  # a value JSON cannot hold: say so, do not crash
        return encode(error_reply(f"the reply could not be encoded: {exc}"))
    except RecursionError:
        return json.dumps(error_reply("the reply nests too deeply")).encode() + b"\r\n"
