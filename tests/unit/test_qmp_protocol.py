"""QMP without KVM: the JSON stream splitter (hypothesis: any chunking of valid messages
gives them back, any bytes at all never break it and never grow its buffer past its
bound), one client's session (negotiation, QEMU's error texts, ids echoed), the address
syntax, the HMP register layout and the SHUTDOWN causes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leanvm.errors import ConfigError
from leanvm.machine.qmp.address import parse_qmp_address
from leanvm.machine.qmp.session import Pending, Session
from leanvm.machine.qmp.stream import MAX_MESSAGE, MAX_NESTING, JsonSplitter

from qmp_fake import FakeMachine

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)
messages = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


def split_all(chunks: list[bytes]) -> list:
    splitter = JsonSplitter()
    out = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out


@given(st.lists(messages, min_size=1, max_size=6), st.data(), st.booleans())
@settings(max_examples=200, deadline=None)
def test_any_chunking_of_valid_messages_gives_them_back(objects, data, newlines) -> None:
    stream = (b"\n" if newlines else b" ").join(json.dumps(o).encode() for o in objects) + b"\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    out = split_all(chunks)
    assert [json.loads(m.data) for m in out] == objects
    assert not any(m.error for m in out)


@given(st.lists(st.binary(max_size=300), max_size=20))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_break_the_splitter(chunks) -> None:
    splitter = JsonSplitter()
    for chunk in chunks:
        for message in splitter.feed(chunk):
            assert message.data or message.error
        assert splitter.buffered <= MAX_MESSAGE + 300


@given(st.lists(st.binary(max_size=200), max_size=30))
@settings(max_examples=200, deadline=None)
def test_a_session_answers_any_bytes_with_a_reply_or_nothing(chunks) -> None:
    splitter, session, machine = JsonSplitter(), Session(), FakeMachine()
    session.negotiated = True
    for chunk in chunks:
        for message in splitter.feed(chunk):
            if message.error:
                continue
            reply = session.handle(message.data, machine)  # type: ignore[arg-type]
            if isinstance(reply, Pending):
                reply = reply.run()
            assert ("return" in reply) != ("error" in reply)
            json.dumps(reply)


def test_nesting_and_size_limits() -> None:
    splitter = JsonSplitter()
    [deep, after] = splitter.feed(b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1)
                                  + b'{"ok": 1}')
    assert deep.error == "JSON nesting depth limit exceeded" and not deep.fatal
    assert json.loads(after.data) == {"ok": 1}
    just = b"[" * MAX_NESTING + b"]" * MAX_NESTING
    assert split_all([just])[0].data == just
    big = JsonSplitter()
    out = []
    for _ in range(MAX_MESSAGE // 65536 + 2):
        out += big.feed(b'"' + b"x" * 65535)
    assert out[-1].error == "JSON token size limit exceeded" and out[-1].fatal
    assert big.buffered < 2 * 65536


def test_strings_hide_structure_and_escapes() -> None:
    out = split_all([b'{"a": "}{\\"]", "b": "\\\\"}', b'garbage\n'])
    assert json.loads(out[0].data) == {"a": '}{"]', "b": "\\"}
    assert out[1].data == b"garbage"


def handle(session: Session, text: str, machine: FakeMachine | None = None) -> dict:
    reply = session.handle(text.encode(), machine or FakeMachine())  # type: ignore[arg-type]
    return reply.run() if isinstance(reply, Pending) else reply


def test_negotiation_and_errors_as_qemu() -> None:
    session = Session()
    assert handle(session, '{"execute": "query-status", "id": 1}') == {
        "error": {"class": "CommandNotFound",
                  "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}
    assert handle(session, '{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')[
        "error"]["desc"] == "Capability 'oob' not available"
    assert handle(session, '{"execute": "qmp_capabilities"}') == {"return": {}}
    assert handle(session, '{"execute": "qmp_capabilities"}')["error"]["desc"] == (
        "Capabilities negotiation is already complete, command ignored")
    assert handle(session, '{"execute": "query-status", "id": null}') == {
        "return": {"status": "running", "singlestep": False, "running": True}, "id": None}
    assert handle(session, "[1]")["error"]["desc"] == "QMP input must be a JSON object"
    assert handle(session, '{"arguments": {}}')["error"]["desc"] == "QMP input lacks member 'execute'"
    assert handle(session, '{"execute": "x", "id": 5}') == {
        "error": {"class": "CommandNotFound", "desc": "The command x has not been found"}, "id": 5}
    assert handle(session, '{"execute": "human-monitor-command", "arguments": {"command-line": true}}'
                  )["error"]["desc"] == "Invalid parameter type for 'command-line', expected: string"
    assert handle(session, '{"execute": "qom-get", "arguments": {"path": "p"}}')["error"]["desc"] == (
        "Parameter 'property' is missing")
    assert handle(session, '{"a": NaN}')["error"]["desc"].startswith("JSON parse error")
    assert handle(session, '{"execute": "query-status"}', None)["return"]["status"] == "running"


def test_run_control_commands_reach_the_machine_and_events_follow() -> None:
    machine, session = FakeMachine(), Session()
    session.negotiated = True
    seen = []
    machine.events.listen(lambda event: seen.append(event.qmp()))
    for command in ("stop", "stop", "cont", "system_powerdown", "system_reset", "quit"):
        assert handle(session, json.dumps({"execute": command}), machine) == {"return": {}}
    assert machine.calls == ["pause", "pause", "resume", "powerdown", "reset", "quit"]
    assert [e["event"] for e in seen] == ["STOP", "RESUME", "POWERDOWN", "SHUTDOWN"]
    assert set(seen[0]["timestamp"]) == {"seconds", "microseconds"}
    assert handle(session, '{"execute": "cont"}', machine)["error"]["desc"].startswith(
        "the VM has stopped")


def test_addresses() -> None:
    assert parse_qmp_address("unix:/tmp/a.sock,server=on,wait=off") == (
        "unix", "/tmp/a.sock", "", 0, False)
    assert parse_qmp_address("unix:/tmp/a.sock,server").wait is True  # QEMU's default
    assert parse_qmp_address("/tmp/b.sock").wait is False
    tcp = parse_qmp_address("tcp:127.0.0.1:4444,server=on,wait=off")
    assert (tcp.kind, tcp.host, tcp.port) == ("tcp", "127.0.0.1", 4444)
    assert parse_qmp_address("tcp:[::1]:0,server,nowait").host == "::1"
    for bad in ("", "tcp:4444", "tcp::4444", "tcp:localhost:99999", "unix:",
                "unix:/x,server=off", "unix:/x,frob=1", "unix:/x,wait=maybe", "/" + "x" * 200):
        with pytest.raises(ConfigError, match="-qmp"):
            parse_qmp_address(bad)


def test_info_registers_layout() -> None:
    from leanvm.dump.source import CpuState, Segment
    from leanvm.machine.qmp.hmp import format_registers

    regs = {name: i for i, name in enumerate(
        ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
         "r12", "r13", "r14", "r15"])}
    regs.update(rip=0xFFFFFFFF81000000, rflags=0x246)
    code = Segment(0x10, 0, 0xFFFFFFFF, (0xB << 8) | (1 << 12) | (1 << 15) | (1 << 21) | (1 << 23))
    data = Segment(0x18, 0, 0xFFFFFFFF, (0x3 << 8) | (1 << 12) | (1 << 15) | (1 << 22) | (1 << 23))
    segments = {name: data for name in ("ds", "es", "fs", "gs", "ss")}
    segments.update(cs=code, ldt=Segment(0, 0, 0xFFFF, 0x2 << 8), tr=Segment(0x40, 0x1000, 0x67,
                                                                          (0xB << 8) | (1 << 15)),
                    gdt=Segment(0, 0x2000, 0x7F, 0), idt=Segment(0, 0x3000, 0xFFF, 0))
    text = format_registers(CpuState(0, regs, segments, (0x80050033, 0, 0, 0x1000, 0x20), 0xD01))
    lines = text.split("\r\n")
    assert lines[1] == "CPU#0"
    assert lines[2].startswith("RAX=0000000000000000 RBX=0000000000000001")
    assert "RIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0" in text
    assert "CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]" in text
    assert "DS =0018 0000000000000000 ffffffff 00c09300 DPL=0 DS   [-WA]" in text
    assert "TR =0040 0000000000001000 00000067 00008b00 DPL=0 TSS64-busy" in text
    assert "CR0=80050033" in text and "EFER=0000000000000d01" in text


def test_shutdown_causes() -> None:
    from leanvm.machine.control import GUEST_CAUSES, HOST_CAUSES
    from leanvm.machine.vcpu_loop import StopReason

    assert GUEST_CAUSES[StopReason.POWEROFF] == "guest-shutdown"
    assert GUEST_CAUSES[StopReason.GUEST_PANIC] == "guest-panic"
    assert HOST_CAUSES[StopReason.QUIT] == "host-qmp-quit"
    assert not set(GUEST_CAUSES) & set(HOST_CAUSES)


def test_a_command_that_breaks_is_an_error_reply_not_a_dead_server() -> None:
    machine, session = FakeMachine(), Session()
    session.negotiated = True
    del machine.loop_control  # query-cpus-fast now fails inside the command
    reply = handle(session, '{"execute": "query-cpus-fast", "id": 3}', machine)
    assert reply["id"] == 3 and reply["error"]["desc"].startswith("internal error: AttributeError")
    assert handle(session, '{"execute": "query-status"}', machine)["return"]["status"] == "running"


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_any_hmp_line_gets_text_or_a_qmp_error(line: str) -> None:
    from leanvm.errors import QmpError
    from leanvm.machine.qmp.hmp import run_hmp

    machine = FakeMachine()
    if line.split()[:2] == ["info", "registers"]:
        return  # needs vCPUs (tests/kvm/test_qmp.py)
    try:
        out = run_hmp(machine, line, None)  # type: ignore[arg-type]
    except QmpError:
        return
    assert isinstance(out, str)


def test_size_change_events_are_rate_limited_and_end_with_the_last_size() -> None:
    import time

    from leanvm.machine.events import MachineEvents, SizeChangeEvents

    events, seen = MachineEvents(), []
    events.listen(lambda event: seen.append(event.data["size"]))
    size = [0]
    listener = SizeChangeEvents(events, "vmem0", lambda: size[0], period=0.2)
    for step in range(1, 6):  # five plugs in a row: one event now, one at the period's end
        listener.on_populate(0, 2 << 20)  # as memory/discard.py: told, then marked
        size[0] = step << 21
    assert seen == [1 << 21]
    time.sleep(0.35)
    assert seen == [1 << 21, 5 << 21]
    listener.on_discard(0, 2 << 20)  # same size as last sent: nothing new after the period
    time.sleep(0.35)
    assert seen == [1 << 21, 5 << 21]
    size[0] = 0  # a discard is marked, then told
    listener.on_discard(0, 2 << 20)
    time.sleep(0.35)
    assert seen[-1] == 0
