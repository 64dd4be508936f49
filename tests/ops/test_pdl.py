"""HWATTN_PDL: which launches of our kernels go with programmatic dependent launch
(`hwattn.ops.kernels.pdl`). What the kernels compile to with it is checked by
test_sm90_compile.py (the wait and the trigger in the PTX, on every kernel of the decode step);
that it decodes as without it, on the GPU (tests/engine/test_graph_replay.py)."""

from __future__ import annotations

import subprocess
import sys

import torch

from hwattn.ops.kernels import pdl


def test_off_by_default_and_never_off_a_gpu(monkeypatch):
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setattr(pdl, "PDL_ENABLED", True)
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    assert not pdl.use_pdl(torch.device("cpu"))


def test_on_for_a_hopper_gpu_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(pdl, "PDL_ENABLED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pdl.launch_options(torch.device("cuda")) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert pdl.launch_options(torch.device("cuda")) == {"PDL": False}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.launch_options(torch.device("cuda")) == {"PDL": False}


def test_a_bad_setting_is_refused_by_name():
    done = subprocess.run([sys.executable, "-c", "import hwattn.ops.kernels.pdl"],
                          env={"HWATTN_PDL": "yes", "PATH": ""}, capture_output=True, text=True)
    assert done.returncode != 0 and "HWATTN_PDL must be 0 or 1, got 'yes'" in done.stderr
