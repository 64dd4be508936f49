"""Every optional extra installs what the code it enables imports, and the version ranges can
be met together."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
# Which extra enables which code (path prefixes relative to the repository; the first match).
EXTRA_OF = {
    "hwattn/cli/compare.py": "compare", "hwattn/train/compare.py": "compare",
    "hwattn/ops/": "gpu", "hwattn/cli/bench_decode.py": "gpu", "hwattn/bench/decode.py": "gpu",
    "hwattn/analysis/plot.py": "plot", "hwattn/train/plot.py": "plot", "hwattn/bench/plot.py": "plot",
    "hwattn/plotting.py": "plot",
    "hwattn/train/": "train", "hwattn/data/": "train",
    "hwattn/eval/report/": "plot", "hwattn/eval/": "eval", "hwattn_lm_eval_hook.py": "eval",
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


def _readme_commands() -> dict[str, str]:
    """The README's two commands: {"main": ..., "test": ...}."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines() if "python3 -m venv" in ln]
    main = [ln for ln in lines if ln.endswith("hwattn compare")]
    test = [ln for ln in lines if "pytest" in ln]
    assert len(main) == 1 and len(test) == 1, lines
    return {"main": main[0], "test": test[0]}


def _extras_of(command: str) -> list[str]:
    return re.search(r"-e '\.\[([a-z,]+)\]'", command).group(1).split(",")


def _installs(command: str) -> list[str]:
    """The requirements a README command's `-e '.[extras]'` asks for, hwattn[...] expanded."""
    extras, out, todo = _project()["optional-dependencies"], [], _extras_of(command)
    while todo:
        for spec in extras[todo.pop()]:
            nested = re.fullmatch(r"hwattn\[(.*)\]", spec)
            if nested:
                todo += nested.group(1).split(",")
            else:
                out.append(spec)
    return out


def test_ci_runs_the_readme_test_command_verbatim():
    assert _readme_commands()["test"] in (REPO / ".ci" / "run").read_text()


def test_the_readme_commands_install_what_they_use_and_agree_on_triton():
    """The main job's line installs no evaluation-harness, dataframe or server packages, and
    the two lines (run one after the other in one environment) never ask for two different
    Triton versions; the tests' pinned Triton is one [gpu] accepts."""
    extras = _project()["optional-dependencies"]
    commands = _readme_commands()
    main = _requirements(_installs(commands["main"]))
    assert not {"lm-eval", "pandas", "pyarrow", "scikit-learn", "datasets", "transformers",
                "fastapi", "triton"} & set(main)
    test = _requirements(_installs(commands["test"]))
    pinned = re.fullmatch(r"triton==(\S+)", test["triton"]).group(1)
    assert pinned in SpecifierSet(str(Requirement(_requirements(extras["gpu"])["triton"]).specifier))


def _closure(requirements: list[str]) -> set[str]:
    """Installed distributions that `requirements` need, dependencies included (markers
    evaluated here, no extras)."""
    todo, seen = [Requirement(r) for r in requirements], set()
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in metadata.requires(name) or []]
    return seen


@pytest.mark.slow  # the main job end to end, at toy size
def test_the_main_job_runs_with_only_its_extra_installed(tmp_path):
    """`hwattn compare` (shipped corpus, data build included) in an interpreter that sees only
    the distributions the README's main-job line installs: each is linked into a fresh
    site folder and Python starts without its own site-packages (-S)."""
    project = _project()
    dists = _closure(project["dependencies"] + _installs(_readme_commands()["main"]))
    assert not {"lm-eval", "pandas", "pyarrow", "scikit-learn", "datasets"} & dists
    site = tmp_path / "site"
    site.mkdir()
    for name in dists:
        for top in {f.parts[0] for f in metadata.distribution(name).files or []
                    if f.parts and f.parts[0] != ".."}:
            source = Path(metadata.distribution(name).locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    code = ("import sys; from hwattn.cli import main; rc = main(sys.argv[1:]); "
            "print('LOADED', sorted({m.split('.')[0] for m in sys.modules})); sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{site}", MPLCONFIGDIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-S", "-c", code, "compare", "--variants", "mqa,gla-2",
                          "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--device",
                          "cpu", "--out", str(tmp_path / "cmp"), "--no-progress"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "cmp" / "compare.png").is_file() and "| gla-2 |" in res.stdout
    loaded = set(ast.literal_eval(res.stdout.split("LOADED ", 1)[1].splitlines()[0]))
    assert {"torch", "tokenizers", "matplotlib"} <= loaded and "lm_eval" not in loaded
