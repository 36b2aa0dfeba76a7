from __future__ import annotations

import pytest

from leanvm.errors import ConfigError
from leanvm.machine.config import MachineConfig, SerialConfig, parse_size


@pytest.mark.parametrize("text,value", [
    ("512M", 512 << 20), ("512", 512 << 20), ("4G", 4 << 30), ("1.5G", 3 << 29),
    ("64K", 64 << 10), ("2g", 2 << 30), ("1T", 1 << 40), ("16MiB", 16 << 20), ("8MB", 8 << 20),
])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12Q", "M", "-1M", "1..5G", "0x10M", "1.0000001K"])
def test_bad_sizes_name_the_value(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(text, "memory size")
    assert repr(text) in str(info.value) and "\n" not in str(info.value)


def test_memory_limits() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        MachineConfig(memory="1M")
    with pytest.raises(ConfigError, match="multiple of 4K"):
        MachineConfig(memory=(4 << 20) + 1)
    assert MachineConfig(memory="64M").memory == 64 << 20


def test_serial_modes() -> None:
    assert SerialConfig.parse("file:/tmp/x").path is not None
    assert MachineConfig(serial="stdio").serial.mode == "stdio"
    for bad in ("tty", "file:"):
        with pytest.raises(ConfigError, match="serial mode"):
            SerialConfig.parse(bad)


def test_config_is_a_value() -> None:
    a = MachineConfig(memory="64M", args="x")
    assert a == MachineConfig(memory=64 << 20, args="x")
    assert a.replace(args="y").args == "y" and a.args == "x"
    assert hash(a) == hash(MachineConfig(memory="64M", args="x"))
    assert "memory=67108864" in repr(a)
