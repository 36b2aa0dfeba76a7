"""Small files and short functions (docs/architecture.md): no file in src/ over 500 lines,
no function over 60, except argparse declarations (cli's add_parser), which are lists."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "leanvm"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
DECLARATIVE = {"add_parser"}  # argparse option lists in cli/


def test_files_and_functions_stay_small() -> None:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text()
        lines = source.count("\n")
        where = path.relative_to(SRC.parent)
        if lines > MAX_FILE_LINES:
            problems.append(f"{where}: {lines} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES and node.name not in DECLARATIVE:
                    problems.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    assert not problems, "\n".join(problems)
