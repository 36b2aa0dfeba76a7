"""The emulation fallback (machine/fallback) over a fake vCPU and guest memory with page
tables built here: no KVM. Expected results are computed independently (bit counts, byte
swaps, literal values), not by the code under test."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from leanvm.abi import kvm as abi
from leanvm.kvm.exits import InternalError
from leanvm.machine.fallback import Fallback
from leanvm.memory.guest import GuestMemory, GuestRegion, RegionKind
from leanvm.memory.host import map_anonymous

MiB = 1 << 20
CODE = 0x10000  # linear = physical for the low 2 MiB (4 KiB pages)
DATA = 0x11000
DATA2 = 0x12000  # the page after DATA
READ_ONLY = 0x20000  # present, not writable
ABSENT = 0x21000  # not present
MMIO_PAGE = 0x30000  # maps guest-physical 0xE000_0000: no RAM there
ROM_PAGE = 0x31000  # maps the ROM region
ROM_BASE = 0x40_0000
HIGH_CODE = 0xFFFF_FFFF_8000_0000  # kernel-style high mapping -> physical 0x20_0000
HIGH_PHYS = 0x20_0000
STACK = 0x18000


class FakeVcpu:
    """Register state as KVM holds it, with the ioctls the fallback uses."""

    def __init__(self, bits: int = 64) -> None:
        self.id = 0
        self.regs = abi.kvm_regs()
        self.sregs = abi.kvm_sregs()
        self.xsave = abi.kvm_xsave()  # FCW at byte 0, MXCSR at 24, ST at 32, XMM at 160
        self.events = abi.kvm_vcpu_events()
        self.set_u(0, 2, 0x37F)
        self.set_u(24, 4, 0x1F80)
        self.regs.rflags = 0x2
        self.regs.rsp = STACK
        s = self.sregs
        if bits == 64:
            s.cr0, s.cr4, s.efer, s.cr3 = 0x8001_0033, 0x620, 0xD00, 0x1000
            s.cs = abi.kvm_segment(selector=8, type=0xB, present=1, s=1, l=1, g=1)
        else:  # 32-bit protected mode, paging off
            s.cr0, s.cr4 = 0x33, 0x600
            s.cs = abi.kvm_segment(selector=8, type=0xB, present=1, s=1, db=1, g=1,
                                   limit=0xFFFFFFFF)
        self.set_xsave_calls = 0

    def image(self) -> bytes:
        return bytes(self.xsave)

    def u(self, offset: int, size: int) -> int:
        return int.from_bytes(self.image()[offset:offset + size], "little")

    def set_u(self, offset: int, size: int, value: int) -> None:
        view = memoryview(self.xsave).cast("B")
        view[offset:offset + size] = value.to_bytes(size, "little")

    @property
    def mxcsr(self) -> int:
        return self.u(24, 4)

    def get_regs(self): return _copy(self.regs)
    def set_regs(self, regs): self.regs = _copy(regs)
    def get_sregs(self): return _copy(self.sregs)
    def set_sregs(self, sregs): self.sregs = _copy(sregs)
    def get_xsave(self): return _copy(self.xsave)
    def get_events(self): return _copy(self.events)
    def set_events(self, events): self.events = _copy(events)

    def set_xsave(self, xsave):
        self.set_xsave_calls += 1
        self.xsave = _copy(xsave)


def _copy(struct_):
    out = type(struct_)()
    import ctypes

    ctypes.memmove(ctypes.addressof(out), ctypes.addressof(struct_), ctypes.sizeof(struct_))
    return out


def build_memory() -> GuestMemory:
    memory = GuestMemory()
    memory.add(GuestRegion("ram", 0, map_anonymous(4 * MiB), RegionKind.RAM))
    memory.add(GuestRegion("rom", ROM_BASE, map_anonymous(64 << 10), RegionKind.ROM,
                           readonly=True))
    put = lambda a, v: memory.write(a, struct.pack("<Q", v))  # noqa: E731
    put(0x1000, 0x2000 | 0x3)  # PML4[0] -> PDPT
    put(0x2000, 0x3000 | 0x3)  # PDPT[0] -> PD
    put(0x3000, 0x4000 | 0x3)  # PD[0] -> PT for [0, 2 MiB)
    for page in range(512):
        put(0x4000 + page * 8, page << 12 | 0x3)
    put(0x4000 + (READ_ONLY >> 12) * 8, READ_ONLY | 0x1)
    put(0x4000 + (ABSENT >> 12) * 8, 0)
    put(0x4000 + (MMIO_PAGE >> 12) * 8, 0xE000_0000 | 0x3)
    put(0x4000 + (ROM_PAGE >> 12) * 8, ROM_BASE | 0x3)
    put(0x1000 + 511 * 8, 0x5000 | 0x3)  # PML4[511] -> PDPT 0x5000
    put(0x5000 + 510 * 8, 0x6000 | 0x3)  # PDPT[510] -> PD 0x6000
    put(0x6000, HIGH_PHYS | 0x83)  # 2 MiB page: 0xffffffff80000000 -> 0x200000
    return memory


@pytest.fixture
def memory():
    mem = build_memory()
    yield mem
    mem.close()


def failure(code: bytes) -> InternalError:
    """An emulation failure as KVM reports it: suberror 1, instruction bytes from RIP."""
    return InternalError(abi.KVM_INTERNAL_ERROR_EMULATION, (0, 0, 0), code[:15])


def run(memory: GuestMemory, vcpu: FakeVcpu, code: bytes, rip: int = CODE,
        fallback: Fallback | None = None) -> str | None:
    physical = HIGH_PHYS + (rip - HIGH_CODE) if rip >= HIGH_CODE else rip
    memory.write(physical, code)
    vcpu.regs.rip = rip
    fallback = fallback or Fallback(memory)
    return fallback.handle(vcpu, failure(code))


FLAGS_CF_ZF_AC = (1 << 0, 1 << 6, 1 << 18)


def test_popcnt_register_form(memory) -> None:
    vcpu = FakeVcpu()
    value = 0xF0F0_0000_0000_0001
    vcpu.regs.rbx = value
    vcpu.regs.rflags = 0x2 | 0x1 | 0x800  # CF and OF set: POPCNT clears them
    fallback = Fallback(memory)
    assert run(memory, vcpu, bytes.fromhex("f3480fb8c3"), fallback=fallback) is None  # popcnt rax, rbx
    assert vcpu.regs.rax == bin(value).count("1") == 9
    assert vcpu.regs.rip == CODE + 5
    assert vcpu.regs.rflags & 0x8D5 == 0  # OF SF ZF AF PF CF clear
    assert fallback.counts == {"popcnt": 1} and fallback.total == 1 and fallback.seconds > 0
    vcpu.regs.rbx = 0
    assert run(memory, vcpu, bytes.fromhex("f3480fb8c3"), fallback=fallback) is None
    assert vcpu.regs.rax == 0 and vcpu.regs.rflags & 0x40  # ZF for a zero source
    assert fallback.summary().startswith("emulation fallback 2 instructions in ")
    assert fallback.summary().endswith(": popcnt 2")


def test_popcnt_memory_form(memory) -> None:
    vcpu = FakeVcpu()
    memory.write(DATA + 8, struct.pack("<Q", 0x0123_4567_89AB_CDEF))
    vcpu.regs.rsi = DATA
    assert run(memory, vcpu, bytes.fromhex("f3480fb84608")) is None  # popcnt rax, [rsi+8]
    assert vcpu.regs.rax == 32
    assert vcpu.regs.rip == CODE + 6


def test_rip_relative_operand_in_the_high_half(memory) -> None:
    vcpu = FakeVcpu()
    code = bytes.fromhex("f3480fb805f0000000")  # popcnt rax, [rip + 0xf0]
    target = HIGH_PHYS + len(code) + 0xF0
    memory.write(target, struct.pack("<Q", 0xFF))
    assert run(memory, vcpu, code, rip=HIGH_CODE) is None
    assert vcpu.regs.rax == 8
    assert vcpu.regs.rip == HIGH_CODE + len(code)


def test_ldmxcsr_and_stmxcsr(memory) -> None:
    vcpu = FakeVcpu()
    memory.write(STACK, struct.pack("<I", 0x7F80))  # round toward zero, all masked
    assert run(memory, vcpu, bytes.fromhex("0fae1424")) is None  # ldmxcsr [rsp]
    assert vcpu.mxcsr == 0x7F80 and vcpu.set_xsave_calls == 1
    assert vcpu.u(512, 8) & 0x3 == 0x3  # XSTATE_BV: x87 and SSE state are in the image
    vcpu.set_u(24, 4, 0x1FA0)
    assert run(memory, vcpu, bytes.fromhex("0fae5c2408")) is None  # stmxcsr [rsp+8]
    assert memory.read(STACK + 8, 4) == struct.pack("<I", 0x1FA0)
    assert vcpu.set_xsave_calls == 1  # nothing in the FPU changed


def test_ldmxcsr_with_reserved_bits_delivers_gp(memory) -> None:
    vcpu = FakeVcpu()
    memory.write(STACK, struct.pack("<I", 0x1_1F80))
    fallback = Fallback(memory)
    assert run(memory, vcpu, bytes.fromhex("0fae1424"), fallback=fallback) is None
    assert (vcpu.events.exception_injected, vcpu.events.exception_nr) == (1, 13)
    assert vcpu.events.exception_has_error_code == 1 and vcpu.events.exception_error_code == 0
    assert vcpu.mxcsr == 0x1F80 and vcpu.regs.rip == CODE
    assert fallback.exceptions == {"#GP": 1}


def test_clac_and_stac(memory) -> None:
    vcpu = FakeVcpu()
    assert run(memory, vcpu, bytes.fromhex("0f01cb")) is None  # stac
    assert vcpu.regs.rflags & (1 << 18) and vcpu.regs.rip == CODE + 3
    assert run(memory, vcpu, bytes.fromhex("0f01ca")) is None  # clac
    assert not vcpu.regs.rflags & (1 << 18) and vcpu.regs.rip == CODE + 3


def test_fwait_is_a_no_op_without_pending_x87_exceptions(memory) -> None:
    vcpu = FakeVcpu()
    vcpu.regs.rax, vcpu.regs.rflags = 0x1234, 0x46
    fallback = Fallback(memory)
    assert run(memory, vcpu, b"\x9b", fallback=fallback) is None
    assert vcpu.regs.rip == CODE + 1 and vcpu.regs.rax == 0x1234 and vcpu.regs.rflags == 0x46
    assert fallback.counts == {"wait": 1}


def test_fwait_with_cr0_ts_delivers_nm(memory) -> None:
    vcpu = FakeVcpu()
    vcpu.sregs.cr0 |= 0x8 | 0x2  # TS and MP
    assert run(memory, vcpu, b"\x9b") is None
    assert (vcpu.events.exception_injected, vcpu.events.exception_nr) == (1, 7)
    assert vcpu.regs.rip == CODE


def test_movbe_load_and_store(memory) -> None:
    vcpu = FakeVcpu()
    memory.write(DATA, bytes.fromhex("11223344"))
    vcpu.regs.rsi, vcpu.regs.rdi = DATA, DATA + 0x10
    assert run(memory, vcpu, bytes.fromhex("0f38f006")) is None  # movbe eax, [rsi]
    assert vcpu.regs.rax == 0x11223344
    vcpu.regs.rax = 0x0102_0304_0506_0708
    assert run(memory, vcpu, bytes.fromhex("480f38f107")) is None  # movbe [rdi], rax
    assert memory.read(DATA + 0x10, 8) == bytes.fromhex("0102030405060708")


def test_cmpxchg16b_equal_and_not_equal(memory) -> None:
    vcpu = FakeVcpu()
    memory.write(DATA, struct.pack("<QQ", 0xAAAA, 0xBBBB))
    r = vcpu.regs
    r.rsi, r.rax, r.rdx, r.rbx, r.rcx = DATA, 0xAAAA, 0xBBBB, 0x1111, 0x2222
    code = bytes.fromhex("f0480fc70e")  # lock cmpxchg16b [rsi]
    fallback = Fallback(memory)
    assert run(memory, vcpu, code, fallback=fallback) is None
    assert memory.read(DATA, 16) == struct.pack("<QQ", 0x1111, 0x2222)
    assert vcpu.regs.rflags & 0x40  # ZF: swapped
    vcpu.regs.rax, vcpu.regs.rdx = 0, 0
    assert run(memory, vcpu, code, fallback=fallback) is None
    assert (vcpu.regs.rax, vcpu.regs.rdx) == (0x1111, 0x2222)  # loaded, not swapped
    assert not vcpu.regs.rflags & 0x40
    assert memory.read(DATA, 16) == struct.pack("<QQ", 0x1111, 0x2222)
    assert fallback.counts == {"lock cmpxchg16b": 2}


def test_write_across_a_page_boundary(memory) -> None:
    vcpu = FakeVcpu()
    vcpu.regs.rdi = DATA2 - 3
    vcpu.regs.rax = 0x8877_6655_4433_2211
    assert run(memory, vcpu, bytes.fromhex("480f38f107")) is None  # movbe [rdi], rax
    assert memory.read(DATA2 - 3, 8) == bytes.fromhex("8877665544332211")


def test_write_to_a_read_only_page_delivers_a_page_fault(memory) -> None:
    vcpu = FakeVcpu()
    vcpu.regs.rdi, vcpu.regs.rax = READ_ONLY + 0x40, 0x55
    before = memory.read(READ_ONLY, 4096)
    fallback = Fallback(memory)
    assert run(memory, vcpu, bytes.fromhex("480f38f107"), fallback=fallback) is None
    assert (vcpu.events.exception_injected, vcpu.events.exception_nr) == (1, 14)
    assert vcpu.events.exception_has_error_code and vcpu.events.exception_error_code == 0x3
    assert vcpu.sregs.cr2 == READ_ONLY + 0x40
    assert vcpu.regs.rip == CODE  # a fault: the instruction will run again after the handler
    assert memory.read(READ_ONLY, 4096) == before
    assert fallback.exceptions == {"#PF": 1}


def test_page_crossing_write_into_a_read_only_page_writes_nothing(memory) -> None:
    vcpu = FakeVcpu()
    vcpu.regs.rdi, vcpu.regs.rax = READ_ONLY - 4, 0xFFFF_FFFF_FFFF_FFFF
    memory.write(READ_ONLY - 4, bytes(4))
    assert run(memory, vcpu, bytes.fromhex("480f38f107")) is None
    assert vcpu.events.exception_nr == 14 and vcpu.sregs.cr2 == READ_ONLY
    assert memory.read(READ_ONLY - 4, 4) == bytes(4)  # the first page was not written either


def test_read_of_a_page_that_is_not_present(memory) -> None:
    vcpu = FakeVcpu()
    vcpu.regs.rsi = ABSENT + 0x123
    assert run(memory, vcpu, bytes.fromhex("f3480fb806")) is None  # popcnt rax, [rsi]
    assert vcpu.events.exception_nr == 14 and vcpu.events.exception_error_code == 0
    assert vcpu.sregs.cr2 == ABSENT + 0x123


def test_access_outside_ram_stops_without_touching_it(memory) -> None:
    vcpu = FakeVcpu()
    vcpu.regs.rsi, vcpu.regs.rip = MMIO_PAGE + 8, CODE
    regs_before = bytes(vcpu.regs)
    detail = run(memory, vcpu, bytes.fromhex("f3480fb806"))
    assert detail is not None and "popcnt rax, qword ptr [rsi]" in detail
    assert "0xe0000000" in detail and "not RAM" in detail
    assert bytes(vcpu.regs) == regs_before and vcpu.events.exception_injected == 0


def test_write_to_rom_stops(memory) -> None:
    vcpu = FakeVcpu()
    vcpu.regs.rdi, vcpu.regs.rax = ROM_PAGE, 0x1
    detail = run(memory, vcpu, bytes.fromhex("480f38f107"))
    assert detail is not None and "not writable RAM" in detail
    assert memory.read(ROM_BASE, 8) == bytes(8)


def test_int3_moves_rip_past_the_byte_and_injects_bp(memory) -> None:
    vcpu = FakeVcpu()
    fallback = Fallback(memory)
    assert run(memory, vcpu, b"\xcc", fallback=fallback) is None
    assert vcpu.regs.rip == CODE + 1
    assert (vcpu.events.exception_injected, vcpu.events.exception_nr) == (1, 3)
    assert vcpu.events.exception_has_error_code == 0
    assert fallback.counts == {"int3": 1} and fallback.exceptions == {"#BP": 1}


def test_int3_special_case_agrees_with_unicorn() -> None:
    """Unicorn itself raises interrupt 3 for 0xCC with RIP already past the byte: the same
    vector and return address the special case gives the guest."""
    from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_RIP

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, 0x1000)
    uc.mem_write(0x1000, b"\xcc\x90")
    seen = []
    uc.hook_add(UC_HOOK_INTR, lambda u, n, _: (seen.append((n, u.reg_read(UC_X86_REG_RIP))),
                                              u.emu_stop()))
    uc.emu_start(0x1000, 0x1001)
    assert seen == [(3, 0x1001)]


@pytest.mark.parametrize("code,word", [
    (bytes.fromhex("e680"), "out"),  # out 0x80, al
    (bytes.fromhex("ec"), "in"),  # in al, dx
    (b"\xf4", "hlt"),
    (bytes.fromhex("0f22d8"), "cr3"),  # mov cr3, rax
    (bytes.fromhex("0f30"), "wrmsr"),
    (bytes.fromhex("0fae2c24"), "xrstor"),  # xrstor [rsp]
    (bytes.fromhex("8ed8"), "mov ds"),
])
def test_refused_instructions_stop_with_their_name(memory, code: bytes, word: str) -> None:
    vcpu = FakeVcpu()
    detail = run(memory, vcpu, code)
    assert detail is not None and detail.startswith("emulation fallback refused '")
    assert word in detail and code.hex(" ") in detail
    assert vcpu.regs.rip == CODE


def test_32bit_protected_mode(memory) -> None:
    vcpu = FakeVcpu(bits=32)
    vcpu.regs.rbx = 0x8000_0003
    memory.write(DATA, struct.pack("<I", 0x1122_3344))
    vcpu.regs.rsi = DATA
    assert run(memory, vcpu, bytes.fromhex("f30fb8c3")) is None  # popcnt eax, ebx
    assert vcpu.regs.rax == 3 and vcpu.regs.rip == CODE + 4
    assert run(memory, vcpu, bytes.fromhex("0f38f006")) is None  # movbe eax, [esi]
    assert vcpu.regs.rax == 0x4433_2211


def test_other_modes_are_refused(memory) -> None:
    vcpu = FakeVcpu(bits=32)
    vcpu.sregs.cr0 = 0x10  # real mode
    detail = run(memory, vcpu, bytes.fromhex("f30fb8c3"))
    assert detail == f"emulation fallback: cannot run code at RIP {CODE:#x} in real mode"
    vcpu = FakeVcpu(bits=32)
    vcpu.sregs.cs.db = 0
    assert "16-bit protected mode" in run(memory, vcpu, bytes.fromhex("f30fb8c3"))


def test_sse_and_x87_state_round_trip(memory) -> None:
    vcpu = FakeVcpu()
    memory.write(DATA, bytes(range(16)))
    vcpu.regs.rsi = DATA
    assert run(memory, vcpu, bytes.fromhex("f30f6f0e")) is None  # movdqu xmm1, [rsi]
    assert vcpu.image()[160 + 16:160 + 32] == bytes(range(16))  # XMM1
    assert run(memory, vcpu, bytes.fromhex("d9e8")) is None  # fld1
    assert (vcpu.u(2, 2) >> 11) & 7 == 7  # FSW.TOP decremented
    assert vcpu.image()[32:42] == struct.pack("<QH", 1 << 63, 0x3FFF)  # ST(0) = 1.0
    assert vcpu.u(4, 1) == 0x80  # abridged tag: physical register 7 valid


def test_accessed_and_dirty_bits_are_set(memory) -> None:
    vcpu = FakeVcpu()
    pte = 0x4000 + (DATA >> 12) * 8
    vcpu.regs.rdi = DATA
    assert run(memory, vcpu, bytes.fromhex("480f38f107")) is None
    assert memory.read(pte, 1)[0] & 0x60 == 0x60
    assert memory.read(0x1000, 1)[0] & 0x20  # the PML4 entry was accessed


def test_a_branch_runs_one_instruction_only(memory) -> None:
    vcpu = FakeVcpu()
    memory.write(CODE + 0x20, bytes.fromhex("48c7c007000000"))  # mov rax, 7 (must not run)
    assert run(memory, vcpu, bytes.fromhex("eb1e")) is None  # jmp +0x1e
    assert vcpu.regs.rip == CODE + 0x20 and vcpu.regs.rax == 0


def test_machine_exposes_the_summary_and_json(memory) -> None:
    fallback = Fallback(memory)
    vcpu = FakeVcpu()
    run(memory, vcpu, b"\xcc", fallback=fallback)
    run(memory, vcpu, bytes.fromhex("0f01cb"), fallback=fallback, rip=CODE + 0x40)
    data = fallback.to_json()
    assert data["total"] == 2 and data["counts"] == {"int3": 1, "stac": 1}
    assert data["exceptions"] == {"#BP": 1}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=15), st.sampled_from(
    [CODE, CODE + 4093, DATA2 - 1, READ_ONLY, ABSENT, MMIO_PAGE, HIGH_CODE + 0x10]),
    st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1), st.sampled_from([32, 64]))
def test_random_instructions_never_crash_the_vmm(code: bytes, rip: int, rsi: int, rdi: int,
                                                 bits: int) -> None:
    """Whatever the bytes and registers: the instruction is handled or the VM stops with a
    one-line reason; nothing raises, and memory outside the guest is never touched (the
    guest memory object refuses it)."""
    memory = build_memory()
    try:
        vcpu = FakeVcpu(bits)
        vcpu.regs.rsi, vcpu.regs.rdi, vcpu.regs.rbx = rsi, rdi, rsi ^ rdi
        vcpu.regs.rip = rip if bits == 64 else rip & 0xFFFFFFFF
        physical = {HIGH_CODE + 0x10: HIGH_PHYS + 0x10}.get(rip, rip)
        if physical < 4 * MiB - 16 and rip not in (READ_ONLY, ABSENT, MMIO_PAGE):
            memory.write(physical, code)
        detail = Fallback(memory).handle(vcpu, failure(code))
        assert detail is None or ("\n" not in detail and detail.startswith("emulation fallback"))
    finally:
        memory.close()


# --- the last page of the 64-bit address space ------------------------------------------
TOP = 0xFFFF_FFFF_FFFF_F000
TOP_PHYS = 0x9000


def map_top_page(memory: GuestMemory, present: bool = True) -> None:
    put = lambda a, v: memory.write(a, struct.pack("<Q", v))  # noqa: E731
    put(0x5000 + 511 * 8, 0x7000 | 0x3)  # PDPT[511] -> PD 0x7000
    put(0x7000 + 511 * 8, 0x8000 | 0x3)  # PD[511] -> PT 0x8000
    put(0x8000 + 511 * 8, TOP_PHYS | 0x3 if present else 0)  # PT[511] -> the last page


def test_an_instruction_on_the_last_page_of_the_address_space(memory) -> None:
    map_top_page(memory)
    vcpu = FakeVcpu()
    vcpu.regs.rbx = 0xF00F
    code = bytes.fromhex("f3480fb8c3")  # popcnt rax, rbx
    memory.write(TOP_PHYS, code)
    vcpu.regs.rip = TOP
    assert Fallback(memory).handle(vcpu, failure(code)) is None
    assert vcpu.regs.rax == 8 and vcpu.regs.rip == TOP + 5


def test_data_on_the_last_page_of_the_address_space(memory) -> None:
    map_top_page(memory)
    vcpu = FakeVcpu()
    memory.write(TOP_PHYS + 0xFF8, struct.pack("<Q", 0x0F0F))
    vcpu.regs.rsi = TOP + 0xFF8
    assert run(memory, vcpu, bytes.fromhex("f3480fb806")) is None  # popcnt rax, [rsi]
    assert vcpu.regs.rax == 8
    vcpu.regs.rdi, vcpu.regs.rax = TOP + 0xFF0, 0x0102_0304_0506_0708
    assert run(memory, vcpu, bytes.fromhex("480f38f107")) is None  # movbe [rdi], rax
    assert memory.read(TOP_PHYS + 0xFF0, 8) == bytes.fromhex("0102030405060708")


def test_an_instruction_that_ends_at_the_top_of_the_address_space(memory) -> None:
    map_top_page(memory)
    vcpu = FakeVcpu()
    code = bytes.fromhex("f3480fb8c3")
    memory.write(TOP_PHYS + 0x1000 - len(code), code)
    vcpu.regs.rip, vcpu.regs.rbx = (1 << 64) - len(code), 0x7
    assert Fallback(memory).handle(vcpu, failure(code)) is None
    assert vcpu.regs.rax == 3 and vcpu.regs.rip == 0  # RIP wraps, as on the CPU


def test_a_page_fault_on_the_last_page(memory) -> None:
    map_top_page(memory, present=False)
    vcpu = FakeVcpu()
    vcpu.regs.rsi = TOP + 0x10
    assert run(memory, vcpu, bytes.fromhex("f3480fb806")) is None
    assert vcpu.events.exception_nr == 14 and vcpu.sregs.cr2 == TOP + 0x10
    assert vcpu.regs.rip == CODE


# --- pages that are not RAM-backed at the moment go through the MMIO bus -------------------
DEVICE_PHYS = 0xE000_0000  # what MMIO_PAGE maps


from fake_vm import FakeVm  # noqa: E402


class Spy:
    """A bus device that logs what reaches the device behind it."""

    def __init__(self, device) -> None:
        self.device = device
        self.log: list[tuple] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size))
        return self.device.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))
        self.device.write(offset, size, value)


class Registers:
    """A device page of plain bytes."""

    def __init__(self) -> None:
        self.data = bytearray(range(256)) * 16

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")


def with_devices(memory: GuestMemory):
    """The ROM region as a pc flash bank on an MMIO bus, with memslots that follow its mode,
    and a register page at DEVICE_PHYS; a Fallback wired to both."""
    from leanvm.devices.bus import Bus
    from leanvm.devices.pflash import PC_GEOMETRY, CfiFlash
    from leanvm.machine.memory_manager import Memslots
    from leanvm.machine.fallback.device_pages import memslot_backing

    rom = memory.find(ROM_BASE)
    memory.write(ROM_BASE, b"\x11" * rom.size, force=True)
    slots = Memslots(FakeVm())  # type: ignore[arg-type]
    for region in memory.regions:
        slots.add(region)
    flash = CfiFlash(rom.view, PC_GEOMETRY, image_size=rom.size, writable=True,
                     on_romd=lambda on: slots.set_present(rom.name, on))
    bus = Bus("mmio", 1 << 40)
    spy, registers = Spy(flash), Spy(Registers())
    bus.register(ROM_BASE, rom.size, spy, "flash0")
    bus.register(DEVICE_PHYS, 0x1000, registers, "registers")
    return Fallback(memory, mmio=bus, backing=memslot_backing(slots)), flash, spy, registers, bus


def test_flash_in_query_mode_is_read_through_the_device(memory) -> None:
    fallback, flash, spy, _, _ = with_devices(memory)
    flash.write(0x55, 1, 0x98)  # CFI query: the bank leaves its memslot
    vcpu = FakeVcpu()
    vcpu.regs.rsi = ROM_PAGE + 0x10
    assert run(memory, vcpu, bytes.fromhex("0f38f006"), fallback=fallback) is None  # movbe eax, [rsi]
    assert vcpu.regs.rax == 0x5100_0000  # 'Q', byte-swapped; the array holds 0x11 bytes
    assert spy.log == [("r", 0x10, 4)]
    spy.log.clear()
    vcpu.regs.rsi = ROM_PAGE + 0x0E
    assert run(memory, vcpu, bytes.fromhex("f3480fb806"), fallback=fallback) is None  # popcnt rax, [rsi]
    assert spy.log == [("r", 0x0E, 8)]  # one 8-byte read, as the guest made it
    assert vcpu.regs.rax == 4  # entries 0x0E (0) and 0x12 ('Y' = 0x59: four bits)


def test_flash_in_read_array_mode_is_read_from_its_memslot(memory) -> None:
    fallback, _, spy, _, _ = with_devices(memory)
    vcpu = FakeVcpu()
    vcpu.regs.rsi = ROM_PAGE + 0x10
    assert run(memory, vcpu, bytes.fromhex("0f38f006"), fallback=fallback) is None
    assert vcpu.regs.rax == 0x1111_1111 and spy.log == []


def test_stores_to_flash_reach_the_device_in_either_mode(memory) -> None:
    fallback, flash, spy, _, _ = with_devices(memory)
    vcpu = FakeVcpu()
    vcpu.regs.rdi, vcpu.regs.rax = ROM_PAGE + 0x20, 0x9800_0000
    store = bytes.fromhex("0f38f107")  # movbe [rdi], eax
    assert run(memory, vcpu, store, fallback=fallback) is None  # read-array mode: a command
    assert spy.log == [("w", 0x20, 4, 0x98)] and not flash.romd
    vcpu.regs.rsi = ROM_PAGE + 0x11
    assert run(memory, vcpu, bytes.fromhex("0f38f006"), fallback=fallback, rip=CODE + 0x40) is None
    assert vcpu.regs.rax == 0x5200_0000  # 'R'
    vcpu.regs.rax = 0xFF00_0000
    assert run(memory, vcpu, store, fallback=fallback, rip=CODE + 0x80) is None
    assert spy.log[-1] == ("w", 0x20, 4, 0xFF) and flash.romd  # back to read array
    assert memory.read(ROM_BASE, 0x40) == b"\x11" * 0x40  # no command wrote the array


def test_device_registers_see_the_guests_access_widths(memory) -> None:
    fallback, _, _, registers, bus = with_devices(memory)
    vcpu = FakeVcpu()
    vcpu.regs.rsi, vcpu.regs.rdi = MMIO_PAGE + 0x40, MMIO_PAGE + 0x80
    assert run(memory, vcpu, bytes.fromhex("f30f6f0e"), fallback=fallback) is None  # movdqu xmm1, [rsi]
    assert vcpu.image()[160 + 16:160 + 32] == bytes(range(0x40, 0x50))
    assert registers.log == [("r", 0x40, 8), ("r", 0x48, 8)]  # two 8-byte MMIO reads, as KVM
    registers.log.clear()
    assert run(memory, vcpu, bytes.fromhex("f30f7f0f"), fallback=fallback) is None  # movdqu [rdi], xmm1
    assert registers.log == [("w", 0x80, 8, 0x4746_4544_4342_4140),
                             ("w", 0x88, 8, 0x4F4E_4D4C_4B4A_4948)]
    registers.log.clear()
    vcpu.regs.rax = 0x1122_3344
    vcpu.regs.rdi = MMIO_PAGE + 0x101
    assert run(memory, vcpu, bytes.fromhex("0f38f107"), fallback=fallback) is None  # movbe [rdi], eax
    assert registers.log == [("w", 0x101, 4, 0x4433_2211)]  # unaligned, one access, swapped
    assert bus.unclaimed_reads == bus.unclaimed_writes == 0


def test_nothing_on_the_bus_reads_all_ones(memory) -> None:
    fallback, _, _, _, bus = with_devices(memory)
    vcpu = FakeVcpu()
    put = lambda a, v: memory.write(a, struct.pack("<Q", v))  # noqa: E731
    put(0x4000 + (MMIO_PAGE >> 12) * 8, 0xE010_0000 | 0x3)  # a page where no device is
    vcpu.regs.rsi = MMIO_PAGE + 8
    assert run(memory, vcpu, bytes.fromhex("f3480fb806"), fallback=fallback) is None
    assert vcpu.regs.rax == 64 and bus.unclaimed_reads == 1 and bus.unclaimed[0xE010_0008] == 1


def test_code_never_runs_from_device_memory(memory) -> None:
    fallback, flash, spy, _, _ = with_devices(memory)
    flash.write(0, 1, 0x70)  # read status: the bank is device memory now
    vcpu = FakeVcpu()
    vcpu.regs.rip = ROM_PAGE
    detail = fallback.handle(vcpu, failure(bytes.fromhex("f3480fb8c3")))
    assert detail is not None and "device memory at the moment" in detail
    assert f"{ROM_BASE:#x}" in detail and spy.log == []


def test_device_accesses_obey_the_page_tables_and_wait_for_the_instruction(memory) -> None:
    fallback, _, _, registers, _ = with_devices(memory)
    put = lambda a, v: memory.write(a, struct.pack("<Q", v))  # noqa: E731
    put(0x4000 + (MMIO_PAGE >> 12) * 8, DEVICE_PHYS | 0x1)  # present, read-only
    vcpu = FakeVcpu()
    vcpu.regs.rdi, vcpu.regs.rax = MMIO_PAGE + 0x10, 0x55
    assert run(memory, vcpu, bytes.fromhex("0f38f107"), fallback=fallback) is None
    assert vcpu.events.exception_nr == 14 and vcpu.events.exception_error_code == 0x3
    assert vcpu.sregs.cr2 == MMIO_PAGE + 0x10 and registers.log == []
    # a store that starts in a device page and faults on the next page writes nothing
    put(0x4000 + (MMIO_PAGE >> 12) * 8, DEVICE_PHYS | 0x3)
    put(0x4000 + (ROM_PAGE >> 12) * 8, ROM_BASE | 0x1)  # the page after it: read-only
    vcpu = FakeVcpu()
    vcpu.regs.rdi, vcpu.regs.rax = MMIO_PAGE + 0xFFC, 0x1122_3344_5566_7788
    assert run(memory, vcpu, bytes.fromhex("480f38f107"), fallback=fallback) is None
    assert vcpu.events.exception_nr == 14 and vcpu.sregs.cr2 == ROM_PAGE
    assert all(entry[0] == "r" for entry in registers.log)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.sampled_from([bytes.fromhex(h) for h in (
           "0f38f006", "0f38f107", "480f38f107", "f3480fb806", "f30f6f0e", "f30f7f0f",
           "f0480fc70e", "0fae1e", "0fae17", "f3a4", "f348a5")]),  # movbe, popcnt, movdqu,
                 st.binary(min_size=1, max_size=15)),  # cmpxchg16b, [ld|st]mxcsr, rep movs
       st.sampled_from([MMIO_PAGE, MMIO_PAGE + 0xFFD, ROM_PAGE, ROM_PAGE - 3, DATA]),
       st.sampled_from([MMIO_PAGE + 0x800, MMIO_PAGE + 0xFFF, ROM_PAGE + 0x10, DATA2 - 2]),
       st.sampled_from([0x98, 0x90, 0x70, 0xFF]), st.integers(0, (1 << 64) - 1))
def test_random_instructions_over_device_pages(code: bytes, rsi: int, rdi: int, command: int,
                                               rax: int) -> None:
    """Random instructions reading and writing device pages and flash in any mode: nothing
    raises, every device access stays inside its device, and writes reach devices only
    when the instruction completed."""
    memory = build_memory()
    try:
        fallback, flash, spy, registers, bus = with_devices(memory)
        flash.write(0, 1, command)
        vcpu = FakeVcpu()
        vcpu.regs.rsi, vcpu.regs.rdi, vcpu.regs.rax = rsi, rdi, rax
        vcpu.regs.rcx = rax & 0x3F  # REP counts
        before = len(registers.log) + len(spy.log)
        detail = run(memory, vcpu, code, fallback=fallback)
        assert detail is None or ("\n" not in detail and detail.startswith("emulation fallback"))
        for log, span in ((spy.log, 64 << 10), (registers.log, 0x1000)):
            assert all(0 <= e[1] and e[1] + e[2] <= span and e[2] in (1, 2, 4, 8) for e in log)
        wrote = any(e[0] == "w" for e in registers.log + spy.log)
        if wrote:  # only a completed instruction (or a trap after it) writes
            assert detail is None
        assert len(registers.log) + len(spy.log) >= before
    finally:
        memory.close()


def test_pages_are_read_from_where_the_memslots_map_them(memory) -> None:
    """The BIOS area's case: a page of the RAM region that KVM maps from other memory (the
    flash alias at 0xE0000) reads as that memory, and a store to it goes to the bus, as a
    guest store to a read-only memslot does, instead of into the RAM underneath."""
    from leanvm.devices.bus import Bus
    from leanvm.machine.memory_manager import Memslots
    from leanvm.machine.fallback.device_pages import memslot_backing

    rom = memory.find(ROM_BASE)
    memory.write(ROM_BASE, b"\x11" * rom.size, force=True)
    memory.write(DATA, b"\x22" * 4096)
    slots = Memslots(FakeVm())  # type: ignore[arg-type]
    for region in memory.regions:
        slots.add(region)
    slots.punch(DATA, 4096)
    slots.replace_group("alias", [(DATA, 4096, rom.mapping.address, True)])
    bus = Bus("mmio", 1 << 40)
    fallback = Fallback(memory, mmio=bus, backing=memslot_backing(slots))
    vcpu = FakeVcpu()
    vcpu.regs.rsi = DATA + 0x10
    assert run(memory, vcpu, bytes.fromhex("0f38f006"), fallback=fallback) is None  # movbe eax, [rsi]
    assert vcpu.regs.rax == 0x1111_1111
    vcpu.regs.rdi, vcpu.regs.rax = DATA + 0x20, 0x3333_3333
    assert run(memory, vcpu, bytes.fromhex("0f38f107"), fallback=fallback) is None  # movbe [rdi], eax
    assert memory.read(DATA, 4096) == b"\x22" * 4096 and bus.unclaimed_writes == 1
    assert bus.unclaimed[DATA + 0x20] == 1


def test_a_load_that_wraps_from_the_top_of_the_address_space_to_zero(memory) -> None:
    map_top_page(memory)
    memory.write(TOP_PHYS + 0xFF8, bytes(range(1, 9)))
    memory.write(0, bytes(range(0x11, 0x19)))  # linear page 0 is physical page 0
    vcpu = FakeVcpu()
    vcpu.regs.rsi = TOP + 0xFF8
    assert run(memory, vcpu, bytes.fromhex("f30f6f0e")) is None  # movdqu xmm1, [rsi]
    assert vcpu.image()[160 + 16:160 + 32] == bytes(range(1, 9)) + bytes(range(0x11, 0x19))
    vcpu.regs.rsi = TOP + 0xFFC
    assert run(memory, vcpu, bytes.fromhex("f3480fb806")) is None  # popcnt rax, [rsi]
    assert vcpu.regs.rax == sum(bin(b).count("1") for b in (5, 6, 7, 8, 0x11, 0x12, 0x13, 0x14))
