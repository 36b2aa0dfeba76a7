"""Tests that cannot fail are defects: an AST walk over tests/ finds test functions that
assert nothing and assertions that hold whatever happens.

A test asserts when its body (nested functions included) has an ``assert``, uses
``pytest.raises``/``pytest.warns``/``pytest.fail``, or calls a function or fixture of its own
module or of a conftest that does (followed through calls, within those files).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
CHECKERS = {"raises", "warns", "fail", "deprecated_call"}  # pytest.<name>


def _direct(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assert):
            return True
        if (isinstance(sub, ast.Attribute) and sub.attr in CHECKERS
                and isinstance(sub.value, ast.Name) and sub.value.id == "pytest"):
            return True
    return False


def _called_names(node: ast.AST) -> set[str]:
    return {sub.func.id for sub in ast.walk(node)
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name)}


def asserting_functions(trees: list[ast.Module]) -> set[str]:
    """Names of module-level functions in ``trees`` that assert, directly or through calls
    to others of them (a fixed point)."""
    functions = {node.name: node for tree in trees for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    asserting = {name for name, node in functions.items() if _direct(node)}
    while True:
        more = {name for name, node in functions.items()
                if name not in asserting and _called_names(node) & asserting}
        if not more:
            return asserting
        asserting |= more


def conftests_for(path: Path) -> list[ast.Module]:
    found = []
    for directory in [path.parent, *path.parent.parents]:
        conftest = directory / "conftest.py"
        if conftest.exists():
            found.append(ast.parse(conftest.read_text()))
        if directory == TESTS:
            break
    return found


def assert_free_tests() -> list[str]:
    problems = []
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        asserting = asserting_functions([tree, *conftests_for(path)])
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if not node.name.startswith("test"):
                continue
            if _direct(node) or _called_names(node) & asserting:
                continue
            problems.append(f"{path.relative_to(TESTS)}:{node.lineno} {node.name}")
    return problems


def _always_true(test: ast.expr) -> bool:
    if isinstance(test, ast.Constant):
        return bool(test.value)
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
        return any(_always_true(value) for value in test.values)
    if (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.GtE) and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == 0 and isinstance(test.left, ast.Call)
            and isinstance(test.left.func, ast.Name) and test.left.func.id == "len"):
        return True  # len(x) >= 0
    return False


def constant_assertions() -> list[str]:
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(TESTS)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Assert) and _always_true(node.test):
                problems.append(f"{where} assert {ast.unparse(node.test)}")
            elif isinstance(node, ast.BoolOp) and any(
                    isinstance(v, ast.Constant) and v.value is True for v in node.values):
                problems.append(f"{where} {ast.unparse(node)}")
    return problems


def test_every_test_function_asserts_something() -> None:
    problems = assert_free_tests()
    assert not problems, "tests that assert nothing:\n" + "\n".join(problems)


def test_no_assertion_holds_whatever_happens() -> None:
    problems = constant_assertions()
    assert not problems, "assertions that cannot fail:\n" + "\n".join(problems)


def test_the_checks_themselves_catch_what_they_are_for() -> None:
    sample = ast.parse(
        "def helper(x):\n    assert x\n"
        "def test_a():\n    helper(1)\n"
        "def test_b():\n    print('nothing')\n"
        "def test_c():\n    with pytest.raises(ValueError):\n        int('x')\n")
    asserting = asserting_functions([sample])
    tests = {n.name: n for n in sample.body if n.name.startswith("test")}  # type: ignore[attr-defined]
    free = [name for name, node in tests.items()
            if not _direct(node) and not _called_names(node) & asserting]
    assert free == ["test_b"]
    for text, expected in (("assert True", True), ("assert x or 1", True),
                           ("assert len(x) >= 0", True), ("assert x", False),
                           ("assert len(x) >= 1", False)):
        assert _always_true(ast.parse(text).body[0].test) is expected, text  # type: ignore[attr-defined]
