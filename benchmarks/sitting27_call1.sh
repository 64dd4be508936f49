#!/usr/bin/env bash
# One device call (2026-12-07, twenty-seventh sitting): verify the compiled prefill blocks'
# warm-up on a GPU (recompiles after start-up, logits against eager, whole-prompt times against
# run 14), the compiled 8192 TTFT run's ITL tail, the engine's GLA-2 and MLA decode steps, and
# the compiled chunked prefill's host side under cProfile.
set -o pipefail
export OUT=${OUT:-/tmp/s27}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu_before"
bash benchmarks/engine_check.sh ttftlog prefillc
grep -a "slowest" "$OUT/ttftlog/stderr_and_out" | cut -c1-900 | head -8
ENGINE_MODES=compiled ENGINE_VARIANTS=gla-2,mla ENGINE_STEPS=160 OUT=$OUT/engine \
  bash benchmarks/engine_check.sh engine
mkdir -p "$OUT/diag"
COMPILE_PREFILL=1 PREFILL_DIAG_VARIANTS=gla-2 OUT=$OUT/diag timeout 100 \
  python3 benchmarks/engine_diagnostics.py prefillhost 2>&1 | tail -5
head -40 "$OUT"/diag/prefillhost_gla-2_compiled.txt | cut -c1-200
