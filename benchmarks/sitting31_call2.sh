#!/usr/bin/env bash
# Second and third device calls of 2026-12-07's thirty-first sitting (one GPU; everything
# printed also goes to $OUT/summary.txt, each engine run keeps only its .json and .md):
#   PART=tests (default): the GPU tests of `AttentionBackend.store_states` (the Triton store
#     that norms and rotates a layer's states: tests/ops/test_plan_store.py), of decode steps
#     finishing their states in the cache write (compiled, captured, fp32, GTA-4 / GLA-2 /
#     MLA) and the captured decode test again (now under cuBLASLt); then prefill with the
#     engine's BLAS preference (HWATTN_BLAS, cuBLASLt) beside cuBLAS (HWATTN_BLAS=cublas).
#   PART=engine: the compiled `xl` decode step (engine_check.sh engine) at this tree for
#     $VARIANTS (default GTA-4, GLA-2, MLA) with HWATTN_FUSED_STATE_STORE=1 (norm and RoPE
#     done by the store) and HWATTN_DEFER_RESIDUAL=1 (each block's last residual add in the
#     next block's norm), then the same without them (the defaults), in one call so the times
#     compare directly; the kernel lists tell the two changes apart.
#   PART=one: what fits one call: the engine A/B for GLA-2 and GTA-4, the store tests, the
#     GPU engine test for GLA-2, then the prefill A/B. PART=min: the same with the A/B for
#     GLA-2 alone.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s31c2}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/summary.txt") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
FINISHED=tests/engine/test_graph_replay.py::test_states_finished_in_the_cache_write_on_the_gpu_decode_as_before
TESTS=("tests/ops/test_plan_store.py -k store_states or finishing" "$FINISHED"
       tests/engine/test_graph_replay.py::test_captured_decode_on_the_gpu_matches_eager)
if [[ ${PART:-tests} == one || ${PART:-tests} == min ]]; then
  TESTS=("tests/ops/test_plan_store.py -k store_states or finishing" "$FINISHED[gla-2]")
fi
source benchmarks/engine_ab.sh  # run NAME VAR=VALUE...
if [[ ${PART:-tests} != engine ]]; then
  if [[ $PART == one || $PART == min ]]; then  # the A/B first, then the tests, prefill last
    ab=gla-2,gta-4
    [[ $PART == min ]] && ab=gla-2
    run fused HWATTN_FUSED_STATE_STORE=1 HWATTN_DEFER_RESIDUAL=1 ENGINE_VARIANTS=$ab
    run unfused ENGINE_VARIANTS=$ab
  fi
  for t in "${TESTS[@]}"; do
    echo "== $t"
    if [[ $t == *" -k "* ]]; then
      HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 120 python3 -m pytest -q \
        -p no:cacheprovider "${t%% -k *}" -k "${t#* -k }" 2>&1 \
        | grep -aE "passed|skipped|failed|FAILED|Error|^E |Timeout" | head -8
    else
      HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 200 python3 -m pytest -q \
        -p no:cacheprovider "$t" 2>&1 | grep -aE "passed|skipped|failed|FAILED|Error|^E |Timeout" | head -8
    fi
  done
  for blas in cublaslt cublas; do
    echo "== prefill HWATTN_BLAS=$blas"
    mkdir -p "$OUT/prefill_$blas"
    HWATTN_BLAS=$blas timeout 140 python3 benchmarks/engine_roofline.py --parts prefill \
      --variants gla-2 --prefill-modes compiled \
      --out "$OUT/prefill_$blas" 2>&1 | grep -aE "^\[|^\||MFU|TFLOP" | tail -24
    rm -f "$OUT/prefill_$blas"/*.png
  done
  exit 0
fi
run fused HWATTN_FUSED_STATE_STORE=1 HWATTN_DEFER_RESIDUAL=1 ENGINE_VARIANTS=${VARIANTS:-gta-4,gla-2,mla}
run unfused ENGINE_VARIANTS=${VARIANTS:-gta-4,gla-2,mla}
