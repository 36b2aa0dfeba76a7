"""Build bare guest programs from tests/guests with gcc, cached by content.

    python tests/guests/build.py hello            # prints the path of hello.bin
    python tests/guests/build.py demo --out FILE  # a flat binary at FILE
    python tests/guests/build.py linux            # the Linux-shaped test kernel (bzImage)
    python tests/guests/build.py firmware/outloop --count 20000   # a tiny x86 firmware image

Every program is start.S + programs/NAME.c (or programs/NAME.S alone) linked at 1 MiB by
guest.ld. The tiny firmware (firmware/: outloop, flashwork) is firmware/start.S +
firmware/NAME.S assembled for i386 and linked to end at 4 GiB by firmware/firmware.ld, a
flat image with the reset vector in its last 16 bytes. The cache key covers the sources, the
flags and the compiler version, so a change to any of them rebuilds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE.parent.parent / "build" / "guests"
CFLAGS = [
    "-m64", "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-no-pie", "-nostdlib", "-static",
    "-mno-red-zone", "-mgeneral-regs-only", "-fno-stack-protector", "-fno-builtin",
    "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-Wall", "-Werror",
    "-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments",
]


class GuestBuildError(RuntimeError):
    pass


def sources(name: str) -> list[Path]:
    asm_only = HERE / "programs" / f"{name}.S"
    if asm_only.exists():
        return [asm_only]
    c = HERE / "programs" / f"{name}.c"
    if not c.exists():
        raise GuestBuildError(f"no guest program {name!r} in {HERE / 'programs'}")
    return [HERE / "start.S", c]


def _compiler_version() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GuestBuildError("gcc is not installed: run 'make test' (it installs it)")
    return subprocess.run([gcc, "--version"], capture_output=True, text=True, check=True).stdout


def build_guest(name: str, kind: str = "bin") -> Path:
    """Path to programs/NAME built as a flat binary (kind 'bin') or an ELF (kind 'elf')."""
    srcs = sources(name)
    digest = hashlib.sha256()
    for item in [*srcs, HERE / "runtime.h", HERE / "guest.ld"]:
        digest.update(item.name.encode() + b"\0" + item.read_bytes())
    digest.update(" ".join(CFLAGS).encode() + _compiler_version().encode())
    out_dir = CACHE / f"{name}-{digest.hexdigest()[:16]}"
    elf, flat = out_dir / f"{name}.elf", out_dir / f"{name}.bin"
    if not flat.exists():
        tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = ["gcc", *CFLAGS, f"-I{HERE}", "-T", str(HERE / "guest.ld"), *map(str, srcs),
               "-o", str(tmp / elf.name)]
        _run(cmd)
        _run(["objcopy", "-O", "binary", str(tmp / elf.name), str(tmp / flat.name)])
        _publish(tmp, out_dir)
    return flat if kind == "bin" else elf


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move a finished build into place; a concurrent build of the same sources may win."""
    try:
        tmp.rename(out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out_dir.is_dir():
            raise


LINUX_DIR = HERE / "linux"
SETUP_SECTS, SYSSIZE, INIT_SIZE, PAYLOAD = 0x1F1, 0x1F4, 0x260, 0x248


def build_test_kernel() -> Path:
    """Path to linux/ built as a bzImage: setup sectors, the kernel loaded at 1 MiB, and a
    gzip'd ELF of that kernel as the payload. "vmlinux" (the ELF, with a PVH note) sits next
    to it."""
    srcs = [LINUX_DIR / "setup.S", LINUX_DIR / "head.S", LINUX_DIR / "kernel.c"]
    digest = hashlib.sha256()
    for item in [*srcs, LINUX_DIR / "kernel.ld", HERE / "runtime.h", Path(__file__)]:
        digest.update(item.name.encode() + b"\0" + item.read_bytes())
    digest.update(" ".join(CFLAGS).encode() + _compiler_version().encode())
    out_dir = CACHE / f"linux-{digest.hexdigest()[:16]}"
    image = out_dir / "bzImage"
    if image.exists():
        return image
    tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    elf = tmp / "kernel.elf"
    _run(["gcc", *CFLAGS, f"-I{HERE}", "-T", str(LINUX_DIR / "kernel.ld"), *map(str, srcs),
          "-o", str(elf)])
    _run(["objcopy", "-O", "binary", "-j", ".setup", str(elf), str(tmp / "setup.bin")])
    _run(["objcopy", "-O", "binary", "-R", ".setup", str(elf), str(tmp / "kernel.bin")])
    _run(["objcopy", "--remove-section", ".setup", str(elf), str(tmp / "vmlinux")])
    setup = bytearray((tmp / "setup.bin").read_bytes())
    kernel = (tmp / "kernel.bin").read_bytes()
    # The compressed payload, as a real bzImage carries it: the ELF vmlinux, gzip'd. Its own
    # entry code does not use it; loaders that decompress on the host (leanvm) do.
    import gzip

    payload = gzip.compress((tmp / "vmlinux").read_bytes(), mtime=0)
    sectors = max(4, -(-len(setup) // 512))  # sector 0 plus setup_sects more
    setup = setup.ljust(sectors * 512, b"\0")
    end = _symbol(elf, "_end")
    kernel = kernel.ljust(end - 0x100000, b"\0")  # the payload lands past .bss, not in it
    loaded = len(kernel) + len(payload)
    setup[SETUP_SECTS] = sectors - 1
    setup[SYSSIZE:SYSSIZE + 4] = (-(-loaded // 16)).to_bytes(4, "little")
    setup[INIT_SIZE:INIT_SIZE + 4] = (-(-loaded // 4096) * 4096).to_bytes(4, "little")
    setup[PAYLOAD:PAYLOAD + 8] = len(kernel).to_bytes(4, "little") + len(payload).to_bytes(4, "little")
    (tmp / "bzImage").write_bytes(bytes(setup) + kernel + payload)
    _publish(tmp, out_dir)
    return image


def _symbol(elf: Path, name: str) -> int:
    listing = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == name:
            return int(fields[0], 16)
    raise GuestBuildError(f"symbol {name} missing from {elf}")


FIRMWARE_DIR = HERE / "firmware"
FIRMWARE_PROGRAMS = ("outloop", "flashwork")
FIRMWARE_SIZE = 64 * 1024  # the whole image, padded with 0xff: a valid pc flash bank
FIRMWARE_RESET_VECTOR = FIRMWARE_SIZE - 16  # CS:IP F000:FFF0 = 4 GiB - 16
FIRMWARE_PARAMS = FIRMWARE_SIZE - 32  # "LVTF", count (u32), checksum (u32), reserved
FIRMWARE_MAGIC = b"LVTF"
OUTLOOP_DEFAULT_COUNT = 1000
# flashwork's vars store (bank 1, directly below the image): what it programs and erases
FLASHWORK_VARS_SIZE = 64 * 1024
FLASHWORK_PROGRAM_OFFSET = 0x1000  # sector 1: erased in the initial store, then programmed
FLASHWORK_PROGRAM_TEXT = b"flashwork wrote!"  # four 32-bit words
FLASHWORK_ERASE_OFFSET = 0x2000  # sector 2: a pattern in the initial store, then erased
FLASHWORK_DONE = "flashwork done"
FIRMWARE_ASFLAGS = ["-m32", "-c", "-nostdlib", "-ffreestanding", "-Wa,--noexecstack",
                    f"-DFW_SIZE={FIRMWARE_SIZE:#x}", f"-DVARS_SIZE={FLASHWORK_VARS_SIZE:#x}",
                    f"-DPROGRAM_OFFSET={FLASHWORK_PROGRAM_OFFSET:#x}",
                    f"-DPROGRAM_WORDS={len(FLASHWORK_PROGRAM_TEXT) // 4}",
                    f"-DPROGRAM_TEXT=\"{FLASHWORK_PROGRAM_TEXT.decode()}\"",
                    f"-DERASE_OFFSET={FLASHWORK_ERASE_OFFSET:#x}"]
FIRMWARE_LDFLAGS = ["-m", "elf_i386", "-static", "-nostdlib", "--build-id=none",
                    "-z", "noexecstack", f"--defsym=FW_BASE={(1 << 32) - FIRMWARE_SIZE:#x}"]


def build_firmware(name: str, count: int | None = None) -> Path:
    """Path to the tiny x86 firmware firmware/NAME as a flat FIRMWARE_SIZE image (cached).
    ``count`` (outloop's number of port writes, default OUTLOOP_DEFAULT_COUNT) is patched
    into the parameter block; every image gets the checksum word that makes its 32-bit
    words sum to 0 (flashwork checks it while it reads the code bank)."""
    if name not in FIRMWARE_PROGRAMS:
        raise GuestBuildError(f"no tiny firmware {name!r}: expected one of "
                              f"{', '.join(FIRMWARE_PROGRAMS)}")
    if count is not None and not 0 <= count < 1 << 32:
        raise GuestBuildError(f"firmware count {count} does not fit 32 bits")
    srcs = [FIRMWARE_DIR / "start.S", FIRMWARE_DIR / f"{name}.S"]
    digest = hashlib.sha256()
    for item in [*srcs, FIRMWARE_DIR / "firmware.h", FIRMWARE_DIR / "firmware.ld"]:
        digest.update(item.name.encode() + b"\0" + item.read_bytes())
    digest.update(" ".join(FIRMWARE_ASFLAGS + FIRMWARE_LDFLAGS).encode())
    digest.update(_compiler_version().encode() + _tool_version("ld").encode())
    out_dir = CACHE / f"firmware-{name}-{digest.hexdigest()[:16]}"
    base = out_dir / f"{name}.bin"
    if not base.exists():
        tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        objects = []
        for src in srcs:
            obj = tmp / f"{src.stem}.o"
            _run(["gcc", *FIRMWARE_ASFLAGS, f"-I{FIRMWARE_DIR}", str(src), "-o", str(obj)])
            objects.append(str(obj))
        elf = tmp / f"{name}.elf"
        _run(["ld", *FIRMWARE_LDFLAGS, "-T", str(FIRMWARE_DIR / "firmware.ld"), *objects,
              "-o", str(elf)])
        raw = tmp / f"{name}.raw"
        _run(["objcopy", "-O", "binary", "--gap-fill=0xff", str(elf), str(raw)])
        image = raw.read_bytes()
        if len(image) != FIRMWARE_SIZE:
            raise GuestBuildError(f"{name}: the linked image is {len(image)} bytes, expected "
                                  f"{FIRMWARE_SIZE} (see firmware/firmware.ld)")
        if image[FIRMWARE_PARAMS:FIRMWARE_PARAMS + 4] != FIRMWARE_MAGIC:
            raise GuestBuildError(f"{name}: no parameter block at offset {FIRMWARE_PARAMS:#x}")
        (tmp / base.name).write_bytes(patch_firmware(image, OUTLOOP_DEFAULT_COUNT))
        _publish(tmp, out_dir)
    if count is None or count == OUTLOOP_DEFAULT_COUNT:
        return base
    variant = out_dir / f"{name}-n{count}.bin"
    if not variant.exists():
        tmp_file = variant.with_name(f"{variant.name}.{os.getpid()}.tmp")
        tmp_file.write_bytes(patch_firmware(base.read_bytes(), count))
        tmp_file.rename(variant)  # atomic: a concurrent writer wrote the same bytes
    return variant


def patch_firmware(image: bytes, count: int) -> bytes:
    """``image`` with ``count`` in its parameter block and the checksum word fixed so that
    its 32-bit little-endian words sum to 0 modulo 2**32."""
    out = bytearray(image)
    at = FIRMWARE_PARAMS
    out[at + 4:at + 12] = count.to_bytes(4, "little") + bytes(4)
    total = sum(int.from_bytes(out[i:i + 4], "little") for i in range(0, len(out), 4))
    out[at + 8:at + 12] = (-total % (1 << 32)).to_bytes(4, "little")
    return bytes(out)


def flashwork_vars() -> bytes:
    """The vars store flashwork expects: erased (0xff) but for a header in sector 0 and a
    pattern filling the sector it erases."""
    store = bytearray(b"\xff" * FLASHWORK_VARS_SIZE)
    header = b"leanvm tiny firmware vars store\n"
    store[:len(header)] = header
    erase = FLASHWORK_ERASE_OFFSET
    store[erase:erase + 4096] = bytes((i * 13 + 1) & 0xFF for i in range(4096))
    return bytes(store)


def flashwork_vars_after(store: bytes) -> bytes:
    """``store`` as flashwork leaves it: the words programmed, the sector erased."""
    out = bytearray(store)
    start = FLASHWORK_PROGRAM_OFFSET
    out[start:start + len(FLASHWORK_PROGRAM_TEXT)] = FLASHWORK_PROGRAM_TEXT
    out[FLASHWORK_ERASE_OFFSET:FLASHWORK_ERASE_OFFSET + 4096] = b"\xff" * 4096
    return bytes(out)


def _tool_version(tool: str) -> str:
    if shutil.which(tool) is None:
        raise GuestBuildError(f"{tool} is not installed: run 'make test' (it installs binutils)")
    return subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed:\n{done.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--elf", action="store_true", help="the ELF rather than the flat binary")
    parser.add_argument("--out", type=Path, help="copy the result here")
    parser.add_argument("--count", type=int, help="firmware/outloop: number of port writes")
    args = parser.parse_args()
    if args.name.startswith("firmware/"):
        path = build_firmware(args.name.removeprefix("firmware/"), args.count)
    elif args.name == "linux":
        path = build_test_kernel()
    else:
        path = build_guest(args.name, "elf" if args.elf else "bin")
    if args.out:
        shutil.copyfile(path, args.out)
        path = args.out
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
