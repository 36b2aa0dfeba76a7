from __future__ import annotations

import struct

import pytest

from leanvm.abi import kvm as abi
from leanvm.errors import ConfigError
from leanvm.kvm import exits as ex
from leanvm.kvm.cpuid import CpuidEntry, CpuidTable
from leanvm.kvm.vcpu import decode_internal_error

TABLE = CpuidTable((
    CpuidEntry(1, 0, 0, 0x906ED, 0, (1 << 26) | (1 << 13) | 1, 1 << 25),
    CpuidEntry(7, 0, abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 1 << 5, 0, 0),
    CpuidEntry(7, 1, abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 0xFF, 0, 0),
    CpuidEntry(0x80000008, 0, 0, 0x3028, 0, 0, 0),
))


def test_hiding_features_clears_only_their_bits() -> None:
    assert TABLE.has("xsave") and TABLE.has("cx16") and TABLE.has("avx2")
    hidden = TABLE.without(["xsave", "AVX2"])
    assert not hidden.has("xsave") and not hidden.has("avx2")
    assert hidden.has("cx16") and hidden.has("sse3") and hidden.has("sse")
    assert hidden.lookup(7, 1).ebx == 0xFF  # another subleaf is untouched
    assert TABLE.has("xsave")  # the original is unchanged


def test_unknown_feature_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown CPU feature 'warp'"):
        TABLE.without(["warp"])


def test_phys_addr_bits_and_struct() -> None:
    assert TABLE.phys_addr_bits() == 0x28
    assert CpuidTable(()).phys_addr_bits() == 36
    buf = TABLE.to_struct()
    assert buf.nent == 4 and buf.entries[1].index == 0 and buf.entries[2].index == 1


def test_emulation_failure_is_decoded_with_instruction_bytes() -> None:
    union = struct.pack("<IIQB15s", abi.KVM_INTERNAL_ERROR_EMULATION, 3,
                        abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, 3,
                        b"\x0f\x01\xca" + bytes(12))
    error = decode_internal_error(union)
    assert error.instruction == b"\x0f\x01\xca"
    text = error.describe(rip=0xFFFFFFFF81000000)
    assert text == ("KVM internal error (emulation failure) at RIP 0xffffffff81000000: "
                    "instruction bytes 0f 01 ca (the host's KVM cannot emulate this instruction)")


def test_other_internal_errors_show_their_data() -> None:
    union = struct.pack("<II2Q", abi.KVM_INTERNAL_ERROR_DELIVERY_EV, 2, 0x80000b0e, 0x31)
    error = decode_internal_error(union)
    assert error.instruction is None
    assert "error while delivering an event" in error.describe()
    assert "0x80000b0e 0x31" in error.describe()


def test_exits_are_values_of_their_own_type() -> None:
    assert ex.IoOut(0x3F8, 1, 1, b"a") == ex.IoOut(0x3F8, 1, 1, b"a")
    assert ex.Hlt() != ex.Shutdown()
    assert ex.MmioRead(1, 2) != ex.FailEntry(1, 2)
    assert len({ex.Hlt(), ex.Hlt(), ex.Shutdown()}) == 2
    with pytest.raises(AttributeError):
        ex.IoOut(0, 1, 1, b"").port = 5  # type: ignore[misc]
