"""The QMP socket server on a stand-in machine (no KVM): random bytes from several clients,
a client too many, events only after negotiation, stale sockets and files in the way."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanvm.errors import ConfigError
from leanvm.machine.qmp.address import parse_qmp_address
from leanvm.machine.qmp.server import MAX_CLIENTS, QmpServer

from qmp_fake import FakeMachine


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(10)
    return sock


def lines(sock: socket.socket, count: int) -> list[dict]:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()[:count]]


def negotiate(sock: socket.socket) -> None:
    assert "QMP" in lines(sock, 1)[0]
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert lines(sock, 1) == [{"return": {}}]


@pytest.fixture
def server(tmp_path: Path):
    machine = FakeMachine()
    path = str(tmp_path / "q.sock")
    srv = QmpServer(parse_qmp_address(path), machine)  # type: ignore[arg-type]
    yield srv, machine, path
    srv.close()
    assert not os.path.exists(path)


@given(st.lists(st.lists(st.binary(max_size=400), max_size=6), min_size=1, max_size=4))
@settings(max_examples=25, deadline=None)
def test_random_traffic_from_several_clients_leaves_the_server_answering(tmp_path_factory,
                                                                        traffic) -> None:
    machine = FakeMachine()
    path = str(tmp_path_factory.mktemp("q") / "q.sock")
    srv = QmpServer(parse_qmp_address(path), machine)  # type: ignore[arg-type]
    try:
        socks = [connect(path) for _ in traffic]
        for sock, chunks in zip(socks, traffic):
            for chunk in chunks:
                try:
                    sock.sendall(chunk)
                except OSError:
                    break
        for sock in socks:
            sock.close()
        probe = connect(path)
        negotiate(probe)
        probe.sendall(b'\n{"execute": "query-status", "id": "p"}\n')
        assert lines(probe, 1)[0]["id"] == "p"
        probe.close()
    finally:
        srv.close()


def test_events_reach_negotiated_clients_only(server) -> None:
    srv, machine, path = server
    early, ready = connect(path), connect(path)
    assert "QMP" in lines(early, 1)[0]
    negotiate(ready)
    machine.events.emit("POWERDOWN")
    [event] = lines(ready, 1)
    assert event["event"] == "POWERDOWN" and event["timestamp"]["seconds"] > 1e9
    early.setblocking(False)
    time.sleep(0.1)
    with pytest.raises(BlockingIOError):
        early.recv(100)  # nothing came before negotiation
    early.close()
    ready.close()


def test_one_client_too_many_is_told_and_closed(server) -> None:
    srv, machine, path = server
    socks = [connect(path) for _ in range(MAX_CLIENTS)]
    for sock in socks:
        assert "QMP" in lines(sock, 1)[0]
    extra = connect(path)
    [refused] = lines(extra, 1)
    assert refused["error"]["desc"] == f"too many QMP clients (at most {MAX_CLIENTS})"
    assert extra.recv(100) == b""
    for sock in socks:
        sock.close()
    deadline = time.monotonic() + 5
    while srv.clients and time.monotonic() < deadline:
        time.sleep(0.01)
    again = connect(path)
    negotiate(again)
    again.close()


def test_socket_mode_stale_socket_and_file_in_the_way(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: replaced
    srv = QmpServer(parse_qmp_address(str(path)), FakeMachine())  # type: ignore[arg-type]
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(ConfigError, match="in use by another server"):
            QmpServer(parse_qmp_address(str(path)), FakeMachine())  # type: ignore[arg-type]
    finally:
        srv.close()
    precious = tmp_path / "file"
    precious.write_text("data")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        QmpServer(parse_qmp_address(str(precious)), FakeMachine())  # type: ignore[arg-type]
    assert precious.read_text() == "data"
    with pytest.raises(ConfigError, match="cannot create the socket"):
        QmpServer(parse_qmp_address(str(tmp_path / "no" / "s")), FakeMachine())  # type: ignore[arg-type]


def test_tcp_port_zero_is_resolved() -> None:
    srv = QmpServer(parse_qmp_address("tcp:127.0.0.1:0,server=on,wait=off"), FakeMachine())  # type: ignore[arg-type]
    try:
        assert srv.address.port > 0
        sock = socket.create_connection(("127.0.0.1", srv.address.port), timeout=10)
        negotiate(sock)
        sock.close()
    finally:
        srv.close()
