"""Devices on `leanvm run`'s command line: --virtio-mem, and QEMU's spelling of the same
(-object memory-backend-ram + -device virtio-mem-pci), turned into VirtioMemSpec values."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leanvm.errors import ConfigError

if TYPE_CHECKING:
    from leanvm.machine.config import VirtioMemSpec

VIRTIO_MEM_DEVICES = ("virtio-mem-pci", "virtio-mem-device", "virtio-mem")


def _options(text: str, what: str) -> tuple[str, dict[str, str]]:
    """'TYPE,KEY=VALUE,...' -> (TYPE, {KEY: VALUE})."""
    kind, *rest = [part.strip() for part in text.split(",")]
    values: dict[str, str] = {}
    for part in rest:
        key, eq, value = part.partition("=")
        if not eq or not key or key in values:
            raise ConfigError(f"bad {what} {text!r}: expected TYPE,KEY=VALUE,...")
        values[key] = value
    return kind, values


def virtio_mem_specs(ours: list[str], objects: list[str], devices: list[str]
                     ) -> "tuple[VirtioMemSpec, ...]":
    """Specs from --virtio-mem, then from -device virtio-mem-* with their -object backends."""
    from leanvm.machine.config import VirtioMemSpec, parse_size

    specs = [VirtioMemSpec.parse(text, index) for index, text in enumerate(ours)]
    backends: dict[str, int] = {}
    for text in objects:
        kind, values = _options(text, "-object")
        if kind != "memory-backend-ram":
            raise ConfigError(f"bad -object {kind!r}: leanvm takes memory-backend-ram (for "
                              "virtio-mem) only")
        if "id" not in values or "size" not in values:
            raise ConfigError(f"bad -object {text!r}: memory-backend-ram needs id= and size=")
        unknown = set(values) - {"id", "size", "share", "prealloc", "merge", "dump"}
        if unknown:
            raise ConfigError(f"bad -object {text!r}: unknown {', '.join(sorted(unknown))}")
        backends[values["id"]] = parse_size(values["size"], "memory-backend-ram size")
    used: set[str] = set()
    for text in devices:
        kind, values = _options(text, "-device")
        if kind not in VIRTIO_MEM_DEVICES:
            raise ConfigError(f"bad -device {kind!r}: leanvm takes "
                              f"{' or '.join(VIRTIO_MEM_DEVICES)} only")
        memdev = values.get("memdev", "")
        if memdev not in backends:
            raise ConfigError(f"-device {kind}: memdev={memdev!r} names no -object "
                              "memory-backend-ram")
        if memdev in used:
            raise ConfigError(f"-device {kind}: memdev {memdev!r} is used twice")
        used.add(memdev)
        unknown = set(values) - {"memdev", "requested-size", "block-size", "id", "node"}
        if unknown:
            raise ConfigError(f"bad -device {text!r}: unknown {', '.join(sorted(unknown))}")
        specs.append(VirtioMemSpec(
            values.get("id", f"vmem{len(specs)}"), backends[memdev],
            parse_size(values.get("requested-size", "0"), "requested-size"),
            parse_size(values.get("block-size", "2M"), "block-size")))
    unused = set(backends) - used
    if unused:
        raise ConfigError(f"-object memory-backend-ram {', '.join(sorted(unused))}: no -device "
                          "uses it")
    return tuple(specs)
