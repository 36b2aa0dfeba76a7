from __future__ import annotations

from hypothesis import given, settings, strategies as st

from leanvm.devices import serial as uart
from leanvm.devices.serial import Serial16550


def make() -> tuple[Serial16550, bytearray, list[bool]]:
    out = bytearray()
    levels: list[bool] = []
    dev = Serial16550(out.extend, levels.append)
    return dev, out, levels


def test_transmit_goes_to_output_and_line_is_always_ready() -> None:
    dev, out, _ = make()
    for byte in b"hi\n":
        assert dev.read(uart.LSR, 1) & uart.LSR_THRE
        dev.write(uart.RBR_THR, 1, byte)
    assert bytes(out) == b"hi\n"
    assert dev.read(uart.LSR, 1) & (uart.LSR_THRE | uart.LSR_TEMT) == 0x60


def test_receive_sets_data_ready_and_reads_in_order() -> None:
    dev, _, _ = make()
    assert not dev.read(uart.LSR, 1) & uart.LSR_DR
    dev.receive(b"ab")
    assert dev.read(uart.LSR, 1) & uart.LSR_DR
    assert dev.read(uart.RBR_THR, 1) == ord("a")
    assert dev.read(uart.RBR_THR, 1) == ord("b")
    assert not dev.read(uart.LSR, 1) & uart.LSR_DR
    assert dev.read(uart.RBR_THR, 1) == 0  # empty FIFO reads zero


def test_divisor_latch_hides_data_registers() -> None:
    dev, out, _ = make()
    dev.write(uart.LCR, 1, 0x83)
    dev.write(uart.RBR_THR, 1, 0x01)  # DLL, not a transmitted byte
    dev.write(uart.IER, 1, 0x00)  # DLM
    assert (dev.read(uart.RBR_THR, 1), dev.read(uart.IER, 1)) == (0x01, 0x00)
    dev.write(uart.LCR, 1, 0x03)
    assert out == bytearray() and dev.read(uart.LCR, 1) == 0x03


def test_rx_interrupt_follows_data_and_out2() -> None:
    dev, _, levels = make()
    dev.write(uart.IER, 1, uart.IER_RDI)
    dev.receive(b"x")
    assert levels == [True]
    assert dev.read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_RDI
    dev.read(uart.RBR_THR, 1)
    assert levels == [True, False]
    dev.write(uart.MCR, 1, 0)  # OUT2 low: the PC's interrupt gate is closed
    dev.receive(b"y")
    assert levels == [True, False]
    dev.write(uart.MCR, 1, uart.MCR_OUT2)
    assert levels == [True, False, True]


def test_thre_interrupt_is_acknowledged_by_reading_iir() -> None:
    dev, _, levels = make()
    dev.write(uart.IER, 1, uart.IER_THRI)
    assert levels == [True]
    assert dev.read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_THRI
    assert levels == [True, False]
    assert dev.read(uart.IIR_FCR, 1) & 0x0F == uart.IIR_NONE
    dev.write(uart.RBR_THR, 1, ord("z"))  # transmitting empties THR again
    assert levels[-1] is True


def test_loopback_returns_transmitted_bytes() -> None:
    dev, out, _ = make()
    dev.write(uart.MCR, 1, uart.MCR_LOOP | uart.MCR_OUT2)
    dev.write(uart.RBR_THR, 1, 0x42)
    assert out == bytearray()
    assert dev.read(uart.RBR_THR, 1) == 0x42


def test_fifo_bits_and_overrun() -> None:
    dev, _, _ = make()
    dev.write(uart.IIR_FCR, 1, uart.FCR_ENABLE)
    assert dev.read(uart.IIR_FCR, 1) & 0xC0 == 0xC0
    dev.receive(bytes(uart.RX_QUEUE_LIMIT + 5))
    assert dev.dropped == 5
    assert dev.read(uart.LSR, 1) & uart.LSR_OE
    assert not dev.read(uart.LSR, 1) & uart.LSR_OE  # reading LSR clears the error
    dev.write(uart.IIR_FCR, 1, uart.FCR_ENABLE | uart.FCR_CLEAR_RX)
    assert dev.pending_input == 0


@settings(max_examples=300)
@given(st.lists(st.one_of(
    st.tuples(st.just("r"), st.integers(0, 15), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("w"), st.integers(0, 15), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("in"), st.binary(max_size=40)),
), max_size=200))
def test_random_register_traffic_never_raises_and_keeps_invariants(ops: list[tuple]) -> None:
    dev, out, levels = make()
    for op in ops:
        if op[0] == "r":
            value = dev.read(op[1], op[2])
            assert 0 <= value <= 0xFF
        elif op[0] == "w":
            dev.write(op[1], 1, op[2])
        else:
            dev.receive(op[1])
        iir = dev._identify()
        assert iir in (uart.IIR_NONE, uart.IIR_THRI, uart.IIR_RDI, uart.IIR_RLSI)
        # the line is high exactly when an enabled interrupt is pending and OUT2 is set
        expected = iir != uart.IIR_NONE and bool(dev.mcr & uart.MCR_OUT2)
        assert (levels[-1] if levels else False) == expected
    assert all(a != b for a, b in zip(levels, levels[1:]))  # only edges are reported
    assert len(out) <= dev.transmitted
