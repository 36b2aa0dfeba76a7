"""The initramfs writer, checked with an independent reader (GNU cpio), and its own reader."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from leanvm.errors import ImageError
from leanvm.loader.initrd import entries as initrd_entries
from leanvm.loader.initramfs import (
    HEADER_SIZE, NEWC_MAGIC, TRAILER, Entry, Initramfs, base_image, busybox_image,
    is_static_elf, probe_helper_path, read_newc,
)

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None,
                                reason="GNU cpio is needed (scripts/install-deps installs it)")
# GNU cpio -tv --numeric-uid-gid: mode, links, uid, gid, size or "major, minor", date, name
LISTING = re.compile(r"^(?P<mode>\S{10})\s+(?P<nlink>\d+)\s+(?P<uid>\d+)\s+(?P<gid>\d+)\s+"
                     r"(?:(?P<major>\d+),\s+(?P<minor>\d+)|(?P<size>\d+))\s+"
                     r"\w{3}\s+\d+\s+\d{4}\s+(?P<name>.*)$")


def gnu_listing(archive: bytes) -> list[dict[str, str]]:
    done = subprocess.run(["cpio", "-itv", "--numeric-uid-gid", "--quiet"], input=archive,
                          capture_output=True, check=True)
    rows = []
    for line in done.stdout.decode().splitlines():
        match = LISTING.match(line)
        assert match, f"unexpected cpio listing line: {line!r}"
        rows.append(match.groupdict())
    return rows


def gnu_contents(archive: bytes, name: str) -> bytes:
    done = subprocess.run(["cpio", "-i", "--to-stdout", "--quiet", name], input=archive,
                          capture_output=True, check=True)
    return done.stdout


def sample() -> Initramfs:
    image = Initramfs()
    image.directory("/etc", 0o750)
    image.file("/etc/motd", b"hello\n", 0o640)
    image.file("usr/share/odd", b"abc", 0o600)  # parents usr and usr/share come first
    image.symlink("/bin/sh", "/bin/busybox")
    image.char_device("/dev/console", 5, 1)
    image.block_device("dev/vda", 254, 0, 0o660)
    image.file("empty", b"")
    return image


@needs_cpio
def test_gnu_cpio_reads_names_modes_devices_and_contents() -> None:
    archive = sample().to_bytes()
    rows = {row["name"]: row for row in gnu_listing(archive)}
    assert list(rows) == ["etc", "etc/motd", "usr", "usr/share", "usr/share/odd", "bin",
                          "bin/sh -> /bin/busybox", "dev", "dev/console", "dev/vda", "empty"]
    assert rows["etc"]["mode"] == "drwxr-x---" and rows["etc"]["nlink"] == "2"
    assert rows["etc/motd"]["mode"] == "-rw-r-----" and rows["etc/motd"]["size"] == "6"
    assert rows["usr/share"]["mode"] == "drwxr-xr-x"  # implied parents: 0755
    assert rows["bin/sh -> /bin/busybox"]["mode"] == "lrwxrwxrwx"
    console = rows["dev/console"]
    assert (console["mode"], console["major"], console["minor"]) == ("crw-------", "5", "1")
    vda = rows["dev/vda"]
    assert (vda["mode"], vda["major"], vda["minor"]) == ("brw-rw----", "254", "0")
    assert all(row["uid"] == "0" and row["gid"] == "0" for row in rows.values())
    assert gnu_contents(archive, "etc/motd") == b"hello\n"
    assert gnu_contents(archive, "usr/share/odd") == b"abc"
    assert gnu_contents(archive, "empty") == b""


def test_layout_is_aligned_and_ends_with_the_trailer() -> None:
    archive = sample().to_bytes()
    assert len(archive) % 4 == 0
    offsets, pos = [], 0
    while True:  # walk by hand: every header starts on a 4-byte boundary
        assert archive[pos:pos + 6] == NEWC_MAGIC and pos % 4 == 0
        offsets.append(pos)
        namesize = int(archive[pos + 94:pos + 102], 16)
        filesize = int(archive[pos + 54:pos + 62], 16)
        name = archive[pos + HEADER_SIZE:pos + HEADER_SIZE + namesize - 1]
        end = pos + HEADER_SIZE + namesize
        end += -end % 4
        assert archive[end - (-(pos + HEADER_SIZE + namesize) % 4):end].strip(b"\0") == b""
        end += filesize
        end += -end % 4
        pos = end
        if name == TRAILER.encode():
            break
    assert pos == len(archive)
    assert len(offsets) == len(sample()) + 1


def test_own_reader_round_trip() -> None:
    image = sample()
    assert read_newc(image.to_bytes()) == image.entries
    assert read_newc(gzip.compress(image.to_bytes())) == image.entries  # gzip unwrapped


def test_concatenated_archives_are_read_like_the_kernel_does() -> None:
    first, second = Initramfs(), Initramfs()
    first.file("a", b"1")
    second.file("b", b"22")
    joined = first.to_bytes() + b"\0" * 512 + second.to_bytes()
    assert [e.path for e in read_newc(joined)] == ["a", "b"]


def test_later_entry_replaces_earlier_in_place() -> None:
    image = base_image(b"#!/bin/sh\n")
    image.file("/init", b"new", 0o700)
    entries = image.entries
    init = [e for e in entries if e.path == "init"]
    assert len(init) == 1 and init[0].data == b"new" and stat.S_IMODE(init[0].mode) == 0o700


@pytest.mark.parametrize("call,message", [
    (lambda i: i.file("../x", b""), "without '..'"),
    (lambda i: i.file("/", b""), "bad path"),
    (lambda i: i.char_device("dev/x", 4096, 0), "bad device number 4096:0"),
    (lambda i: i.symlink("a", ""), "bad symlink target"),
    (lambda i: (i.file("f", b""), i.file("f/g", b"")), "'f' is a file, not a directory"),
    (lambda i: (i.file("d/g", b""), i.file("d", b"")), "cannot replace directory 'd'"),
])
def test_bad_entries_are_refused_with_one_line(call, message: str) -> None:
    with pytest.raises(ImageError, match=re.escape(message)):
        call(Initramfs())


def test_add_host_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "run.sh").write_text("echo hi\n")
    os.chmod(tree / "sub" / "run.sh", 0o751)
    os.symlink("sub/run.sh", tree / "link")
    image = Initramfs()
    assert image.add_host(tree, "/opt/t") == 4
    by_path = {e.path: e for e in image.entries}
    assert list(by_path) == ["opt", "opt/t", "opt/t/link", "opt/t/sub", "opt/t/sub/run.sh"]
    assert by_path["opt/t/link"].data == b"sub/run.sh" and by_path["opt/t/link"].kind == "symlink"
    assert stat.S_IMODE(by_path["opt/t/sub/run.sh"].mode) == 0o751
    with pytest.raises(ImageError, match="cannot add to the initramfs"):
        image.add_host(tmp_path / "missing", "x")


@pytest.mark.parametrize("data,message", [
    (b"", "test.cpio: no cpio archive in it"),
    (b"070702" + b"0" * 200, "test.cpio: cpio entry at offset 0x0 has a name size of 0"),
    (b"070701" + b"0" * 20, "test.cpio: truncated cpio header at offset 0x0"),
    (b"070701" + b"G" * 104, "test.cpio: bad hex field"),
    (b"070701" + b"-0000001" * 13, "test.cpio: bad hex field"),  # int() would take these
    (b"070707" + b"0" * 200, "the old portable format"),
    (b"\x1f\x8b\x08\x00garbage", "test.cpio: the gzip member at byte 0x0 is cut short"),
])
def test_reader_rejects_damaged_archives(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=re.escape(message)):
        read_newc(data, "test.cpio")


def test_reader_rejects_truncation() -> None:
    archive = sample().to_bytes()
    with pytest.raises(ImageError):
        read_newc(archive[:len(archive) - 200])


names = st.text(alphabet="abcdefgh_-.0123456789", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))


@st.composite
def images(draw: st.DrawFn) -> Initramfs:
    image = Initramfs()
    for _ in range(draw(st.integers(0, 12))):
        path = "/".join(draw(st.lists(names, min_size=1, max_size=3)))
        kind = draw(st.sampled_from(["file", "dir", "symlink", "char"]))
        try:
            if kind == "file":
                image.file(path, draw(st.binary(max_size=70)), draw(st.integers(0, 0o7777)))
            elif kind == "dir":
                image.directory(path, draw(st.integers(0, 0o7777)))
            elif kind == "symlink":
                image.symlink(path, draw(names))
            else:
                image.char_device(path, draw(st.integers(0, 4095)),
                                  draw(st.integers(0, (1 << 20) - 1)))
        except ImageError:
            pass  # a path clashing with an earlier one of another kind: refused, as it should
    return image


@settings(max_examples=60, deadline=None)
@given(images())
def test_random_images_round_trip(image: Initramfs) -> None:
    archive = image.to_bytes()
    assert len(archive) % 4 == 0
    assert read_newc(archive) == image.entries
    paths = [e.path for e in image.entries]
    for i, path in enumerate(paths):  # every parent precedes its children
        parent = path.rpartition("/")[0]
        assert not parent or parent in paths[:i]


@needs_cpio
@settings(max_examples=15, deadline=None)
@given(images())
def test_gnu_cpio_agrees_on_random_images(image: Initramfs) -> None:
    rows = gnu_listing(image.to_bytes())
    expected = [e.path + (f" -> {e.data.decode()}" if e.kind == "symlink" else "")
                for e in image.entries]
    assert [row["name"] for row in rows] == expected
    for row, entry in zip(rows, image.entries):
        assert row["mode"] == stat.filemode(entry.mode)
        if entry.kind == "char":
            assert (int(row["major"]), int(row["minor"])) == entry.rdev


def header_offsets(archive: bytes) -> list[int]:
    """Where each entry's header starts (walked as the format says)."""
    offsets, pos = [], 0
    while pos + HEADER_SIZE <= len(archive):
        offsets.append(pos)
        namesize = int(archive[pos + 94:pos + 102], 16)
        filesize = int(archive[pos + 54:pos + 62], 16)
        end = pos + HEADER_SIZE + namesize
        end += -end % 4 + filesize
        pos = end + (-end % 4)
    return offsets


