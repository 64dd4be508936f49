#!/usr/bin/env bash
# Second device call of 2026-12-07's twenty-ninth sitting (carry .ext, from
# benchmarks/fetch_external_kernels.sh): issue 22's side-by-side table at this tree, FlashMLA
# and FA3 (vLLM 0.26.0's prebuilt libraries) timed in this process beside the Hopper kernels:
# MLA and GLA-2, h_q 128, B 128, L = $CONTEXTS (default 16K), L_q 1 / 2 / 4,
# then GTA-4 against GQA-4 at B 128, L 16K and at B 1, L 128K (hopper_decode.py).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s29c2}
mkdir -p "$OUT"
nvidia-smi -q -d CLOCK,POWER,TEMPERATURE > "$OUT/gpu_state_before.txt" 2>&1
[[ -d .ext ]] && export HWATTN_EXTERNAL_DIR=$PWD/.ext
timeout 300 python3 -m hwattn bench decode --variants mla,gla-2 --batch 128 \
  --context ${CONTEXTS:-16384} --query-len 1,2,4 --no-sdpa --warmup-ms 10 --rep-ms 60 \
  --out "$OUT/decode_external.json" 2>&1 | grep -v "^row " | tail -16
timeout 100 python3 benchmarks/hopper_decode.py --only timing --rep-ms 60 --variants default \
  --shapes gta4-b128-16k,gta4-b1-128k --out "$OUT/gta_gqa.json" 2>&1 | tail -6
