#!/usr/bin/env bash
# First device call for the next sitting (one Hopper GPU, about 7 minutes; everything printed
# also goes to $OUT/summary.txt). Carry `.ext` for part 3.
#   1. Where GTA-4's B 1 x 128K call spends the 14 us its two kernels do not (issue 22: 0.665x
#      GQA-4's time against <= 0.65x): benchmarks/split_profile.py now reports each replayed
#      call's span (first kernel's start to last kernel's end) and the idle time inside it, so
#      the timed median minus the span is what lies outside the kernels. GQA-4's call beside it
#      (the Triton kernel under its backend's plan), and the uneven and B 4 batches.
#   2. The `xl` decode step of the four variants at this tree's defaults (the deferred
#      residual on since 2026-12-08): on an H200, issue 19's card, if this call got one.
#   3. On an H200 only: issue 22's side-by-side rows beside FlashMLA / FA3 (B 128 at 16K,
#      L_q 1 / 2 / 4; B 4 at 32K and the uneven batch).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s34}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/summary.txt") 2>&1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "$gpu"
echo "== split_profile timelines"
timeout 150 python3 benchmarks/split_profile.py \
  --cases gta-4@32:1x131072,gqa-4@32:1x131072,mla:131072x1+1024x63,gla-2:131072x1+1024x63,mla:4x32768 \
  --plans default --rep-ms 30 --out "$OUT/timelines.json" 2>&1 | grep -a "^|\|Error"
if [[ $gpu == *H200* ]]; then
  source benchmarks/engine_ab.sh  # run NAME VAR=VALUE...
  run defaults4 ENGINE_VARIANTS=gqa-4,gta-4,gla-2,mla
  [[ -d .ext ]] && export HWATTN_EXTERNAL_DIR=$PWD/.ext  # (FlashMLA and FA3, carried)
  timeout 200 python3 -m hwattn bench decode --variants mla,gla-2 --batch 128 --context 16384 \
    --query-len 1,2,4 --no-sdpa --warmup-ms 10 --rep-ms 60 --out "$OUT/decode_b128.json" 2>&1 \
    | grep -v "^row " | tail -12
  timeout 120 python3 -m hwattn bench decode --variants mla,gla-2 --batch 4 --context 32768 \
    --query-len 1 --no-sdpa --warmup-ms 10 --rep-ms 60 --out "$OUT/decode_b4.json" 2>&1 \
    | grep -v "^row " | tail -8
  timeout 150 python3 -m hwattn bench decode --variants mla,gla-2 --mixed 131072x1+1024x63 \
    --query-len 1 --no-sdpa --warmup-ms 10 --rep-ms 60 --out "$OUT/decode_uneven.json" 2>&1 \
    | grep -v "^row " | tail -8
else
  echo "== not an H200: the engine step and the side-by-side rows are left for an H200"
fi
# A second call, on any Hopper card: Inductor's Triton GEMM templates autotuned for each `xl`
# decode GEMM alone, beside cuBLASLt (the whole step under max-autotune did not finish
# compiling in a call on 2026-12-08):
#   OUT=$OUT/b bash -c 'mkdir -p $OUT && PYTHONPATH=$PWD timeout 560 python3 \
#     benchmarks/engine_diagnostics.py gemmtune 2>&1 | tee $OUT/summary.txt | tail -30'
