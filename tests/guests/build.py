"""Build bare guest programs from tests/guests with gcc, cached by content.

    python tests/guests/build.py hello            # prints the path of hello.bin
    python tests/guests/build.py demo --out FILE  # a flat binary at FILE

Every program is start.S + programs/NAME.c (or programs/NAME.S alone) linked at 1 MiB by
guest.ld. The cache key covers the sources, the flags and the compiler version, so a change
to any of them rebuilds.
"""

from __future__ import annotations

import argparse
import hashlib
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
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = ["gcc", *CFLAGS, f"-I{HERE}", "-T", str(HERE / "guest.ld"), *map(str, srcs),
               "-o", str(tmp / elf.name)]
        _run(cmd)
        _run(["objcopy", "-O", "binary", str(tmp / elf.name), str(tmp / flat.name)])
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    return flat if kind == "bin" else elf


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
    path = build_guest(args.name, "elf" if args.elf else "bin")
    if args.out:
        shutil.copyfile(path, args.out)
        path = args.out
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
