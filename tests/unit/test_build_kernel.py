"""scripts/build-kernel: the config fragment is applied over tinyconfig and every option it
sets is checked after olddefconfig (Kconfig drops options with unmet dependencies silently)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-kernel"


builder = load_script("build-kernel")


def test_parse_reads_set_and_unset_lines_and_ignores_comments() -> None:
    text = ("# a comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n"
            "CONFIG_NR=64\n\n  CONFIG_A=n  \n# CONFIG_D is set\n")
    assert builder.parse_config(text) == {"CONFIG_A": "n", "CONFIG_B": "n",
                                          "CONFIG_C": "\"x y\"", "CONFIG_NR": "64"}


def test_apply_replaces_in_place_of_old_lines_and_appends_new() -> None:
    config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_KEEP=y\nCONFIG_HZ=250\n"
    merged = builder.apply_fragment(config, {"CONFIG_A": "n", "CONFIG_B": "y",
                                             "CONFIG_HZ": "100", "CONFIG_NEW": "y"})
    values = builder.parse_config(merged)
    assert values == {"CONFIG_A": "n", "CONFIG_B": "y", "CONFIG_KEEP": "y",
                      "CONFIG_HZ": "100", "CONFIG_NEW": "y"}
    assert merged.count("CONFIG_A") == 1 and "# CONFIG_A is not set" in merged


def test_dropped_options_names_what_kconfig_did_not_keep() -> None:
    fragment = {"CONFIG_PVH": "y", "CONFIG_VIRTIO_MEM": "y", "CONFIG_NET": "n",
                "CONFIG_VT": "n"}
    final = {"CONFIG_PVH": "y", "CONFIG_VT": "y"}  # VIRTIO_MEM absent: an unmet dependency
    assert builder.dropped_options(fragment, final) == [
        "CONFIG_VIRTIO_MEM (wanted y, got n)", "CONFIG_VT (wanted n, got y)"]


def test_cache_key_follows_every_input() -> None:
    key = builder.cache_key("CONFIG_A=y\n", "linux-source-6.1 6.1.1", "gcc 12")
    assert key == builder.cache_key("CONFIG_A=y\n", "linux-source-6.1 6.1.1", "gcc 12")
    assert len({key, builder.cache_key("CONFIG_A=n\n", "linux-source-6.1 6.1.1", "gcc 12"),
                builder.cache_key("CONFIG_A=y\n", "linux-source-6.1 6.1.2", "gcc 12"),
                builder.cache_key("CONFIG_A=y\n", "linux-source-6.1 6.1.1", "gcc 13")}) == 4


def test_the_minimal_fragment_wants_what_leanvm_needs() -> None:
    wanted = builder.parse_config(builder.FRAGMENT.read_text())
    for option in ("64BIT", "SMP", "PRINTK", "EARLY_PRINTK", "TTY", "SERIAL_8250",
                   "SERIAL_8250_CONSOLE", "BLK_DEV_INITRD", "BINFMT_ELF", "BINFMT_SCRIPT",
                   "IA32_EMULATION", "PVH", "ACPI", "X86_LOCAL_APIC", "X86_IO_APIC", "PROC_FS",
                   "SYSFS", "DEVTMPFS", "VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES",
                   "VIRTIO_MEM", "MEMORY_HOTPLUG", "MEMORY_HOTREMOVE", "KERNEL_GZIP"):
        assert wanted.get(f"CONFIG_{option}") == "y", option
    for option in ("MODULES", "NET", "RD_GZIP", "RD_XZ", "RD_ZSTD", "KERNEL_XZ"):
        assert wanted.get(f"CONFIG_{option}") == "n", option


def test_missing_source_is_exit_3_with_one_line() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--source", "/nonexistent/linux.tar.xz"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode == 3 and "building the kernel needs" in done.stderr:
        pytest.skip("build tools are missing here; the source check comes after them")
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1
    assert "/nonexistent/linux.tar.xz is missing" in done.stderr
    assert "linux-source-6.1" in done.stderr


@pytest.mark.slow
def test_real_kconfig_drop_is_reported_in_one_line(tmp_path: Path) -> None:
    """Over tinyconfig, VIRTIO_MEM alone has unmet dependencies: Kconfig drops it, the
    builder names it and stops before compiling anything."""
    if not builder.SOURCE.is_file():
        pytest.skip(f"{builder.SOURCE} is not installed (make test installs it)")
    fragment = tmp_path / "bad.config"
    fragment.write_text("CONFIG_PRINTK=y\nCONFIG_VIRTIO_MEM=y\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--config", str(fragment),
                           "--configure-only"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1
    assert "Kconfig did not keep bad.config" in done.stderr
    assert "CONFIG_VIRTIO_MEM (wanted y, got n)" in done.stderr
    assert "CONFIG_PRINTK" not in done.stderr
