"""The QMP commands leanvm answers, each doing what QEMU's does (docs/qmp.md says where they
differ), with QEMU's argument checks and error texts.

A command is a function of the machine and its checked arguments that returns the reply's
"return" value or raises QmpError. A slow command (a dump that waits) returns a Deferred:
the server runs it on a worker thread so other clients are served meanwhile; in process
(Machine.execute) it runs at once. The table at the bottom is the whole list (nothing
registers itself).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from leanvm.errors import LeanvmError, QmpError

if TYPE_CHECKING:
    from leanvm.machine.machine import Machine


@dataclass(frozen=True, slots=True)
class Deferred:
    """Work a command leaves for a worker thread; its result is the reply."""

    run: Callable[[], Any]


# argument type names as QEMU's messages spell them -> the Python check
_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}


@dataclass(frozen=True, slots=True)
class Command:
    handler: Callable[["Machine", dict[str, Any]], Any]
    required: tuple[tuple[str, str], ...] = ()  # (name, type)
    optional: tuple[tuple[str, str], ...] = ()

    def check(self, arguments: dict[str, Any]) -> None:
        known = dict(self.required + self.optional)
        for name in arguments:
            if name not in known:
                raise QmpError(f"Parameter '{name}' is unexpected")
        for name, _ in self.required:
            if name not in arguments:
                raise QmpError(f"Parameter '{name}' is missing")
        for name, value in arguments.items():
            kind = known[name]
            if not _TYPES[kind](value):
                raise QmpError(f"Invalid parameter type for '{name}', expected: {kind}")


def execute(machine: "Machine", name: str, arguments: dict[str, Any]) -> Any:
    """In process: the command's return value (a Deferred is run here and now)."""
    result = dispatch(machine, name, arguments)
    return result.run() if isinstance(result, Deferred) else result


def dispatch(machine: "Machine", name: str, arguments: dict[str, Any]) -> Any:
    command = COMMANDS.get(name)
    if command is None:
        raise QmpError(f"The command {name} has not been found", "CommandNotFound")
    if not isinstance(arguments, dict):
        raise QmpError("QMP input member 'arguments' must be an object")
    command.check(arguments)
    try:
        return command.handler(machine, arguments)
    except QmpError:
        raise
    except LeanvmError as exc:  # the VMM's own one-line errors, as GenericError
        raise QmpError(str(exc)) from None


