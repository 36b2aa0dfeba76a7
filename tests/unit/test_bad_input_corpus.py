"""Bad input, every kind, for every subcommand: each must end in exit status 2 and one line
on stderr that names the file or value at fault, with no traceback, no Python exception
name, and no file changed or left behind.

Files are given empty, truncated, as random bytes, as a directory, missing, unreadable
(mode 000, with leanvm run under setpriv without capabilities: root reads anything), and
outputs go to a missing directory, a directory, an unwritable directory or file. Values
get their boundaries and nonsense. Most cases run in-process (fast); the permission cases
run leanvm as a process without capabilities.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from leanvm.cli.main import main

SRC = Path(__file__).resolve().parents[2] / "src"
EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Warning)\b|Traceback")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content (or 'dir'), and its mode."""
    seen = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            seen[str(path)] = "link"
        elif path.is_dir():
            seen[str(path)] = f"dir {path.stat().st_mode:o}"
        else:
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                digest = "unreadable"
            seen[str(path)] = f"{digest} {path.stat().st_mode:o}"
    return seen


def check_one_line(code: int, err: str, names: str, before: dict, root: Path) -> None:
    assert code == 2, f"exit status {code}, stderr: {err!r}"
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert names in err, f"{names!r} not named in {err!r}"
    assert not EXCEPTION_NAME.search(err), f"a Python exception leaks out: {err!r}"
    assert snapshot(root) == before, "a file was changed, created or left behind"


@pytest.fixture
def inprocess(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., None]:
    """bad(*argv, names=TEXT): leanvm *argv must fail in one line naming TEXT."""

    def bad(*argv: str, names: str) -> None:
        before = snapshot(tmp_path)
        code = main(list(argv))
        out = capsys.readouterr()
        check_one_line(code, out.err, names, before, tmp_path)

    return bad


def no_caps(*argv: str) -> subprocess.CompletedProcess[str]:
    """leanvm without capabilities, so file permissions hold even for root."""
    prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-m", "leanvm", *argv], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": str(SRC)})


needs_setpriv = pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                                   reason="setpriv (util-linux) is needed to drop root's "
                                          "capabilities")


