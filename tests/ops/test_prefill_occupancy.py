"""The prefill kernel's tuned launches compiled for Hopper (sm_90) without a GPU: how many
programs an SM holds. The tile shapes of `triton_prefill._TUNED` were timed fastest at these
occupancies; a kernel change that costs registers can halve one and slow the launch with no
test failing. (The stale-plan bounds of 2026-12-06 took the then expanded latent launch, keys
of 192 padded to 256, 128 rows, 8 warps, from 123 to 144 registers a thread: one program per
SM instead of two, MLA's and GLA-2's paged prefill 4.7-5.6% slower on an H100. A launch of 4 warps
holds two programs at any register count, so that launch stays here as a guard of the
kernel's registers.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hwattn.ops import triton_prefill

# (key, value, RoPE key) widths padded -> (the `xl` layer it serves: tied, query heads per KV
# head, key width, value width, RoPE width, values of their own; programs per SM at the tuned
# tile shape).
LAUNCHES = {
    (128, 128, 0): ((False, 4, 128, 128, 16, False), 2),  # GQA-4
    (64, 128, 64): ((True, 4, 64, 128, 64, False), 2),  # GTA-4: 64 state dims in the key, and the RoPE key
    (256, 256, 64): ((True, 8, 256, 256, 64, False), 1),  # GLA-2 absorbed (short chunks over a context)
    (128, 128, 64): ((True, 1, 128, 128, 64, True), 2),  # MLA / GLA expanded: per-head K and V
}

# Launches outside the tuned table that guard the kernel's registers: (tied, group, d_qk, d_v,
# d_rope, split values, (block_m, block_n, warps, stages)) -> programs per SM.
GUARDS = {
    "untied-192-128x32x8": ((False, 1, 192, 128, 16, False, (128, 32, 8, 2)), 2),
}

# Compiled in a child process: the ops tests run Triton's interpreter, whose functions the
# compiler cannot take.
COMPILE_SCRIPT = """
import json, sys
from hwattn.ops import kernel_code, triton_prefill
results = []
for tied, group, d_qk, d_v, d_rope, split, *tile in json.loads(sys.argv[1]):
    kernel, config = triton_prefill.compile_sm90(
        tied=tied, group=group, d_qk=d_qk, d_v=d_v, d_rope=d_rope, split_values=split,
        config=triton_prefill.PrefillConfig(*tile[0]) if tile else None)
    res = kernel_code.resources(kernel)
    results.append(dict(res, programs=kernel_code.programs_per_sm(res, 32 * config.num_warps)))
print(json.dumps(results))
"""


def _nvidia_backend() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia.compiler") is not None
    except ImportError:
        return False


def test_every_tuned_tile_shape_is_covered():
    assert set(LAUNCHES) == set(triton_prefill._TUNED)


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its NVIDIA backend")
def test_tuned_prefill_launches_keep_their_occupancy():
    launches = {**LAUNCHES, **GUARDS}
    shapes = [shape for shape, _ in launches.values()]
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(shapes)],
                          env=dict(os.environ, TRITON_INTERPRET="0"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(reports) == len(launches)
    for (name, (_, programs)), res in zip(launches.items(), reports):
        assert res["spill_bytes"] == 0, (name, res)
        assert res["programs"] >= programs, (name, res)


@pytest.mark.parametrize("registers, shared, threads, programs", [
    (123, 114688, 256, 2),  # the guard launch: 128 registers allocated, 2 x 32 K
    (144, 114688, 256, 1),  # the same at 144: one program's registers leave no room for two
    (255, 163840, 256, 1),
    (64, 16384, 128, 8),
    (32, 0, 32, 32),  # the cap on resident programs
])
def test_programs_per_sm(registers, shared, threads, programs):
    from hwattn.ops.kernel_code import programs_per_sm

    assert programs_per_sm(dict(registers=registers, shared_bytes=shared), threads) == programs
