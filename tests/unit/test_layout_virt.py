"""leanvm's reproduction of QEMU's arm virt memory map (QEMU 8.0+ semantics)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from leanvm.errors import ConfigError
from leanvm.layout.region import GiB, MiB, RegionState
from leanvm.layout.virt import VERSIONS, plan_virt_layout, resolve_virt_version, virt_defaults

ENABLED, RESERVED, DISABLED = RegionState.ENABLED, RegionState.RESERVED, RegionState.DISABLED


def high(plan) -> dict[str, tuple[int, int, RegionState]]:
    return {r.name: (r.base, r.end, r.state) for r in plan.regions if r.name.startswith("high-")}


def test_qemu_worked_example_legacy() -> None:
    """QEMU commit 'hw/arm/virt: Add compact-highmem property': pa_bits 40, redists and ecam
    off, mmio on, -m 4G,maxmem=511G, compact-highmem=off."""
    plan = plan_virt_layout(4 * GiB, maxmem=511 * GiB, pa_bits=40, machine="virt-7.2",
                            settings={"highmem-redists": "off", "highmem-ecam": "off",
                                      "compact-highmem": "off"})
    assert plan.get("mem").base == GiB and plan.get("mem").size == 4 * GiB
    assert plan.get("device-memory").base == 5 * GiB
    assert plan.get("device-memory").end == 512 * GiB
    assert high(plan) == {
        "high-gic-redist2": (512 * GiB, 512 * GiB + 64 * MiB, RESERVED),
        "high-pcie-ecam": (512 * GiB + 256 * MiB, 512 * GiB + 512 * MiB, RESERVED),
        "high-pcie-mmio": (1024 * GiB, 1536 * GiB, DISABLED),
    }
    assert "does not fit below 2^40" in plan.get("high-pcie-mmio").reason
    assert plan.highest_gpa == 0x80_1FFF_FFFF


def test_qemu_worked_example_compact() -> None:
    plan = plan_virt_layout(4 * GiB, maxmem=511 * GiB, pa_bits=40, machine="virt-7.2",
                            settings={"highmem-redists": "off", "highmem-ecam": "off"})
    assert dict(plan.properties)["compact-highmem"] == "on"  # virt-7.2's default
    assert high(plan)["high-pcie-mmio"] == (512 * GiB, 1024 * GiB, ENABLED)
    assert high(plan)["high-gic-redist2"][2] is DISABLED
    assert high(plan)["high-pcie-ecam"][2] is DISABLED
    assert plan.highest_gpa == 0xFF_FFFF_FFFF


def test_default_layout_keeps_the_legacy_addresses() -> None:
    for machine in ("virt", "virt-2.12", "virt-6.2"):
        plan = plan_virt_layout(128 * MiB, machine=machine)
        got = high(plan)
        assert got["high-gic-redist2"][:2] == (0x40_0000_0000, 0x40_0400_0000)
        assert got["high-pcie-ecam"][:2] == (0x40_1000_0000, 0x40_2000_0000)
        assert got["high-pcie-mmio"] == (0x80_0000_0000, 0x100_0000_0000, ENABLED)
        assert plan.highest_gpa == 0xFF_FFFF_FFFF
    assert high(plan_virt_layout(128 * MiB, machine="virt-2.12"))["high-pcie-ecam"][2] is RESERVED
    assert high(plan_virt_layout(128 * MiB, machine="virt-3.0"))["high-pcie-ecam"][2] is ENABLED


def test_big_ram_moves_the_high_area_up() -> None:
    plan = plan_virt_layout(300 * GiB, pa_bits=44)
    assert high(plan)["high-gic-redist2"][0] == 0x4B_4000_0000
    assert high(plan)["high-pcie-ecam"][0] == 0x4B_5000_0000
    assert high(plan)["high-pcie-mmio"][0] == 0x80_0000_0000


def test_highmem_off_is_a_32_bit_address_space() -> None:
    with pytest.raises(ConfigError, match=r"^Addressing limited to 32 bits, but memory exceeds "
                                          r"it by 1073741824 bytes$"):
        plan_virt_layout(4 * GiB, settings={"highmem": "off"})
    plan = plan_virt_layout(3 * GiB, settings={"highmem": "off"})
    assert plan.pa_bits == 32 and plan.highest_gpa == 0xFFFF_FFFF
    assert all(state is DISABLED for _, _, state in high(plan).values())
    assert plan_virt_layout(128 * MiB, settings={"highmem": "off"}).highest_gpa == 0x7FFF_FFFF


def test_small_pa_space_disables_every_high_region_in_both_layouts() -> None:
    for compact, ecam_base in (("on", 0x40_0000_0000), ("off", 0x40_1000_0000)):
        plan = plan_virt_layout(4 * GiB, pa_bits=36, settings={"compact-highmem": compact})
        assert all(state is DISABLED for _, _, state in high(plan).values())
        assert high(plan)["high-pcie-ecam"][0] == ecam_base
        assert plan.highest_gpa == 0x1_3FFF_FFFF


def test_32_bit_firmware_drops_the_high_ecam_but_keeps_its_space() -> None:
    plan = plan_virt_layout(GiB, settings={"firmware-32bit": "on"})
    ecam = plan.get("high-pcie-ecam")
    assert ecam.state is RESERVED and ecam.reason == "32-bit firmware loaded"
    assert plan.get("high-pcie-mmio").base == plan_virt_layout(GiB).get("high-pcie-mmio").base


def test_version_defaults() -> None:
    assert virt_defaults(resolve_virt_version("virt-2.6"))["highmem-ecam"] == "off"
    assert virt_defaults(resolve_virt_version("virt-2.12"))["highmem-ecam"] == "off"
    assert virt_defaults(resolve_virt_version("virt-3.0"))["highmem-ecam"] == "on"
    assert virt_defaults(resolve_virt_version("virt-7.1"))["compact-highmem"] == "off"
    assert virt_defaults(resolve_virt_version("virt-7.2"))["compact-highmem"] == "on"
    assert resolve_virt_version("virt").name == "virt-9.2"


@pytest.mark.parametrize("kwargs,message", [
    (dict(ram_size=GiB, maxmem=2 * GiB, slots=257), "unsupported number of memory slots: 257"),
    (dict(ram_size=GiB, slots=2), "slots specified but no max-size"),
    (dict(ram_size=GiB, maxmem=GiB, slots=2), "memory slots were specified but maximum memory"),
    (dict(ram_size=2 * GiB, maxmem=GiB), "must be at least the initial memory size"),
    (dict(ram_size=GiB, maxmem=1024 * GiB), "Addressing limited to 40 bits"),
    (dict(ram_size=GiB, machine="virt-2.5"), "unknown machine 'virt-2.5'"),
    (dict(ram_size=GiB, machine="virt-10.0"), "unknown machine"),
    (dict(ram_size=GiB, settings={"highmem-cxl": "on"}), "unknown property 'highmem-cxl'"),
    (dict(ram_size=GiB, settings={"gic-version": "5"}), "Invalid gic-version"),
])
def test_fails_where_qemu_fails(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_virt_layout(**kwargs)


SWITCHES = ("highmem-redists", "highmem-ecam", "highmem-mmio")


@st.composite
def virt_configs(draw: st.DrawFn) -> dict:
    ram = draw(st.integers(1, 2048)) * 128 * MiB
    slots = draw(st.integers(0, 8))
    extra = draw(st.integers(1 if slots else 0, 600)) * GiB if draw(st.booleans()) or slots else 0
    return dict(ram_size=ram, maxmem=ram + extra if extra else None, slots=slots,
                pa_bits=draw(st.integers(32, 52)), machine=f"virt-{draw(st.sampled_from(VERSIONS))}",
                settings={**{k: draw(st.sampled_from(["on", "off"])) for k in SWITCHES},
                          "highmem": draw(st.sampled_from(["on", "on", "off"]))})


@given(virt_configs())
def test_plan_invariants(kwargs: dict) -> None:
    try:
        legacy = plan_virt_layout(**{**kwargs, "settings": {**kwargs["settings"],
                                                             "compact-highmem": "off"}})
    except ConfigError as exc:
        assert str(exc).startswith("Addressing limited to")
        return
    compact = plan_virt_layout(**{**kwargs, "settings": {**kwargs["settings"],
                                                          "compact-highmem": "on"}})
    for plan in (legacy, compact):
        limit = 1 << plan.pa_bits
        enabled = sorted(plan.enabled(), key=lambda r: r.base)
        for a, b in zip(enabled, enabled[1:]):
            assert a.end <= b.base, f"{a.name} overlaps {b.name}"
        placed = [r for r in plan.regions if r.state is not DISABLED]
        assert all(r.end <= limit for r in placed)
        for r in plan.regions:
            if r.name.startswith("high-"):
                assert r.base % r.size == 0 and r.base >= 256 * GiB
        mem = plan.get("mem")
        try:
            dm = plan.get("device-memory")
            memtop = dm.base + -(-dm.size // GiB) * GiB
        except KeyError:
            memtop = -(-mem.end // GiB) * GiB
        tops = [memtop] + [r.end for r in placed if r.name.startswith("high-")]
        assert plan.highest_gpa == max(tops) - 1
    for name in ("high-gic-redist2", "high-pcie-ecam", "high-pcie-mmio"):
        if compact.get(name).enabled:
            assert compact.get(name).base <= legacy.get(name).base
    if compact.highest_gpa > legacy.highest_gpa:  # only by fitting what legacy could not
        assert {r.name for r in compact.enabled()} > {r.name for r in legacy.enabled()}
