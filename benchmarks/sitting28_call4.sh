#!/usr/bin/env bash
# Fourth device call (2026-12-07, twenty-eighth sitting): mixed steps after the kernel warm-up
# (ModelRunner.warm_kernels) and with the prompt rows' table and lengths copied (aligned).
# TTFT/ITL of 64 Poisson 8K GLA-2 prompts at 16/s, mixed and prefill-first, budgets 2048 and
# 8192, with every Triton compile of the run in time order beside the runs' start times.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s28d}; mkdir -p "$OUT/ttft"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu_before"
export TRITON_CACHE_DIR=$OUT/tc; rm -rf "$TRITON_CACHE_DIR"
timeout 300 python3 benchmarks/engine_roofline.py --parts ttft --ttft-variants ${VARIANTS:-gla-2} \
  --ttft-chunks ${CHUNKS:-2048m,2048,8192m,8192} --ttft-prefill-modes compiled --out "$OUT/ttft" > "$OUT/ttft/log" 2>&1
grep -aE "ttft |Error|warming" "$OUT/ttft/log" | cut -c1-700 | head -16
python3 benchmarks/jit_timeline.py "$TRITON_CACHE_DIR" | tail -14
rm -rf "$TRITON_CACHE_DIR"
