#!/usr/bin/env bash
# One device call checking the attention-backend seam on a GPU: the ops and backend tests
# compiled (Triton, not the interpreter), the engine with CUDA graphs through the backend's
# in-place plan refresh (graph vs eager logits, decode-step breakdown), and the headline decode
# rows, to compare with the H100 table of docs/results/decode.md. Logs and JSON go to $OUT.
#   run: bash benchmarks/backend_seam_gpu.sh        (about 6 minutes on one H100/H200)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/backend_seam_out}; mkdir -p "$OUT"
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/log"
echo "== ops tests compiled on the GPU" | tee -a "$OUT/log"
HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
  tests/ops 2>&1 | tail -15 | tee -a "$OUT/log"
echo "== engine on the GPU: auto backend, CUDA graphs, graph vs eager" | tee -a "$OUT/log"
timeout 150 python3 - <<'PY' 2>&1 | tee -a "$OUT/log"
import json, os
import torch
from hwattn.engine import LLM, SamplingParams
from hwattn.bench.engine import decode_breakdown, graph_consistency
rows = []
for label in ("gqa-4", "gta-4", "mla", "gla-2"):
    llm = LLM("small", attention=label, device="cuda", max_num_seqs=16, max_model_len=2048,
              memory_budget=2 << 30)
    engine, runner = llm.engine, llm.engine.runner
    out = llm.generate([[1, 2, 3, 4] * 64] * 8, SamplingParams(max_tokens=32, temperature=0))
    row = dict(variant=label, backend=runner.backend.name, graphs=runner.cuda_graphs,
               graph_error=runner.graph_error, tokens=sum(len(o.token_ids) for o in out),
               consistency=graph_consistency(engine), breakdown=decode_breakdown(engine, 8, 1024))
    print(json.dumps(row), flush=True)
    rows.append(row)
    del llm, engine, runner
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "engine.json"), "w"), indent=1)
PY
echo "== headline decode rows (docs/results/decode.md: GLA-2 16K 847 µs, MLA 16K 2369 µs, GQA-4 1417 µs, GTA-4 862 µs on an H100)" | tee -a "$OUT/log"
timeout 200 python3 -m hwattn bench decode --variants gla-2,mla,gqa-4,gta-4 --context 16384 \
  --warmup-ms 10 --rep-ms 60 --out "$OUT/decode.json" 2>&1 | grep -v "^row \|^{" | tee -a "$OUT/log"
