"""Initramfs images: our own writer (and reader) of the cpio "newc" format the kernel unpacks.

Why our own: an image for a test VM is a handful of entries (busybox, its applet links, an
/init, /dev/console) and building it must not depend on host tools or root (mknod), so the
entries are described in Python and written straight into the archive.

Format (Linux Documentation/driver-api/early-userspace/buffer-format.rst, cpio(5) "New ASCII
Format"): every entry is a 110-byte header, "070701" then 13 fields of 8 hex digits (ino,
mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize
counting the NUL, check = 0), the name and its NUL padded to 4 bytes, then the data padded
to 4 bytes. A symlink's data is its target. The entry named "TRAILER!!!" ends the archive.
The kernel creates entries in archive order and never creates missing parents, so every
parent directory is written before what it holds.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from leanvm.errors import ImageError

NEWC_MAGIC = b"070701"  # cpio(5) New ASCII Format, no checksum
HEADER_SIZE = 110  # magic + 13 fields of 8 hex digits
TRAILER = "TRAILER!!!"
ALIGN = 4
MAX_NAME = 4096  # the kernel's PATH_MAX; longer names are refused when unpacking
CONSOLE = (5, 1)  # /dev/console: the kernel opens it for init's fds 0, 1 and 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One archive member. ``path`` is relative ("bin/sh"); ``mode`` includes the file type
    bits; ``data`` is a file's contents or a symlink's target; ``rdev`` a device's numbers."""
    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0
    mtime: int = 0

    @property
    def kind(self) -> str:
        return _KINDS.get(stat.S_IFMT(self.mode), "other")


_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}


def guest_path(path: str) -> str:
    """Normalise a path inside the image: no leading '/', no '.', '..' or empty parts."""
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    if not parts or ".." in parts:
        raise ImageError(f"bad path in the initramfs: {path!r} (expected an absolute or "
                         f"relative path without '..')")
    joined = "/".join(parts)
    if len(joined.encode()) + 1 > MAX_NAME or "\0" in joined:
        raise ImageError(f"bad path in the initramfs: {path!r} (too long or holds a NUL)")
    return joined


