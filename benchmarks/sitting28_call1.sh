#!/usr/bin/env bash
# One device call (2026-12-07, twenty-eighth sitting): the prefill graphs' GPU test with the
# present capture order (decode graphs first); TTFT/ITL at budget 2048 with and without mixed
# prefill+decode steps, prefill graphs on (compiled) and off (pieces), to see whether mixed
# steps bound the ITL tail that faster prefill exposes; then one 8K prompt in chunks of 2048
# for GQA-4, GTA-4 and MLA through eager blocks, compiled pieces and the pieces' graphs.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s28}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee "$OUT/gpu_before"
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 90 python3 -m pytest -q -x -p no:cacheprovider \
  tests/engine/test_prefill_graphs.py::test_captured_prefill_on_the_gpu_matches_eager 2>&1 | tail -3
mkdir -p "$OUT/ttft" "$OUT/prefillc"
TORCH_LOGS=recompiles timeout 200 python3 benchmarks/engine_roofline.py --parts ttft --ttft-variants gla-2 \
  --ttft-chunks 2048m,2048 --ttft-prefill-modes compiled,pieces --out "$OUT/ttft" > "$OUT/ttft/log" 2>&1
grep -aE "ttft gla|Recompiling|guard failure" "$OUT/ttft/log" | cut -c1-600 | head -12
timeout 240 python3 benchmarks/engine_roofline.py --parts prefill --unequal "" --variants gqa-4,gta-4,mla \
  --prefill-modes eager,pieces,compiled --out "$OUT/prefillc" 2>&1 | grep -a "prefill " | cut -c1-300
