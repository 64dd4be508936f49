#!/usr/bin/env bash
# One device call (2026-12-07, twenty-seventh sitting): the prefill pieces' CUDA graphs
# (hwattn/engine/prefill_graphs.py, EngineConfig.prefill_graphs) on a GPU: their GPU test
# against eager prefill; one 8K GLA-2 prompt whole and in chunks of 2048 through the eager
# blocks, the compiled pieces launched one by one, and the pieces' graphs; then TTFT at budget
# 2048 with recompiles logged and the slowest steps, pieces with and without their graphs.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s27}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu_before"
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 80 python3 -m pytest -q -x -p no:cacheprovider \
  tests/engine/test_prefill_graphs.py 2>&1 | tail -4
mkdir -p "$OUT/prefillc" "$OUT/ttft"
timeout 170 python3 benchmarks/engine_roofline.py --parts prefill --unequal "" --variants gla-2 \
  --prefill-modes eager,pieces,compiled --out "$OUT/prefillc" 2>&1 | grep -a "prefill gla" | cut -c1-300
TORCH_LOGS=recompiles timeout 120 python3 benchmarks/engine_roofline.py --parts ttft --ttft-variants gla-2 \
  --ttft-chunks 2048 --ttft-prefill-modes compiled,pieces --out "$OUT/ttft" > "$OUT/ttft/log" 2>&1
grep -aE "ttft gla|Recompiling|guard failure" "$OUT/ttft/log" | cut -c1-600 | head -12
