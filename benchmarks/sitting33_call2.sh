#!/usr/bin/env bash
# Second device call of 2026-12-07's thirty-third sitting (one Hopper GPU; everything printed
# also goes to $OUT/summary.txt): programmatic dependent launch (PDL) of the compiled decode
# blocks' Inductor kernels, and Inductor's own GEMM templates, in the `xl` decode step.
#   At L = 1K the step's GEMMs read the weights at about 60% of the copy rate and 340-412
#   kernels a step each pay a launch and a ramp (run 19, docs/results/engine.md). With
#   TORCHINDUCTOR_ENABLE_PDL=1 Inductor launches its Triton kernels with PDL (each waits on
#   `griddepcontrol.wait` before it reads what the kernel before it wrote), so a kernel's
#   launch overlaps its predecessor's tail; TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 lets Inductor
#   time its Triton GEMM templates against cuBLAS for each decode GEMM (and fuse epilogues).
#   Our own kernels of the step (the state store, the attention kernels, the combine) go with
#   PDL under HWATTN_PDL=1 (hwattn/ops/kernels/pdl.py: each waits first, then lets the next
#   launch; compiled for sm_90 on the CPU, not yet run on a GPU).
#   1. Whether this PyTorch has the switch; the captured fp32 engine test under both switches
#      (greedy tokens equal to eager steps), GTA-4 / GLA-2 / MLA, and the Hopper and Triton
#      decode tests under HWATTN_PDL=1.
#   2. GTA-4's B 1 x 128K call (75 us, 14 of them around its two kernels) with and without
#      HWATTN_PDL (split_profile, one process each).
#   3. The engine step for GLA-2 and GQA-4: plain, Inductor's PDL, both PDLs.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s33b}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/summary.txt") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, torch._inductor.config as c; print('torch', torch.__version__, 'inductor enable_pdl:', getattr(c.triton, 'enable_pdl', 'absent'))"
TORCHINDUCTOR_ENABLE_PDL=1 python3 -c "import torch._inductor.config as c; print('with TORCHINDUCTOR_ENABLE_PDL=1:', getattr(c.triton, 'enable_pdl', 'absent'))"
echo "== engine test under PDL"
TORCHINDUCTOR_ENABLE_PDL=1 HWATTN_PDL=1 HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 200 \
  python3 -m pytest -q -p no:cacheprovider tests/engine/test_graph_replay.py \
  -k "finished_in_the_cache_write and gla" 2>&1 | grep -aE "passed|failed|FAILED|^E " | head -12
echo "== decode kernels under HWATTN_PDL=1"
HWATTN_PDL=1 HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 150 python3 -m pytest -q \
  -p no:cacheprovider tests/ops/test_combine.py 2>&1 | grep -aE "passed|failed|FAILED|^E " | head -12
echo "== GTA-4 B 1 x 128K, HWATTN_PDL 0 then 1"
for pdl in 0 1 0 1; do
  HWATTN_PDL=$pdl timeout 60 python3 benchmarks/split_profile.py --cases gta-4@32:1x131072,mla:4x32768 \
    --plans default --rep-ms 30 --out "$OUT/pdl$pdl.json" 2>&1 | grep -a "^|\|Error"
done
source benchmarks/engine_ab.sh  # run NAME VAR=VALUE...
run inductor_pdl TORCHINDUCTOR_ENABLE_PDL=1 ENGINE_VARIANTS=gla-2,gqa-4
run both_pdl TORCHINDUCTOR_ENABLE_PDL=1 HWATTN_PDL=1 ENGINE_VARIANTS=gla-2,gqa-4
