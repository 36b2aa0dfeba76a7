"""The bundled demo guest is the one tests/guests/programs/demo.c builds to."""

from __future__ import annotations

import subprocess

import pytest

from leanvm.loader.image import load_image
from leanvm.machine.machine import demo_guest_path

BUILT_WITH = "12.2.0"  # gcc version that produced src/leanvm/data/demo.bin (make demo-guest)


def test_demo_guest_is_shipped_and_loadable() -> None:
    image = load_image(demo_guest_path())
    assert image.kind == "flat" and 0 < len(image.segments[0].data) < 4096


def test_demo_guest_matches_its_source(guest) -> None:
    version = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    if version != BUILT_WITH:
        pytest.skip(f"demo.bin was built with gcc {BUILT_WITH}; this host has {version}")
    assert demo_guest_path().read_bytes() == guest("demo").read_bytes(), \
        "src/leanvm/data/demo.bin is stale: run 'make demo-guest'"