@st.composite
def mutated_archives(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(a valid archive from images(), the same with header fields, digits, magics or bytes
    changed, perhaps cut short and perhaps gzip'd)."""
    archive = draw(images()).to_bytes()
    damaged = bytearray(archive)
    offsets = header_offsets(archive)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(offsets))
        how = draw(st.sampled_from(["field", "field", "digit", "text", "magic", "byte"]))
        if how == "field":  # one of the 13 fields set to another number
            index = draw(st.integers(0, 12))
            value = draw(st.one_of(st.integers(0, 0xFFFFFFFF),
                                   st.sampled_from([0, 1, 3, 0xFFFFFFFF, len(archive)])))
            damaged[at + 6 + 8 * index:at + 14 + 8 * index] = b"%08X" % value
        elif how == "digit":  # a character that int(x, 16) would take or choke on
            damaged[at + draw(st.integers(6, HEADER_SIZE - 1))] = draw(
                st.sampled_from(b"0123456789abcdefG -+_x"))
        elif how == "text":  # a whole field that is not 8 hex digits, yet int(x, 16) reads
            index = draw(st.one_of(st.sampled_from([6, 11]), st.integers(0, 12)))  # sizes
            damaged[at + 6 + 8 * index:at + 14 + 8 * index] = draw(st.sampled_from(
                [b"-0000001", b"-0000004", b"+0000004", b" 0000004", b"0000_004", b"0x000004"]))
        elif how == "magic":
            damaged[at + 5] = draw(st.sampled_from(b"0123789"))
        else:
            position = draw(st.integers(0, len(damaged) - 1))
            damaged[position] ^= draw(st.integers(1, 255))
    if draw(st.integers(0, 3)) == 0:
        del damaged[draw(st.integers(0, len(damaged))):]
    return archive, gzip.compress(bytes(damaged)) if draw(st.booleans()) else bytes(damaged)


@settings(max_examples=500, deadline=None)
@given(mutated_archives())
def test_mutated_archives_are_read_in_bounds_or_refused_by_name(case: tuple[bytes, bytes]) -> None:
    original, data = case
    try:
        entries = read_newc(data, "fuzz.cpio")
    except ImageError as exc:
        text = str(exc)
        assert text.startswith("fuzz.cpio: ") and "\n" not in text, text
        assert "Error" not in text.replace("ImageError", ""), text
        event(f"refused: {re.sub('0x[0-9a-f]+|[0-9]+', 'N', text.split(': ', 1)[1])[:30]}")
        return
    event("read")
    plain = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    assert len(entries) * HEADER_SIZE <= len(plain)
    records = initrd_entries(data, "fuzz.cpio")
    assert len(records) == len(entries)
    for (member, record), entry in zip(records, entries):
        # every entry's name and data lie inside its member, after its header, in order
        assert record.offset + HEADER_SIZE + len(record.name) < record.start <= record.end
        assert record.end <= len(member.data) and len(entry.data) == record.end - record.start
        assert bytes(member.data[record.start:record.end]) == entry.data and entry.data in plain
    if original == data:
        assert entries == read_newc(original)


def test_static_elf_detection() -> None:
    assert is_static_elf(probe_helper_path().read_bytes()) is True
    assert is_static_elf(Path(sys.executable).resolve().read_bytes()[:1 << 16]) is False
    assert is_static_elf(b"#!/bin/sh\n" + b"\0" * 100) is None


def test_busybox_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no busybox there.*--busybox PATH"):
        busybox_image(tmp_path / "busybox")
    dynamic = tmp_path / "dyn"
    dynamic.write_bytes(Path(sys.executable).resolve().read_bytes())
    with pytest.raises(ImageError, match="dynamically linked; .*busybox-static"):
        busybox_image(dynamic, applets=["bin/sh"])


def test_busybox_image_with_a_stand_in_binary(tmp_path: Path) -> None:
    """The image's shape, with the static probe helper standing in for busybox."""
    fake = tmp_path / "busybox"
    fake.write_bytes(probe_helper_path().read_bytes())
    image = busybox_image(fake, applets=["bin/sh", "sbin/poweroff", "linuxrc", "bin/busybox"])
    by_path = {e.path: e for e in image.entries}
    assert by_path["bin/busybox"].data == fake.read_bytes()
    assert by_path["bin/sh"].data == b"/bin/busybox" and by_path["bin/sh"].kind == "symlink"
    assert "linuxrc" not in by_path  # would shadow nothing useful; /init is ours
    assert by_path["dev/console"].rdev == (5, 1) and by_path["dev/console"].kind == "char"
    init = by_path["init"]
    assert init.data.startswith(b"#!/bin/sh\n") and stat.S_IMODE(init.mode) == 0o755
    assert b"poweroff -f" in init.data and b"leanvm-init: user space is up" in init.data
    assert by_path["bin/leanvm-probe"].data == probe_helper_path().read_bytes()
    for path in ("proc", "sys", "dev", "tmp"):
        assert by_path[path].kind == "dir"


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static is not installed")
def test_default_image_from_debian_busybox() -> None:
    image = busybox_image()
    by_path = {e.path: e for e in image.entries}
    assert by_path["bin/sh"].data == b"/bin/busybox"
    assert by_path["sbin/poweroff"].data == b"/bin/busybox"
    assert len([e for e in image.entries if e.kind == "symlink"]) > 100


def test_entry_kinds() -> None:
    assert Entry("x", stat.S_IFIFO | 0o600).kind == "fifo"
    assert Entry("x", stat.S_IFREG | 0o600).kind == "file"


def leanvm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "leanvm", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_cli_build_and_list(tmp_path: Path) -> None:
    init = tmp_path / "myinit"
    init.write_text("#!/bin/sh\necho hi\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("payload")
    out = tmp_path / "initrd.cpio"
    done = leanvm("initrd", "build", str(out), "--no-busybox", "--init", str(init),
                  "--add", f"{extra}:/etc/extra.txt")
    assert done.returncode == 0, done.stderr
    assert f"{out}: " in done.stdout and "entries" in done.stdout
    entries = {e.path: e for e in read_newc(out.read_bytes())}
    assert entries["init"].data == init.read_bytes()
    assert entries["etc/extra.txt"].data == b"payload"
    listed = leanvm("initrd", "list", str(out))
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert any(line.startswith("crw-------") and line.endswith("5,1 /dev/console")
               for line in lines)
    assert any(line.startswith("-rwxr-xr-x") and line.endswith(" 18 /init") for line in lines)


@pytest.mark.parametrize("args,message", [
    (["initrd", "build", "/tmp/x.cpio", "--add", "nocolon"], "bad --add 'nocolon'"),
    (["initrd", "build", "/tmp/x.cpio", "--no-busybox"], "--no-busybox needs --init"),
    (["initrd", "build", "/tmp/x.cpio", "--busybox", "/nonexistent/bb"],
     "/nonexistent/bb: no busybox there"),
    (["initrd", "list", "/nonexistent/i.cpio"], "no such initramfs file"),
    (["initrd", "list", "/etc/hostname"],
     "/etc/hostname: byte 0x0 starts neither a cpio archive nor a compressed stream"),
])
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    done = leanvm(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_init_probe_ids_are_named_on_the_timeline() -> None:
    from leanvm.loader.initramfs import INIT_PROBES
    from leanvm.trace.events import BUILTIN_PROBES

    assert all(BUILTIN_PROBES[ident] == name for ident, name in INIT_PROBES.items())
