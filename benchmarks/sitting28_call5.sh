#!/usr/bin/env bash
# Fifth device call (2026-12-07, twenty-eighth sitting): a mixed step against its halves
# (engine_diagnostics.py mixedstep: 32 decode rows at 8K beside a 2016-token chunk, with the
# decode rows through the decode op and through the prefill op), then TTFT/ITL at budget 2048
# mixed and prefill-first after the combine kernels stopped specialising on the splits'
# alignment, with the run's Triton compiles in time order.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s28e}; mkdir -p "$OUT/ttft"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu_before"
export TRITON_CACHE_DIR=$OUT/tc; rm -rf "$TRITON_CACHE_DIR"
timeout 200 python3 benchmarks/engine_diagnostics.py mixedstep 2>&1 | grep -a "mixedstep\|Error\|error" | cut -c1-400
export TRITON_CACHE_DIR=$OUT/tc2  # a fresh cache: nothing the diagnostic compiled is reused
timeout 240 python3 benchmarks/engine_roofline.py --parts ttft --ttft-variants gla-2 \
  --ttft-chunks ${CHUNKS:-2048m,2048} --ttft-prefill-modes compiled --out "$OUT/ttft" > "$OUT/ttft/log" 2>&1
grep -aE "ttft |Error|warming" "$OUT/ttft/log" | cut -c1-700 | head -8
python3 benchmarks/jit_timeline.py "$TRITON_CACHE_DIR" | grep -v triton_ | tail -14
rm -rf "$TRITON_CACHE_DIR"
rm -rf "$OUT/tc" "$OUT/tc2"
