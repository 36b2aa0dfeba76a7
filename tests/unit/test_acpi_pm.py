"""ACPI PM1a event/control registers and the PM timer: S5 power-off, write-1-to-clear status,
the SCI line, and random register traffic."""

from __future__ import annotations

from hypothesis import given, strategies as st

from leanvm.devices import acpi_pm
from leanvm.devices.acpi_pm import (PM1_CNT_OFFSET, PM_TMR_OFFSET, PORT_SIZE, PWRBTN_STS,
                                    SCI_EN, SLP_EN, SLP_TYP_S5, SLP_TYP_SHIFT, AcpiPm)

STS, EN, CNT = 0, 2, PM1_CNT_OFFSET


class Recorder:
    def __init__(self) -> None:
        self.poweroffs = 0
        self.sci: list[bool] = []
        self.now = 0

    def device(self) -> AcpiPm:
        return AcpiPm(self.poweroff, self.sci.append, clock_ns=lambda: self.now)

    def poweroff(self) -> None:
        self.poweroffs += 1


def test_control_reads_sci_en_and_keeps_slp_typ() -> None:
    rec = Recorder()
    dev = rec.device()
    assert dev.read(CNT, 2) == SCI_EN  # always in ACPI mode
    dev.write(CNT, 2, 0)  # SCI_EN cannot be cleared
    assert dev.read(CNT, 2) & SCI_EN
    dev.write(CNT, 2, 3 << SLP_TYP_SHIFT)
    assert dev.read(CNT, 2) == (3 << SLP_TYP_SHIFT) | SCI_EN
    assert rec.poweroffs == 0


def test_linux_s5_sequence_powers_off_once() -> None:
    """ACPICA writes SLP_TYP first, then SLP_TYP | SLP_EN; SLP_EN reads back as 0."""
    rec = Recorder()
    dev = rec.device()
    dev.write(STS, 2, 0xFFFF)  # clear all status, as ACPICA does before sleeping
    dev.write(CNT, 2, SLP_TYP_S5 << SLP_TYP_SHIFT)
    assert rec.poweroffs == 0
    dev.write(CNT, 2, (SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN)
    assert rec.poweroffs == 1
    assert not dev.read(CNT, 2) & SLP_EN


def test_slp_en_with_another_sleep_type_does_nothing() -> None:
    rec = Recorder()
    dev = rec.device()
    for sleep_type in range(8):
        if sleep_type != SLP_TYP_S5:
            dev.write(CNT, 2, (sleep_type << SLP_TYP_SHIFT) | SLP_EN)
    assert rec.poweroffs == 0


def test_byte_writes_reach_the_high_byte_of_control() -> None:
    rec = Recorder()
    dev = rec.device()
    dev.write(CNT + 1, 1, ((SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN) >> 8)
    assert rec.poweroffs == 1


def test_power_button_raises_the_sci_only_when_enabled_and_clears_on_write_one() -> None:
    rec = Recorder()
    dev = rec.device()
    dev.press_power_button()
    assert dev.read(STS, 2) & PWRBTN_STS and rec.sci == []  # not enabled: no SCI
    dev.write(EN, 2, PWRBTN_STS)
    assert rec.sci == [True]
    dev.write(STS, 2, 0)  # writing 0 changes nothing
    assert dev.read(STS, 2) & PWRBTN_STS and rec.sci == [True]
    dev.write(STS, 4, PWRBTN_STS | (PWRBTN_STS << 16))  # dword write: status and enable
    assert not dev.read(STS, 2) & PWRBTN_STS and rec.sci == [True, False]
    assert dev.read(EN, 2) == PWRBTN_STS


def test_pm_timer_counts_at_3_579545_mhz_in_32_bits() -> None:
    rec = Recorder()
    dev = rec.device()
    assert dev.read(PM_TMR_OFFSET, 4) == 0
    rec.now = 1_000_000_000
    assert dev.read(PM_TMR_OFFSET, 4) == 3_579_545
    rec.now = (1 << 32) * 1_000_000_000 // 3_579_545 + 1_000
    assert dev.read(PM_TMR_OFFSET, 4) < 10  # wrapped
    dev.write(PM_TMR_OFFSET, 4, 0)  # read-only
    assert dev.read(PM_TMR_OFFSET, 4) < 10


offsets = st.integers(-2, PORT_SIZE + 2)
sizes = st.sampled_from([1, 2, 4, 8])
ops = st.lists(st.tuples(st.booleans(), offsets, sizes, st.integers(0, (1 << 64) - 1)),
               max_size=200)


@given(ops)
def test_random_traffic_never_raises_and_keeps_invariants(ops) -> None:  # type: ignore[no-untyped-def]
    rec = Recorder()
    dev = rec.device()
    expected_poweroffs = 0
    for is_write, offset, size, value in ops:
        rec.now += 12345
        if is_write:
            dev.write(offset, size, value)
            # SLP_TYP and SLP_EN both live in PM1_CNT's high byte: a write covering it with
            # SLP_EN set and \_S5's SLP_TYP is a power-off
            if 0 <= offset <= CNT + 1 < offset + size <= PORT_SIZE:
                high = (value >> (8 * (CNT + 1 - offset))) & 0xFF
                if high << 8 & SLP_EN and (high << 8 >> SLP_TYP_SHIFT) & 7 == SLP_TYP_S5:
                    expected_poweroffs += 1
        else:
            got = dev.read(offset, size)
            assert 0 <= got < 1 << (8 * size)
        assert dev.read(CNT, 2) & SCI_EN
        assert not dev.read(CNT, 2) & SLP_EN
        assert dev.sci_level == bool(dev.read(STS, 2) & dev.read(EN, 2))
        assert (rec.sci[-1] if rec.sci else False) == dev.sci_level
    assert rec.poweroffs == dev.poweroffs == expected_poweroffs


def test_block_layout_matches_what_the_fadt_says() -> None:
    assert acpi_pm.PM1_EVT_OFFSET == 0 and acpi_pm.PM1_EVT_LEN == 4
    assert acpi_pm.PM1_CNT_OFFSET == 4 and acpi_pm.PM1_CNT_LEN == 2
    assert acpi_pm.PM_TMR_OFFSET == 8 and acpi_pm.PM_TMR_LEN == 4
    from leanvm.machine.platform import IRQ, PORT

    assert acpi_pm.PORT_SIZE == PORT["acpi-pm"].size == 12 and IRQ["acpi-pm"] == 9
