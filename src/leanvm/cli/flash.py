"""`leanvm flash inspect IMAGE` and `leanvm flash unpad IMAGE OUT`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("flash", help="inspect or unpad firmware flash images",
                            description="Inspect a firmware flash image (what it holds and "
                                        "what it costs a VM) or write a sparse copy of it.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    inspect = verbs.add_parser("inspect", help="extents, zero and 0xff runs, UEFI volumes, cost",
                               description="Show a flash image's data extents on disk, its "
                                           "runs of zero and 0xff bytes, its UEFI firmware "
                                           "volumes, and the host memory a VM booting it "
                                           "costs in leanvm.")
    inspect.add_argument("image")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(handler=handle_inspect)
    unpad = verbs.add_parser("unpad", help="write a sparse copy: holes where the image is zero",
                             description="Copy IMAGE to OUT leaving holes where it is zero, "
                                         "so the copy takes disk space only for its content. "
                                         "OUT is written whole or not at all.")
    unpad.add_argument("image")
    unpad.add_argument("out")
    unpad.set_defaults(handler=handle_unpad)


def handle_inspect(args: argparse.Namespace) -> int:
    import json

    from leanvm.firmware.image import analyze

    info = analyze(args.image)
    if args.json:
        print(json.dumps({
            "path": info.path, "size": info.size, "allocated": info.allocated,
            "content": info.content, "trailing_zero": info.trailing_zero,
            "data_extents": [r._asdict() for r in info.data_extents],
            "zero_runs": [r._asdict() for r in info.zero_runs],
            "ff_runs": [r._asdict() for r in info.ff_runs],
            "volumes": [v._asdict() for v in info.volumes],
        }, indent=1))
        return 0
    print(f"{info.path}: {info.size} bytes ({size(info.size)}), {size(info.allocated)} allocated "
          f"on disk in {len(info.data_extents)} extent(s)")
    print(f"  content (pages neither all-zero nor all-0xff): {size(info.content)}")
    print(f"  zero runs: {len(info.zero_runs)}, {size(sum(r.length for r in info.zero_runs))}"
          + (f" (trailing padding {size(info.trailing_zero)})" if info.trailing_zero else ""))
    for run in info.zero_runs[:8]:
        print(f"    {run.offset:#010x}-{run.end - 1:#010x}  {size(run.length)}")
    print(f"  0xff runs: {len(info.ff_runs)}, {size(sum(r.length for r in info.ff_runs))}")
    for run in info.ff_runs[:8]:
        print(f"    {run.offset:#010x}-{run.end - 1:#010x}  {size(run.length)}")
    print(f"  UEFI firmware volumes: {len(info.volumes)}")
    for volume in info.volumes:
        print(f"    {volume.offset:#010x}  {size(volume.length):>6}  {volume.kind:7} {volume.guid}")
    print("  host memory per VM in leanvm: read-only: 0 private, at most "
          f"{size(info.content)} of page cache shared by all VMs; writable: only the blocks "
          "the guest writes")
    print(f"  (QEMU 7.2 allocates the whole image, {size(info.size)}, in every VM)")
    return 0


def handle_unpad(args: argparse.Namespace) -> int:
    from leanvm.firmware.unpad import unpad

    total, allocated = unpad(args.image, args.out)
    print(f"{args.out}: {size(total)} with {size(allocated)} allocated "
          f"({size(total - allocated)} left as holes)")
    return 0


def size(value: int) -> str:
    from leanvm.cli.summary import human

    return human(value, "iB")
