#!/usr/bin/env bash
# Third device call (2026-12-07, twenty-eighth sitting): where mixed steps' one-second stalls
# come from. The rest of the GPU test of mixed steps; then TTFT/ITL at budget 2048 with mixed
# steps (prefill kernel no longer specialised on the block table's and lse's strides), and the
# Triton compiles and dynamo recompiles of that run in time order.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s28c}; mkdir -p "$OUT/ttft"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu_before"
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 150 python3 -m pytest -q -x -p no:cacheprovider \
  tests/engine/test_packed_prefill.py::test_mixed_steps_on_the_gpu_match_prefill_first -k "mla or bf16" 2>&1 | tail -3
export TRITON_CACHE_DIR=$OUT/tc; rm -rf "$TRITON_CACHE_DIR"
date +"start %T"
TORCH_LOGS=recompiles timeout 200 python3 benchmarks/engine_roofline.py --parts ttft --ttft-variants gla-2 \
  --ttft-chunks ${CHUNKS:-2048m} --ttft-prefill-modes compiled --out "$OUT/ttft" > "$OUT/ttft/log" 2>&1
grep -aE "ttft |Error" "$OUT/ttft/log" | cut -c1-900 | head -6
grep -aE "Recompiling" "$OUT/ttft/log" | cut -c1-160 | tail -8
python3 benchmarks/jit_timeline.py "$TRITON_CACHE_DIR" | tail -40
rm -rf "$TRITON_CACHE_DIR"
