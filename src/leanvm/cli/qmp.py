"""`leanvm qmp SOCKET COMMAND [NAME=VALUE ...]`: send one QMP command to a running VM (leanvm's
or QEMU's) and print the reply."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "qmp", help="send one QMP command to a running VM and print the reply",
        description="Connect to a QMP socket (a path, unix:PATH or tcp:HOST:PORT, as given to "
                    "`leanvm run -qmp`; QEMU's work too), negotiate, send COMMAND with the "
                    "arguments given as NAME=VALUE (VALUE is read as JSON where it is a number, "
                    "true, false, null, a list or an object, else as text) and print the reply: "
                    "text as it is (human-monitor-command), anything else as JSON. Exit "
                    "status 1 with the error's class and text on stderr if the command fails. "
                    "For example: leanvm qmp vm.sock human-monitor-command "
                    "command-line='info registers'.")
    parser.add_argument("socket", metavar="SOCKET", help="the VM's QMP socket")
    parser.add_argument("name", metavar="COMMAND", help="e.g. query-status, stop, cont, quit")
    parser.add_argument("arguments", nargs="*", metavar="NAME=VALUE")
    parser.add_argument("--wait-event", metavar="EVENT",
                        help="after the reply, wait for this event (e.g. SHUTDOWN) and print it")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the reply or the event (default 30)")
    parser.set_defaults(handler=handle)


def parse_arguments(pairs: list[str]) -> dict[str, Any]:
    import json

    from leanvm.errors import ConfigError

    arguments: dict[str, Any] = {}
    for pair in pairs:
        name, eq, text = pair.partition("=")
        if not eq or not name:
            raise ConfigError(f"bad argument {pair!r}: expected NAME=VALUE")
        value: Any = text
        if text[:1] in '[{"-0123456789' or text in ("true", "false", "null"):
            try:
                value = json.loads(text)
            except ValueError:
                value = text
        arguments[name] = value
    return arguments


def handle(args: argparse.Namespace) -> int:
    import json
    import sys

    from leanvm.errors import QmpError
    from leanvm.machine.qmp.client import QmpClient

    arguments = parse_arguments(args.arguments)
    with QmpClient(args.socket, args.timeout) as client:
        try:
            result = client.command(args.name, arguments)
        except QmpError as exc:
            print(f"leanvm: qmp: {exc.error_class}: {exc.desc}", file=sys.stderr)
            return 1
        if isinstance(result, str):
            sys.stdout.write(result.replace("\r\n", "\n"))
        else:
            print(json.dumps(result, indent=2))
        if args.wait_event:
            print(json.dumps(client.wait_event(args.wait_event, args.timeout)))
    return 0
