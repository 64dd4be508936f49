#!/usr/bin/env bash
# First device call of 2026-12-07's thirtieth sitting (one GPU, under 10 minutes):
#   1. GPU tests of what no GPU has run yet: hwattn/ops/argmax.py against torch.argmax; the
#      engine's staging, captured decode and prefill and mixed steps (pinned non-blocking
#      uploads, the mixed_steps switch, the metadata split, W_UV's rows through
#      hwattn::absorb_rows); the composed absorptions (HWATTN_COMPOSE_ABSORB) in captured,
#      compiled steps against the separate products run eagerly;
#   2. issue 19's decode-step targets at this tree: `xl`, B 64, L 1K and 8K, compiled
#      (engine_check.sh engine: the step against its byte floor, its 40 costliest kernels,
#      the host beyond the queued forward);
#   3. the same step for GLA-2 and MLA with the absorptions composed into the projections
#      (HWATTN_COMPOSE_ABSORB=1: two batched GEMMs fewer a layer, more weight bytes);
#   4. GLA-2 and MLA with W_UV's product copied into rows as before (HWATTN_LATENT_OUT_COPY=1);
#   5. GQA-4 and GLA-2 with cuBLASLt preferred for every GEMM (TORCH_BLAS_PREFER_CUBLASLT=1;
#      the down projection was 1.14x faster under it on an H100, the others within 5%).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s30c1}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 60 python3 -m pytest -q -p no:cacheprovider \
  tests/ops/test_argmax.py 2>&1 | tail -2
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 ${LIMIT:-240} python3 -m pytest -q -p no:cacheprovider \
  tests/engine/test_staging.py \
  tests/engine/test_graph_replay.py::test_captured_decode_on_the_gpu_matches_eager \
  tests/engine/test_graph_replay.py::test_composed_absorptions_on_the_gpu_decode_as_the_separate_products \
  tests/engine/test_graph_replay.py::test_captured_latent_decode_on_the_gpu_reads_its_staged_plan \
  tests/engine/test_prefill_graphs.py::test_captured_prefill_on_the_gpu_matches_eager \
  "tests/engine/test_packed_prefill.py::test_mixed_steps_on_the_gpu_match_prefill_first[gla-2-bf16]" \
  2>&1 | grep -aE "passed|failed|FAILED|Error|^E " | head -20
run() {  # name, then environment assignments for engine_check.sh engine
  local name=$1; shift
  echo "== $name"
  env "$@" ENGINE_MODES=compiled OUT=$OUT/$name bash benchmarks/engine_check.sh engine 2>&1 \
    | grep -aE "^\| (gqa|gta|gla|mla)|^Copy|decode .* step" | head -30
}
run engine
run composed HWATTN_COMPOSE_ABSORB=1 ENGINE_VARIANTS=gla-2,mla
[[ -n ${SHORT:-} ]] && exit 0  # (SHORT=1: with little device time left, stop here)
run rowcopy HWATTN_LATENT_OUT_COPY=1 ENGINE_VARIANTS=gla-2,mla
run cublaslt TORCH_BLAS_PREFER_CUBLASLT=1 ENGINE_VARIANTS=gqa-4,gla-2