class Initramfs:
    """Entries in the order they will be written; adding an entry adds its missing parent
    directories first. Adding a path again replaces the earlier entry in place (so --add can
    override the default /init), except that a directory is never turned into something else
    while it holds entries."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: str) -> bool:
        return guest_path(path) in self._entries

    @property
    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def get(self, path: str) -> Entry | None:
        return self._entries.get(guest_path(path))

    def directory(self, path: str, mode: int = 0o755) -> None:
        self._put(Entry(guest_path(path), stat.S_IFDIR | (mode & 0o7777)))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._put(Entry(guest_path(path), stat.S_IFREG | (mode & 0o7777), bytes(data)))

    def symlink(self, path: str, target: str) -> None:
        if not target or "\0" in target:
            raise ImageError(f"bad symlink target for {path!r} in the initramfs: {target!r}")
        self._put(Entry(guest_path(path), stat.S_IFLNK | 0o777, target.encode()))

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(Entry(guest_path(path), stat.S_IFCHR | (mode & 0o7777),
                        rdev=_device(path, major, minor)))

    def block_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._put(Entry(guest_path(path), stat.S_IFBLK | (mode & 0o7777),
                        rdev=_device(path, major, minor)))

    def add_host(self, host: "str | Path", guest: str) -> int:
        """Copy a host file, symlink or directory tree to ``guest``; returns entries added.
        Ownership becomes root's (0:0), permissions are kept, hard links become copies."""
        host = Path(host)
        try:
            info = host.lstat()
        except OSError as exc:
            raise ImageError(f"{host}: cannot add to the initramfs ({exc.strerror})") from None
        if stat.S_ISLNK(info.st_mode):
            self.symlink(guest, os.readlink(host))
            return 1
        if stat.S_ISREG(info.st_mode):
            try:
                self.file(guest, host.read_bytes(), info.st_mode)
            except OSError as exc:
                raise ImageError(f"{host}: cannot read ({exc.strerror})") from None
            return 1
        if stat.S_ISDIR(info.st_mode):
            self.directory(guest, info.st_mode)
            added = 1
            try:
                children = sorted(host.iterdir())
            except OSError as exc:
                raise ImageError(f"{host}: cannot list ({exc.strerror})") from None
            for child in children:
                added += self.add_host(child, f"{guest_path(guest)}/{child.name}")
            return added
        raise ImageError(f"{host}: only files, symlinks and directories can be added to "
                         f"the initramfs (use a device entry for device nodes)")

    def to_bytes(self) -> bytes:
        """The archive: every entry, then the trailer."""
        out = bytearray()
        for ino, entry in enumerate(self._entries.values(), start=1):
            nlink = 2 if entry.kind == "dir" else 1
            _append(out, entry.path, entry.data, ino=ino, mode=entry.mode, uid=entry.uid,
                    gid=entry.gid, nlink=nlink, mtime=entry.mtime, rdev=entry.rdev)
        _append(out, TRAILER, b"", ino=0, mode=0, uid=0, gid=0, nlink=1, mtime=0,
                rdev=(0, 0))
        return bytes(out)

    def write(self, path: "str | Path") -> int:
        """Write the archive to ``path`` (a temporary file renamed into place); its size."""
        data = self.to_bytes()
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as sink:
                sink.write(data)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"{target}: cannot write the initramfs ({exc.strerror})") from None
        return len(data)

    def _put(self, entry: Entry) -> None:
        parent = entry.path.rpartition("/")[0]
        if parent:
            existing = self._entries.get(parent)
            if existing is None:
                self.directory(parent)
            elif existing.kind != "dir":
                raise ImageError(f"initramfs: cannot add {entry.path!r}: {parent!r} is a "
                                 f"{existing.kind}, not a directory")
        old = self._entries.get(entry.path)
        if old is not None and old.kind == "dir" and entry.kind != "dir":
            prefix = entry.path + "/"
            if any(p.startswith(prefix) for p in self._entries):
                raise ImageError(f"initramfs: cannot replace directory {entry.path!r}, "
                                 f"which holds entries, with a {entry.kind}")
        self._entries[entry.path] = entry


def _device(path: str, major: int, minor: int) -> tuple[int, int]:
    if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):  # Linux dev_t: 12 + 20 bits
        raise ImageError(f"bad device number {major}:{minor} for {path!r} (major below "
                         f"4096, minor below 1048576)")
    return (major, minor)


def _pad(out: bytearray) -> None:
    out += b"\0" * (-len(out) % ALIGN)


def _append(out: bytearray, name: str, data: bytes, *, ino: int, mode: int, uid: int,
            gid: int, nlink: int, mtime: int, rdev: tuple[int, int]) -> None:
    encoded = name.encode() + b"\0"
    values = (ino, mode, uid, gid, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1],
              len(encoded), 0)
    out += NEWC_MAGIC + b"".join(b"%08X" % v for v in values) + encoded
    _pad(out)
    out += data
    _pad(out)


def read_newc(data: "bytes | memoryview", where: str = "initramfs") -> list[Entry]:
    """Entries of an initramfs as the kernel unpacks it: uncompressed newc archives and
    compressed members of any format loader/compression.py reads, zero padding between
    them (loader/initrd.py walks the members, loader/newc.py the archives). Every length
    and checksum is checked: a damaged image is one ImageError line naming ``where``."""
    from leanvm.loader.initrd import entries

    return [Entry(record.name.decode("utf-8", "surrogateescape"), record.mode,
                  bytes(member.data[record.start:record.end]), record.rdev, record.uid,
                  record.gid, record.mtime)
            for member, record in entries(data, where)]


# --- leanvm's default image: busybox, an /init that marks the timeline, then powers off ---

BUSYBOX = Path("/bin/busybox")  # Debian package busybox-static
PROBE_HELPER = "bin/leanvm-probe"  # built from tests/guests/init/probe.c (make initrd-probe)
# Probe ids user space fires on port 0x404 (docs/kernel.md): init's own milestones.
INIT_PROBES = {3001: "init started", 3002: "init mounted file systems",
               3003: "init powering off"}  # trace.events.BUILTIN_PROBES names them too
