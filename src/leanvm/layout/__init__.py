"""Memory-map planners: pure functions from a machine description to guest-physical regions.

No KVM, no I/O: ``plan_x86_layout`` (leanvm's own x86 machine) and ``plan_virt_layout``
(QEMU's arm virt machine, reproduced exactly) return a MemoryMap that machine/boot.py
uses and that ``leanvm memmap`` prints.
"""
