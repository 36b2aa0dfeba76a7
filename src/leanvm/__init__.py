"""leanvm: a lean virtual machine monitor in Python on Linux KVM.

Layers (lower never imports upward; tests/unit/test_layering.py enforces it):

    L0  errors, abi, trace.events      standard library only
    L1  kvm, memory                    thin /dev/kvm wrappers; guest memory
    L2  devices, loader, firmware,     device models, image loaders, planners:
        dump, layout                   never touch KVM
    L3  machine                        wires everything together, runs vCPUs
    L4  cli                            argparse front end

Importing this package does no work: names below load their modules on first use.
"""

from __future__ import annotations


from leanvm.version import __version__

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leanvm.errors import LeanvmError
    from leanvm.machine.config import MachineConfig
    from leanvm.machine.machine import Machine, RunResult, RunState

__all__ = ["Machine", "MachineConfig", "RunResult", "RunState", "LeanvmError", "__version__"]

_LAZY = {
    "Machine": "leanvm.machine.machine",
    "RunResult": "leanvm.machine.machine",
    "RunState": "leanvm.machine.machine",
    "MachineConfig": "leanvm.machine.config",
    "LeanvmError": "leanvm.errors",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'leanvm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
