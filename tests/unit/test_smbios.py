"""SMBIOS tables served through fw_cfg: a valid 2.1 entry point and well-formed structures."""

from __future__ import annotations

import struct

from leanvm.firmware.smbios import smbios_tables


def walk(tables: bytes) -> list[tuple[int, int, bytes, list[bytes]]]:
    """(type, handle, formatted area, strings) for each structure, checking the framing."""
    out = []
    offset = 0
    while offset < len(tables):
        kind, length, handle = struct.unpack_from("<BBH", tables, offset)
        assert length >= 4
        formatted = tables[offset + 4:offset + length]
        end = tables.index(b"\0\0", offset + length)
        strings = [s for s in tables[offset + length:end].split(b"\0") if s]
        out.append((kind, handle, formatted, strings))
        offset = end + 2
    assert offset == len(tables)
    return out


def test_entry_point_checksums_and_counts() -> None:
    anchor, tables = smbios_tables(manufacturer="ACME", product="box", uuid=bytes(range(16)))
    assert len(anchor) == 31 and anchor[:4] == b"_SM_" and anchor[0x10:0x15] == b"_DMI_"
    assert sum(anchor) % 256 == 0 and sum(anchor[0x10:]) % 256 == 0
    assert (anchor[6], anchor[7]) == (2, 8) and anchor[30] == 0x28
    length, address, count = struct.unpack_from("<HIH", anchor, 0x16)
    assert length == len(tables) and address == 0
    structures = walk(tables)
    assert count == len(structures)
    assert max(len(s[2]) + 4 for s in structures) <= struct.unpack_from("<H", anchor, 8)[0]
    assert [s[0] for s in structures] == [1, 3, 32, 127] and structures[-1][2] == b""


def test_system_strings_and_uuid() -> None:
    _, tables = smbios_tables(manufacturer="ACME", product="box", version="2", uuid=bytes(range(16)))
    kind, _, formatted, strings = walk(tables)[0]
    assert kind == 1 and strings == [b"ACME", b"box", b"2", b"0"]
    assert formatted[:4] == bytes([1, 2, 3, 4]) and formatted[4:20] == bytes(range(16))
    assert len(formatted) + 4 == 0x19  # the SMBIOS 2.1 size of a type 1 structure
