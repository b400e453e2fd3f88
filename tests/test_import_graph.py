"""The package's import graph has no cycles, lazy (function-level) imports included.

Every ``import ilm_megatron...`` / ``from ilm_megatron... import`` statement anywhere in a module
is an edge. A cycle means two modules that cannot be understood, tested or moved apart (and an
import-order trap waiting to happen). The leaf :mod:`ilm_megatron.core` (process groups, TP
layers) is what lets the models and :mod:`ilm_megatron.parallel` both use TP without importing
each other; :mod:`ilm_megatron.train.device` does the same for the engines, the loop and the
launcher helpers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import ROOT


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: modules of the package it imports anywhere in its source}."""
    mods: dict[str, Path] = {}
    for f in package.rglob("*.py"):
        name = ".".join(f.relative_to(package.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package.name):
                base = node.module or ""
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(package.name)]
            for t in targets:
                r = resolve(t)
                if r and r != m and not m.startswith(r + "."):  # a package's own __init__
                    edges[m].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    edges = import_graph(ROOT / "ilm_megatron")
    assert "ilm_megatron.models.lm" in edges and len(edges) > 40
    assert cycles(edges) == []


def test_core_is_a_leaf() -> None:
    edges = import_graph(ROOT / "ilm_megatron")
    for module in ("ilm_megatron.core.parallel_state", "ilm_megatron.core.tensor_parallel"):
        assert {t for t in edges[module] if not t.startswith("ilm_megatron.core")} <= {
            "ilm_megatron.config"
        }, (module, edges[module])


def test_the_check_finds_a_cycle(tmp_path) -> None:
    pkg = tmp_path / "ilm_megatron"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from ilm_megatron.b import g\n")
    (pkg / "b.py").write_text("from ilm_megatron.a.x import f\n")
    assert cycles(import_graph(pkg)) == [["ilm_megatron.a.x", "ilm_megatron.b"]]


def test_trainer_and_data_import_no_task() -> None:
    """The trainer streams every dataset through ``ilm_megatron.data``; tasks sit on top."""
    edges = import_graph(ROOT / "ilm_megatron")
    for module, targets in edges.items():
        if module.startswith(("ilm_megatron.train", "ilm_megatron.data")):
            tasks = {t for t in targets if t.startswith("ilm_megatron.tasks")}
            assert not tasks, (module, tasks)
