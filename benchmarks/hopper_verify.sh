#!/usr/bin/env bash
# One device call verifying the Hopper backend on one H200/H100 (about 5 minutes; every part has
# its own time limit, so a hang costs only that part). Everything goes to $OUT:
#   1. tests/ops/test_hopper_decode.py on the GPU (HWATTN_TEST_DEVICE=cuda, compiled Triton): every
#      schedule, the default configs and the "hopper" backend against the fp64 truth on hostile
#      paged caches; its sm_90 compile checks run beside it on the CPU cores;
#   2. the engine with backend "auto" (= hopper) against backend "triton" on mini GLA-2, MLA and
#      GTA-4 models (d_h 128): teacher-forced logits through CUDA-graph replays, and greedy
#      generation compared token by token (benchmarks/hopper_engine_check.py);
#   3. `hwattn bench decode` on the headline shapes: the Hopper backend beside Triton and SDPA, % of
#      the roofline measured in the same run (B 128 at 16K for GLA-2 / MLA at L_q 1 and 2, GTA-4 and
#      GQA-4; B 4 at 32K split-KV for MLA, GLA-2, GTA-4).
#   run: bash benchmarks/hopper_verify.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/hopper_verify_out}; mkdir -p "$OUT"
status=0
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/log"
git log -1 --format='commit %H %s' 2>/dev/null | tee -a "$OUT/log"

# The sm_90 compile checks need no GPU: run them on the CPU cores while the GPU works.
(TRITON_INTERPRET=0 timeout 240 python3 -m pytest -q -p no:cacheprovider \
   tests/ops/test_hopper_decode.py -k compiles > "$OUT/compile_tests.log" 2>&1
 echo "rc=$?" >> "$OUT/compile_tests.log") &
compile_pid=$!

echo "== 1. tests/ops/test_hopper_decode.py on the GPU" | tee -a "$OUT/log"
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 170 python3 -m pytest -q -p no:cacheprovider \
  -rs tests/ops/test_hopper_decode.py -k "not compiles" > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -25 "$OUT/gpu_tests.log" | tee -a "$OUT/log"

echo "== 2. engine: backend auto (hopper) vs triton" | tee -a "$OUT/log"
timeout 150 python3 benchmarks/hopper_engine_check.py --steps 16 --max-tokens 24 2>&1 \
  | tee "$OUT/engine.log" | grep -v '^{' | tee -a "$OUT/log" || status=1

wait $compile_pid
echo "== sm_90 compile checks (CPU)" | tee -a "$OUT/log"
tail -4 "$OUT/compile_tests.log" | tee -a "$OUT/log"
grep -q "rc=0" "$OUT/compile_tests.log" || status=1

echo "== 3. hwattn bench decode: Hopper beside Triton and SDPA" | tee -a "$OUT/log"
bench() {  # name, time limit, arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m hwattn bench decode "$@" --warmup-ms 10 --rep-ms 50 \
    --out "$OUT/decode_$name.json" 2>&1 | tee "$OUT/decode_$name.log" | grep -v '^row \|^{' \
    | tee -a "$OUT/log" || status=1
}
bench b128_latent 80 --variants gla-2,mla --batch 128 --context 16384 --query-len 1,2
bench b128_gta 45 --variants gta-4,gqa-4 --batch 128 --context 16384
bench b4_split 55 --variants mla,gla-2,gta-4 --batch 4 --context 32768
echo "verify status $status" | tee -a "$OUT/log"
exit $status
