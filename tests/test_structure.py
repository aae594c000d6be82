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
    assert all(u == "condconv.cli" or u.startswith("condconv.cli") for u in users), users


def test_load_checkpoint_defined_once():
    defined = [name for name, (_, tree) in MODULES.items()
               if any(isinstance(n, ast.FunctionDef) and n.name == "load_checkpoint" for n in ast.walk(tree))]
    assert defined == ["condconv.models.checkpoint"]


def test_library_does_not_import_the_command_layer():
    for name, (path, tree) in MODULES.items():
        if name == "condconv.cli" or name.startswith("condconv.cli"):
            continue
        bad = {m for m in _imports(name, path, tree) if m == "condconv.cli" or m.startswith("condconv.cli")}
        assert not bad, f"{name} imports {bad}"


#: the folders, bottom to top: a folder imports only from the folders before it (and from itself)
FOLDER_ORDER = ("utils", "nn", "models", "data", "deploy", "training", "bench", "cli")


def _folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_package_root_holds_only_its_init_py_typed_and_folders():
    loose = sorted(p.name for p in PACKAGE.iterdir()
                   if p.is_file() and p.name not in ("__init__.py", "py.typed"))
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert not loose, loose
    assert sorted(FOLDER_ORDER) == folders, folders


def test_folders_import_one_way_bottom_to_top():
    rank = {name: i for i, name in enumerate(FOLDER_ORDER)}
    upward = []
    for name, (path, tree) in MODULES.items():
        here = _folder(name)
        if here is None:
            continue
        for target in _imports(name, path, tree):
            there = _folder(target)
            if there is None:  # the package root: only its lazily served version string may be read
                assert name == "condconv.cli", f"{name} imports the package root"
                continue
            if rank[there] > rank[here]:
                upward.append(f"{name} ({here}) -> {target} ({there})")
    assert not upward, upward


def test_the_folder_order_check_catches_an_upward_import(tmp_path):
    # the check above must be able to fail: a module of nn importing training is found by _imports and ranked upward
    tree = ast.parse("def f():\n    from condconv.training.loop import train_model\n")
    found = _imports("condconv.nn.layers", PACKAGE / "nn" / "layers.py", tree)
    assert "condconv.training.loop" in found
    assert FOLDER_ORDER.index(_folder("condconv.training.loop")) > FOLDER_ORDER.index("nn")


def test_import_condconv_is_cheap_and_serves_every_public_name():
    import subprocess
    import sys

    code = ("import sys, condconv; assert 'torch' not in sys.modules, 'import condconv imported torch'; "
            "names = [n for n in condconv.__all__ if n != '__version__']; "
            "missing = [n for n in names if getattr(condconv, n, None) is None]; assert not missing, missing; "
            "assert sorted(dir(condconv)) == sorted(set(dir(condconv))) and set(names) <= set(dir(condconv))")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("old", "new"), [("condconv.layers", "condconv.nn.layers"),
                                          ("condconv.functional", "condconv.nn.functional"),
                                          ("condconv.ops.context", "condconv.nn.ops.context"),
                                          ("condconv.train", "condconv.training.loop"),
                                          ("condconv.commands.options", "condconv.cli.commands.options"),
                                          ("condconv.convert", "condconv.nn.convert")])
def test_old_module_paths_import_the_new_module_with_one_warning(old, new):
    import importlib
    import subprocess
    import sys
    import warnings

    # in a fresh interpreter: the first import warns once, a second import is silent, the module is the new one
    code = (f"import warnings, importlib, sys\n"
            f"with warnings.catch_warnings(record=True) as w:\n"
            f"    warnings.simplefilter('always')\n"
            f"    a = importlib.import_module({old!r}); b = importlib.import_module({old!r})\n"
            f"msgs = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]\n"
            f"assert len(msgs) == 1 and 'moved to condconv.' in msgs[0], msgs\n"
            f"assert a is b is sys.modules[{new!r}]\n"
            f"import condconv; assert callable(condconv.convert), condconv.convert\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert importlib.import_module(old) is importlib.import_module(new)


def test_names_deprecated_in_0_2_are_gone():
    import condconv.bench.layers
    import condconv.training.loop

    for module, name in [(condconv.training.loop, "load_checkpoint"), (condconv.bench.layers, "seed_loop_odconv")]:
        assert not hasattr(module, name)
