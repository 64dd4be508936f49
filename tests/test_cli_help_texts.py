"""Every command-line option of `hwattn` and of the benchmark scripts says what it does: each
`add_argument` call (of a parser, a subparser or a group) under hwattn/cli/ and benchmarks/
passes `help=` (argparse.SUPPRESS counts: a hidden option is a choice, not an omission)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("hwattn/cli", "benchmarks")
SOURCES = sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def options_without_help(source: str, name: str) -> list[str]:
    """'name:line option' of every `add_argument` call in `source` that passes no help=."""
    tree = ast.parse(source, filename=name)
    missing = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        # **kwargs may carry help=; only a call that cannot pass it is reported.
        if any(k.arg in ("help", None) for k in node.keywords):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant)] or ["?"]
        missing.append(f"{name}:{node.lineno} {'/'.join(map(str, names))}")
    return missing


def test_the_sources_are_found():
    assert any(p.parent.name == "cli" for p in SOURCES)
    assert any(p.parent.name == "benchmarks" for p in SOURCES)


def test_every_option_has_a_help_text():
    missing = [m for path in SOURCES for m in options_without_help(path.read_text(), _rel(path))]
    assert not missing, "add_argument without help=:\n" + "\n".join(missing)


@pytest.mark.parametrize("source, expected", [
    ('p.add_argument("--x", type=int)', ["--x"]),
    ('group.add_argument("-y", "--why", default=1)', ["-y/--why"]),
    ('sub.add_parser("a").add_argument("name")', ["name"]),
    ('p.add_argument("--x", help="an x")', []),
    ('p.add_argument("--x", help=argparse.SUPPRESS)', []),
    ('p.add_argument("--x", **common)', []),
])
def test_the_check_finds_calls_without_help(source, expected):
    found = options_without_help(source, "probe.py")
    assert found == [f"probe.py:1 {option}" for option in expected]
