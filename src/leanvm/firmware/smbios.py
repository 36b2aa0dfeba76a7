"""SMBIOS 2.8 tables for fw_cfg ("etc/smbios/smbios-anchor" and "etc/smbios/smbios-tables").

SeaBIOS copies tables served this way and adds its own type 0 (BIOS information); without
them it builds a legacy set itself, which costs about 0.3 s of emulated firmware code on a
host that emulates guest supervisor code. The guest OS then reads who made the "system"
(Linux: /sys/class/dmi/id, the "DMI:" boot line).

Structures (DMTF DSP0134): each is a header {u8 type; u8 length; u16 handle}, its formatted
area, then its strings, each NUL-terminated, and one more NUL (two NULs when there are no
strings). The 2.1 entry point is 31 bytes: "_SM_", checksum, length, version, maximum
structure size, revision, formatted area, "_DMI_", intermediate checksum, table length,
table address (the firmware fills it in), structure count, BCD revision.
"""

from __future__ import annotations

import struct

MAJOR, MINOR = 2, 8
ENTRY_POINT = struct.Struct("<4sBBBBHB5s5sBHIHB")
assert ENTRY_POINT.size == 31


def _structure(kind: int, handle: int, formatted: bytes, strings: tuple[str, ...] = ()) -> bytes:
    header = struct.pack("<BBH", kind, 4 + len(formatted), handle)
    if strings:
        tail = b"".join(s.encode("ascii", "replace")[:64] + b"\0" for s in strings) + b"\0"
    else:
        tail = b"\0\0"
    return header + formatted + tail


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def smbios_tables(manufacturer: str = "leanvm", product: str = "leanvm",
                  version: str = "", uuid: bytes = bytes(16)) -> tuple[bytes, bytes]:
    """(anchor, tables): a system (type 1), a chassis (type 3), boot status (type 32) and
    the end marker (type 127)."""
    if len(uuid) != 16:
        raise ValueError("SMBIOS UUID must be 16 bytes")
    structures = [
        # type 1: manufacturer 1, product 2, version 3, serial 4, UUID, wake-up: power switch
        _structure(1, 0x100, bytes([1, 2, 3, 4]) + uuid + bytes([6]),
                   (manufacturer, product, version or "1", "0")),
        # type 3: manufacturer 1, type "other", version/serial/asset none; states safe, security unknown
        _structure(3, 0x300, bytes([1, 1, 0, 0, 0, 3, 3, 3, 2]), (manufacturer,)),
        # type 32: six reserved bytes, then "no errors detected"
        _structure(32, 0x2000, bytes(6) + b"\0"),
        _structure(127, 0x7F00, b""),
    ]
    tables = b"".join(structures)
    anchor = bytearray(ENTRY_POINT.pack(
        b"_SM_", 0, ENTRY_POINT.size, MAJOR, MINOR, max(len(s) for s in structures), 0,
        bytes(5), b"_DMI_", 0, len(tables), 0, len(structures), (MAJOR << 4) | MINOR))
    anchor[0x15] = _checksum(bytes(anchor[0x10:]))
    anchor[0x04] = _checksum(bytes(anchor))
    return bytes(anchor), tables
