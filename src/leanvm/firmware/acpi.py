"""Minimal ACPI tables for direct Linux boots: RSDP, XSDT, FADT, FACS, MADT and a DSDT.

Without firmware nobody else describes the platform, and without ACPI Linux finds one CPU,
no IOAPIC and no way to power off. These tables say what leanvm's x86 machine has, and no
more: an ACPI 6.4 platform that is not hardware-reduced (fixed PM1a event and control
registers and a PM timer in I/O space, devices/acpi_pm.py), always in ACPI mode (SMI_CMD 0),
with legacy ISA devices and an i8042 (IAPC_BOOT_ARCH), a reset register (the i8042's pulse
reset, 0xFE to port 0x64), one Processor Local APIC per vCPU, KVM's in-kernel IOAPIC at GSI
base 0, and a DSDT holding the \\_S5 (soft-off) sleep package and one device per virtio-mmio
window (``_HID "LNRO0005"``, the id Linux's virtio_mmio driver matches, with the window and
its interrupt in ``_CRS``; QEMU's microvm describes its windows the same way).

Interrupt source overrides: KVM's default GSI routing (the one installed by
KVM_CREATE_IRQCHIP) connects ISA IRQ n to IOAPIC pin n and PIC pin n % 8 for n < 16, and the
in-kernel PIT raises GSI 0; so ISA identity holds and IRQ0 needs no override (QEMU's 0 -> 2
comes from routing it installs itself). The one override is for the SCI (IRQ 9): same pin,
but level-triggered and active high, as the PM device drives the line.

Layouts are the ACPI specification's (6.4: 5.2.5.3 RSDP, 5.2.6 table header, 5.2.8 XSDT,
5.2.9 FADT, 5.2.10 FACS, 5.2.12 MADT, 5.2.3.2 Generic Address Structure, 20.2 AML grammar).
All tables go in one block at ``base`` (leanvm uses 0xE0000, which the e820 map leaves out
and Linux's legacy RSDP scan of 0xE0000-0xFFFFF also finds); the RSDP comes first.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from leanvm.errors import ConfigError

OEM_ID = b"LEANVM"  # 6 bytes
OEM_TABLE_ID = b"LEANVM  "  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"LNVM"
CREATOR_REVISION = 1
HEADER = struct.Struct("<4sIBB6s8sI4sI")  # signature, length, revision, checksum, OEM ids...
assert HEADER.size == 36

RSDP = struct.Struct("<8sB6sBIIQB3x")  # signature, checksum, OEM id, revision, RSDT, length,
assert RSDP.size == 36  # XSDT, extended checksum, reserved
RSDP_REVISION = 2  # ACPI 2.0 and later: XSDT address and extended checksum present
XSDT_REVISION = 1
FADT_REVISION, FADT_MINOR = 6, 4  # ACPI 6.4
FADT_LENGTH = 276
MADT_REVISION = 5
DSDT_REVISION = 2  # integers are 64 bits
FACS_LENGTH, FACS_VERSION = 64, 2

# Generic Address Structure: address space id, bit width, bit offset, access size, address
GAS = struct.Struct("<BBBBQ")
SYSTEM_IO = 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3

# FADT IAPC_BOOT_ARCH
LEGACY_DEVICES = 1 << 0  # ISA devices the OS may probe (COM1, CMOS)
I8042 = 1 << 1  # an 8042 keyboard controller is present
VGA_NOT_PRESENT = 1 << 2  # no VGA: leanvm has none
# FADT Flags
WBINVD = 1 << 0  # WBINVD works (required for ACPI 1.0 and later)
PROC_C1 = 1 << 2  # C1 (HLT) works on every processor
PWR_BUTTON = 1 << 4  # set: no fixed-feature power button (clear here: leanvm has one)
SLP_BUTTON = 1 << 5  # set: no fixed-feature sleep button
FIX_RTC = 1 << 6  # set: RTC wake status is not in the fixed registers
TMR_VAL_EXT = 1 << 8  # the PM timer counts 32 bits
RESET_REG_SUP = 1 << 10  # RESET_REG is valid
P_LVL2_LAT_NONE, P_LVL3_LAT_NONE = 101, 1001  # > 100 us / > 1000 us: no C2 / C3

# MADT
LOCAL_APIC_ADDRESS = 0xFEE00000
PCAT_COMPAT = 1 << 0  # a PC-AT dual 8259 setup exists too (KVM's in-kernel PIC)
PROCESSOR_LOCAL_APIC, IO_APIC, INTERRUPT_SOURCE_OVERRIDE, LOCAL_APIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1 << 0
IOAPIC_ADDRESS = 0xFEC00000
IOAPIC_ID = 0  # what KVM's in-kernel IOAPIC reports after reset
ISA_BUS = 0
# MPS INTI flags: polarity bits 0-1 (01 active high, 11 active low), trigger bits 2-3
# (01 edge, 11 level)
ACTIVE_HIGH, LEVEL_TRIGGERED = 0b01, 0b11 << 2
ALL_PROCESSORS = 0xFF  # ACPI processor UID meaning every processor (Local APIC NMI)
MAX_APIC_ID = 0xFE  # xAPIC ids in Processor Local APIC structures; 0xFF is broadcast

# AML opcodes (ACPI 6.4, 20.2.5 Term Objects Encoding / 20.2.3 Data Objects Encoding)
ZERO_OP = 0x00  # ZeroOp
ONE_OP = 0x01  # OneOp
NAME_OP = 0x08  # DefName := NameOp NameString DataRefObject
BYTE_PREFIX = 0x0A  # ByteConst := BytePrefix ByteData
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
QWORD_PREFIX = 0x0E
PACKAGE_OP = 0x12  # DefPackage := PackageOp PkgLength NumElements PackageElementList
STRING_PREFIX = 0x0D  # String := StringPrefix AsciiCharList NullChar
SCOPE_OP = 0x10  # DefScope := ScopeOp PkgLength NameString TermList
BUFFER_OP = 0x11  # DefBuffer := BufferOp PkgLength BufferSize ByteList
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82  # DefDevice := ExtOpPrefix 0x82 PkgLength NameString ...
# resource descriptors (6.4.3): large items are a tag byte and a 16-bit length
MEMORY32_FIXED = 0x86  # 32-bit fixed memory range: info, base, length
MEMORY32_READ_WRITE = 1
EXTENDED_INTERRUPT = 0x89  # flags, count, then 32-bit interrupt numbers (GSIs)
INT_CONSUMER, INT_EDGE = 1 << 0, 1 << 1  # flags: consumer; edge (else level); active high
END_TAG = bytes([0x79, 0])  # small item End Tag, checksum 0 ("treat as summed to zero")
VIRTIO_MMIO_HID = "LNRO0005"

TABLES_LIMIT = 0x20000  # [0xE0000, 0x100000) holds at most this much


class AcpiPlatform(NamedTuple):
    """What the tables describe: vCPUs and where the PM registers and SCI are."""

    cpus: int
    pm1a_event_port: int  # PM1a_EVT_BLK: PM1_STS, PM1_EN
    pm1a_control_port: int  # PM1a_CNT_BLK
    pm_timer_port: int  # PM_TMR_BLK (32-bit)
    sci_irq: int  # ISA IRQ of the SCI
    s5_sleep_type: int  # SLP_TYP value for \_S5
    reset_port: int = 0x64  # RESET_REG (system I/O): the i8042 command port
    reset_value: int = 0xFE  # i8042 "pulse output line 0": CPU reset
    pm1_event_length: int = 4
    pm1_control_length: int = 2
    pm_timer_length: int = 4
    century: int = 0x32  # CMOS index of the century byte
    virtio_mmio: tuple[tuple[int, int, int], ...] = ()  # (base, size, GSI) of each window
    fw_cfg_port: int | None = None  # QEMU fw_cfg's I/O ports (12 with DMA), for Linux's driver


class AcpiTables(NamedTuple):
    base: int
    blob: bytes  # everything, to be written at ``base``
    rsdp_address: int
    addresses: dict[str, int]  # "RSDP", "FACS", "XSDT", "FACP", "APIC", "DSDT" -> address


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to zero (mod 256) once it is added."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = HEADER.size + len(body)
    header = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION,
                         CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def _gas(width_bits: int, access: int, address: int) -> bytes:
    if not address:
        return bytes(GAS.size)
    return GAS.pack(SYSTEM_IO, width_bits, 0, access, address)


# --- AML ----------------------------------------------------------------------------------
def aml_pkg_length(body_length: int) -> bytes:
    """PkgLength for ``body_length`` bytes following it (the encoding counts itself):
    one byte up to 63, else a lead byte with the count of following bytes in bits 6-7 and
    the low 4 bits of the length, then 8 bits per byte (20.2.4 Package Length Encoding)."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError(f"AML package of {body_length} bytes is too long")


