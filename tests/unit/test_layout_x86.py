from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from leanvm.errors import ConfigError
from leanvm.layout.region import GiB, MiB, RegionState
from leanvm.layout.x86 import VERSIONS, plan_x86_layout, x86_properties

SWITCHABLE = sorted(k for k in x86_properties("leanvm-1") if k != "compact")


def test_leanvm_1_is_pinned() -> None:
    """The leanvm-1 layout never changes: these are its addresses."""
    plan = plan_x86_layout(8 * GiB, maxmem=12 * GiB, slots=2, pa_bits=40, machine="leanvm-1")
    got = {r.name: (r.base, r.size, r.state.value) for r in plan.regions}
    assert got == {
        "ram-low": (0, 3 * GiB, "enabled"),
        "flash-large": (0xC000_0000, 128 * MiB, "enabled"),
        "platform": (0xD000_0000, 16 * MiB, "enabled"),
        "ioapic": (0xFEC0_0000, 0x1000, "enabled"),
        "lapic": (0xFEE0_0000, 0x1000, "enabled"),
        "kvm-private": (0xFEFF_C000, 0x4000, "enabled"),
        "firmware": (0xFF00_0000, 16 * MiB, "enabled"),
        "ram-high": (4 * GiB, 5 * GiB, "enabled"),
        "device-memory": (9 * GiB, 6 * GiB, "enabled"),
        "pcie-ecam": (15 * GiB, 256 * MiB, "enabled"),
        "pcie-mmio64": (64 * GiB, 64 * GiB, "enabled"),
    }
    assert plan.highest_gpa == 128 * GiB - 1
    assert plan_x86_layout(GiB, machine="leanvm") == plan_x86_layout(GiB, machine="leanvm-1")


def test_regions_that_do_not_fit_are_disabled_with_a_reason() -> None:
    plan = plan_x86_layout(2 * GiB, pa_bits=36)
    assert plan.get("pcie-mmio64").state is RegionState.DISABLED
    assert "does not fit below 2^36" in plan.get("pcie-mmio64").reason
    assert plan.get("pcie-ecam").enabled
    assert plan.highest_gpa == plan.get("pcie-ecam").end - 1


def test_ram_beyond_the_limit_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="beyond the 32-bit physical address limit"):
        plan_x86_layout(4 * GiB, pa_bits=32)
    with pytest.raises(ConfigError, match="device memory .* beyond the 36-bit"):
        plan_x86_layout(GiB, maxmem=80 * GiB, pa_bits=36)


def test_compact_skips_disabled_regions_and_legacy_reserves_them() -> None:
    compact = plan_x86_layout(GiB, settings={"pcie-ecam": "off"})
    legacy = plan_x86_layout(GiB, settings={"pcie-ecam": "off", "compact": "off"})
    assert compact.get("pcie-ecam").state is RegionState.DISABLED
    assert legacy.get("pcie-ecam").state is RegionState.RESERVED
    assert legacy.get("pcie-ecam").reason == "pcie-ecam=off"
    # with the ECAM's space kept, nothing above it moves when it is switched back on
    on = plan_x86_layout(GiB, settings={"compact": "off"})
    assert legacy.get("pcie-mmio64").base == on.get("pcie-mmio64").base


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="unknown property 'ecam'"):
        plan_x86_layout(GiB, settings={"ecam": "off"})
    with pytest.raises(ConfigError, match="expected on or off"):
        plan_x86_layout(GiB, settings={"compact": "maybe"})
    with pytest.raises(ConfigError, match="unknown machine 'leanvm-9'"):
        plan_x86_layout(GiB, machine="leanvm-9")
    with pytest.raises(ConfigError, match="maxmem"):
        plan_x86_layout(2 * GiB, maxmem=GiB)


sizes = st.integers(1, 512).map(lambda n: n * 256 * MiB)


@st.composite
def layouts(draw: st.DrawFn) -> dict:
    ram = draw(sizes)
    extra = draw(st.integers(0, 64)) * GiB
    return dict(ram_size=ram, maxmem=ram + extra, slots=draw(st.integers(0, 8)),
                pa_bits=draw(st.integers(32, 52)),
                settings={k: draw(st.sampled_from(["on", "off"])) for k in SWITCHABLE})


@given(layouts())
def test_plan_invariants(kwargs: dict) -> None:
    try:
        compact = plan_x86_layout(**kwargs)
    except ConfigError as exc:
        assert "physical address limit" in str(exc)
        return
    legacy = plan_x86_layout(**{**kwargs, "settings": {**kwargs["settings"], "compact": "off"}})
    limit = 1 << kwargs["pa_bits"]
    for plan in (compact, legacy):
        enabled = sorted(plan.enabled(), key=lambda r: r.base)
        for a, b in zip(enabled, enabled[1:]):
            assert a.end <= b.base, f"{a.name} overlaps {b.name}"
        kept = [r for r in plan.regions if r.state is not RegionState.DISABLED and r.size]
        for region in kept:
            assert region.end <= limit, region
        for name in ("pcie-ecam", "pcie-mmio64"):
            region = plan.get(name)
            assert region.base % region.size == 0
        if plan.get("device-memory").size:
            assert plan.get("device-memory").base % GiB == 0
        assert plan.highest_gpa == max(r.end for r in kept) - 1
        assert sum(r.size for r in plan.enabled() if r.name.startswith("ram")) == kwargs["ram_size"]
    for name in ("pcie-ecam", "pcie-mmio64"):
        assert compact.get(name).base <= legacy.get(name).base
    assert compact.highest_gpa <= legacy.highest_gpa


@given(st.sampled_from(sorted(VERSIONS)), sizes)
def test_every_version_places_ram_first(version: str, ram: int) -> None:
    plan = plan_x86_layout(ram, pa_bits=48, machine=version)
    assert plan.get("ram-low").base == 0
