"""ACPI tables for direct boots: layout, checksums and field offsets (ACPI 6.4), then the same
tables read by an independent parser, iasl from ACPICA (Debian's acpica-tools)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from leanvm.errors import ConfigError
from leanvm.firmware import acpi
from leanvm.firmware.acpi import AcpiPlatform, build_acpi_tables

BASE = 0xE0000


def platform(cpus: int = 4) -> AcpiPlatform:
    return AcpiPlatform(cpus=cpus, pm1a_event_port=0x600, pm1a_control_port=0x604,
                        pm_timer_port=0x608, sci_irq=9, s5_sleep_type=5)


def table_at(blob: bytes, address: int) -> bytes:
    offset = address - BASE
    length = struct.unpack_from("<I", blob, offset + 4)[0]
    return blob[offset:offset + length]


def tables(cpus: int = 4) -> dict[str, bytes]:
    built = build_acpi_tables(BASE, platform(cpus))
    out = {name: table_at(built.blob, address) for name, address in built.addresses.items()
           if name not in ("RSDP",)}
    out["RSDP"] = built.blob[:36]
    return out


def test_rsdp_points_at_the_xsdt_with_both_checksums() -> None:
    built = build_acpi_tables(BASE, platform())
    rsdp = built.blob[:36]
    assert built.rsdp_address == BASE and BASE % 16 == 0
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2  # revision 2: ACPI 2.0+
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    rsdt, length, xsdt = struct.unpack_from("<IIQ", rsdp, 16)
    assert (rsdt, length, xsdt) == (0, 36, built.addresses["XSDT"])


def test_every_table_has_its_signature_length_and_checksum() -> None:
    built = build_acpi_tables(BASE, platform())
    for name in ("XSDT", "FACP", "APIC", "DSDT"):
        table = table_at(built.blob, built.addresses[name])
        assert table[:4] == name.encode()
        assert sum(table) % 256 == 0, name
        assert table[10:16] == b"LEANVM"
        assert built.addresses[name] % 16 == 0
    xsdt = table_at(built.blob, built.addresses["XSDT"])
    assert struct.unpack_from("<2Q", xsdt, 36) == (built.addresses["FACP"], built.addresses["APIC"])
    assert len(xsdt) == 36 + 16
    facs = built.blob[built.addresses["FACS"] - BASE:][:64]
    assert facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64
    assert built.addresses["FACS"] % 64 == 0 and facs[32] == 2  # version
    assert BASE + len(built.blob) <= 0x100000


def test_fadt_fields_at_their_spec_offsets() -> None:
    built = build_acpi_tables(BASE, platform())
    fadt = table_at(built.blob, built.addresses["FACP"])
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 4  # revision 6, minor 4
    u8 = lambda off: fadt[off]
    u16 = lambda off: struct.unpack_from("<H", fadt, off)[0]
    u32 = lambda off: struct.unpack_from("<I", fadt, off)[0]
    u64 = lambda off: struct.unpack_from("<Q", fadt, off)[0]
    assert u32(36) == built.addresses["FACS"] and u32(40) == built.addresses["DSDT"]
    assert u16(46) == 9  # SCI_INT
    assert u32(48) == 0 and u8(52) == u8(53) == 0  # SMI_CMD 0: always in ACPI mode
    assert (u32(56), u32(60), u32(64), u32(68)) == (0x600, 0, 0x604, 0)  # PM1a/b EVT, CNT
    assert (u32(72), u32(76), u32(80), u32(84)) == (0, 0x608, 0, 0)  # PM2, PM_TMR, GPE0/1
    assert bytes(fadt[88:92]) == bytes([4, 2, 0, 4])  # PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR
    assert u16(96) > 100 and u16(98) > 1000  # no C2, no C3
    assert u8(108) == 0x32  # CENTURY: the CMOS century byte
    boot_arch = u16(109)
    assert boot_arch & acpi.LEGACY_DEVICES and boot_arch & acpi.I8042
    flags = u32(112)
    assert flags & acpi.WBINVD and flags & acpi.TMR_VAL_EXT and flags & acpi.RESET_REG_SUP
    assert not flags & (1 << 20)  # HW_REDUCED_ACPI clear: fixed hardware is used
    assert not flags & acpi.PWR_BUTTON  # the fixed power button exists
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, 0x64)  # RESET_REG
    assert u8(128) == 0xFE  # RESET_VALUE
    assert u64(132) == 0 and u64(140) == built.addresses["DSDT"]  # X_FIRMWARE_CTRL, X_DSDT
    assert struct.unpack_from("<BBBBQ", fadt, 148) == (1, 32, 0, 2, 0x600)  # X_PM1a_EVT_BLK
    assert struct.unpack_from("<BBBBQ", fadt, 172) == (1, 16, 0, 2, 0x604)  # X_PM1a_CNT_BLK
    assert struct.unpack_from("<BBBBQ", fadt, 208) == (1, 32, 0, 3, 0x608)  # X_PM_TMR_BLK
    assert fadt[244:268] == bytes(24)  # sleep control/status: hardware-reduced only


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        assert length >= 2
        entries.append((kind, madt[offset + 2:offset + length]))
        offset += length
    assert offset == len(madt)
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 7, 64])
def test_madt_lists_one_local_apic_per_vcpu_and_the_ioapic(cpus: int) -> None:
    madt = tables(cpus)["APIC"]
    assert madt[8] == 5  # revision
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)  # LAPIC address, PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [struct.unpack("<BBI", body) for kind, body in entries if kind == 0]
    assert lapics == [(i, i, 1) for i in range(cpus)]  # UID, APIC id, enabled
    ioapics = [struct.unpack("<BBII", body) for kind, body in entries if kind == 1]
    assert ioapics == [(0, 0, 0xFEC00000, 0)]  # id 0, address, GSI base 0
    overrides = [struct.unpack("<BBIH", body) for kind, body in entries if kind == 2]
    # KVM routes ISA IRQ n to GSI n (IRQ0 too): only the SCI's trigger/polarity is declared
    assert overrides == [(0, 9, 9, 0x000D)]
    nmis = [struct.unpack("<BHB", body) for kind, body in entries if kind == 4]
    assert nmis == [(0xFF, 0, 1)]


def test_dsdt_holds_the_s5_package_in_aml() -> None:
    dsdt = tables()["DSDT"]
    assert dsdt[8] == 2
    # NameOp "_S5_" PackageOp PkgLength NumElements BytePrefix 5, BytePrefix 5, Zero, Zero
    assert dsdt[36:] == bytes([0x08]) + b"_S5_" + bytes([0x12, 0x08, 0x04, 0x0A, 5, 0x0A, 5, 0, 0])


def test_aml_encodings() -> None:
    assert acpi.aml_pkg_length(0) == b"\x01"
    assert acpi.aml_pkg_length(62) == bytes([63])  # still one byte
    assert acpi.aml_pkg_length(63) == bytes([0x40 | (65 & 0xF), 65 >> 4])  # two bytes count
    assert acpi.aml_pkg_length(0x1000) == bytes([0x80 | 3, 0x00, 0x01])  # 0x1003 in 3 bytes
    assert [acpi.aml_integer(v) for v in (0, 1, 2, 0x100, 0x10000, 1 << 32)] == [
        b"\x00", b"\x01", b"\x0a\x02", b"\x0b\x00\x01", b"\x0c\x00\x00\x01\x00",
        b"\x0e" + (1 << 32).to_bytes(8, "little")]
    with pytest.raises(ValueError):
        acpi.aml_integer(-1)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match="vCPUs"):
        build_acpi_tables(BASE, platform(0))
    with pytest.raises(ValueError, match="aligned"):
        build_acpi_tables(BASE + 8, platform())


# --- the same tables through ACPICA's disassembler ------------------------------------------
@pytest.fixture(scope="module")
def iasl() -> str:
    found = shutil.which("iasl")
    if found is None:
        pytest.skip("iasl is not installed (scripts/install-deps installs acpica-tools)")
    return found


def disassemble(iasl: str, table: bytes, where: Path, name: str) -> str:
    """iasl's disassembly of one table; fails on any warning or error it reports."""
    source = where / f"{name}.dat"
    source.write_bytes(table)
    done = subprocess.run([iasl, "-d", str(source)], capture_output=True, text=True, timeout=60)
    messages = done.stdout + done.stderr
    assert done.returncode == 0, messages
    assert not re.search(r"warning|error", messages, re.IGNORECASE), messages
    text = source.with_suffix(".dsl").read_text()
    assert "Incorrect" not in text, text
    return text