def aml_integer(value: int) -> bytes:
    """ComputationalData for an integer: ZeroOp, OneOp or the smallest prefixed constant."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"AML integer {value} out of range")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable")


def aml_name_seg(name: str) -> bytes:
    """A NameSeg: four characters, '_' padded ("_S5" -> "_S5_")."""
    seg = name.ljust(4, "_").encode("ascii")
    if len(seg) != 4 or not (seg[:1].isupper() or seg[:1] == b"_"):
        raise ValueError(f"bad AML name {name!r}")
    return seg


def aml_package(elements: list[int]) -> bytes:
    """DefPackage of integers."""
    body = bytes([len(elements)]) + b"".join(aml_integer(e) for e in elements)
    return bytes([PACKAGE_OP]) + aml_pkg_length(len(body)) + body


def aml_name(name: str, data: bytes) -> bytes:
    """DefName: Name (NAME, data), in the scope it is placed in (the DSDT's is the root,
    so no RootChar prefix is needed: iasl drops it too)."""
    return bytes([NAME_OP]) + aml_name_seg(name) + data


def aml_string(text: str) -> bytes:
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\0"


def aml_buffer(data: bytes) -> bytes:
    body = aml_integer(len(data)) + data
    return bytes([BUFFER_OP]) + aml_pkg_length(len(body)) + body


def aml_device(name: str, body: bytes) -> bytes:
    inner = aml_name_seg(name) + body
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + aml_pkg_length(len(inner)) + inner


def aml_scope(path: str, body: bytes) -> bytes:
    """Scope (NAME) { body } for a name under the root ("_SB"): in the DSDT, whose scope is
    the root, no RootChar is needed (iasl drops it too)."""
    inner = aml_name_seg(path) + body
    return bytes([SCOPE_OP]) + aml_pkg_length(len(inner)) + inner


def mmio_resources(base: int, size: int, gsi: int) -> bytes:
    """ResourceTemplate { Memory32Fixed (ReadWrite, base, size)
                          Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi } }"""
    if base + size > 1 << 32 or not 0 <= gsi < 1 << 32:
        raise ValueError(f"window {base:#x}+{size:#x} or GSI {gsi} does not fit 32 bits")
    memory = struct.pack("<BHBII", MEMORY32_FIXED, 9, MEMORY32_READ_WRITE, base, size)
    interrupt = struct.pack("<BHBBI", EXTENDED_INTERRUPT, 6, INT_CONSUMER | INT_EDGE, 1, gsi)
    return memory + interrupt + END_TAG


def virtio_devices(windows: tuple[tuple[int, int, int], ...]) -> bytes:
    """Scope (\\_SB) { Device (VR00) { _HID "LNRO0005", _UID 0, _CRS ... } ... }"""
    devices = b"".join(
        aml_device(f"VR{index:02d}",
                   aml_name("_HID", aml_string(VIRTIO_MMIO_HID))
                   + aml_name("_UID", aml_integer(index))
                   + aml_name("_CRS", aml_buffer(mmio_resources(base, size, gsi))))
        for index, (base, size, gsi) in enumerate(windows))
    return aml_scope("_SB", devices) if devices else b""


FW_CFG_HID = "QEMU0002"  # the id Linux's qemu_fw_cfg driver matches
FW_CFG_PORTS = 0x0C  # selector, data, DMA address (QEMU docs/specs/fw_cfg.rst)
IO_PORT = 0x47  # small item: I/O port descriptor, 7 bytes
IO_DECODE16 = 1


def fw_cfg_device(port: int) -> bytes:
    """Device (FWCF) { _HID "QEMU0002", _STA 0x0B, _CRS IO (Decode16, port, port, 1, 12) },
    as QEMU's DSDT describes fw_cfg."""
    if not 0 <= port <= 0xFFFF - FW_CFG_PORTS:
        raise ValueError(f"fw_cfg port {port:#x} does not fit 16 bits")
    crs = struct.pack("<BBHHBB", IO_PORT, IO_DECODE16, port, port, 1, FW_CFG_PORTS) + END_TAG
    return aml_device("FWCF", aml_name("_HID", aml_string(FW_CFG_HID))
                      + aml_name("_STA", aml_integer(0x0B))  # present, enabled, functioning
                      + aml_name("_CRS", aml_buffer(crs)))


