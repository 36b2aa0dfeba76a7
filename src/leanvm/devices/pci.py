"""PCI configuration mechanism #1 (ports 0xCF8/0xCFC) with the i440FX host bridge and the
PIIX3 ISA bridge, the PC chipset SeaBIOS and Linux expect on bus 0.

CONFIG_ADDRESS (0xCF8, 32-bit): bit 31 enable, bits 23-16 bus, 15-11 device, 10-8
function, 7-2 register. CONFIG_DATA (0xCFC-0xCFF) reads or writes the addressed dword (a
byte or word access at 0xCFC+n reaches byte n of it). Nothing answers for absent functions:
reads are all ones. The i440FX's PAM registers (0x59-0x5F) decide what the BIOS area
0xC0000-0xFFFFF shows; each write is reported through ``on_pam(register, value)``.
"""

from __future__ import annotations

from collections.abc import Callable

ADDRESS = 0  # port 0xCF8
DATA = 4  # ports 0xCFC-0xCFF
PORT_SIZE = 8  # CONFIG_ADDRESS, CONFIG_DATA (where: machine/platform.py)
ENABLE = 1 << 31

VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION, CLASS_PROG, HEADER_TYPE = 0x08, 0x09, 0x0E
SUBSYSTEM_VENDOR, SUBSYSTEM_ID = 0x2C, 0x2E
HEADER_MULTIFUNCTION = 0x80

INTEL = 0x8086
I440FX_DEVICE = 0x1237  # 82441FX PMC
PIIX3_ISA_DEVICE = 0x7000  # 82371SB PIIX3 ISA bridge
QEMU_SUBSYSTEM_VENDOR, QEMU_SUBSYSTEM = 0x1AF4, 0x1100

PAM0 = 0x59  # PAM0 high nibble: 0xF0000-0xFFFFF; PAM1-6 cover 0xC0000-0xEFFFF in 16 KiB halves
PAM_COUNT = 7
SMRAM = 0x72
SMRAM_DEFAULT = 0x02  # compatible SMRAM at 0xA0000, closed


class PciFunction:
    """A config space of 256 bytes; ``writable`` marks bytes the guest may change."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 header_type: int = 0) -> None:
        self.config = bytearray(256)
        self.writable = bytearray(256)
        self._put(VENDOR_ID, 2, vendor)
        self._put(DEVICE_ID, 2, device)
        self._put(REVISION, 1, revision)
        self._put(CLASS_PROG, 3, class_code)
        self._put(HEADER_TYPE, 1, header_type)
        self._put(SUBSYSTEM_VENDOR, 2, QEMU_SUBSYSTEM_VENDOR)
        self._put(SUBSYSTEM_ID, 2, QEMU_SUBSYSTEM)
        self.writable[COMMAND:COMMAND + 2] = b"\xff\xff"
        self.writable[0x40:0x100] = b"\xff" * 0xC0  # device-specific registers
        self.on_write: Callable[[int, int], None] = lambda register, value: None

    def _put(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = value.to_bytes(size, "little")

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        for index in range(size):
            register = offset + index
            byte = (value >> (8 * index)) & 0xFF
            mask = self.writable[register]
            old = self.config[register]
            new = (old & ~mask) | (byte & mask)
            if new != old or mask:
                self.config[register] = new
                self.on_write(register, new)


class PciHost:
    """Bus 0 behind ports 0xCF8/0xCFC."""

    def __init__(self, on_pam: Callable[[int, int], None] = lambda register, value: None) -> None:
        self.address = 0
        self.functions: dict[tuple[int, int], PciFunction] = {}
        host = PciFunction(INTEL, I440FX_DEVICE, 0x060000, revision=0x02)
        host.config[SMRAM] = SMRAM_DEFAULT

        def host_write(register: int, value: int) -> None:
            if PAM0 <= register < PAM0 + PAM_COUNT:
                on_pam(register, value)

        host.on_write = host_write
        self.functions[(0, 0)] = host
        self.functions[(1, 0)] = PciFunction(INTEL, PIIX3_ISA_DEVICE, 0x060100,
                                             header_type=HEADER_MULTIFUNCTION)

    @property
    def host_bridge(self) -> PciFunction:
        return self.functions[(0, 0)]

    def _target(self, byte: int) -> tuple[PciFunction | None, int]:
        address = self.address
        if not address & ENABLE or (address >> 16) & 0xFF:  # disabled, or not bus 0
            return None, 0
        function = self.functions.get(((address >> 11) & 0x1F, (address >> 8) & 0x7))
        return function, (address & 0xFC) + byte

    def read(self, offset: int, size: int) -> int:
        if offset == ADDRESS and size == 4:
            return self.address
        if offset >= DATA:
            function, register = self._target(offset - DATA)
            if function is not None and register + size <= 256:
                return function.read(register, size)
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == ADDRESS and size == 4:
            self.address = value & 0xFFFFFFFC | (value & ENABLE)
        elif offset >= DATA:
            function, register = self._target(offset - DATA)
            if function is not None and register + size <= 256:
                function.write(register, size, value)
