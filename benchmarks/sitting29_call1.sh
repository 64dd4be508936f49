#!/usr/bin/env bash
# First device call of 2026-12-07's twenty-ninth sitting (one GPU, under 10 minutes):
#   1. the engine's GPU tests at the tree the last sitting left untested on a GPU (pinned
#      non-blocking plan uploads, the mixed_steps switch, the metadata module split, prompt
#      offsets by a device subtraction): staging, captured decode and prefill, mixed steps;
#      (and hwattn/ops/argmax.py against torch.argmax on the GPU);
#   2. issue 19's decode-step targets at this tree: `xl`, B 64, L 1K and 8K, compiled, the
#      step against its byte floor, its kernels and the host beyond the queued forward
#      (engine_check.sh engine, mixed steps off as in runs 1-15);
#      then GLA-2 and MLA with HWATTN_LATENT_OUT_COPY=1 (W_UV's product into a buffer of its
#      own and a copy into rows, as before hwattn/layers/mla.py's _absorb_rows);
#   (the `serving` preset's GLA-2 against MLA was left out: little device time was left after
#   failed machine starts.)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s29c1}
mkdir -p "$OUT/engine" "$OUT/engine_copy"
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 60 python3 -m pytest -q -p no:cacheprovider tests/ops/test_argmax.py 2>&1 | tail -2
LIMIT=250 bash benchmarks/sitting28_call8.sh
ENGINE_MODES=compiled OUT=$OUT/engine bash benchmarks/engine_check.sh engine 2>&1 | tail -30
# The latent variants again with the old output absorption (an einsum, then a copy into rows)
HWATTN_LATENT_OUT_COPY=1 ENGINE_MODES=compiled ENGINE_VARIANTS=gla-2,mla OUT=$OUT/engine_copy \
  bash benchmarks/engine_check.sh engine 2>&1 | tail -14