# --- the files each file-taking option is given -------------------------------------------
def make_files(root: Path, good: bytes | None) -> dict[str, Path]:
    """Bad versions of a file: empty, truncated (half of ``good``), random, a directory,
    missing, and unreadable (mode 000)."""
    files = {}
    files["empty"] = root / "empty.bin"
    files["empty"].write_bytes(b"")
    if good is not None:
        files["truncated"] = root / "truncated.bin"
        files["truncated"].write_bytes(good[:max(1, len(good) // 2 - 7)])
    files["random"] = root / "random.bin"
    files["random"].write_bytes(hashlib.sha512(b"leanvm").digest() * 7 + b"\x01\x02\x03")
    files["directory"] = root / "a-directory"
    files["directory"].mkdir()
    files["missing"] = root / "missing.bin"
    files["unreadable"] = root / "unreadable.bin"
    files["unreadable"].write_bytes(good or b"x" * 4096)
    files["unreadable"].chmod(0)
    return files


def flash_image(root: Path) -> bytes:
    return b"\x90" * 4096 * 4  # any content is a flash image; sizes and access are checked


# option -> (how to put the file on the command line, content kinds that must be refused)
# Flat guests and flash images accept any bytes of a fitting size, so random or truncated
# content is a program or firmware like any other (it runs and fails as the guest, exit 3):
# only the kinds that cannot be used at all are bad input there.
RUN_FILE_OPTIONS: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    "--guest": (lambda f: ["--guest", str(f)], ("empty", "directory", "missing")),
    "--bios": (lambda f: ["--bios", str(f)], ("empty", "random", "directory", "missing")),
    "--flash code=": (lambda f: ["--flash", f"code={f}"], ("empty", "random", "directory",
                                                             "missing")),
    "-drive": (lambda f: ["-drive", f"if=pflash,format=raw,file={f},readonly=on"],
               ("empty", "random", "directory", "missing")),
    "-kernel": (lambda f: ["-kernel", str(f)], ("empty", "truncated", "random", "directory",
                                                 "missing")),
    "--probes": (lambda f: ["--probes", str(f)], ("directory", "missing", "random")),
}


@pytest.mark.parametrize("option", sorted(RUN_FILE_OPTIONS))
def test_run_refuses_unusable_input_files(option: str, tmp_path: Path, inprocess, test_kernel
                                          ) -> None:
    place, kinds = RUN_FILE_OPTIONS[option]
    good = test_kernel.read_bytes() if option == "-kernel" else flash_image(tmp_path)
    files = make_files(tmp_path, good)
    for kind in kinds:
        inprocess("run", *place(files[kind]), names=str(files[kind]))


def test_run_refuses_unusable_initrd_and_vars(tmp_path: Path, inprocess, test_kernel) -> None:
    files = make_files(tmp_path, None)
    code = tmp_path / "code.fd"
    code.write_bytes(flash_image(tmp_path))
    for kind in ("directory", "missing"):
        inprocess("run", "-kernel", str(test_kernel), "-initrd", str(files[kind]),
                  names=str(files[kind]))
    for kind in ("empty", "random", "directory", "missing"):
        inprocess("run", "--flash", f"code={code}", "--flash", f"vars={files[kind]}",
                  names=str(files[kind]))


@needs_setpriv
@pytest.mark.parametrize("option", ["--guest", "--bios", "--flash code=", "--flash vars=",
                                    "-kernel", "-initrd", "--probes", "--symbols"])
def test_run_refuses_unreadable_files_in_one_line(option: str, tmp_path: Path, test_kernel
                                                  ) -> None:
    target = tmp_path / "unreadable"
    target.write_bytes(test_kernel.read_bytes() if option in ("-kernel", "--symbols")
                       else flash_image(tmp_path))
    target.chmod(0)
    code = tmp_path / "code.fd"
    code.write_bytes(flash_image(tmp_path))
    argv = {
        "--guest": ["--guest", str(target)], "--bios": ["--bios", str(target)],
        "--flash code=": ["--flash", f"code={target}"],
        "--flash vars=": ["--flash", f"code={code}", "--flash", f"vars={target}"],
        "-kernel": ["-kernel", str(target)],
        "-initrd": ["-kernel", str(test_kernel), "-initrd", str(target)],
        "--probes": ["--probes", str(target)],
        "--symbols": ["--sample-rip", "10", "--symbols", str(target)],
    }[option]
    before = snapshot(tmp_path)
    done = no_caps("run", *argv, "--timeout", "20")
    check_one_line(done.returncode, done.stderr, str(target), before, tmp_path)


@needs_setpriv
@pytest.mark.parametrize("how", ["read-only file", "read-only directory"])
def test_a_vars_store_that_cannot_be_kept_is_refused_at_start(how: str, tmp_path: Path) -> None:
    code = tmp_path / "code.fd"
    code.write_bytes(flash_image(tmp_path))
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = store_dir / "vars.fd"
    store.write_bytes(b"\xff" * 8192)
    if how == "read-only file":
        store.chmod(0o444)
    else:
        store_dir.chmod(0o555)
    before = snapshot(tmp_path)
    done = no_caps("run", "--flash", f"code={code}", "--flash", f"vars={store}")
    check_one_line(done.returncode, done.stderr, str(store), before, tmp_path)
    assert "mode=ephemeral" in done.stderr  # says how to run anyway
    ephemeral = no_caps("run", "--flash", f"code={code}", "--flash",
                        f"vars={store},mode=ephemeral", "--timeout", "3", "-q")
    assert ephemeral.returncode != 2, ephemeral.stderr  # asked for: runs, keeps nothing
    assert snapshot(tmp_path) == before


# --- outputs --------------------------------------------------------------------------
def output_places(root: Path) -> dict[str, Path]:
    (root / "exists-as-dir").mkdir()
    locked = root / "locked"
    locked.mkdir()
    (root / "locked" / "old.json").write_text("{}")
    return {"missing directory": root / "no" / "such" / "out.json",
            "a directory": root / "exists-as-dir"}


RUN_OUTPUTS = {
    "--stats-json": lambda p: ["--stats-json", str(p)],
    "--trace": lambda p: ["--trace", str(p)],
    "-serial file:": lambda p: ["-serial", f"file:{p}"],
    "-debugcon file:": lambda p: ["-debugcon", f"file:{p}"],
}


@pytest.mark.parametrize("option", sorted(RUN_OUTPUTS))
def test_run_checks_every_output_before_booting(option: str, tmp_path: Path, inprocess
                                                ) -> None:
    for where, path in output_places(tmp_path).items():
        inprocess("run", *RUN_OUTPUTS[option](path), names=str(path))


@needs_setpriv
@pytest.mark.parametrize("option", sorted(RUN_OUTPUTS))
def test_run_refuses_unwritable_outputs_before_booting(option: str, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.json").write_text("{}")
    (locked / "old.json").chmod(0o444)
    locked.chmod(0o555)
    before = snapshot(tmp_path)
    for path in (locked / "new.json", locked / "old.json"):
        done = no_caps("run", *RUN_OUTPUTS[option](path))
        check_one_line(done.returncode, done.stderr, str(path), before, tmp_path)


# --- values ---------------------------------------------------------------------------
RUN_VALUES = [
    (["-m", "0"], "'0'"), (["-m", "1K"], "1K"), (["-m", "2T"], "2T"), (["-m", "abc"], "abc"),
    (["-m", "-1"], "-1"), (["-m", "1.5K"], "1.5K"), (["-m", "64M,maxmem=32M"], "maxmem"),
    (["-m", "64M,slots=x"], "'x'"), (["-m", "64M,foo=1"], "foo"),
    (["-smp", "0"], "0"), (["-smp", "65"], "65"), (["-smp", "two"], "two"),
    (["--timeout", "0"], "'0'"), (["--timeout", "-1"], "-1"), (["--timeout", "inf"], "inf"),
    (["--timeout", "nan"], "nan"), (["--timeout", "soon"], "soon"),
    (["--pa-bits", "0"], "0"), (["--pa-bits", "31"], "31"), (["--pa-bits", "53"], "53"),
    (["--pa-bits", "x"], "'x'"),
    (["--max-fw-size", "0"], "0"), (["--max-fw-size", "17M"], "17M"),
    (["--max-fw-size", "1"], "'1'"), (["--max-fw-size", "big"], "big"),
    (["--sample-rip", "-1"], "-1"), (["--sample-rip", "1001"], "1001"),
    (["--sample-rip", "nan"], "nan"), (["--until", ""], "--until"),
    (["--cpu-profile", "max"], "max"), (["-cpu", "qemu64"], "qemu64"),
    (["--kernel-boot", "uefi"], "uefi"), (["--emulation-fallback", "maybe"], "maybe"),
    (["--machine", "pc"], "pc"), (["-machine", "q35,accel=kvm"], "q35"),
    (["-M", "leanvm-99"], "leanvm-99"), (["--set", "compact"], "compact"),
    (["--set", "compact=maybe"], "maybe"), (["--set", "warp=on"], "warp"),
    (["-serial", "tty"], "tty"), (["-serial", "file:"], "file:"), (["-debugcon", "vc"], "vc"),
    (["--cpu-hide", "warp"], "warp"), (["-name", "a\nb"], "name"),
    (["-name", "x" * 200], "name"), (["-accel", "tcg"], "tcg"),
    (["--tsc-khz", "5"], "5"), (["--tsc-khz", "fast"], "fast"),
    (["--flash", "rom=x.fd"], "rom=x.fd"), (["--flash", "code"], "code"),
    (["--flash", "code=x.fd,mode=sometimes"], "sometimes"),
    (["--flash", "code=x.fd,geometry=arm"], "arm"), (["--flash", "code=x.fd,size=big"], "big"),
    (["--flash", "code=x.fd,colour=red"], "colour"),
    (["-drive", "if=ide,file=x.fd"], "if=ide"), (["-drive", "if=pflash"], "file="),
    (["-drive", "if=pflash,format=qcow2,file=x.fd"], "qcow2"),
    (["-drive", "if=pflash,file=x.fd,unit=abc"], "abc"),
    (["-drive", "if=pflash,file=x.fd,unit=5"], "unit"),
    (["-drive", "if=pflash,file=x.fd,readonly=maybe"], "maybe"),
    (["-drive", "if=pflash,file=x.fd,readonly=1"], "'1'"),
    (["-drive", "if=pflash,file=x.fd,cache=none"], "cache"),
    (["-initrd", "x.img"], "-kernel"), (["-append", "quiet"], "-kernel"),
    (["--symbols", "System.map"], "System.map"),
    (["-monitor", "stdio"], "-monitor"), (["-k", "en-us"], "-k"), (["--mem", "64M"], "--mem"),
    (["-vnc", ":0"], "-vnc"), (["stray"], "stray"),
    (["--virtio-mem", "size=1G"], "maxmem"), (["--virtio-mem", "size=lots"], "lots"),
    (["--virtio-mem", "requested=1G"], "size="), (["--virtio-mem", "size=1G,block=3M"], "3M"),
    (["-m", "128M,maxmem=640M", "--virtio-mem", "size=1G"], "1024M"),
    (["-object", "memory-backend-file,id=m,size=1G"], "memory-backend-file"),
    (["-device", "virtio-net-pci"], "virtio-net-pci"),
    (["--virtio-discovery", "fdt"], "fdt"),
    (["-m", "128M,maxmem=1G", "--virtio-mem", "size=512M,id=platform"], "platform"),
    (["-qmp", "tcp:4444"], "tcp:4444"), (["-qmp", "unix:"], "unix:"),
    (["-qmp", "unix:q.sock,server=off"], "server"), (["-qmp", "unix:q.sock,frob=1"], "frob"),
    (["-qmp", "tcp:127.0.0.1:99999,server=on"], "99999"), (["-qmp", "x" * 200], "-qmp"),
    (["-qmp", "unix:no/such/dir/q.sock,server=on,wait=off"], "no/such/dir/q.sock"),
]


@pytest.mark.parametrize("argv,names", RUN_VALUES, ids=[" ".join(a)[:40] for a, _ in RUN_VALUES])
def test_run_refuses_bad_values_in_one_line(argv: list[str], names: str, inprocess,
                                            tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    inprocess("run", *argv, names=names)


def test_run_refuses_contradictions(tmp_path: Path, inprocess, test_kernel, guest) -> None:
    code = tmp_path / "code.fd"
    code.write_bytes(flash_image(tmp_path))
    inprocess("run", "--bios", str(code), "--flash", f"code={code}", names="--bios")
    inprocess("run", "--bios", str(code), "-kernel", str(test_kernel), "--kernel-boot", "pvh",
              names="--kernel-boot")
    inprocess("run", "--guest", str(guest("hello")), "-kernel", str(test_kernel),
              names="--guest")
    inprocess("run", "--flash", f"code={code}", "--flash", f"code={code}", names="once")
    inprocess("run", "-kernel", str(test_kernel), "-append", "x" * 70000, names="command line")
    # beyond the 2047 bytes its setup header allows, though PVH itself would carry more
    inprocess("run", "-kernel", str(test_kernel), "--cpu-profile", "host", "-append",
              "x" * 2048, names="at most 2047")


MEMMAP_VALUES = [
    (["--machine", "bogus"], "bogus"), (["--machine", "virt-1.0"], "virt-1.0"),
    (["-m", "abc"], "abc"), (["--pa-bits", "0"], "0"), (["--pa-bits", "99"], "99"),
    (["--set", "x"], "'x'"), (["--machine", "virt", "--set", "highmem=perhaps"], "perhaps"),
    (["--set", "highmem=off"], "highmem"), (["--machine", "virt", "-m", "1T"], "40 bits"),
]


@pytest.mark.parametrize("argv,names", MEMMAP_VALUES)
def test_memmap_refuses_bad_values(argv: list[str], names: str, inprocess) -> None:
    inprocess("memmap", *argv, names=names)


# --- the other subcommands, file by file -------------------------------------------------
@pytest.mark.parametrize("verb", ["inspect", "unpad"])
def test_flash_commands_refuse_unusable_images(verb: str, tmp_path: Path, inprocess) -> None:
    files = make_files(tmp_path, None)
    out = tmp_path / "out.fd"
    for kind in ("directory", "missing"):
        argv = ["flash", verb, str(files[kind])] + ([str(out)] if verb == "unpad" else [])
        inprocess(*argv, names=str(files[kind]))


def test_flash_unpad_refuses_bad_destinations(tmp_path: Path, inprocess) -> None:
    image = tmp_path / "image.fd"
    image.write_bytes(b"\x01" * 8192 + bytes(100 * 1024))
    places = output_places(tmp_path)
    for where, out in places.items():
        inprocess("flash", "unpad", str(image), str(out), names=str(out))
    inprocess("flash", "unpad", str(image), str(image), names=str(image))


def test_trace_commands_refuse_unusable_files(tmp_path: Path, inprocess) -> None:
    good = b'{"traceEvents": [{"name": "x", "ph": "i", "ts": 1, "pid": 1, "tid": 1}]}'
    files = make_files(tmp_path, good)
    (tmp_path / "good.json").write_bytes(good)
    for kind in ("empty", "truncated", "random", "directory", "missing"):
        inprocess("trace", "show", str(files[kind]), names=str(files[kind]))
        inprocess("trace", "diff", str(tmp_path / "good.json"), str(files[kind]),
                  names=str(files[kind]))
    for where, out in output_places(tmp_path).items():
        inprocess("trace", "show", str(tmp_path / "good.json"), "--svg", str(out),
                  names=str(out))


def test_kernel_commands_refuse_unusable_files(tmp_path: Path, inprocess, test_kernel) -> None:
    files = make_files(tmp_path, test_kernel.read_bytes())
    out = tmp_path / "vmlinux"
    for kind in ("empty", "truncated", "random", "directory", "missing"):
        inprocess("kernel", "info", str(files[kind]), names=str(files[kind]))
        inprocess("kernel", "extract", str(files[kind]), str(out), names=str(files[kind]))
    for where, place in output_places(tmp_path).items():
        inprocess("kernel", "extract", str(test_kernel), str(place), names=str(place))


def test_initrd_commands_refuse_unusable_files(tmp_path: Path, inprocess) -> None:
    from leanvm.loader.initramfs import base_image

    image = base_image(b"#!/bin/sh\n")
    good_path = tmp_path / "good.cpio"
    image.write(good_path)
    files = make_files(tmp_path, good_path.read_bytes())
    for kind in ("empty", "truncated", "random", "directory", "missing"):
        inprocess("initrd", "list", str(files[kind]), names=str(files[kind]))
    for where, out in output_places(tmp_path).items():
        inprocess("initrd", "build", str(out), "--no-busybox", "--init", str(good_path),
                  names=str(out))
    for kind in ("directory", "missing"):
        inprocess("initrd", "build", str(tmp_path / "new.cpio"), "--no-busybox", "--init",
                  str(files[kind]), names=str(files[kind]))
    inprocess("initrd", "build", str(tmp_path / "new.cpio"), "--add", "nocolon",
              names="nocolon")
    inprocess("initrd", "build", str(tmp_path / "new.cpio"), "--add",
              f"{files['missing']}:/x", names=str(files["missing"]))


def test_run_refuses_a_kernel_whose_payload_is_damaged(tmp_path: Path, inprocess, test_kernel
                                                        ) -> None:
    """A payload in a format leanvm decompresses that does not decompress to what it declares
    is an error, not a reason to let the guest decompress it (it would fail there too, as a
    hang): one line, whatever --kernel-boot says, and nothing lands in the kernel cache."""
    from leanvm.loader.decompress import read_payload

    data = bytearray(test_kernel.read_bytes())
    found = read_payload(bytes(data), str(test_kernel))
    middle = data.index(bytes(found.body[:16])) + len(found.body) // 2
    data[middle] ^= 0xFF
    damaged = tmp_path / "damaged-bzImage"
    damaged.write_bytes(bytes(data))
    for mode in ("auto", "pvh"):
        inprocess("run", "-kernel", str(damaged), "--kernel-boot", mode, names=str(damaged))


@pytest.mark.parametrize("argv,names", [
    (["qmp", "no-such.sock", "query-status"], "no-such.sock"),
    (["qmp", "tcp:127.0.0.1:x", "query-status"], "tcp:127.0.0.1:x"),
    (["qmp", "x.sock", "query-status", "novalue"], "novalue"),
])
def test_qmp_refuses_bad_sockets_and_arguments(argv: list[str], names: str, inprocess,
                                              tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    inprocess(*argv, names=names)
