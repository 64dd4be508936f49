"""Every optional extra installs what the code it enables imports, and the version ranges can
be met together."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Which extra enables which code (path prefixes relative to the repository).
EXTRA_OF = {
    "hwattn/ops/": "gpu", "hwattn/cli/bench_decode.py": "gpu", "hwattn/bench/decode.py": "gpu",
    "hwattn/analysis/plot.py": "plot", "hwattn/train/plot.py": "plot",
    "hwattn/train/": "train", "hwattn/data/": "train",
    "hwattn/eval/report.py": "plot", "hwattn/eval/": "eval", "hwattn_lm_eval_hook.py": "eval",
    "hwattn/hf/": "hf", "hwattn/models/": "hf",
    "hwattn/server/": "serve", "hwattn/engine/": "serve", "hwattn/cli/serve.py": "serve",
    "hwattn/cli/bench_serve.py": "serve", "hwattn/cli/bench_engine.py": "serve",
    "hwattn/bench/": "serve",
}
DISTRIBUTION = {"lm_eval": "lm-eval", "pydantic_core": "pydantic-core"}  # import name -> package name where they differ


def _requirements(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name = re.match(r"[A-Za-z0-9_.\-]+", spec).group(0).lower()
        out[name] = spec
    return out


def _project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("hwattn", "__future__")}


def test_each_extra_installs_what_its_code_imports():
    project = _project()
    base = _requirements(project["dependencies"])
    extras = {k: _requirements(v) for k, v in project["optional-dependencies"].items()}
    files = [*REPO.glob("hwattn/**/*.py"), REPO / "hwattn_lm_eval_hook.py"]
    missing = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        extra = next((e for prefix, e in EXTRA_OF.items() if rel.startswith(prefix)), None)
        allowed = set(base) | set(extras.get(extra, {}))
        for name in _third_party_imports(path):
            if DISTRIBUTION.get(name, name).lower() not in allowed:
                missing.append(f"{rel} imports {name}, not in [{extra or 'base'}]")
    assert not missing, "\n".join(missing)
    everything = set().union(*map(set, extras.values())) - {"hwattn"}
    all_extra = extras["all"]["hwattn"]
    named = set(re.search(r"\[(.*)\]", all_extra).group(1).split(","))
    assert everything <= set(base) | set().union(*(set(extras[n]) for n in named)) | set(extras["test"])


def test_triton_floor_comes_with_a_torch_that_allows_it():
    """PyTorch wheels pin Triton exactly (2.5 -> 3.1.0, 2.6 -> 3.2.0): asking for Triton >= 3.2
    must also ask for PyTorch >= 2.6, or the two cannot be installed together."""
    gpu = _requirements(_project()["optional-dependencies"]["gpu"])
    triton_floor = re.search(r">=\s*(\d+)\.(\d+)", gpu["triton"]).groups()
    torch_floor = re.search(r">=\s*(\d+)\.(\d+)", gpu["torch"]).groups()
    pins = {(3, 1): (2, 5), (3, 2): (2, 6), (3, 3): (2, 7), (3, 4): (2, 8), (3, 5): (2, 9)}
    needed = pins.get(tuple(map(int, triton_floor)), (2, 10))
    assert tuple(map(int, torch_floor)) >= needed
