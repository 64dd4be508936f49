#!/usr/bin/env bash
# One device call (2026-12-07, twenty-seventh sitting): the prefill pieces' CUDA graphs
# (hwattn/engine/prefill_graphs.py) on a GPU: their test against eager prefill, one 8K prompt
# whole and in chunks of 2048 through eager blocks, compiled pieces launched one by one, and
# the pieces' graphs; then TTFT at budgets 8192 and 2048 with recompiles logged and the
# slowest steps, compiled pieces with and without their graphs.
set -o pipefail
export OUT=${OUT:-/tmp/s27}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu_before"
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 100 python3 -m pytest -q -x -p no:cacheprovider \
  tests/engine/test_prefill_graphs.py 2>&1 | tail -4
PREFILL_VARIANTS=gla-2,gqa-4 PREFILL_MODES=eager,pieces,compiled bash benchmarks/engine_check.sh prefillc
TTFT_MODES=compiled,pieces bash benchmarks/engine_check.sh ttftlog
