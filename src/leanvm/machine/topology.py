"""Per-vCPU CPUID: each vCPU's APIC id and one consistent topology for N vCPUs.

KVM_GET_SUPPORTED_CPUID describes the host, not the guest: leaf 1 carries the host's APIC id
and logical-processor count, leaf 4 the host's core count, leaves 0xB/0x1F nothing. Guests
(Linux's SMP boot, the test guests) read their own APIC id and the package layout there, so
every vCPU gets a copy with its own id and a topology of one package with N cores, one
thread per core, APIC id = vCPU index (which is also KVM's initial xAPIC id for a vCPU
created with that index). Facts from the Intel SDM, CPUID instruction:

  leaf 1     EBX[31:24] initial APIC id; EBX[23:16] addressable logical processor ids in the
             package; EDX[28] HTT (that field is valid)
  leaf 4     EAX[31:26] addressable core ids in the package - 1; EAX[25:14] addressable
             logical processor ids sharing this cache - 1
  leaf 0xB   per subleaf (level): EAX[4:0] bits to shift an x2APIC id right to get the next
  and 0x1F   level's id; EBX[15:0] logical processors at this level; ECX[7:0] the subleaf,
             ECX[15:8] level type (1 SMT, 2 core, 0 invalid); EDX the x2APIC id (on every
             subleaf, valid or not)

AMD hosts: leaf 0x80000008 ECX[7:0] is cores - 1 and ECX[15:12] the APIC id bits for them.
"""

from __future__ import annotations

from leanvm.abi import kvm as abi
from leanvm.kvm.cpuid import CpuidEntry, CpuidTable

HTT = 1 << 28  # leaf 1 EDX
LEVEL_SMT, LEVEL_CORE = 1, 2
TOPOLOGY_LEAVES = (0xB, 0x1F)
AMD = (0x68747541, 0x444D4163, 0x69746E65)  # "AuthenticAMD" in EBX, ECX, EDX of leaf 0


def id_bits(count: int) -> int:
    """Bits needed for ``count`` ids (ceil(log2(count)))."""
    return max(count - 1, 0).bit_length()


def vcpu_cpuid(table: CpuidTable, index: int, count: int) -> CpuidTable:
    """``table`` as vCPU ``index`` of ``count`` sees it."""
    if not 0 <= index < count:
        raise ValueError(f"vCPU {index} of {count}")
    apic_id, shift = index, id_bits(count)
    leaf0 = table.lookup(0)
    max_leaf = leaf0.eax if leaf0 is not None else 0
    amd = leaf0 is not None and (leaf0.ebx, leaf0.ecx, leaf0.edx) == AMD
    out: list[CpuidEntry] = []
    for entry in table.entries:
        leaf = entry.function
        if leaf in TOPOLOGY_LEAVES:
            continue  # rebuilt below
        if leaf == 1:
            ebx = (entry.ebx & 0xFFFF) | (min(count, 0xFF) << 16) | (apic_id << 24)
            edx = entry.edx | HTT if count > 1 else entry.edx & ~HTT
            entry = entry._replace(ebx=ebx, edx=edx)
        elif leaf == 4 and entry.eax & 0x1F:  # a cache (type 0 ends the list)
            level = (entry.eax >> 5) & 0x7
            sharing = count if level >= 3 else 1  # L1/L2 per core, L3 shared by the package
            eax = (entry.eax & 0x3FFF) | ((sharing - 1) << 14) | ((count - 1) << 26)
            entry = entry._replace(eax=eax)
        elif leaf == 4:
            entry = entry._replace(eax=entry.eax & 0x3FFF)  # no cores on the "no cache" subleaf
        elif leaf == 0x80000008 and amd:
            entry = entry._replace(ecx=(entry.ecx & ~0xF0FF) | (shift << 12) | (count - 1))
        out.append(entry)
    for leaf in TOPOLOGY_LEAVES:
        if max_leaf >= leaf or any(e.function == leaf for e in table.entries):
            out += _extended_topology(leaf, apic_id, count, shift)
    return CpuidTable(tuple(out))


def _extended_topology(leaf: int, apic_id: int, count: int, shift: int) -> list[CpuidEntry]:
    flag = abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        # SMT level: one thread per core, no bits to shift
        CpuidEntry(leaf, 0, flag, 0, 1, (LEVEL_SMT << 8) | 0, apic_id),
        # core level: ``count`` cores; shifting by ``shift`` gives the package id (0)
        CpuidEntry(leaf, 1, flag, shift, count, (LEVEL_CORE << 8) | 1, apic_id),
        # end of the list: level type 0
        CpuidEntry(leaf, 2, flag, 0, 0, 2, apic_id),
    ]
