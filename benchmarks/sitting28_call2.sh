#!/usr/bin/env bash
# Second device call (2026-12-07, twenty-eighth sitting): mixed steps whose decode rows attend
# through the paged decode op (AttentionMetadata.split_decode_rows). TTFT/ITL of 64 Poisson
# 8K GLA-2 prompts at 16/s with and without mixed steps at budgets 2048 and 8192, prefill graphs
# on (after the GPU test of mixed steps against prefill-first steps); the mixed runs' slowest steps show any warm-up left on the serving path.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s28b}; mkdir -p "$OUT/ttft"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu_before"
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 120 python3 -m pytest -q -x -p no:cacheprovider \
  tests/engine/test_packed_prefill.py::test_mixed_steps_on_the_gpu_match_prefill_first 2>&1 | tail -3
timeout 300 python3 benchmarks/engine_roofline.py --parts ttft --ttft-variants ${VARIANTS:-gla-2} \
  --ttft-chunks ${CHUNKS:-2048m,2048,8192m} --ttft-prefill-modes compiled --out "$OUT/ttft" > "$OUT/ttft/log" 2>&1
grep -aE "ttft |Error|error" "$OUT/ttft/log" | cut -c1-700 | head -12
