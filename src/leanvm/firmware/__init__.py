"""Firmware flash images: analysis (extents, zero and 0xff runs, UEFI volumes) and packing."""
