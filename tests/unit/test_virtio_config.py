"""virtio-mem settings: --virtio-mem and QEMU's -object/-device spelling, their one-line
errors, placement in the device-memory region, the MMIO windows and the command-line
discovery parameters."""

from __future__ import annotations

import pytest

from leanvm.cli.devices import virtio_mem_specs
from leanvm.errors import ConfigError
from leanvm.layout.x86 import plan_x86_layout
from leanvm.machine.config import MachineConfig, VirtioMemSpec
from leanvm.machine.virtio import cmdline_devices, place_virtio_mem, windows

MB, GB = 1 << 20, 1 << 30


def test_our_spelling_and_qemus_give_the_same_device() -> None:
    ours = virtio_mem_specs(["size=1G,requested=256M,block=4M,id=vm0"], [], [])
    qemus = virtio_mem_specs([], ["memory-backend-ram,id=m0,size=1G"],
                             ["virtio-mem-pci,id=vm0,memdev=m0,requested-size=256M,"
                              "block-size=4M"])
    assert ours == qemus == (VirtioMemSpec("vm0", GB, 256 * MB, 4 * MB),)
    assert virtio_mem_specs(["size=512M"], [], [])[0] == VirtioMemSpec("vmem0", 512 * MB, 0)


@pytest.mark.parametrize("ours, objects, devices, message", [
    (["requested=1G"], [], [], "no size= given"),
    (["size=1G,colour=red"], [], [], "bad --virtio-mem option 'colour=red'"),
    (["size=1G,requested=2G"], [], [], "requested size 2G must be a multiple of 2M from 0 to"),
    (["size=1G,block=3M"], [], [], "bad block size 3M"),
    (["size=1G,block=1M"], [], [], "bad block size 1M"),
    (["size=3M"], [], [], "size 3M must be a positive multiple"),
    (["size=1G,id=a b"], [], [], "bad virtio-mem id 'a b'"),
    ([], ["memory-backend-file,id=m,size=1G"], [], "memory-backend-ram (for virtio-mem) only"),
    ([], ["memory-backend-ram,id=m"], [], "needs id= and size="),
    ([], ["memory-backend-ram,id=m,size=1G"], ["virtio-blk-pci,memdev=m"], "virtio-mem-pci"),
    ([], [], ["virtio-mem-pci,memdev=nope"], "memdev='nope' names no -object"),
    ([], ["memory-backend-ram,id=m,size=1G"], [], "no -device uses it"),
    ([], ["memory-backend-ram,id=m,size=1G"],
     ["virtio-mem-pci,memdev=m", "virtio-mem-pci,memdev=m"], "is used twice"),
])
def test_bad_settings_are_one_line_errors(ours, objects, devices, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        virtio_mem_specs(ours, objects, devices)


def test_names_must_differ_and_cmdline_discovery_needs_a_kernel() -> None:
    with pytest.raises(ConfigError, match="two virtio-mem devices are called 'a'"):
        MachineConfig(virtio_mem=("size=1G,id=a", "size=1G,id=a"))
    with pytest.raises(ConfigError, match="cmdline adds to the kernel command line"):
        MachineConfig(virtio_mem=("size=1G",), virtio_discovery="cmdline")
    with pytest.raises(ConfigError, match="bad virtio discovery 'dt'"):
        MachineConfig(virtio_discovery="dt")


def test_regions_go_in_device_memory_aligned_to_linux_blocks() -> None:
    config = MachineConfig(memory="3584M,maxmem=8G",
                           virtio_mem=("size=130M,id=a", "size=1G,id=b"))
    plan = plan_x86_layout(config.memory, maxmem=config.maxmem)
    hotplug = plan.get("device-memory")
    placed = place_virtio_mem(config.virtio_mem, plan)
    assert [p.base for p in placed] == [hotplug.base, hotplug.base + 256 * MB]
    assert all(p.base % (128 * MB) == 0 for p in placed)
    slots = windows(config, plan)
    assert [(w.base, w.size, w.gsi) for w in slots] == [(0xD000_0000, 0x200, 5),
                                                        (0xD000_1000, 0x200, 6)]


def test_regions_that_do_not_fit_are_refused() -> None:
    plan = plan_x86_layout(256 * MB)
    with pytest.raises(ConfigError, match="needs device memory after RAM"):
        place_virtio_mem((VirtioMemSpec("a", GB),), plan)
    plan = plan_x86_layout(256 * MB, maxmem=1280 * MB)
    with pytest.raises(ConfigError, match="does not fit the 1024M of device memory"):
        place_virtio_mem((VirtioMemSpec("a", 512 * MB), VirtioMemSpec("b", 1 * GB)), plan)


def test_cmdline_discovery_names_each_window() -> None:
    config = MachineConfig(memory="256M,maxmem=1280M", kernel="/bzImage",
                           virtio_mem=("size=256M", "size=256M,id=two"),
                           virtio_discovery="cmdline")
    plan = plan_x86_layout(config.memory, maxmem=config.maxmem)
    assert cmdline_devices(config, plan) == ("virtio_mmio.device=512@0xd0000000:5 "
                                             "virtio_mmio.device=512@0xd0001000:6")
    assert cmdline_devices(config.replace(virtio_discovery="acpi"), plan) == ""


def test_the_plan_and_memmap_show_the_region_inside_device_memory() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    from leanvm.machine.plan import plan_for

    config = MachineConfig(memory="512M,maxmem=2G", virtio_mem=("size=1G,id=vm0",))
    plan = plan_for(config, 40)
    region, hotplug = plan.get("vm0"), plan.get("device-memory")
    assert hotplug.base <= region.base and region.end <= hotplug.end
    assert region.role.value == "hotplug" and region not in plan.ram()
    src = Path(__file__).resolve().parents[2] / "src"
    done = subprocess.run([sys.executable, "-m", "leanvm", "memmap", "-m", "512M,maxmem=2G",
                           "--virtio-mem", "size=1G,id=vm0", "--pa-bits", "40", "--json"],
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(src)})
    assert done.returncode == 0, done.stderr
    shown = {r["name"]: r for r in json.loads(done.stdout)["regions"]}
    assert shown["vm0"]["base"] == region.base == 1 << 32 and shown["vm0"]["size"] == 1 << 30
