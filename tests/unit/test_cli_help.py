"""`leanvm X --help` and `leanvm X VERB --help`: the description argparse prints is whole
sentences (it once was the first line of a module docstring, cut mid-sentence)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from leanvm.cli.main import build_parser

SRC = Path(__file__).resolve().parents[2] / "src"
SENTENCE_END = re.compile(r"[.!?][\"')\]`]*$")
# Every command and verb says what it does in whole sentences.
MUST_DESCRIBE = {"run", "memmap", "trace", "trace show", "trace diff", "kernel", "initrd",
                 "initrd build", "initrd list", "kernel extract", "kernel info", "flash",
                 "flash inspect", "flash unpad", "qmp", "version"}


def parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand and verb, as ('trace show', its parser)."""
    todo = [("", build_parser())]
    while todo:
        name, parser = todo.pop()
        if name:
            yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for verb, child in action.choices.items():
                    todo.append((f"{name} {verb}".strip(), child))


def printed_description(help_text: str) -> str | None:
    """The paragraph argparse prints between the usage and the first argument heading."""
    blocks = help_text.split("\n\n")
    if len(blocks) < 2 or re.match(r"[\w ]+:\n", blocks[1] + "\n"):
        return None
    return " ".join(blocks[1].split())


ALL = dict(parsers())


def test_every_command_and_verb_is_found() -> None:
    assert {"trace", "trace show", "trace diff", "kernel", "kernel info", "kernel extract",
            "initrd", "initrd build", "initrd list", "run", "version"} <= set(ALL)
    assert set(ALL) <= MUST_DESCRIBE  # a new command or verb comes with its description


@pytest.mark.parametrize("command", sorted(ALL))
def test_help_description_is_whole_sentences(command: str) -> None:
    parser = ALL[command]
    shown = printed_description(parser.format_help())
    if parser.description is None:
        assert command not in MUST_DESCRIBE, f"leanvm {command} --help has no description"
        assert shown is None
        return
    assert shown == " ".join(parser.description.split())
    assert SENTENCE_END.search(shown), f"leanvm {command} --help stops mid-sentence: {shown!r}"
    assert shown[0].isupper() or shown[0] == "`", shown


@pytest.mark.parametrize("command", ["trace", "kernel", "initrd"])
def test_the_real_command_prints_it(command: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-m", "leanvm", command, "--help"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    shown = printed_description(done.stdout)
    assert shown and SENTENCE_END.search(shown), done.stdout