def test_iasl_reads_every_table_without_complaint(iasl: str, tmp_path: Path) -> None:
    found = tables(3)
    madt = disassemble(iasl, found["APIC"], tmp_path, "apic")
    assert re.findall(r"Local Apic ID : (\w+)", madt) == ["00", "01", "02"]
    assert len(re.findall(r"Processor Enabled : 1", madt)) == 3
    assert re.search(r"Address : FEC00000", madt) and re.search(r"Interrupt : 00000000", madt)
    override = madt[madt.index("[Interrupt Source Override]"):madt.index("[Local APIC NMI]")]
    assert re.search(r"Source : 09\s.*Interrupt : 00000009\s.*Polarity : 1\s+Trigger Mode : 3",
                     override, re.DOTALL), override
    assert madt.count("[Interrupt Source Override]") == 1  # no IRQ0 -> 2: KVM routes 0 to 0
    fadt = disassemble(iasl, found["FACP"], tmp_path, "facp")
    assert "SCI Interrupt : 0009" in fadt and "Hardware Reduced (V5) : 0" in fadt
    assert re.search(r"PM1A Control Block Address : 00000604", fadt)
    assert re.search(r"8042 Present on ports 60/64 \(V2\) : 1", fadt)
    for name in ("XSDT", "FACS"):
        disassemble(iasl, found[name], tmp_path, name.lower())
    dsdt = disassemble(iasl, found["DSDT"], tmp_path, "dsdt")
    body = re.sub(r"\s+", " ", dsdt[dsdt.index("DefinitionBlock"):])
    assert "Name (_S5, Package (0x04) // _S5_: S5 System State { 0x05, 0x05, Zero, Zero })" in body


