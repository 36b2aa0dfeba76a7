"""leanvm's command line. Every user error ends in one line on stderr and exit status 2.

This module is the one place where errors become messages: a LeanvmError prints as it is,
an OSError as the file it names and what the system said, an argparse usage error as its
own one line. Option abbreviations are off everywhere (``-machine`` must never become
``-m achine``, nor ``-k`` a prefix of ``-kernel``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from leanvm import __version__
from leanvm.errors import LeanvmError

DESCRIPTION = "leanvm: a lean virtual machine monitor on Linux KVM."
EXIT_USAGE = 2  # a bad option, value or file
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGTERM: 143, SIGHUP: 129, as 128 + the signal)


class UsageError(Exception):
    """argparse found a bad command line; the message is one line."""


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter sized with os.get_terminal_size: argparse builds one for every
    add_argument, and its own sizing imports shutil (with bz2, lzma, zlib), 4 ms of start-up."""

    def __init__(self, prog: str) -> None:
        import os

        try:
            width = os.get_terminal_size().columns
        except OSError:
            width = 80
        super().__init__(prog, width=max(width - 2, 40))


class _Parser(argparse.ArgumentParser):
    """No abbreviations, no glued short options, usage errors as one line."""

    command_seen: str | None = None  # the subcommand on the command line, for error hints

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _get_option_tuples(self, option_string: str) -> list:  # type: ignore[override]
        # argparse matches "-monitor" as "-m onitor" and "-k" as a prefix of "-kernel" even
        # with allow_abbrev off; an option is spelt out in full or it is unknown.
        return []

    def error(self, message: str) -> NoReturn:
        message = _plain_usage_message(message)
        if message.startswith("unrecognized arguments: "):
            unknown = message.split(": ", 1)[1].split()
            first = next((word for word in unknown if word.startswith("-")), unknown[0])
            if first.startswith("-"):
                message = f"unknown option {first}"
            else:
                message = f"unexpected argument {first!r}"
            # The root parser reports what a subcommand left over: point at that one's help.
            command = self.command_seen
            if command:
                raise UsageError(f"{self.prog} {command}: {message} (see {self.prog} "
                                 f"{command} --help)")
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


_KINDS = {"int": "a whole number", "float": "a number", "Path": "a file name"}


def _plain_usage_message(message: str) -> str:
    """argparse's "argument --x/-y: invalid int value: 'v'" as "bad --x 'v': expected a
    whole number", naming the option and the value as every other leanvm error does."""
    import re

    found = re.match(r"argument ([^/:\s]+)(?:/\S+)?: (.*)$", message)
    if not found:
        return message
    option, rest = found.groups()
    if rest.startswith("bad value "):  # our own type checks say what they expected
        return f"bad {option} {rest[len('bad value '):]}"
    invalid = re.match(r"invalid (\w+) value: (.*)$", rest)
    if invalid:
        kind, value = invalid.groups()
        return f"bad {option} {value}: expected {_KINDS.get(kind, kind)}"
    choice = re.match(r"invalid choice: (.*?) \(choose from (.*)\)$", rest)
    if choice:
        value, options = choice.groups()
        return f"bad {option} {value}: expected one of {options.replace(chr(39), '')}"
    return f"{option}: {rest}"


COMMANDS = ("run", "memmap", "flash", "trace", "kernel", "initrd", "qmp", "version")


def build_parser(only: str | None = None) -> _Parser:
    """The parser; with ``only`` (a command on the command line), just that command's:
    importing and declaring the others is start-up time a `leanvm run` does not need (a
    second in a guest of a nested KVM, where Python runs under TCG)."""
    import importlib

    parser = _Parser(prog="leanvm", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"leanvm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        if only is None or name == only:
            importlib.import_module(f"leanvm.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        command = next((w for w in words if not w.startswith("-")), None)
        parser = build_parser(command if command in COMMANDS else None)
        parser.command_seen = command
        args = parser.parse_args(words)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return int(args.handler(args))
    except UsageError as exc:
        return _fail(str(exc))
    except LeanvmError as exc:
        return _fail(f"leanvm: error: {exc}")
    except BrokenPipeError:
        return 141
    except OSError as exc:  # a file the command was given, as the system describes it
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"leanvm: error: {where}{exc.strerror or exc}")
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None)
        name = "interrupted" if signum is None else f"terminated by signal {signum}"
        print(f"leanvm: {name}", file=sys.stderr)
        return EXIT_INTERRUPTED if signum is None else 128 + signum


def _fail(message: str) -> int:
    print(one_line(message), file=sys.stderr)
    return EXIT_USAGE


def one_line(text: str) -> str:
    """``text`` as a single printable line: newlines and control characters escaped, so a
    file name or a value the user gave cannot break the line or drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
