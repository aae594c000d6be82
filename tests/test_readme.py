"""Every ```python block of the README runs, and each `print(...)  # expected` line prints what its comment says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_PRINT = re.compile(r"^(\s*)print\((.*)\)\s*#\s*(.+?)\s*$")


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    out = []
    for match in re.finditer(r"```python\n(.*?)```", text, re.S):
        out.append((text[:match.start()].count("\n") + 1, match.group(1)))
    return out


def _instrument(code: str) -> tuple[str, int]:
    lines, checks = [], 0
    for line in code.splitlines():
        m = _PRINT.match(line)
        if m:
            indent, expr, expected = m.groups()
            line = f"{indent}__check__(({expr}), {expected!r})"
            checks += 1
        lines.append(line)
    return "\n".join(lines), checks


def _check(value, expected: str) -> None:
    got = str(value)
    assert got == expected, f"README says {expected!r}, code prints {got!r}"


BLOCKS = _blocks()


def test_readme_has_examples():
    assert BLOCKS, "README.md has no python examples"


@pytest.mark.parametrize("lineno,code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block(lineno, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source, _ = _instrument(code)
    exec(compile(source, f"README.md:{lineno}", "exec"), {"__check__": _check, "__name__": "__readme__"})
