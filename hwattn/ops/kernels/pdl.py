"""Programmatic dependent launch (PDL) of the decode step's own kernels (HWATTN_PDL=1, off).

A kernel launched with PDL (`launch_pdl=True`, sm_90 and later) may be put on the SMs while
the kernel before it in the stream is still running; it must then wait
(`griddepcontrol.wait`) before it touches anything that kernel wrote. In a decode step of 24
layers, each of a few hundred kernels otherwise starts only once its predecessor has drained
and its memory is flushed: a launch gap of a microsecond or two a kernel (run 19,
docs/results/engine.md: 340-412 kernels a step, their gaps 3-4% of the step at L = 1K).

Our kernels wait first, before any load and before any early return, and then let the next
kernel launch (`griddepcontrol.launch_dependents`): so a kernel of ours never completes
before its predecessor has, and every later kernel, PDL or not, sees every earlier kernel's
writes, as in plain stream order. What overlaps is the next grid's launch and placement with
this one's run. The kernel after ours must wait likewise before reading our output: our
kernels do, Inductor's do (TORCHINDUCTOR_ENABLE_PDL=1: it waits before the first read of a
buffer its predecessor wrote, and always in a graph's first kernel), and a kernel launched
without PDL (cuBLAS) starts after ours completes.

`PDL` is each kernel's constexpr switch (off under the interpreter, which has no inline
assembly); `launch_options` gives a launch's keywords.

Measured on an H100 (run 20, docs/results/engine.md): the `xl` decode step was 0.3-1.1%
slower with ours and Inductor's kernels under PDL than with neither, and GTA-4's B 1 x 128K
call 1.3 µs slower with ours; so it is off, kept for experiments (a kernel that could read
its weights before it waits, such as a GEMM, is where it might pay).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from hwattn.switches import env_flag

PDL_ENABLED = env_flag("HWATTN_PDL")


def use_pdl(device) -> bool:
    """Whether kernels launched on `device` (a torch.device) go with PDL: HWATTN_PDL=1, a CUDA
    device of compute capability 9 or more, and compiled kernels (not the interpreter)."""
    if not PDL_ENABLED or device.type != "cuda":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(device) -> dict:
    """The keywords a launch of one of our PDL-aware kernels adds: the kernel's `PDL`
    constexpr, and Triton's `launch_pdl` option when it is on."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(device) else {"PDL": False}


@triton.jit
def wait_for_predecessor(PDL: tl.constexpr):
    """First statement of a PDL-aware Triton kernel: with PDL, wait until the kernel before
    it has completed and its writes are visible, then let the next kernel launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@gluon.jit
def gluon_wait_for_predecessor(PDL: gl.constexpr):
    """`wait_for_predecessor` for a Gluon kernel."""
    if PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)
