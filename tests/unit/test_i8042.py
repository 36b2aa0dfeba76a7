from __future__ import annotations

from hypothesis import given, strategies as st

from leanvm.devices.i8042 import COMMAND, DATA, I8042


def test_pulse_reset_command() -> None:
    resets = []
    dev = I8042(lambda: resets.append(1))
    assert dev.read(COMMAND, 1) & 0x02 == 0  # input buffer empty: Linux may send 0xFE
    dev.write(COMMAND, 1, 0xFE)
    assert resets == [1]


def test_reset_through_the_output_port() -> None:
    resets = []
    dev = I8042(lambda: resets.append(1))
    dev.write(COMMAND, 1, 0xD1)
    dev.write(DATA, 1, 0x03)  # bit 0 high: no reset
    assert resets == []
    dev.write(COMMAND, 1, 0xD1)
    dev.write(DATA, 1, 0x02)  # bit 0 low: reset
    assert resets == [1]


def test_self_test_and_config_byte() -> None:
    dev = I8042(lambda: None)
    dev.write(COMMAND, 1, 0xAA)
    assert dev.read(COMMAND, 1) & 0x01
    assert dev.read(DATA, 1) == 0x55
    assert not dev.read(COMMAND, 1) & 0x01
    dev.write(COMMAND, 1, 0x60)
    dev.write(DATA, 1, 0x47)
    dev.write(COMMAND, 1, 0x20)
    assert dev.read(DATA, 1) == 0x47


@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4]), st.booleans(), st.integers(0, 255)),
                max_size=100))
def test_random_traffic_never_raises(ops: list[tuple[int, bool, int]]) -> None:
    dev = I8042(lambda: None)
    for offset, is_write, value in ops:
        if is_write:
            dev.write(offset, 1, value)
        else:
            assert 0 <= dev.read(offset, 1) <= 0xFF
