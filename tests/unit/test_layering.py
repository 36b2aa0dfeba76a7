"""Lower layers never import upward (docs/architecture.md): an AST walk over src/."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "leanvm"

LAYER = {
    "errors": 0, "abi": 0, "trace.events": 0, "fileio": 0, "version": 0,
    "kvm": 1, "memory": 1,
    "devices": 2, "loader": 2, "firmware": 2, "layout": 2, "trace": 2, "dump": 2,
    "machine": 3,
    "cli": 4, "__main__": 5,  # python -m leanvm: the very top
}
# What each layer may import besides itself and the layers below it.
FORBIDDEN_FOR_L2 = {"kvm"}  # devices, loaders, planners never touch KVM


def layer_of(module: str) -> tuple[str, int]:
    """('devices', 2) for 'leanvm.devices.serial'; the package root is layer 4 (it re-exports)."""
    parts = module.split(".")[1:]
    if not parts or parts == ["__init__"]:
        return "leanvm", 4
    if len(parts) >= 2 and ".".join(parts[:2]) in LAYER:
        return ".".join(parts[:2]), LAYER[".".join(parts[:2])]
    if parts[0] not in LAYER:
        raise AssertionError(f"module {module} is in no layer: add it to LAYER and docs/architecture.md")
    return parts[0], LAYER[parts[0]]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[str]:
    tree = ast.parse(source)
    found = []
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                found.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.append(node.module)
    return [name for name in found if name == "leanvm" or name.startswith("leanvm.")]


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    problems = []
    name, level = layer_of(module)
    for target in imports_of(source, module, is_package):
        if target == "leanvm":
            if level < 4:
                problems.append(f"{module} imports the package root")
            continue
        target_name, target_level = layer_of(target)
        if target_name.split(".")[0] == name.split(".")[0]:
            continue
        if target_level > level or (level == target_level and level > 0 and target_name != name):
            problems.append(f"{module} (L{level}) imports {target} (L{target_level})")
        if level == 2 and target_name in FORBIDDEN_FOR_L2:
            problems.append(f"{module} (L2) imports {target}: devices never touch KVM")
    return problems


def test_every_module_imports_only_its_layer_and_below() -> None:
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 20
    problems = []
    for path in modules:
        problems += violations(module_name(path), path.read_text(), path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_the_check_reports_upward_and_sideways_imports() -> None:
    assert violations("leanvm.devices.serial", "from leanvm.machine import machine\n")
    assert violations("leanvm.devices.serial", "import leanvm.kvm.vm\n")
    assert violations("leanvm.memory.guest", "from leanvm.kvm import vcpu\n")  # L1 sideways
    assert violations("leanvm.loader.bare", "from ..cli import main\n")
    assert not violations("leanvm.loader.bare", "from leanvm.memory.guest import GuestMemory\n")
    assert not violations("leanvm.machine.cpu", "from leanvm.kvm.vcpu import Vcpu\n")


def module_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """leanvm modules imported when ``module`` itself is imported: top-level statements only
    (imports inside functions run later, and TYPE_CHECKING blocks never)."""
    kept: list[ast.stmt] = []

    def collect(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue  # runs when called, not when imported
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                kept.append(node)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    collect([n for n in inner if isinstance(n, ast.stmt)] +
                            [s for h in inner if isinstance(h, ast.ExceptHandler) for s in h.body])

    collect(ast.parse(source).body)
    return imports_of(ast.unparse(ast.Module(body=kept, type_ignores=[])), module, is_package)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle in ``graph`` (module -> modules it imports), each once."""
    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(graph.get(node, ())):
            if target in path:
                cycle = path[path.index(target):]
                key = tuple(sorted(cycle))
                if key not in seen:
                    seen.add(key)
                    cycles.append(cycle + [target])
            elif len(path) < 12:
                visit(target, path + [target])

    for start in sorted(graph):
        visit(start, [start])
    return cycles


def test_no_import_cycles_between_modules_of_one_package() -> None:
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
        targets = set(module_imports(path.read_text(), name, path.name == "__init__.py"))
        graph[name] = {t for t in targets if t != name and t.rsplit(".", 1)[0] == package}
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_cycles() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    assert module_imports("if TYPE_CHECKING:\n    import leanvm.x\nimport leanvm.y\n"
                          "def f():\n    import leanvm.w\n", "leanvm.z") == ["leanvm.y"]
