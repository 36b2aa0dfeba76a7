"""What known lines of firmware and kernels mean: a line's prefix names a boot phase.

SeaBIOS prints on the bochs debug console (port 0x402); Linux and its setup code print on
the serial console. Only the first line matching each phase marks it (SeaBIOS prints its
banner twice). qboot prints nothing: its phases come from fw_cfg transfers and the kernel
entry.
"""

from __future__ import annotations

FIRMWARE_LINES = (
    ("SeaBIOS (version", "BIOS post"),
    ("Scan for option roms", "BIOS option ROM scan"),
    ("Running option rom at", "option ROM init"),
    ("enter handle_18", "BIOS int 18"),
    ("enter handle_19", "BIOS int 19"),
    ("Booting from ", "BIOS boot OS"),
    ("No bootable device", "BIOS no boot device"),
)

CONSOLE_LINES = (
    ("early console in setup code", "kernel setup code"),
    ("Decompressing Linux", "kernel decompression"),  # the bzImage stub, in the guest
    ("Booting the kernel", "kernel decompressed"),
    ("Linux version ", "kernel banner"),
    ("Freeing unused kernel", "kernel frees init memory"),
    ("Run /init as init process", "run /init"),
    (" as init process", "run init"),
)

FW_CFG_SPANS = {  # fw_cfg item name -> phase
    "kernel": "copy kernel", "initrd": "copy initrd", "cmdline": "copy cmdline",
    "setup": "copy setup", "genroms/linuxboot_dma.bin": "copy option ROM",
}


class LineMatcher:
    """Maps lines to phase names, each phase once."""

    def __init__(self, table: tuple[tuple[str, str], ...]) -> None:
        self.table = table
        self.seen: set[str] = set()

    def match(self, line: str) -> str | None:
        text = line.lstrip()
        for prefix, phase in self.table:
            if prefix in text[:200] and phase not in self.seen:
                self.seen.add(phase)
                return phase
        return None
