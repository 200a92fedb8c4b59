"""The house has no import circles: every module imports alone, and no module imports (at its top or inside a
function) one that imports it back, directly or through others. A lazy back-import hides a circle until the day
the function runs first."""

from __future__ import annotations

import ast
import multiprocessing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hf_optcore"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """hf_optcore modules ``name`` imports anywhere in its code (module level or inside functions; not under
    ``if TYPE_CHECKING``), each resolved to the module file it names."""
    found: set[str] = set()

    def target(dotted: str) -> str:
        while dotted not in modules and "." in dotted:
            dotted = dotted.rsplit(".", 1)[0]
        return dotted

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(target(a.name) for a in child.names if a.name.startswith("hf_optcore"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                if module.startswith("hf_optcore"):
                    found.update(target(f"{module}.{a.name}") for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def test_no_module_imports_one_that_imports_it_back():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    circles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if a in reachable(b))
    assert circles == []


def _import_alone(name: str) -> str:
    import importlib

    try:
        importlib.import_module(name)
    except Exception as exc:  # report, not raise: the parent collects every failure
        return f"{name}: {type(exc).__name__}: {exc}"
    return ""


def _import_each_alone() -> list[str]:
    """In this (fresh) process: import the third-party libraries once, then import each hf_optcore module first in a
    fork of it, so that no module leans on another having been imported before it."""
    import sys

    import accelerate  # noqa: F401 - shared by the forks
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers.trainer  # noqa: F401

    assert not [m for m in sys.modules if m.startswith("hf_optcore")], "the parent must hold no hf_optcore module"
    ctx = multiprocessing.get_context("fork")
    failures = []
    for name in _modules():
        with ctx.Pool(1) as pool:
            failures.append(pool.apply(_import_alone, (name,)))
    return [f for f in failures if f]


@pytest.mark.slow
def test_every_module_imports_alone():
    import json
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_module_imports as t; "
            "print(json.dumps(t._import_each_alone()))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
