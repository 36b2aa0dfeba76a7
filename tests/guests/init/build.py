"""Build the static user-space test programs in tests/guests/init with gcc, cached by content.

    python tests/guests/init/build.py init                 # prints the path of the test init
    python tests/guests/init/build.py probe --out FILE     # the probe helper, copied to FILE

Each program is start.S + NAME.c, linked static, non-PIE, without libc (-nostdlib), so that
it runs as a Linux process with nothing else in the initramfs and every address in it lies
below 4 GiB (sys32.h says why that matters). The cache key covers the sources, the flags and
the compiler version.
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
CACHE = HERE.parent.parent.parent / "build" / "guests"
PROGRAMS = ("init", "probe", "spin")
CFLAGS = [
    "-m64", "-Os", "-static", "-nostdlib", "-fno-pic", "-fno-pie", "-no-pie",
    "-ffreestanding", "-fno-builtin", "-fno-stack-protector", "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables", "-fcf-protection=none", "-Wall", "-Wextra", "-Werror",
    "-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,-z,noseparate-code", "-s",
]


class InitBuildError(RuntimeError):
    pass


def build_program(name: str) -> Path:
    """Path of NAME (init or probe) built as a static ELF executable."""
    if name not in PROGRAMS:
        raise InitBuildError(f"no program {name!r} in {HERE} (expected one of {PROGRAMS})")
    gcc = shutil.which("gcc")
    if gcc is None:
        raise InitBuildError("gcc is not installed: run 'make test' (it installs it)")
    srcs = [HERE / "start.S", HERE / f"{name}.c"]
    digest = hashlib.sha256()
    for item in [*srcs, HERE / "sys32.h"]:
        digest.update(item.name.encode() + b"\0" + item.read_bytes())
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=True)
    digest.update(" ".join(CFLAGS).encode() + version.stdout.encode())
    out_dir = CACHE / f"user-{name}-{digest.hexdigest()[:16]}"
    program = out_dir / name
    if program.exists():
        return program
    tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [gcc, *CFLAGS, f"-I{HERE}", *map(str, srcs), "-o", str(tmp / name)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InitBuildError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    try:
        tmp.rename(out_dir)
    except OSError:  # a concurrent build of the same sources won
        shutil.rmtree(tmp, ignore_errors=True)
    return program


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=PROGRAMS)
    parser.add_argument("--out", type=Path, help="copy the result here")
    args = parser.parse_args()
    path = build_program(args.name)
    if args.out:
        shutil.copyfile(path, args.out)
        os.chmod(args.out, 0o755)
        path = args.out
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
