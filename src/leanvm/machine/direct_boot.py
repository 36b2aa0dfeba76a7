"""Direct Linux boot (no firmware): pick how the kernel is entered, load it, say what was done.

An ELF vmlinux boots through its PVH entry. A bzImage boots through PVH too when its payload
can be decompressed on the host (cached by content hash, loader/decompress.py), so the guest
never decompresses; otherwise, or with ``kernel_boot="bzimage"``, through the 64-bit boot
protocol, where the kernel's own stub decompresses it in the guest.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple

from leanvm.errors import ConfigError, ImageError

if TYPE_CHECKING:
    from leanvm.layout.region import MemoryMap
    from leanvm.loader.linux64 import DirectKernel
    from leanvm.loader.pvh import PvhKernel
    from leanvm.machine.config import MachineConfig
    from leanvm.memory.guest import GuestMemory
    from leanvm.trace.events import Tracer


class DirectBoot(NamedTuple):
    kernel: "DirectKernel | PvhKernel"
    mode: str  # "pvh" or "bzimage"
    note: str  # for the summary: how the kernel was prepared
    decompress_ms: float | None  # host-side decompression (None: not decompressed here)
    decompress_cached: bool


def load_direct(config: "MachineConfig", plan: "MemoryMap", memory: "GuestMemory",
                kernel: Any, initrd: Any, tracer: "Tracer") -> DirectBoot:
    """Load ``kernel`` (mapped file bytes) and ``initrd`` into ``memory`` for direct entry."""
    from leanvm.loader.linux64 import linux_e820, load_linux64

    ram = [(r.base, r.size) for r in plan.enabled() if r.name.startswith("ram")]
    reserved = [(r.base, r.size) for r in plan.enabled() if r.name == "kvm-private"]
    e820, low_end = linux_e820(ram, reserved), plan.get("ram-low").size
    started = time.monotonic_ns()
    elf, note, decompress_ms, cached = kernel_elf(config, kernel)
    loaded: "DirectKernel | PvhKernel"
    if elf is not None:
        from leanvm.loader.pvh import load_pvh

        loaded = load_pvh(memory, elf, str(config.kernel), initrd, str(config.initrd),
                          config.cmdline, e820, low_end)
        mode = "pvh"
    else:
        loaded = load_linux64(memory, memoryview(kernel), str(config.kernel), initrd,
                              str(config.initrd), config.cmdline, e820, low_end)
        mode = "bzimage"
    if tracer.enabled:
        args = {"mode": mode, "entry": f"{loaded.entry:#x}", "initrd": loaded.initrd_size,
                "detail": note.strip(" ,")}
        tracer.span("vmm", "load kernel", started, time.monotonic_ns(), args)
    return DirectBoot(loaded, mode, f"{mode}{note}", decompress_ms, cached)


def kernel_elf(config: "MachineConfig", kernel: Any) -> tuple[Any, str, float | None, bool]:
    """(ELF bytes to boot through PVH or None, a note for the summary, host decompression
    time in ms or None, whether it came from the cache)."""
    from leanvm.loader.bzimage import is_bzimage

    mode = config.kernel_boot
    if bytes(kernel[:4]) == b"\x7fELF":
        if mode == "bzimage":
            raise ConfigError(f"{config.kernel}: an ELF kernel boots only through PVH")
        return kernel, "", None, False
    if mode == "bzimage" or not is_bzimage(bytes(kernel[:0x280])):
        return None, "", None, False
    from leanvm.loader.decompress import cached_vmlinux
    from leanvm.loader.pvh import pvh_entry

    started = time.monotonic_ns()
    try:
        path, hit = cached_vmlinux(memoryview(kernel), str(config.kernel))
        elf = path.read_bytes()
        pvh_entry(elf, str(path))
    except ImageError as exc:
        if mode == "pvh":
            raise
        return None, f", guest decompresses ({exc})", None, False
    ms = (time.monotonic_ns() - started) / 1e6
    return elf, f", decompressed on the host {'(cached) ' if hit else ''}in {ms:.0f} ms", ms, hit
