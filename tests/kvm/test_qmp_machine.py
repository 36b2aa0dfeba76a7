"""QMP from Python: ``Machine(qmp=...)``, the same commands in process (``Machine.execute``),
TCP, virtio-mem's requested-size through qom-set, leanvm's x-leanvm- commands, dumps of a
paused VM, and a paused VM that can still be stopped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from leanvm.errors import QmpError
from leanvm.machine.machine import Machine

qmp_legacy = pytest.importorskip("qemu.qmp.legacy", reason="qemu.qmp is installed by make test")

MB = 1 << 20


def test_in_process_commands_and_virtio_mem_over_tcp(guest) -> None:
    with Machine(memory="64M,maxmem=1G", guest=guest("spin"), qmp="tcp:127.0.0.1:0",
                 virtio_mem=("size=256M,id=vmem0",), name="py") as vm:
        assert vm.execute("query-status")["status"] == "prelaunch"
        with pytest.raises(QmpError, match="not been started"):
            vm.execute("cont")
        address = vm.qmp_address
        assert address is not None and address.startswith("tcp:127.0.0.1:")
        host, port = address[4:].rsplit(":", 1)
        assert int(port) > 0
        vm.start(timeout=60)
        q = qmp_legacy.QEMUMonitorProtocol((host, int(port)))
        q.connect()
        try:
            assert q.cmd("query-status")["status"] == "running"
            [device] = q.cmd("query-memory-devices")
            assert device["type"] == "virtio-mem"
            assert device["data"]["id"] == "vmem0" and device["data"]["max-size"] == 256 * MB
            assert q.cmd("qom-set", path="vmem0", property="requested-size",
                         value=128 * MB) == {}
            assert q.cmd("qom-get", path="/machine/peripheral/vmem0",
                         property="requested-size") == 128 * MB
            assert vm.virtio_mem[0].requested_size == 128 * MB
            summary = q.cmd("query-memory-size-summary")
            assert summary == {"base-memory": 64 * MB, "plugged-memory": 0}  # no driver
        finally:
            q.close()
        with pytest.raises(QmpError) as missing:
            vm.execute("qom-get", {"path": "nothing", "property": "size"})
        assert missing.value.error_class == "DeviceNotFound"
        with pytest.raises(QmpError, match="multiple of the block size"):
            vm.execute("qom-set", {"path": "vmem0", "property": "requested-size",
                                   "value": 3 * MB})
        with pytest.raises(QmpError, match="read-only"):
            vm.execute("qom-set", {"path": "vmem0", "property": "size", "value": 0})
        assert vm.execute("query-name") == {"name": "py"}
        vm.quit()
        assert vm.wait(10).reason.value == "quit"
        assert vm.execute("query-status")["status"] == "shutdown"


def test_leanvm_extras_timeline_residency_exits(guest) -> None:
    with Machine(memory="64M", guest=guest("spin"), trace=True) as vm:
        vm.start(timeout=60)
        vm.wait_for_console("spinning")
        timeline = vm.execute("x-leanvm-timeline")
        assert timeline["enabled"] and any(e["name"] == "process start" for e in timeline["events"])
        regions = vm.execute("x-leanvm-residency")
        assert regions[0]["region"] and regions[0]["size"] >= 64 * MB
        assert 0 < regions[0]["resident"] <= regions[0]["size"]
        exits = vm.execute("x-leanvm-exits")
        assert "0x3f8" in exits["pio-out"] or "0x3fd" in exits["pio-in"]
        vm.stop()
        vm.wait(10)


def test_a_paused_vm_is_dumped_still_and_stops_when_asked(guest, tmp_path: Path) -> None:
    seen: list[str] = []
    with Machine(memory="64M", guest=guest("spin")) as vm:
        vm.events.listen(lambda event: seen.append(event.name))
        vm.start(timeout=60)
        vm.wait_for_console("spinning")
        assert vm.pause() and vm.paused and vm.status == "paused"
        assert not vm.pause()  # already paused
        exits = vm.loop_control.exits
        rip = vm.execute("human-monitor-command", {"command-line": "info registers"})
        time.sleep(0.2)
        assert vm.execute("human-monitor-command", {"command-line": "info registers"}) == rip
        result = vm.execute("dump-guest-memory", {"paging": False,
                                                  "protocol": f"file:{tmp_path / 'p.elf'}"})
        assert result == {} and (tmp_path / "p.elf").stat().st_size > 0
        assert vm.execute("query-dump")["status"] == "completed"
        assert vm.status == "paused" and vm.loop_control.exits == exits
        vm.stop("stopped while paused")  # a paused vCPU leaves to stop
        assert vm.wait(10).reason.value == "interrupted"
    assert seen == ["STOP", "DUMP_COMPLETED", "SHUTDOWN"]


def test_dump_errors_are_qmp_errors(guest, tmp_path: Path) -> None:
    with Machine(memory="64M", guest=guest("spin")) as vm:
        vm.start(timeout=60)
        with pytest.raises(QmpError, match="cannot write the dump there .no directory"):
            vm.execute("dump-guest-memory", {"paging": False,
                                             "protocol": f"file:{tmp_path}/none/x.elf"})
        assert vm.execute("query-dump")["status"] == "none"  # it never started, as in QEMU
        with pytest.raises(QmpError, match="File descriptor named 'x'"):
            vm.execute("dump-guest-memory", {"paging": False, "protocol": "fd:x"})
        with pytest.raises(QmpError, match="does not accept value 'nope'"):
            vm.execute("dump-guest-memory", {"paging": False, "protocol": "file:/tmp/x",
                                             "format": "nope"})
        with pytest.raises(QmpError, match="does not write win-dmp"):
            vm.execute("dump-guest-memory", {"paging": False, "protocol": "file:/tmp/x",
                                             "format": "win-dmp"})
        assert vm.status == "running"
        vm.stop()
        vm.wait(10)


def test_trace_started_and_stopped_over_qmp_records_the_probes(guest, tmp_path: Path) -> None:
    import json

    from test_trace_guest import PLATFORM

    with Machine(memory="16M", guest=guest("probes"), args=f"{PLATFORM:#x}") as vm:
        assert not vm.tracer.enabled
        vm.start(timeout=60, paused=True)
        assert vm.execute("x-leanvm-trace-start") == {"enabled": True}
        vm.execute("cont")
        vm.wait(30)
        out = tmp_path / "late.json"
        reply = vm.execute("x-leanvm-trace-stop", {"file": str(out)})
        assert reply["events"] > 0 and reply["file"] == str(out)
        names = {(e.get("cat"), e.get("name")) for e in json.loads(out.read_text())["traceEvents"]}
        assert ("probe", "probe 9") in names and ("vmm", "trace started") in names
        assert ("debugcon", "probes: done") in names
        with pytest.raises(QmpError, match="trace"):
            vm.execute("x-leanvm-trace-stop", {"file": str(tmp_path / "none" / "x.json")})
