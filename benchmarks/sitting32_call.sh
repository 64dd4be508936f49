#!/usr/bin/env bash
# Last device call of 2026-12-07's thirty-second sitting (one Hopper GPU; carry .ext from
# benchmarks/fetch_external_kernels.sh for FlashMLA / FA3; everything printed also goes to
# $OUT/summary.txt):
#   1. GPU tests: the combine kernels (wide column blocks included), the state store
#      (fp32 tolerance).
#   2. benchmarks/split_profile.py: MLA / GLA-2 at the uneven batch and B 4 x 32K, MLA B 1
#      x 128K and GTA-4 (h_q 32) B 1 x 128K, each merged by the former combine launch
#      (`narrow`) and the new one (`default`), attention and combine timed apart.
#   3. The compiled `xl` decode step (engine_check.sh engine) for GLA-2 and GQA-4 at this
#      tree's defaults (the state store on for GLA-2, the residual add back in its frame).
#   4. `hwattn bench decode`: MLA and GLA-2 at the uneven batch and B 4 x 32K beside FlashMLA
#      and FA3 in this process.
#   5. MLA's uneven batch under other split plans (pieces of 1K / 2K / 4K, 2K shortest).
#   6. The Hopper decode against fp64 under split plans (default schedule).
# Most wanted first: a call cut short by the device budget still returns what it printed.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s32}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/summary.txt") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
[[ -d .ext ]] && export HWATTN_EXTERNAL_DIR=$PWD/.ext
gpu_tests() {
  echo "== $*"
  HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 150 python3 -m pytest -q \
    -p no:cacheprovider "$@" 2>&1 | grep -aE "passed|failed|FAILED|^E " | head -12
}
gpu_tests tests/ops/test_combine.py
gpu_tests tests/ops/test_plan_store.py -k "store_states or finishing"
echo "== split_profile"
timeout 200 python3 benchmarks/split_profile.py \
  --cases mla:131072x1+1024x63,mla:4x32768,gla-2:131072x1+1024x63,gla-2:4x32768,mla:1x131072,gta-4@32:1x131072 \
  --plans narrow,default --out "$OUT/split_profile.json" 2>&1 | grep -a "^|"
echo "== engine step at this tree's defaults"
source benchmarks/engine_ab.sh
run engine ENGINE_VARIANTS=gla-2,gqa-4
echo "== bench decode (FlashMLA, FA3 in this process)"
timeout 150 python3 -m hwattn bench decode --variants mla,gla-2 --mixed 131072x1+1024x63 \
  --query-len 1 --no-sdpa --warmup-ms 10 --rep-ms 60 --out "$OUT/decode_uneven.json" 2>&1 \
  | grep -v "^row " | tail -8
timeout 120 python3 -m hwattn bench decode --variants mla,gla-2 --batch 4 --context 32768 \
  --query-len 1 --no-sdpa --warmup-ms 10 --rep-ms 60 --out "$OUT/decode_b4.json" 2>&1 \
  | grep -v "^row " | tail -8
echo "== split_profile: other plans for the uneven batch"
timeout 100 python3 benchmarks/split_profile.py --cases mla:131072x1+1024x63 \
  --plans default,s1024,s2048,s4096,m2048 --out "$OUT/split_plans.json" 2>&1 | grep -a "^|"
gpu_tests tests/ops/test_hopper_decode.py -k "test_matches_fp64_on_hopper and default"
