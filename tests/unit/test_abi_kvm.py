"""leanvm.abi.kvm against the C headers: sizes, offsets and ioctl numbers from a compiled
program, where gcc and linux/kvm.h are present; fixed sizes from the ABI otherwise."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from leanvm.abi import kvm as abi

SIZES = {
    "kvm_regs": 144, "kvm_sregs": 312, "kvm_segment": 24, "kvm_dtable": 16, "kvm_fpu": 416,
    "kvm_userspace_memory_region": 32, "kvm_cpuid_entry2": 40, "kvm_cpuid2": 8,
    "kvm_msr_entry": 16, "kvm_msrs": 8, "kvm_irq_level": 8, "kvm_pit_config": 64,
    "kvm_irqfd": 32, "kvm_ioeventfd": 64, "kvm_vcpu_events": 64,
}
IOCTLS = [name for name in dir(abi) if name.startswith("KVM_") and name.isupper()
          and (name.startswith(("KVM_GET_", "KVM_SET_", "KVM_CREATE_", "KVM_CHECK_"))
               or name in ("KVM_RUN", "KVM_IRQ_LINE", "KVM_IRQFD", "KVM_IOEVENTFD"))]
CONSTANTS = [name for name in dir(abi) if name.startswith(("KVM_CAP_", "KVM_EXIT_", "KVM_MEM_",
                                                           "KVM_INTERNAL_ERROR_", "KVM_IOEVENTFD_FLAG"))]


def test_structure_sizes() -> None:
    for name, size in SIZES.items():
        assert ctypes.sizeof(getattr(abi, name)) == size, name


def test_kvm_run_offsets_are_the_documented_ones() -> None:
    assert (abi.RUN_EXIT_REASON, abi.RUN_UNION, abi.RUN_IMMEDIATE_EXIT) == (8, 32, 1)


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or /usr/include/linux/kvm.h missing: cannot compare with the C headers")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void){"]
    for name in SIZES:
        lines.append(f'printf("sizeof_{name} %zu\\n", sizeof(struct {name}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'#ifdef {name}\nprintf("{name} %llu\\n", (unsigned long long)({name}));\n#endif')
    lines += ['printf("off_exit_reason %zu\\n", offsetof(struct kvm_run, exit_reason));',
              'printf("off_union %zu\\n", offsetof(struct kvm_run, io));',
              'printf("off_insn %zu\\n", offsetof(struct kvm_run, emulation_failure.insn_bytes));',
              "return 0;}"]
    work = tmp_path_factory.mktemp("abi")
    (work / "abi.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(work / "abi"), str(work / "abi.c")], check=True)
    out = subprocess.run([str(work / "abi")], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_sizes_match_c(c_values: dict[str, int]) -> None:
    for name in SIZES:
        assert ctypes.sizeof(getattr(abi, name)) == c_values[f"sizeof_{name}"], name


def test_ioctl_numbers_and_constants_match_c(c_values: dict[str, int]) -> None:
    checked = 0
    for name in IOCTLS + CONSTANTS:
        if name in c_values:  # older headers lack the newest constants
            assert getattr(abi, name) == c_values[name], name
            checked += 1
    assert checked > 40
    assert abi.RUN_EXIT_REASON == c_values["off_exit_reason"]
    assert abi.RUN_UNION == c_values["off_union"]
    assert c_values["off_insn"] == abi.RUN_UNION + 17  # suberror, ndata, flags, insn_size
