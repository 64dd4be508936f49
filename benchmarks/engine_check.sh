#!/usr/bin/env bash
# Two device calls (each under 10 minutes on one H200) re-measuring the engine after the
# changes of 2026-12-04's second sitting; every part has its own time limit and writes to $OUT:
#   1. tests/ops on the GPU (HWATTN_TEST_DEVICE=cuda): the paged prefill op with its tuned
#      tiles, the plans, the decode kernels, against the fp64 truth on hostile paged caches;
#   2. `hwattn bench decode` for GQA-4 at the xl decode shape (h_q 16, B 64, L 1K and 8K) under
#      split-KV plans of 1, 2 and 4 programs per SM (its Triton kernel read the cache at 45% of
#      the copy rate at L = 1K);
#   3. benchmarks/engine_roofline.py --parts decode: the step against its floor with the host
#      phases of the engine loop (hwattn/engine/step_timer.py) for GQA-4, GTA-4, GLA-2, MLA;
#   4. benchmarks/engine_roofline.py --parts prefill: chunked-prefill MFU with the tuned tiles,
#      and whole prompts of unequal lengths through the dense loop and through the paged op.
#   5. skinny: the skinny GEMM of hwattn/ops/linear.py against cuBLAS, alone and in the step;
#   6. pps: split-KV plans of the Triton decode kernel for GQA-4, MQA, MHA at B 1, 64, 128.
#   7. host: benchmarks/engine_host.py, the engine's host work per decode step without the
#      graph launch, on this machine's CPU (L 1K) and with real uploads to the GPU (L 1K, 8K), B 64,
#      and both 1K runs again with one torch CPU thread (torch takes one per core);
#      beside `engine`'s launch phase it says what the graph replay costs the host.
#   8. enginetests: the engine's own GPU tests (staged inputs, real CUDA graphs against eager).
#   9. xlattn: the Hopper kernels at the engine's `xl` decode shape (h_q 16, B 64, L 1K and 8K)
#      under several schedules and split-KV plans, Triton beside (run 9: MLA's attention took
#      55 µs a layer at L = 1K where GLA-2's took 28 µs for the same cache bytes).
#  10. fp8: the Hopper tied kernel over an e4m3 cache (copied as it is, widened to fp16 in shared
#      memory; built without a GPU on 2026-12-05): its correctness checks, then its timing beside
#      the bf16 kernel on the same shapes (the target: >= 1.6x the bf16 speed at L_q = 1).
#  11. fp8slots: the fp8 path's ring depths (first run, 2026-12-05: 0.72-1.07x the bf16
#      kernel's speed, the widening setting the pace; docs/hopper.md): the slots the producer
#      widens into (-w, GTA's narrow states have room for 4-6) and the copied ring's (-s), on
#      GTA-4's shapes and GLA-2's (ws-w3: the plain consumers, which hold fewer slots than the
#      overlapped ones, with three widened), with a correctness check of the deepest. The
#      overlapped consumers hold three blocks at once: with three widened slots the producer
#      cannot widen ahead of them.
#  12. harness: the two decode harnesses that disagreed on GLA-2 at B 128, L 16K, L_q 1 (78% of the
#      copy rate in a same-process run with FlashMLA on 2026-12-03, 95.6% in hopper_decode.py on
#      2026-12-05) and on GTA-4 / GQA-4 (0.625 against 0.58), timed on one commit in one call:
#      hopper_decode.py, then `hwattn bench decode` (MLA, and FlashMLA / FA3 where they import,
#      before GLA-2, in the 12-03 order), then hopper_decode.py again (heat), with the clocks,
#      power and temperature before and after.
#  13. fp8ncu: Nsight Compute on one launch each of the Hopper tied kernel over an e4m3 cache and
#      over a bf16 one (GTA-4, B 128, L 16K, L_q 1): the full section set with per-instruction
#      stall samples (where do the producer warps that widen fp8 to fp16 wait?), exported as CSV
#      (details, and the source page at SASS and at Python-source level) beside the report.
#      Needs a machine whose runtime lets ncu read the counters (Firecracker; not gVisor).
#  14. blas: the xl decode GEMMs (M 64, 16, 128) through cuBLAS asked four ways (F.linear, the
#      same under cuBLASLt, W stored transposed for torch.mm, addmm with a zero bias), weights
#      cold: at L = 1K the GEMMs alone exceed the step's floor, and F.linear reads QKV, O and
#      down at a third to a half of the copy rate.
#  15. external: issue 22's side-by-side table, FlashMLA and FA3 timed in this process beside our
#      kernels (MLA, GLA-2; h_q 128, B 128, L 4K / 16K / 32K, L_q 1 / 2 / 4), from the prebuilt
#      libraries in .ext/ (benchmarks/fetch_external_kernels.sh; carry `.ext`). While .ext/ is
#      there every part that runs `hwattn bench decode` (harness too) times them.
#  16. fp8two: the fp8 tied kernel at two programs per SM (GTA-4's state: 115 KB and 128
#      registers a program, compiled without spills; `ncu` on 2026-12-06 found one block per SM
#      latency-bound in its widening), checked against the Triton kernel, then timed beside the
#      one-per-SM default and the bf16 kernel: ovl-c2 (three widened, two copied slots), ws-c2
#      (two widened, four copied).
#  17. small: `hwattn bench decode` at small batches beside FlashMLA and FA3 (where they import or
#      .ext/ carries them): MLA and GLA-2 at h_q 128, B 1 and 4 at L 32K, and the uneven batch of
#      one 128K-token sequence beside 63 of 1K (--mixed 131072x1+1024x63: each sequence's own
#      pages, bytes summed over the sequences), L_q 1; then GTA-4 and GQA-4 on one 128K-token
#      sequence among 127 of 1K, a full batch whose plan cuts only the long sequence.
#  18. smallplans: the split-KV plan knobs where the Hopper kernels trail at few sequences
#      (2026-12-06, H100: MLA at B 1 / 4, 32K 1.11x / 1.15x FA3's time, the uneven batch 1.42x;
#      GTA-4 at B 1, 128K 0.663x GQA-4's time against 0.65x): pieces per SM (-p) and the
#      shortest piece (-m) of the default schedules, timed with hopper_decode.py.
#  19. straggler: benchmarks/straggler_step.py, a captured decode step at B 128 (GTA-4 and GQA-4
#      at `xl`) with one 32K-token sequence among 127 of 1K and with all at 1K, through the
#      engine's plans (room for split pieces, 2026-12-06) and through plans captured without it.
#  20. prefilldiag: where chunked prefill's time goes (2026-12-07, H100: the chunk steps' wall
#      time 1.5-3.5x their device time, the eager forward's host side): engine_diagnostics.py
#      normops (our RMSNorm against F.rms_norm), prefillprof (device time by kind, whole and
#      chunked), prefillhost (cProfile of the chunked steps), into $OUT/diag.
#  21. ttft: TTFT and ITL of 64 Poisson-arriving 8K prompts at 16 req/s on GLA-2, prefill budgets
#      8192 (the default) and 2048 (chunked, run 5: TTFT p50 6.4 s against 0.46 s); TTFT_CHUNKS
#      and TTFT_MODES (eager and/or compiled prefill blocks, default compiled) from the environment.
#  22. prefillc: one 8K prompt whole and in chunks of 2048, through the eager and the compiled
#      prefill blocks (EngineConfig.compile_prefill, 2026-12-07), PREFILL_VARIANTS (default
#      gla-2,mla,gqa-4), PREFILL_MODES (default eager,compiled; pieces: compiled without the
#      prefill graphs); the compiled rows' logits against the eager rows'.
#  23. ttftlog: the ttft step's GLA-2 runs at budgets 8192 and 2048, compiled and eager prefill
#      blocks (TTFT_MODES), under TORCH_LOGS=recompiles: any recompile after start-up, and each
#      run's five slowest steps (run 14's compiled 8192 row had ITL p99 305 ms against 11 ms
#      eager).
#   `engine` takes ENGINE_VARIANTS (default gqa-4,gta-4,gla-2,mla), ENGINE_MODES (default
#   eager,compiled) and ENGINE_STEPS (the engine's steady decode steps, default 32) from the
#   environment.
#   run: bash benchmarks/engine_check.sh [tests|enginetests|decode|prefill|engine|skinny|pps|host|xlattn|fp8|fp8slots|harness|fp8ncu|blas|external|fp8two|small|smallplans|straggler|prefilldiag|ttft|prefillc|ttftlog ...]
#   (default: tests decode prefill; then `engine` alone in a second call)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export OUT=${OUT:-/tmp/engine_check_out}; mkdir -p "$OUT"
[[ -d .ext && -z ${HWATTN_EXTERNAL_DIR:-} ]] && export HWATTN_EXTERNAL_DIR=$PWD/.ext
steps=${*:-tests decode prefill}
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/log"
for step in $steps; do
  echo "== $step" | tee -a "$OUT/log"
  case $step in
    tests)
      HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 240 python3 -m pytest -q --maxfail=10 -n 8 \
        -p no:cacheprovider tests/ops 2>&1 | tail -15 | tee -a "$OUT/log" ;;
    decode)
      timeout 90 python3 -m hwattn bench decode --variants gqa-4 --heads 16 --batch 64 \
        --context 1024,8192 --programs-per-sm 1,2,4 --no-sdpa --warmup-ms 10 --rep-ms 60 \
        --out "$OUT/decode_pps.json" 2>&1 | grep -v "^row " | tee -a "$OUT/log" ;;
    engine)
      # (the figure draws compiled rows only)
      plot=(); [[ ${ENGINE_MODES:-eager,compiled} == *compiled* ]] && plot=(--plot "$OUT/engine_step.png")
      timeout 560 python3 benchmarks/engine_roofline.py --parts decode \
        --variants "${ENGINE_VARIANTS:-gqa-4,gta-4,gla-2,mla}" \
        --decode-modes "${ENGINE_MODES:-eager,compiled}" --engine-steps "${ENGINE_STEPS:-32}" \
        --out "$OUT" "${plot[@]}" \
        2>&1 | tail -40 | tee -a "$OUT/log" ;;
    enginetests)
      # (test_graph_replay's other tests replace the capture; on a GPU they only cost time)
      HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout -k 5 300 python3 -m pytest -q -x -p no:cacheprovider \
        tests/engine/test_staging.py \
        tests/engine/test_graph_replay.py::test_captured_decode_on_the_gpu_matches_eager \
        tests/engine/test_graph_replay.py::test_captured_latent_decode_on_the_gpu_reads_its_staged_plan \
        tests/engine/test_prefill_graphs.py::test_captured_prefill_on_the_gpu_matches_eager \
        2>&1 | tail -5 | tee -a "$OUT/log" ;;
    prefill)
      mkdir -p "$OUT/prefill"
      timeout 300 python3 benchmarks/engine_roofline.py --parts prefill \
        --variants gqa-4,gta-4,gla-2,mla --out "$OUT/prefill" 2>&1 | tail -20 | tee -a "$OUT/log" ;;
    skinny)
      # The skinny GEMM (hwattn/ops/linear.py): its GPU tests, the kernel against cuBLAS on
      # the decode step's shapes, then the compiled decode step with and without it.
      HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 timeout 60 python3 -m pytest -q -x -p no:cacheprovider \
        tests/ops/test_skinny_gemm.py tests/ops/test_linear.py 2>&1 | tail -5 | tee -a "$OUT/log"
      OUT="$OUT" SKINNY_SECONDS=45 timeout 75 python3 benchmarks/engine_diagnostics.py skinny 2>&1 | tail -40 | tee -a "$OUT/log"
      for on in 1 0; do
        mkdir -p "$OUT/skinny$on"
        HWATTN_SKINNY_GEMM=$on timeout 70 python3 benchmarks/engine_roofline.py --parts decode \
          --decode-modes compiled --variants gqa-4,gla-2 --out "$OUT/skinny$on" 2>&1 | tail -12 | tee -a "$OUT/log"
      done ;;
    pps)
      # Split-KV plans of the Triton decode kernel across the variants it serves.
      timeout 50 python3 -m hwattn bench decode --variants gqa-4,mqa,mha --heads 16 --batch 1,64,128 \
        --context 1024,8192 --programs-per-sm 1,2 --no-sdpa --no-hopper --warmup-ms 5 --rep-ms 30 \
        --out "$OUT/decode_pps_all.json" 2>&1 | grep -v "^row " | tail -30 | tee -a "$OUT/log" ;;
    host)
      # (the last two: torch's CPU threads, one per core by default, against one)
      for run in "cpu 1024" "cuda 1024" "cuda 8192" "cpu 1024 1" "cuda 1024 1"; do
        set -- $run
        timeout 90 python3 benchmarks/engine_host.py --device $1 --context $2 --steps 200 \
          ${3:+--cpu-threads $3} --out "$OUT/engine_host.jsonl" 2>&1 | tail -2 | tee -a "$OUT/log"
      done ;;
    xlattn)
      # (kernels compiled by 8 workers first; 1K shapes first, should the budget run out)
      timeout 280 python3 benchmarks/hopper_decode.py --only timing --budget 250 --rep-ms 30 --jobs 8 \
        --shapes mla-xl-b64-1k,gla2-xl-b64-1k,gta4-xl-b64-1k,mla-xl-b64-8k,gla2-xl-b64-8k,gta4-xl-b64-8k \
        --variants default,ws,duo,duo-p1-m256,duo-p1-m512,duo-p1-m1024,duo-p2-m256,ovl,ovl-p1-m256,ovl-p1-m1024 \
        --out "$OUT/hopper_xl.json" 2>&1 | tail -20 | tee -a "$OUT/log" ;;
    fp8)
      timeout 150 python3 benchmarks/hopper_decode.py --only correctness --budget 130 --jobs 4 \
        --checks gla2-lq2-fp8,gta4-lq1-fp8 --variants default,ws,ovl \
        --out "$OUT/hopper_fp8_checks.json" 2>&1 | tail -8 | tee -a "$OUT/log"
      timeout 200 python3 benchmarks/hopper_decode.py --only timing --budget 180 --rep-ms 30 --jobs 8 \
        --shapes gla2-b128-16k-lq1,gla2-b128-16k-lq1-fp8,gta4-b128-16k,gta4-b128-16k-fp8,gla2-b128-16k-lq2,gla2-b128-16k-lq2-fp8,gta4-b1-128k,gta4-b1-128k-fp8,gla2-b4-32k,gla2-b4-32k-fp8 \
        --variants default,ws,ovl --out "$OUT/hopper_fp8.json" 2>&1 | tail -24 | tee -a "$OUT/log" ;;
    fp8slots)
      timeout 100 python3 benchmarks/hopper_decode.py --only correctness --budget 80 --jobs 4 \
        --checks gta4-lq1-fp8 --variants ovl-w6,ws-w4 \
        --out "$OUT/hopper_fp8_slot_checks.json" 2>&1 | tail -4 | tee -a "$OUT/log"
      timeout 200 python3 benchmarks/hopper_decode.py --only timing --budget 180 --rep-ms 30 --jobs 8 \
        --shapes gta4-b128-16k,gta4-b128-16k-fp8,gta4-b1-128k-fp8,gla2-b128-16k-lq1,gla2-b128-16k-lq1-fp8 \
        --variants default,ovl,ovl-w4,ovl-w5,ovl-w6,ovl-w4-s4,ws-w3,ws-w4 \
        --out "$OUT/hopper_fp8_slots.json" 2>&1 | tail -12 | tee -a "$OUT/log" ;;
    fp8two)
      timeout 100 python3 benchmarks/hopper_decode.py --only correctness --budget 80 --jobs 4 \
        --checks gta4-lq1-fp8 --variants ovl-c2,ws-c2 \
        --out "$OUT/hopper_fp8two_checks.json" 2>&1 | tail -4 | tee -a "$OUT/log"
      timeout 200 python3 benchmarks/hopper_decode.py --only timing --budget 180 --rep-ms 30 --jobs 8 \
        --shapes gta4-b128-16k,gta4-b128-16k-fp8,gta4-b1-128k,gta4-b1-128k-fp8 \
        --variants default,ovl,ovl-c2,ws-c2 \
        --out "$OUT/hopper_fp8two.json" 2>&1 | tail -12 | tee -a "$OUT/log" ;;
    harness)
      git rev-parse HEAD 2>/dev/null | tee -a "$OUT/log"
      nvidia-smi -q -d CLOCK,POWER,TEMPERATURE > "$OUT/gpu_state_before.txt" 2>&1
      timeout 120 python3 benchmarks/hopper_decode.py --only timing --rep-ms 100 \
        --variants default,ovl,ws,pipe --shapes gla2-b128-16k-lq1,gta4-b128-16k \
        --out "$OUT/harness_hopper_a.json" 2>&1 | tail -8 | tee -a "$OUT/log"
      timeout 150 python3 -m hwattn bench decode --variants mla,gla-2 --batch 128 --context 16384 \
        --no-sdpa --out "$OUT/harness_bench_latent.json" 2>&1 | grep -v "^row " | tail -12 | tee -a "$OUT/log"
      timeout 120 python3 -m hwattn bench decode --variants gta-4,gqa-4 --heads 32 --batch 128 \
        --context 16384 --no-sdpa --out "$OUT/harness_bench_tied.json" 2>&1 | grep -v "^row " | tail -12 | tee -a "$OUT/log"
      timeout 100 python3 benchmarks/hopper_decode.py --only timing --rep-ms 100 --variants default \
        --shapes gla2-b128-16k-lq1,gta4-b128-16k --out "$OUT/harness_hopper_b.json" 2>&1 | tail -6 | tee -a "$OUT/log"
      nvidia-smi -q -d CLOCK,POWER,TEMPERATURE > "$OUT/gpu_state_after.txt" 2>&1 ;;
    blas)
      timeout 150 python3 benchmarks/engine_diagnostics.py blas 2>&1 | tail -70 | tee -a "$OUT/log" ;;
    fp8ncu)
      rep="$OUT/fp8_ncu"
      timeout 200 ncu --clock-control none --set full --import-source yes -k regex:hopper \
        --launch-count 2 -f -o "$rep" python3 benchmarks/hopper_decode.py --worker \
        --tasks warm:gta4-b128-16k-fp8:default,warm:gta4-b128-16k:default 2>&1 | tail -15 | tee -a "$OUT/log"
      ncu -i "$rep.ncu-rep" --page details --csv > "$OUT/fp8_ncu_details.csv" 2> "$OUT/fp8_ncu_details.err"
      ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$OUT/fp8_ncu_sass.csv" 2> "$OUT/fp8_ncu_sass.err"
      ncu -i "$rep.ncu-rep" --page source --csv --print-source cuda > "$OUT/fp8_ncu_source.csv" 2> "$OUT/fp8_ncu_source.err"
      ls -la "$OUT" | tee -a "$OUT/log" ;;
    external)
      python3 -c "from hwattn.bench import external; [print(k, v) for k, v in external.available().items()]" \
        2>&1 | tee -a "$OUT/log"
      timeout 420 python3 -m hwattn bench decode --variants mla,gla-2 --batch 128 \
        --context 4096,16384,32768 --query-len 1,2,4 --no-sdpa --warmup-ms 10 --rep-ms 60 \
        --out "$OUT/decode_external.json" 2>&1 | tee "$OUT/decode_external.rows" | grep -v "^row " \
        | tail -30 | tee -a "$OUT/log" ;;
    small)
      timeout 240 python3 -m hwattn bench decode --variants mla,gla-2 --batch 1,4 --context 32768 \
        --mixed 131072x1+1024x63 --query-len 1 --no-sdpa --warmup-ms 10 --rep-ms 60 \
        --out "$OUT/decode_small.json" 2>&1 | tee "$OUT/decode_small.rows" | grep -v "^row " \
        | tail -30 | tee -a "$OUT/log"
      # A full batch (B x KV heads fills the GPU): the plan cuts only a sequence far longer
      # than an even share, here one 128K-token sequence among 127 of 1K (hwattn/ops/plan.py).
      timeout 150 python3 -m hwattn bench decode --variants gta-4,gqa-4 --heads 32 \
        --mixed 131072x1+1024x127 --query-len 1 --no-sdpa --warmup-ms 10 --rep-ms 60 \
        --out "$OUT/decode_straggler.json" 2>&1 | grep -v "^row " | tail -12 | tee -a "$OUT/log" ;;
    smallplans)
      timeout 300 python3 benchmarks/hopper_decode.py --only timing --budget 280 --rep-ms 30 --jobs 8 \
        --shapes mla-b1-32k,mla-b4-32k,mla-uneven,gla2-uneven,gta4-b1-128k \
        --variants default,duo-p1-m128,duo-p1-m512,duo-p1-m1024,duo-p2-m256,duo-p4-m256,ovl-p3,ovl-p4,ovl-m512 \
        --out "$OUT/hopper_smallplans.json" 2>&1 | tail -10 | tee -a "$OUT/log" ;;
    straggler)
      timeout 420 python3 benchmarks/straggler_step.py --out "$OUT" 2>&1 | tail -20 | tee -a "$OUT/log" ;;
    prefilldiag)
      mkdir -p "$OUT/diag"
      OUT="$OUT/diag" timeout 200 python3 benchmarks/engine_diagnostics.py normops,prefillprof,prefillhost \
        2>&1 | grep -E "normops|prefillprof|prefillhost|ms  x" | tee -a "$OUT/log" ;;
    ttft)
      mkdir -p "$OUT/ttft"
      timeout 280 python3 benchmarks/engine_roofline.py --parts ttft --ttft-variants gla-2 \
        --ttft-chunks ${TTFT_CHUNKS:-8192,2048} --ttft-prefill-modes ${TTFT_MODES:-compiled} \
        --out "$OUT/ttft" 2>&1 | tail -12 | tee -a "$OUT/log" ;;
    ttftlog)
      mkdir -p "$OUT/ttftlog"
      TORCH_LOGS=recompiles timeout 200 python3 benchmarks/engine_roofline.py --parts ttft \
        --ttft-variants gla-2 --ttft-chunks 8192,2048 --ttft-prefill-modes ${TTFT_MODES:-compiled,eager} \
        --out "$OUT/ttftlog" > "$OUT/ttftlog/stderr_and_out" 2>&1
      grep -aE "ttft gla|Recompiling|guard failure" "$OUT/ttftlog/stderr_and_out" | cut -c1-700 \
        | head -30 | tee -a "$OUT/log" ;;
    prefillc)
      mkdir -p "$OUT/prefillc"
      timeout 330 python3 benchmarks/engine_roofline.py --parts prefill --unequal "" \
        --variants ${PREFILL_VARIANTS:-gla-2,mla,gqa-4} --prefill-modes ${PREFILL_MODES:-eager,compiled} \
        --out "$OUT/prefillc" 2>&1 | tail -16 | tee -a "$OUT/log" ;;
    *) echo "unknown step $step (tests, enginetests, decode, engine, prefill, skinny, pps, host, xlattn, fp8, fp8slots, harness, fp8ncu, blas, external, fp8two, small, smallplans, straggler, prefilldiag, ttft, prefillc, ttftlog)" | tee -a "$OUT/log"; exit 2 ;;
  esac
done
