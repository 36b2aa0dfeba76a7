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


def drain(dev: I8042) -> list[int]:
    out = []
    while dev.read(COMMAND, 1) & 0x01:
        out.append(dev.read(DATA, 1))
    return out


def test_keyboard_answers_as_firmware_expects() -> None:
    dev = I8042(lambda: None)
    dev.write(DATA, 1, 0xFF)  # reset
    assert drain(dev) == [0xFA, 0xAA]
    dev.write(DATA, 1, 0xF2)  # identify
    assert drain(dev) == [0xFA, 0xAB, 0x83]
    dev.write(DATA, 1, 0xED)  # LEDs, then their parameter
    assert drain(dev) == [0xFA]
    dev.write(DATA, 1, 0x07)
    assert drain(dev) == [0xFA]
    dev.write(DATA, 1, 0xF0)  # scan-code set: query
    dev.write(DATA, 1, 0x00)
    assert drain(dev) == [0xFA, 0xFA, 2]
    dev.write(DATA, 1, 0xF5)
    dev.write(DATA, 1, 0x12)  # not a command
    assert drain(dev) == [0xFA, 0xFE]
    dev.write(COMMAND, 1, 0xD4)  # to the mouse, which is absent
    dev.write(DATA, 1, 0xFF)
    assert drain(dev) == []


def test_irq1_follows_the_output_buffer_when_enabled() -> None:
    levels: list[bool] = []
    dev = I8042(lambda: None, levels.append)
    dev.write(COMMAND, 1, 0x60)
    dev.write(DATA, 1, 0x44)  # keyboard interrupt off
    dev.write(DATA, 1, 0xFF)
    assert levels == []
    drain(dev)
    dev.write(COMMAND, 1, 0x60)
    dev.write(DATA, 1, 0x45)  # on
    dev.write(DATA, 1, 0xF4)
    assert levels == [True]
    drain(dev)
    assert levels == [True, False]


@given(st.lists(st.integers(0, 255), max_size=200))
def test_a_flooding_guest_gets_a_bounded_queue(values: list[int]) -> None:
    dev = I8042(lambda: None)
    for value in values:
        dev.write(DATA, 1, value)
    assert len(drain(dev)) <= 16


def test_the_status_register_says_the_keyboard_is_not_locked() -> None:
    """Bit 4 set: Linux warns "i8042: Warning: Keylock active" when it is clear."""
    from leanvm.devices.i8042 import COMMAND, STATUS_UNLOCKED, I8042

    dev = I8042(lambda: None)
    assert STATUS_UNLOCKED == 0x10
    assert dev.read(COMMAND, 1) & STATUS_UNLOCKED
    dev.write(COMMAND, 1, 0x20)  # read config: a command does not lock it either
    assert dev.read(COMMAND, 1) & STATUS_UNLOCKED
