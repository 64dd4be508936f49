#!/usr/bin/env bash
# First device call for the next sitting (one Hopper GPU; everything printed also goes to
# $OUT/summary.txt): the strided combine launch (HWATTN_COMBINE=strided, written on
# 2026-12-07 and tested under the interpreter only) on the GPU, then timed.
#   1. tests/ops/test_combine.py (both launches, compiled) and the Hopper decode against fp64
#      under split plans with HWATTN_COMBINE=strided.
#   2. benchmarks/split_profile.py: MLA / GLA-2 at the uneven batch and B 4 x 32K and MLA at
#      B 1 x 128K, merged by the default launch and the strided one, and the uneven batch cut
#      into shorter pieces under the strided one (which the default launch made too costly).
#   3. The compiled `xl` decode step for GLA-2 and GQA-4 with each block's last residual add
#      deferred to the next block (HWATTN_DEFER_RESIDUAL=1, rewritten in one frame on
#      2026-12-07) and without, and its GPU engine test.
# If the strided launch passes and wins, make it the default (hwattn/ops/kernels/combine.py,
# COMBINE_SCHEDULE) and say so in docs/hopper.md; likewise DEFER_RESIDUAL
# (hwattn/models/compile.py) if the kernel list is a kernel a layer shorter and the step faster.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s33}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/summary.txt") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
gpu_tests() {
  echo "== $*"
  HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 150 python3 -m pytest -q \
    -p no:cacheprovider "$@" 2>&1 | grep -aE "passed|failed|FAILED|^E " | head -12
}
gpu_tests tests/ops/test_combine.py
HWATTN_COMBINE=strided gpu_tests tests/ops/test_hopper_decode.py -k "test_matches_fp64_on_hopper and default"
echo "== split_profile"
timeout 200 python3 benchmarks/split_profile.py \
  --cases mla:131072x1+1024x63,mla:4x32768,gla-2:131072x1+1024x63,gla-2:4x32768,mla:1x131072 \
  --plans default,strided --rep-ms 30 --out "$OUT/split_profile.json" 2>&1 | grep -a "^|\|Error"
timeout 100 python3 benchmarks/split_profile.py --cases mla:131072x1+1024x63,gla-2:131072x1+1024x63 \
  --plans default,strided,s2048-strided,s1024-strided,s4096-strided --rep-ms 30 \
  --out "$OUT/split_plans.json" 2>&1 | grep -a "^|\|Error"
echo "== deferred residual"
gpu_tests tests/engine/test_graph_replay.py -k "finished_in_the_cache_write and gla"
source benchmarks/engine_ab.sh  # run NAME VAR=VALUE...
run deferred HWATTN_DEFER_RESIDUAL=1 ENGINE_VARIANTS=gla-2,gqa-4
run plain ENGINE_VARIANTS=gla-2,gqa-4
