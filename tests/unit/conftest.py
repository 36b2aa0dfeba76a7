"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    """4 MiB of guest RAM at address 0 (modules that need another layout define their own)."""
    mem = GuestMemory()
    mem.add(GuestRegion("ram", 0, map_anonymous(4 << 20), RegionKind.RAM))
    yield mem
    mem.close()