def dsdt(platform: AcpiPlatform) -> bytes:
    # \_S5: Package { PM1a_CNT.SLP_TYP, PM1b_CNT.SLP_TYP, reserved, reserved }
    s5 = aml_name("_S5", aml_package([platform.s5_sleep_type, platform.s5_sleep_type, 0, 0]))
    fw_cfg = (aml_scope("_SB", fw_cfg_device(platform.fw_cfg_port))
              if platform.fw_cfg_port is not None else b"")
    return _table(b"DSDT", DSDT_REVISION, s5 + virtio_devices(platform.virtio_mmio) + fw_cfg)


# --- tables -------------------------------------------------------------------------------
def madt(platform: AcpiPlatform) -> bytes:
    body = bytearray(struct.pack("<II", LOCAL_APIC_ADDRESS, PCAT_COMPAT))
    for cpu in range(platform.cpus):  # ACPI processor UID = APIC id = vCPU index
        body += struct.pack("<BBBBI", PROCESSOR_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", IO_APIC, 12, IOAPIC_ID, 0, IOAPIC_ADDRESS, 0)
    body += struct.pack("<BBBBIH", INTERRUPT_SOURCE_OVERRIDE, 10, ISA_BUS, platform.sci_irq,
                        platform.sci_irq, ACTIVE_HIGH | LEVEL_TRIGGERED)
    body += struct.pack("<BBBHB", LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 1)  # LINT1 is NMI
    return _table(b"APIC", MADT_REVISION, bytes(body))


def facs() -> bytes:
    # signature, length, hardware signature, firmware waking vector, global lock, flags,
    # X firmware waking vector, version, reserved, OSPM flags, reserved
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_LENGTH, 0, 0, 0, 0, 0, FACS_VERSION, 0)