MARKER = "leanvm-init: user space is up"
DEFAULT_INIT = f"""#!/bin/sh
# leanvm's default /init (leanvm initrd build): mount, mark the timeline, report, power off.
/{PROBE_HELPER} 3001
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
/{PROBE_HELPER} 3002
echo "{MARKER}"
/{PROBE_HELPER} 3003
poweroff -f
"""
PT_INTERP = 3  # ELF program header type: the program needs a dynamic loader


def probe_helper_path() -> Path:
    """The prebuilt probe helper shipped in the package (source: tests/guests/init/probe.c)."""
    return Path(__file__).resolve().parent.parent / "data" / "leanvm-probe.bin"


def base_image(init: bytes) -> Initramfs:
    """The least an init needs: /init, /dev/console (so the kernel gives it fds 0, 1 and 2)
    and the mount points the default init uses."""
    image = Initramfs()
    for directory in ("dev", "proc", "sys", "tmp", "root"):
        image.directory(directory, 0o1777 if directory == "tmp" else 0o755)
    image.char_device("dev/console", *CONSOLE, mode=0o600)
    image.char_device("dev/null", 1, 3, mode=0o666)
    image.file("init", init, 0o755)
    return image


def busybox_image(busybox: "str | Path" = BUSYBOX, init: bytes | None = None,
                  applets: list[str] | None = None) -> Initramfs:
    """The default image: a static busybox with a link per applet, the probe helper and
    DEFAULT_INIT (or ``init``). ``applets`` (paths such as "bin/sh") default to what the
    binary lists with ``--list-full``."""
    busybox = Path(busybox)
    binary = _read_static_busybox(busybox)
    if applets is None:
        applets = _list_applets(busybox)
    image = base_image(DEFAULT_INIT.encode() if init is None else init)
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "etc"):
        image.directory(directory)
    image.file("bin/busybox", binary, 0o755)
    for applet in applets:
        if guest_path(applet) not in ("bin/busybox", "init", "linuxrc"):
            image.symlink(applet, "/bin/busybox")
    helper = probe_helper_path()
    try:
        image.file(PROBE_HELPER, helper.read_bytes(), 0o755)
    except OSError as exc:
        raise ImageError(f"{helper}: the probe helper is missing ({exc.strerror}); "
                         f"rebuild it with 'make initrd-probe'") from None
    return image


def _read_static_busybox(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        hint = ("install Debian's busybox-static (apt-get install busybox-static)"
                if path == BUSYBOX else "give the path of a static busybox")
        raise ImageError(f"{path}: no busybox there: {hint}, or pass --busybox PATH") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read busybox ({exc.strerror})") from None
    static = is_static_elf(data)
    if static is None:
        raise ImageError(f"{path}: not a 64-bit x86 ELF program; expected a static busybox")
    if not static:
        raise ImageError(f"{path}: dynamically linked; the initramfs needs a static busybox "
                         f"(Debian's busybox-static, not busybox) or --busybox PATH")
    return data


def is_static_elf(data: bytes) -> bool | None:
    """True for a 64-bit little-endian x86-64 ELF without PT_INTERP, False with one, None for
    anything else (ELF64 header: e_phoff at 0x20, e_phentsize 0x36, e_phnum 0x38)."""
    if len(data) < 0x40 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    if int.from_bytes(data[0x12:0x14], "little") != 0x3E:  # EM_X86_64
        return None
    phoff = int.from_bytes(data[0x20:0x28], "little")
    entsize = int.from_bytes(data[0x36:0x38], "little")
    count = int.from_bytes(data[0x38:0x3A], "little")
    if entsize < 4 or phoff + entsize * count > len(data):
        return None
    return not any(int.from_bytes(data[phoff + i * entsize:phoff + i * entsize + 4],
                                  "little") == PT_INTERP for i in range(count))


def _list_applets(busybox: Path) -> list[str]:
    import subprocess

    try:
        done = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"{busybox}: cannot run it to list its applets ({exc})") from None
    applets = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not applets:
        raise ImageError(f"{busybox}: '--list-full' listed no applets (exit "
                         f"{done.returncode}); is it busybox?")
    return applets
