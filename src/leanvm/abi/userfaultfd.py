"""userfaultfd(2) layouts and numbers for write-protect tracking (live dumps). Constants and
struct formats only; memory/userfaultfd.py uses them.

Facts (Linux include/uapi/linux/userfaultfd.h, arch/x86/entry/syscalls/syscall_64.tbl):

    struct uffdio_api { __u64 api; __u64 features; __u64 ioctls; };             24 bytes
    struct uffdio_range { __u64 start; __u64 len; };                            16 bytes
    struct uffdio_register { struct uffdio_range range; __u64 mode; __u64 ioctls; };
                                                                                32 bytes
    struct uffdio_writeprotect { struct uffdio_range range; __u64 mode; };      24 bytes
    struct uffd_msg { __u8 event; __u8 reserved1; __u16 reserved2; __u32 reserved3;
        union { struct { __u64 flags; __u64 address; union { __u32 ptid; } feat; }
        pagefault; ... } arg; } __packed;                                       32 bytes

The ioctls are _IOWR(0xAA, nr, struct) except UNREGISTER, _IOR(0xAA, 0x01, uffdio_range).
"""

from __future__ import annotations

import struct

SYS_USERFAULTFD = 323  # x86-64
UFFD_API = 0xAA
UFFDIO = 0xAA  # the ioctl type

API = struct.Struct("<QQQ")  # uffdio_api
REGISTER = struct.Struct("<QQQQ")  # uffdio_register
RANGE = struct.Struct("<QQ")  # uffdio_range
WRITEPROTECT = struct.Struct("<QQQ")  # uffdio_writeprotect
MSG = struct.Struct("<BBHIQQI4x")  # uffd_msg as a page fault: event, .., flags, address, ptid


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (UFFDIO << 8) | nr


UFFDIO_API = _ioc(3, 0x3F, API.size)
UFFDIO_REGISTER = _ioc(3, 0x00, REGISTER.size)
UFFDIO_UNREGISTER = _ioc(2, 0x01, RANGE.size)
UFFDIO_WRITEPROTECT = _ioc(3, 0x06, WRITEPROTECT.size)

UFFDIO_REGISTER_MODE_WP = 1 << 1  # report writes to write-protected pages
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0  # protect (without it: unprotect and wake)
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

UFFD_FEATURE_WP_UNPOPULATED = 1 << 13  # protecting also marks pages not yet populated (6.4)

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1

O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
