#!/usr/bin/env bash
# Last device call (2026-12-07, twenty-eighth sitting): the GPU tests of the engine at the
# final tree (kernel warm-up at start-up, mixed steps on by default): staging, captured decode,
# captured prefill, and mixed steps against prefill-first steps for GLA-2 (fp32, bf16).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 ${LIMIT:-330} python3 -m pytest -q -p no:cacheprovider \
  tests/engine/test_staging.py \
  tests/engine/test_graph_replay.py::test_captured_decode_on_the_gpu_matches_eager \
  tests/engine/test_graph_replay.py::test_captured_latent_decode_on_the_gpu_reads_its_staged_plan \
  tests/engine/test_prefill_graphs.py::test_captured_prefill_on_the_gpu_matches_eager \
  "tests/engine/test_packed_prefill.py::test_mixed_steps_on_the_gpu_match_prefill_first[gla-2-fp32]" \
  "tests/engine/test_packed_prefill.py::test_mixed_steps_on_the_gpu_match_prefill_first[gla-2-bf16]" \
  2>&1 | grep -aE "passed|failed|FAILED|Error|^E " | head -20
