#!/usr/bin/env bash
# One device call: the ops tests compiled on the GPU, a few tile-config alternatives on the
# headline shapes, then the standard suite. Logs and JSON go to $OUT.
#   run: bash benchmarks/decode_gpu.sh [tests|explore|explore2|fp8|standard ...]
#   (default: tests explore standard)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/decode_out}; mkdir -p "$OUT"
steps=${*:-tests explore standard}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/log"
python3 -m pip show flash_mla flash-attn flash_attn_3 flashinfer-python 2>&1 | grep -E "^(Name|Version)|not found" | tee -a "$OUT/log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/log"
bench() { timeout "$1" python3 -m hwattn bench decode --warmup-ms 10 --rep-ms 60 "${@:2}" 2>&1 | tee -a "$OUT/log" | grep -v "^row "; }
for step in $steps; do
  echo "== $step" | tee -a "$OUT/log"
  case $step in
    tests)
      HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 150 python3 -m pytest -q -x -n 8 \
        -p no:cacheprovider -p no:benchmark tests/ops 2>&1 | tail -25 | tee -a "$OUT/log" ;;
    explore)  # run 2: tile configs on the headline shapes
      bench 90 --variants gla-2 --context 16384 --query-len 1 --no-sdpa \
        --configs "64:8:2:128;32:8:4:128;32:4:3:128;32:4:2:128"
      bench 60 --variants gla-2 --context 16384 --query-len 2 --no-sdpa \
        --configs "32:8:2:128;32:8:3:64;32:4:3:64;64:8:3:128"
      bench 60 --variants mla --context 16384 --query-len 1,2 --no-sdpa --configs "16:8:4:64;32:8:3:32"
      bench 60 --variants gqa-4,gta-4 --tp 1,4 --context 16384 --no-sdpa \
        --configs "64:4:3:128;32:4:4:128" ;;
    explore2)  # run 3: what run 2 left open
      bench 60 --variants gla-2 --context 16384 --query-len 2 --no-sdpa --configs "32:8:3:128"
      bench 60 --variants mla --context 16384 --query-len 1 --no-sdpa --configs "64:8:2:64"
      bench 60 --variants gta-4 --context 8192,16384 --no-sdpa --configs "64:4:5:128;64:8:4:128" ;;
    fp8)
      bench 90 --variants gla-2,mla,gqa-4,gta-4 --context 16384 --cache-dtype fp8 \
        --out "$OUT/fp8.json" ;;
    standard)
      bench 330 --suite standard --out "$OUT/standard.json" ;;
  esac
done