def fadt(platform: AcpiPlatform, facs_address: int, dsdt_address: int) -> bytes:
    p = platform
    flags = WBINVD | PROC_C1 | SLP_BUTTON | FIX_RTC | TMR_VAL_EXT | RESET_REG_SUP
    body = bytearray()
    body += struct.pack("<II", facs_address, dsdt_address)  # FIRMWARE_CTRL, DSDT
    body += struct.pack("<BBH", 0, 0, p.sci_irq)  # reserved, Preferred_PM_Profile, SCI_INT
    body += struct.pack("<IBBBB", 0, 0, 0, 0, 0)  # SMI_CMD 0: always in ACPI mode
    body += struct.pack("<8I", p.pm1a_event_port, 0, p.pm1a_control_port, 0, 0,
                        p.pm_timer_port, 0, 0)  # PM1a/b EVT, PM1a/b CNT, PM2 CNT, TMR, GPE0/1
    body += struct.pack("<8B", p.pm1_event_length, p.pm1_control_length, 0, p.pm_timer_length,
                        0, 0, 0, 0)  # ..._LEN, GPE1_BASE, CST_CNT
    body += struct.pack("<HHHH", P_LVL2_LAT_NONE, P_LVL3_LAT_NONE, 0, 0)  # + FLUSH_SIZE/STRIDE
    body += struct.pack("<BBBBB", 0, 0, 0, 0, p.century)  # DUTY_*, DAY_ALRM, MON_ALRM, CENTURY
    body += struct.pack("<HBI", LEGACY_DEVICES | I8042 | VGA_NOT_PRESENT, 0, flags)
    body += _gas(8, ACCESS_BYTE, p.reset_port)  # RESET_REG
    body += struct.pack("<BHB", p.reset_value, 0, FADT_MINOR)  # RESET_VALUE, ARM_BOOT_ARCH
    body += struct.pack("<QQ", 0, dsdt_address)  # X_FIRMWARE_CTRL (FACS below 4 GiB), X_DSDT
    body += _gas(8 * p.pm1_event_length, ACCESS_WORD, p.pm1a_event_port)  # X_PM1a_EVT_BLK
    body += _gas(0, 0, 0)  # X_PM1b_EVT_BLK
    body += _gas(8 * p.pm1_control_length, ACCESS_WORD, p.pm1a_control_port)  # X_PM1a_CNT_BLK
    body += _gas(0, 0, 0) + _gas(0, 0, 0)  # X_PM1b_CNT_BLK, X_PM2_CNT_BLK
    body += _gas(8 * p.pm_timer_length, ACCESS_DWORD, p.pm_timer_port)  # X_PM_TMR_BLK
    body += _gas(0, 0, 0) + _gas(0, 0, 0)  # X_GPE0_BLK, X_GPE1_BLK
    body += _gas(0, 0, 0) + _gas(0, 0, 0)  # SLEEP_CONTROL_REG, SLEEP_STATUS_REG (HW-reduced)
    body += b"LEANVM\0\0"  # Hypervisor Vendor Identity
    table = _table(b"FACP", FADT_REVISION, bytes(body))
    assert len(table) == FADT_LENGTH
    return table


