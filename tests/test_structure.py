"""The package's shape: imports run one way (no circles, lazy imports included), no function over 100 lines, no
module over 800, argparse only in the command modules and the CLI, ``load_checkpoint`` defined once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "condconv"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path, tree: ast.Module) -> set[str]:
    """Every condconv module ``name`` imports, at any depth of the file (functions' lazy imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in MODULES and m != name}


def test_imports_have_no_circle():
    # the package's __init__ files re-export; they are targets of imports but not sources of circles
    graph = {name: _imports(name, path, tree) for name, (path, tree) in MODULES.items()
             if path.name != "__init__.py"}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, circles


def test_no_function_over_100_lines_and_no_module_over_800():
    long_functions, long_modules = [], []
    for name, (path, tree) in MODULES.items():
        lines = path.read_text(encoding="utf-8").count("\n") + 1
        if lines > 800:
            long_modules.append(f"{name}: {lines}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    long_functions.append(f"{name}.{node.name}: {length}")
    assert not long_functions and not long_modules, (long_functions, long_modules)


@pytest.mark.parametrize("needle", ["argparse"])
def test_argparse_only_in_commands_and_cli(needle):
    users = [name for name, (path, tree) in MODULES.items()
             if any(isinstance(n, ast.Import) and any(a.name == needle for a in n.names)
                    or isinstance(n, ast.ImportFrom) and n.module == needle for n in ast.walk(tree))]
    assert all(u == "condconv.cli" or u.startswith("condconv.commands") for u in users), users


def test_load_checkpoint_defined_once():
    defined = [name for name, (_, tree) in MODULES.items()
               if any(isinstance(n, ast.FunctionDef) and n.name == "load_checkpoint" for n in ast.walk(tree))]
    assert defined == ["condconv.checkpoint"]


def test_library_does_not_import_the_command_layer():
    for name, (path, tree) in MODULES.items():
        if name == "condconv.cli" or name.startswith("condconv.commands"):
            continue
        bad = {m for m in _imports(name, path, tree) if m == "condconv.cli" or m.startswith("condconv.commands")}
        assert not bad, f"{name} imports {bad}"


def test_deprecated_paths_still_work_with_a_warning():
    import sys

    import condconv
    import condconv.bench
    import condconv.sweep
    import condconv.train

    convert_module = sys.modules["condconv.convert"]  # condconv.convert is the function of that name
    cases = [(condconv.train, "load_checkpoint", condconv.load_checkpoint),
             (condconv.train, "TrainConfig", condconv.TrainConfig),
             (condconv.train, "evaluate_checkpoint", condconv.evaluate_checkpoint),
             (convert_module, "load_checkpoint", condconv.load_checkpoint),
             (condconv.sweep, "routing_statistics", condconv.routing_statistics),
             (condconv.bench, "seed_loop_odconv", condconv.bench.odconv_reference_loop)]
    for module, name, new in cases:
        with pytest.warns(DeprecationWarning, match=name):
            assert getattr(module, name) is new
    with pytest.raises(AttributeError):
        condconv.train.no_such_name  # noqa: B018
