"""Imports flow one way between hwattn's parts, and no two parts import each other.

Read from the source with `ast`, so an import inside a function (a lazy import) counts as much
as one at the top of a module. The tiers, top to bottom:

    cli > server, bench > engine, parallel, train, eval, hf, analysis > models > layers > ops
        > config, variants, device, data, cpu_threads, plotting, files, switches

A module may import from its own tier or below. `analysis` builds models to count their
costs, so it sits with the users of models rather than at the ground. The package's
`__init__` is its public face and sits at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "hwattn"

TIERS = {
    "config": 0, "variants": 0, "device": 0, "data": 0, "cpu_threads": 0, "plotting": 0,
    "files": 0, "switches": 0,
    "ops": 1,
    "layers": 2,
    "models": 3,
    "engine": 4, "parallel": 4, "train": 4, "eval": 4, "hf": 4, "analysis": 4,
    "server": 5, "bench": 5,
    "cli": 6, "__main__": 6, "__init__": 6,
}

# Imports that close a circle and are tolerated for now; delete an entry once its import is gone.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """hwattn modules `path` imports anywhere in its body."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if _is_module(full) else base)
    return {name for name in found if name == "hwattn" or name.startswith("hwattn.")}


def _part(module: str) -> str:
    """The tier key of a module: its subpackage or ground module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


EDGES = sorted((_module_name(p), target) for p in ROOT.rglob("*.py") for target in _imports(p))


def test_every_part_has_a_tier():
    parts = {_part(_module_name(p)) for p in ROOT.rglob("*.py")}
    assert not parts - set(TIERS), f"give these a tier in TIERS: {sorted(parts - set(TIERS))}"


def test_no_module_imports_from_a_tier_above_it():
    upward = [f"{a} -> {b}" for a, b in EDGES if TIERS[_part(a)] < TIERS[_part(b)]]
    assert not upward, "imports from a higher tier:\n" + "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_cycles_between_parts():
    graph: dict[str, set[str]] = {}
    for a, b in EDGES:
        if _part(a) != _part(b) and (a, b) not in KNOWN_CYCLE_EDGES:
            graph.setdefault(_part(a), set()).add(_part(b))
    cycle = _cycle(graph)
    assert cycle is None, "parts that import each other: " + " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} -> {b}" for a, b in EDGES
        if (_part(a), _part(b)) in zip(cycle, cycle[1:]))


@pytest.mark.parametrize("edge", sorted(KNOWN_CYCLE_EDGES), ids=lambda e: f"{e[0]}->{e[1]}")
def test_known_cycle_edges_still_exist(edge):
    assert edge in EDGES, f"{edge[0]} no longer imports {edge[1]}: delete it from KNOWN_CYCLE_EDGES"


def test_the_checker_sees_lazy_imports_and_cycles():
    lazy = [(a, b) for a, b in EDGES if a == "hwattn.eval.lm_eval_adapter"]
    assert ("hwattn.eval.lm_eval_adapter", "hwattn.models.checkpoint") in lazy  # inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
