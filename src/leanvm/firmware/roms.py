"""Firmware blobs leanvm serves to guests but does not ship: found on the host.

QEMU's option ROMs come with Debian's qemu-system-data package (/usr/share/qemu). The
environment variable LEANVM_ROM_PATH (directories separated by ':') is searched first.
"""

from __future__ import annotations

import os
from pathlib import Path

from leanvm.errors import ConfigError

DEFAULT_DIRS = ("/usr/share/qemu", "/usr/share/seabios")


def find_rom(name: str) -> Path:
    dirs = [d for d in os.environ.get("LEANVM_ROM_PATH", "").split(":") if d]
    for directory in (*dirs, *DEFAULT_DIRS):
        path = Path(directory) / name
        if path.is_file():
            return path
    raise ConfigError(f"option ROM {name} not found in {', '.join((*dirs, *DEFAULT_DIRS))}: "
                      "install Debian's qemu-system-data or set LEANVM_ROM_PATH")
