#!/usr/bin/env bash
# Fallback for 2026-12-07's twenty-ninth sitting, when failed machine starts had left too
# little device time for call 1: the GPU tests alone (hwattn/ops/argmax.py against
# torch.argmax; the engine's staging, captured decode and prefill, mixed steps, which run the
# new argmax and the latent variants' W_UV rows), then the engine's compiled decode step for
# GLA-2 and GQA-4 only (its kernel list shows whether the copy and PyTorch's argmax are gone).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s29c3}
mkdir -p "$OUT/engine"
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 60 python3 -m pytest -q -p no:cacheprovider \
  tests/ops/test_argmax.py 2>&1 | tail -2
LIMIT=200 bash benchmarks/sitting28_call8.sh
ENGINE_MODES=compiled ENGINE_VARIANTS=gla-2,gqa-4 OUT=$OUT/engine \
  bash benchmarks/engine_check.sh engine 2>&1 | tail -16
