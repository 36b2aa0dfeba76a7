"""`leanvm version`: leanvm's version and what this host's KVM offers."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("version", help="print the version and the host's KVM capabilities",
                            description="Print leanvm's version, the host's KVM API version "
                                        "and capabilities (of LEANVM_KVM_DEVICE if set, else "
                                        "/dev/kvm), and what this host's KVM cannot emulate.")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import os
    import platform
    import sys

    from leanvm import __version__
    from leanvm.abi import kvm as abi
    from leanvm.errors import KvmError
    from leanvm.kvm.system import KVM_DEVICE, Kvm

    path = os.environ.get("LEANVM_KVM_DEVICE", KVM_DEVICE)  # as `leanvm run` uses it
    print(f"leanvm {__version__} (Python {sys.version.split()[0]}, Linux {platform.release()})")
    try:
        with Kvm(path) as kvm:
            caps = {name[8:]: kvm.check_extension(getattr(abi, name))
                    for name in dir(abi) if name.startswith("KVM_CAP_")}
            print(f"KVM API {kvm.api_version}; memslots {caps['NR_MEMSLOTS']}, "
                  f"recommended vCPUs {caps['NR_VCPUS']}, max vCPUs {caps['MAX_VCPUS']}")
            print("capabilities: " + " ".join(sorted(name for name, value in caps.items() if value)))
        from leanvm.machine.host_check import check_host

        finding = check_host(path)
        how = "cached for this boot" if finding.cached else f"probed in {finding.seconds * 1e3:.0f} ms"
        print(f"{finding.describe()} ({how})")
    except KvmError as exc:
        print(f"KVM ({path}): not usable here ({exc})")
    return 0