def test_iasl_compiles_our_dsdt_disassembly_back_to_the_same_aml(iasl: str, tmp_path: Path) -> None:
    dsdt = tables()["DSDT"]
    disassemble(iasl, dsdt, tmp_path, "dsdt")
    done = subprocess.run([iasl, "-p", str(tmp_path / "again"), str(tmp_path / "dsdt.dsl")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    again = (tmp_path / "again.aml").read_bytes()
    assert again[36:] == dsdt[36:]  # the AML itself (iasl writes its own creator id)


def test_iasl_builds_the_same_rsdp_from_its_fields(iasl: str, tmp_path: Path) -> None:
    """iasl does not disassemble an RSDP, but compiles one from a data-table source and
    computes both checksums itself: ours must be byte for byte the same."""
    built = build_acpi_tables(BASE, platform())
    source = tmp_path / "rsdp.asl"
    source.write_text(
        '[0008] Signature : "RSD PTR "\n[0001] Checksum : 00\n[0006] Oem ID : "LEANVM"\n'
        "[0001] Revision : 02\n[0004] RSDT Address : 00000000\n[0004] Length : 00000024\n"
        f"[0008] XSDT Address : {built.addresses['XSDT']:016X}\n[0001] Extended Checksum : 00\n"
        "[0003] Reserved : 000000\n")
    done = subprocess.run([iasl, str(source)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert source.with_suffix(".aml").read_bytes() == built.blob[:36]


def test_the_iasl_check_catches_a_bad_checksum(iasl: str, tmp_path: Path) -> None:
    madt = bytearray(tables()["APIC"])
    madt[9] ^= 0x01
    with pytest.raises(AssertionError):
        disassemble(iasl, bytes(madt), tmp_path, "bad")


def test_iasl_reads_virtio_mmio_devices_and_compiles_them_back(iasl: str, tmp_path: Path) -> None:
    """Two virtio-mmio windows as Linux's virtio_mmio ACPI probe needs them: _HID LNRO0005,
    the window in Memory32Fixed, the GSI in an edge-triggered, active-high Interrupt."""
    windows = ((0xD000_0000, 0x200, 16), (0xD000_1000, 0x200, 17))
    built = build_acpi_tables(BASE, platform(1)._replace(virtio_mmio=windows))
    dsdt = table_at(built.blob, built.addresses["DSDT"])
    text = re.sub(r"\s+", " ", disassemble(iasl, dsdt, tmp_path, "dsdt"))
    for index, (base, size, gsi) in enumerate(windows):
        assert f"Device (VR{index:02d})" in text
        assert f"Memory32Fixed (ReadWrite, 0x{base:08X}, // Address Base 0x{size:08X}, " in text
        assert ("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { "
                f"0x{gsi:08X}, }}") in text
    assert text.count('Name (_HID, "LNRO0005")') == 2
    assert "Scope (_SB)" in text
    done = subprocess.run([iasl, "-p", str(tmp_path / "again"), str(tmp_path / "dsdt.dsl")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "again.aml").read_bytes()[36:] == dsdt[36:]
