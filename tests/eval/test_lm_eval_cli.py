"""`lm_eval --model hwattn` from lm-evaluation-harness's own command line, through the start-up
hook hwattn installs (hwattn-lm-eval.pth), on a tiny checkpoint and local JSONL tasks."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

import hwattn

pytestmark = pytest.mark.slow  # the lm_eval command line in a subprocess

REPO = Path(hwattn.__file__).resolve().parent.parent
PTH = "hwattn-lm-eval.pth"

# lm-eval's console script, run after `site` has processed a directory holding our .pth (as
# it does for site-packages when hwattn is installed).
_LM_EVAL_WITH_SITE_DIR = """
import site, sys
site.addsitedir(sys.argv.pop(1))
from lm_eval.__main__ import cli_evaluate
sys.argv[0] = "lm_eval"
cli_evaluate()
"""


def _env(tmp_path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    return env


def _lm_eval(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """Run the lm_eval command line: the installed script if hwattn's .pth is installed,
    else the same entry point with the repository's .pth added as a site directory."""
    installed = any((Path(p) / PTH).is_file() for p in site.getsitepackages())
    script = Path(sys.executable).with_name("lm_eval")
    if installed and script.is_file():
        cmd = [str(script), *args]
    else:
        site_dir = tmp_path / "site"
        site_dir.mkdir(exist_ok=True)
        (site_dir / PTH).write_text((REPO / PTH).read_text())
        cmd = [sys.executable, "-c", _LM_EVAL_WITH_SITE_DIR, str(site_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=_env(tmp_path))


def test_lm_eval_command_line_runs_the_hwattn_model(trained, dataset_dir, tmp_path, capsys):
    """The tasks `hwattn eval --write-tasks` writes, run by `lm_eval --model hwattn` with the
    harness's default device (cuda:0: on a CPU-only machine the CPU, as `--model hf` does)."""
    from hwattn.cli import main
    from hwattn.data.loader import TokenDataset
    from hwattn.eval.lm_eval_adapter import HwattnLM
    from hwattn.eval.tasks import read_jsonl, score_cloze, score_mc

    tasks = tmp_path / "tasks"
    assert main(["eval", "--data", str(dataset_dir), "--write-tasks", str(tasks), "--cloze", "6",
                 "--mc", "4"]) == 0
    printed = capsys.readouterr().out
    assert "--tasks hwattn_cloze,hwattn_mc --include_path" in printed
    assert sorted(p.name for p in tasks.iterdir()) == ["cloze.jsonl", "hwattn_cloze.yaml",
                                                      "hwattn_mc.yaml", "mc.jsonl"]
    ckpt = trained[0] / "checkpoint"
    res = _lm_eval(["--model", "hwattn", "--model_args", f"pretrained={ckpt},max_length=256",
                    "--tasks", "hwattn_cloze,hwattn_mc", "--include_path", str(tasks),
                    "--batch_size", "4", "--output_path", str(tmp_path / "out")], tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    files = sorted((tmp_path / "out").rglob("results_*.json"))
    assert files, res.stdout[-2000:]
    results = json.loads(files[-1].read_text())["results"]
    data = TokenDataset(dataset_dir)
    lm = HwattnLM.from_checkpoint(ckpt)
    ours_c = score_cloze(lm.model, data.tokenizer, read_jsonl(tasks / "cloze.jsonl"), 256)
    ours_m = score_mc(lm.model, data.tokenizer, read_jsonl(tasks / "mc.jsonl"), 256)
    assert ours_c["n"] == 6 and ours_m["n"] == 4
    assert results["hwattn_cloze"]["acc,none"] == pytest.approx(ours_c["acc"])
    assert results["hwattn_mc"]["acc,none"] == pytest.approx(ours_m["acc"])
    assert results["hwattn_mc"]["acc_norm,none"] == pytest.approx(ours_m["acc_norm"])


def test_harness_device_falls_back_as_the_hf_model_does(trained, monkeypatch, caplog):
    import torch

    from hwattn.eval import lm_eval_adapter
    from hwattn.eval.lm_eval_adapter import HwattnLM, harness_device

    ckpt = str(trained[0] / "checkpoint")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = HwattnLM.create_from_arg_string(f"pretrained={ckpt}", {"device": "cuda:0",
                                                                "batch_size": 2})
    assert lm.device.type == "cpu" and "'cuda:0' is not available here; using cpu" in caplog.text
    assert harness_device("cpu") == "cpu" and harness_device(None) == "auto"
    with pytest.raises(ValueError, match="--device must be"):
        harness_device("gpu0")
    with pytest.raises(ValueError, match="device 'cuda' is not available on this machine"):
        HwattnLM(pretrained=ckpt, device="cuda")  # asked for by name in model_args: refused
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert harness_device("cuda:3") == "cuda" and harness_device("cuda:0") == "cuda:0"
    assert lm_eval_adapter._present(torch.device("cuda:0"))


def test_start_up_hook_registers_lazily_and_keeps_the_built_in_models(tmp_path):
    code = ("import sys, hwattn_lm_eval_hook; hwattn_lm_eval_hook.install()\n"
            "from lm_eval.api.registry import model_registry as r\n"
            "print(sorted(k for k in r.keys() if k in ('hf', 'local-completions', 'hwattn')),\n"
            "      'torch' in sys.modules, 'hwattn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300, cwd=tmp_path, env=_env(tmp_path)).stdout.split("\n")[0]
    assert out == "['hf', 'hwattn', 'local-completions'] False False"


def test_model_args_are_checked(trained):
    from hwattn.eval.lm_eval_adapter import HwattnLM

    ckpt = str(trained[0] / "checkpoint")
    lm = HwattnLM.create_from_arg_string(f"pretrained={ckpt},max_length=128",
                                         {"batch_size": "auto", "device": "cpu", "max_batch_size": 64})
    assert lm.max_length == 128 and lm.batch_size == 16
    with pytest.raises(ValueError, match="unknown.*dtype"):
        HwattnLM.create_from_arg_obj({"pretrained": ckpt, "dtype": "bfloat16"})
    with pytest.raises(ValueError, match="key=value"):
        HwattnLM.create_from_arg_string(f"pretrained={ckpt},oops")
