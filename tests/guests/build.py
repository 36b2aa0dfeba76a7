"""Build bare guest programs from tests/guests with gcc, cached by content.

    python tests/guests/build.py hello            # prints the path of hello.bin
    python tests/guests/build.py demo --out FILE  # a flat binary at FILE
    python tests/guests/build.py linux            # the Linux-shaped test kernel (bzImage)

Every program is start.S + programs/NAME.c (or programs/NAME.S alone) linked at 1 MiB by
guest.ld. The cache key covers the sources, the flags and the compiler version, so a change
to any of them rebuilds.
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


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed:\n{done.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--elf", action="store_true", help="the ELF rather than the flat binary")
    parser.add_argument("--out", type=Path, help="copy the result here")
    args = parser.parse_args()
    path = build_test_kernel() if args.name == "linux" else build_guest(args.name, "elf" if args.elf else "bin")
    if args.out:
        shutil.copyfile(path, args.out)
        path = args.out
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