def xsdt(entries: list[int]) -> bytes:
    return _table(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in entries))


def rsdp(xsdt_address: int) -> bytes:
    data = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0, RSDP.size,
                               xsdt_address, 0))
    data[8] = checksum(bytes(data[:20]))  # ACPI 1.0 checksum: the first 20 bytes
    data[32] = checksum(bytes(data))  # extended checksum: all 36 bytes
    return bytes(data)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def build_acpi_tables(base: int, platform: AcpiPlatform) -> AcpiTables:
    """All tables laid out from ``base`` (16-byte aligned; the RSDP is at ``base``)."""
    if base % 16:
        raise ValueError(f"ACPI tables base {base:#x} is not 16-byte aligned")
    if not 1 <= platform.cpus <= MAX_APIC_ID + 1:
        raise ConfigError(f"{platform.cpus} vCPUs: xAPIC MADT entries hold at most "
                         f"{MAX_APIC_ID + 1}")
    dsdt_bytes, madt_bytes, facs_bytes = dsdt(platform), madt(platform), facs()
    addresses: dict[str, int] = {"RSDP": base}
    cursor = base + RSDP.size
    addresses["FACS"] = cursor = _align(cursor, 64)  # the FACS is 64-byte aligned
    cursor += FACS_LENGTH
    for name, size in (("XSDT", HEADER.size + 16), ("FACP", FADT_LENGTH),
                       ("APIC", len(madt_bytes)), ("DSDT", len(dsdt_bytes))):
        addresses[name] = cursor = _align(cursor, 16)
        cursor += size
    fadt_bytes = fadt(platform, addresses["FACS"], addresses["DSDT"])
    xsdt_bytes = xsdt([addresses["FACP"], addresses["APIC"]])
    blob = bytearray(cursor - base)
    for name, data in (("RSDP", rsdp(addresses["XSDT"])), ("FACS", facs_bytes),
                       ("XSDT", xsdt_bytes), ("FACP", fadt_bytes), ("APIC", madt_bytes),
                       ("DSDT", dsdt_bytes)):
        offset = addresses[name] - base
        blob[offset:offset + len(data)] = data
    if len(blob) > TABLES_LIMIT:
        raise ConfigError(f"ACPI tables need {len(blob)} bytes; at most {TABLES_LIMIT} fit")
    return AcpiTables(base, bytes(blob), base, addresses)