# --- the machine's state ------------------------------------------------------------------
def version_info() -> dict[str, Any]:
    from leanvm.version import __version__

    major, minor, micro = (int(part) for part in (__version__.split(".") + ["0", "0"])[:3])
    return {"qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"leanvm {__version__}"}


def _query_version(machine: "Machine", args: dict[str, Any]) -> Any:
    return version_info()


def _query_commands(machine: "Machine", args: dict[str, Any]) -> Any:
    return [{"name": name} for name in ("qmp_capabilities", *COMMANDS)]


def _query_status(machine: "Machine", args: dict[str, Any]) -> Any:
    status = machine.status
    return {"status": status, "singlestep": False, "running": status == "running"}


def _query_name(machine: "Machine", args: dict[str, Any]) -> Any:
    return {"name": machine.config.name} if machine.config.name else {}


def _query_kvm(machine: "Machine", args: dict[str, Any]) -> Any:
    return {"enabled": True, "present": True}  # leanvm runs on KVM only


def _query_cpus_fast(machine: "Machine", args: dict[str, Any]) -> Any:
    # one package, a core per vCPU, one thread per core (machine/topology.py)
    threads = machine.loop_control.thread_ids
    return [{"cpu-index": index, "qom-path": f"/machine/unattached/device[{index}]",
             "thread-id": threads.get(index, os.getpid()), "target": "x86_64",
             "props": {"socket-id": 0, "core-id": index, "thread-id": 0}}
            for index in range(len(machine.vcpus))]


def _query_memory_size_summary(machine: "Machine", args: dict[str, Any]) -> Any:
    plugged = sum(device.plugged_size for device in machine.virtio_mem)
    return {"base-memory": machine.config.memory, "plugged-memory": plugged}


# --- run control ------------------------------------------------------------------------
def _run_control(method: str) -> Callable[["Machine", dict[str, Any]], Any]:
    """A command that calls one Machine method (pause, resume, reset, powerdown, quit) and
    returns {}, as QEMU's stop, cont, system_reset, system_powerdown and quit do."""

    def command(machine: "Machine", args: dict[str, Any]) -> Any:
        getattr(machine, method)()
        return {}

    return command


def _human_monitor_command(machine: "Machine", args: dict[str, Any]) -> Any:
    from leanvm.machine.qmp.hmp import run_hmp

    return run_hmp(machine, args["command-line"], args.get("cpu-index"))


# --- dumps --------------------------------------------------------------------------------
QEMU_DUMP_FORMATS = ("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy", "kdump-raw-zlib",
                     "kdump-raw-lzo", "kdump-raw-snappy", "win-dmp")


def _dump_guest_memory(machine: "Machine", args: dict[str, Any]) -> Any:
    from leanvm.machine.dump import FORMATS, DumpRequest

    protocol, paging = args["protocol"], args["paging"]
    form = args.get("format", "elf")
    if form not in FORMATS:
        if form in QEMU_DUMP_FORMATS:
            raise QmpError(f"leanvm does not write {form} dumps")
        raise QmpError(f"Parameter 'format' does not accept value '{form}'")
    if protocol.startswith("fd:"):
        raise QmpError(f"File descriptor named '{protocol[3:]}' has not been found")
    if not protocol.startswith("file:") or not protocol[5:]:
        raise QmpError(f"unsupported protocol '{protocol}': expected file:PATH")
    begin, length = args.get("begin"), args.get("length")
    if (begin is None) != (length is None):
        raise QmpError("Missing 'length' parameter" if length is None
                       else "Missing 'begin' parameter")
    if machine.qmp_dump["status"] == "active":
        raise QmpError("There is a dump in process, please wait.")
    request = DumpRequest(protocol[5:], form, paging=paging, begin=begin, length=length)
    state = machine.qmp_dump
    state.update(status="active", completed=0, total=0)

    def progress(done: int) -> None:
        state["completed"] = done

    def finish(error: str | None) -> Any:
        result = {key: state[key] for key in ("status", "completed", "total")}
        data: dict[str, Any] = {"result": result}
        if error:
            data["error"] = error
        machine.events.emit("DUMP_COMPLETED", data)
        if error:
            raise QmpError(error)
        return {}

    def write() -> Any:
        try:
            job = machine.dump(request.path, form, paging=paging, begin=begin, length=length,
                               wait=False, progress=progress)
            done = job.wait() if hasattr(job, "wait") else job
        except LeanvmError as exc:
            state["status"] = "failed"
            return finish(str(exc))
        state.update(status="completed", completed=done.memory, total=done.memory)
        return finish(None)

    if args.get("detach", False):  # the reply now, DUMP_COMPLETED when done
        import threading

        threading.Thread(target=_quietly, args=(write,), name="leanvm-qmp-dump",
                         daemon=True).start()
        return {}
    return Deferred(write)


def _quietly(work: Callable[[], Any]) -> None:
    try:
        work()
    except QmpError:
        pass  # a detached dump's error goes out in its DUMP_COMPLETED event


def _query_dump(machine: "Machine", args: dict[str, Any]) -> Any:
    state = machine.qmp_dump
    return {key: state[key] for key in ("status", "completed", "total")}


def _query_dump_guest_memory_capability(machine: "Machine", args: dict[str, Any]) -> Any:
    from leanvm.machine.dump import FORMATS

    return {"formats": list(FORMATS)}


# --- memory devices -------------------------------------------------------------------------
def _virtio_mem_path(machine: "Machine", path: str) -> Any:
    name = path.rsplit("/", 1)[-1]
    for device in machine.virtio_mem:
        if path in (device.name, f"/machine/peripheral/{device.name}"):
            return device
    raise QmpError(f"Device '{name}' not found", "DeviceNotFound")


def _query_memory_devices(machine: "Machine", args: dict[str, Any]) -> Any:
    return [{"type": "virtio-mem", "data": {
        "id": device.name, "memaddr": device.address, "requested-size": device.requested_size,
        "size": device.plugged_size, "max-size": device.region_size,
        "block-size": device.block_size, "node": 0,
        "memdev": f"/objects/{device.name}"}} for device in machine.virtio_mem]


_VIRTIO_MEM_PROPERTIES = {"requested-size": "requested_size", "size": "plugged_size",
                          "block-size": "block_size", "max-size": "region_size",
                          "memaddr": "address"}


def _qom_get(machine: "Machine", args: dict[str, Any]) -> Any:
    device = _virtio_mem_path(machine, args["path"])
    attribute = _VIRTIO_MEM_PROPERTIES.get(args["property"])
    if attribute is None:
        raise QmpError(f"Property 'virtio-mem.{args['property']}' not found")
    return getattr(device, attribute)


def _qom_set(machine: "Machine", args: dict[str, Any]) -> Any:
    device = _virtio_mem_path(machine, args["path"])
    prop, value = args["property"], args["value"]
    if prop in _VIRTIO_MEM_PROPERTIES and prop != "requested-size":
        raise QmpError(f"Property 'virtio-mem.{prop}' is read-only" if prop != "block-size"
                       else "'block-size' cannot be changed once the device is realized")
    if prop != "requested-size":
        raise QmpError(f"Property 'virtio-mem.{prop}' not found")
    if isinstance(value, bool) or not isinstance(value, int):
        raise QmpError("Invalid parameter type for 'requested-size', expected: size")
    device.resize(value)
    return {}


# --- leanvm's own (x-leanvm-) ---------------------------------------------------------------
def _x_timeline(machine: "Machine", args: dict[str, Any]) -> Any:
    origin = machine.tracer.origin
    return {"enabled": machine.tracer.enabled, "events": [
        {"name": event.name, "category": event.cat,
         "ms": round((event.ts - origin) / 1e6, 3),
         **({"duration-ms": round(event.dur / 1e6, 3)} if event.dur else {})}
        for event in machine.trace_events]}


def _x_residency(machine: "Machine", args: dict[str, Any]) -> Any:
    return [{"region": row.name, "size": row.size, "resident": row.resident,
             "private": row.private, "shared": row.shared} for row in machine.residency()]


def _x_exits(machine: "Machine", args: dict[str, Any]) -> Any:
    control = machine.loop_control
    return {"kinds": control.counts.kinds(),
            "pio-out": {f"{port:#x}": n for port, n in control.counts.out_ports.items()},
            "pio-in": {f"{port:#x}": n for port, n in control.counts.in_ports.items()}}


def _x_trace_start(machine: "Machine", args: dict[str, Any]) -> Any:
    from leanvm.machine.tracing import start_tracing

    start_tracing(machine)
    return {"enabled": True}


def _x_trace_stop(machine: "Machine", args: dict[str, Any]) -> Any:
    from leanvm.machine.tracing import stop_tracing

    count = stop_tracing(machine, args.get("file"))
    return {"enabled": False, "events": count, **({"file": args["file"]} if "file" in args else {})}


COMMANDS: dict[str, Command] = {
    "query-version": Command(_query_version),
    "query-commands": Command(_query_commands),
    "query-status": Command(_query_status),
    "query-name": Command(_query_name),
    "query-kvm": Command(_query_kvm),
    "query-cpus-fast": Command(_query_cpus_fast),
    "query-memory-size-summary": Command(_query_memory_size_summary),
    "stop": Command(_run_control("pause")),
    "cont": Command(_run_control("resume")),
    "system_reset": Command(_run_control("reset")),
    "system_powerdown": Command(_run_control("powerdown")),
    "quit": Command(_run_control("quit")),
    "human-monitor-command": Command(_human_monitor_command, (("command-line", "string"),),
                                     (("cpu-index", "integer"),)),
    "dump-guest-memory": Command(_dump_guest_memory,
                                 (("paging", "boolean"), ("protocol", "string")),
                                 (("detach", "boolean"), ("begin", "integer"),
                                  ("length", "integer"), ("format", "string"))),
    "query-dump": Command(_query_dump),
    "query-dump-guest-memory-capability": Command(_query_dump_guest_memory_capability),
    "query-memory-devices": Command(_query_memory_devices),
    "qom-get": Command(_qom_get, (("path", "string"), ("property", "string"))),
    "qom-set": Command(_qom_set, (("path", "string"), ("property", "string"), ("value", "any"))),
    "x-leanvm-timeline": Command(_x_timeline),
    "x-leanvm-residency": Command(_x_residency),
    "x-leanvm-exits": Command(_x_exits),
    "x-leanvm-trace-start": Command(_x_trace_start),
    "x-leanvm-trace-stop": Command(_x_trace_stop, optional=(("file", "string"),)),
}
