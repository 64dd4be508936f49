"""The serving study: hwattn's engine end to end on one GPU, per attention variant.

One command, bounded in time (default budget 420 s of work after start-up, ~8 minutes wall
with model builds), on one H100 with PyTorch 2.11 and no network:

    PYTHONUNBUFFERED=1 python benchmarks/serving_study.py --out $OUT

For each of GLA-2, MLA, GQA-4, GTA-4 (random weights, the paper's XL shape, bf16, page 64,
CUDA graphs): 64 concurrent requests of 8K-token prompts and 512 output tokens -> TTFT,
inter-token latency (one decode step), TPOT, output throughput; one decode step at B = 64
split into the attention kernels, the rest of the forward and host overhead beyond the
captured forward; and a check that graph replays give the eager step's logits. Then, on GLA-2:
output throughput against Hugging Face `generate()` through `hwattn.hf` (a reduced workload,
stated), and n-gram speculation (k = 3) on repetitive prompts against plain decoding. Last,
the attention kernel alone at the per-rank shapes of tensor parallelism (TP = 2, 4: GLA-2 vs
MLA, GQA-4 vs GTA-4), measured on one GPU. When the measured step times say the full workload
would not fit the budget, output lengths (then prompt lengths) are scaled down and the
output says so.

Writes `serving_study.json` and `serving_study.md` under --out and prints a compact table last.
`--tiny` runs the same code on the tiny preset (CPU is fine) in about a minute.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hwattn.engine import create_engine  # noqa: E402
from hwattn.bench.engine import (decode_breakdown, graph_consistency, random_prompts,  # noqa: E402
                                     rank_attention_time, run_offline)

VARIANTS = ("gla-2", "mla", "gqa-4", "gta-4")


def settings(tiny: bool) -> dict:
    if tiny:
        return dict(preset="tiny", concurrency=8, prompt_len=96, output_len=24, page_size=16,
                    hf=dict(batch=2, prompt_len=32, output_len=8),
                    spec=dict(requests=4, prompt_len=64, output_len=24),
                    rank=dict(batch=4, context=256), max_num_batched_tokens=512)
    return dict(preset="xl", concurrency=64, prompt_len=8192, output_len=512, page_size=64,
                hf=dict(batch=8, prompt_len=512, output_len=64),
                spec=dict(requests=32, prompt_len=1024, output_len=256),
                rank=dict(batch=64, context=8192), max_num_batched_tokens=8192)


class Clock:
    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget = budget_s

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free(engine) -> None:
    engine.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build(args, cfg, label, **kw):
    max_len = cfg["prompt_len"] + cfg["output_len"] + 64
    return create_engine(cfg["preset"], attention=label, dtype=args.dtype, device=args.device,
                         page_size=cfg["page_size"], max_num_seqs=cfg["concurrency"],
                         max_num_batched_tokens=cfg["max_num_batched_tokens"],
                         memory_budget=args.memory_budget, seed=0,
                         model_overrides=dict(max_seq_len=max_len), **kw)


def study_variant(args, cfg, label, clock, share, notes, extra=None):
    """The main workload on one variant; `extra(engine)` runs more work on the same engine."""
    t0 = time.perf_counter()
    engine = build(args, cfg, label)
    runner = engine.runner
    out = dict(variant=label, build_s=time.perf_counter() - t0,
               kv_bytes_per_token=engine.kv_bytes_per_token,
               kv_bytes_per_token_layer=engine.kv_bytes_per_token // engine.model_config.n_layers,
               pages=engine.block_manager.num_usable_pages, cuda_graphs=runner.cuda_graphs,
               graph_error=runner.graph_error, params=engine.model.num_params())
    log(f"{label}: built in {out['build_s']:.1f} s, {out['pages']} pages, graphs "
        f"{'on' if runner.cuda_graphs else 'off'}{' (' + runner.graph_error + ')' if runner.graph_error else ''}")
    try:
        out["graph_check"] = graph_consistency(engine)
    except Exception as err:  # noqa: BLE001 - reported; the measurements go on
        out["graph_check"] = dict(error=f"{type(err).__name__}: {err}"[:300])
    b, lp, lo = cfg["concurrency"], cfg["prompt_len"], cfg["output_len"]
    probe = decode_breakdown(engine, b, lp + lo // 2)
    out["decode_step"] = probe
    # Fit the workload into this variant's share of the budget, from measured step times.
    run_offline(engine, random_prompts(1, lp, engine.model_config.vocab_size, seed=99), 2)
    t_prefill = time.perf_counter()
    run_offline(engine, random_prompts(1, lp, engine.model_config.vocab_size, seed=98), 1)
    prefill_one = time.perf_counter() - t_prefill
    budget = share * 0.8
    est = b * prefill_one + lo * probe["step_wall_s"] * 1.15
    if est > budget:
        lo_new = max(8, int((budget - b * prefill_one) / (probe["step_wall_s"] * 1.15)))
        if lo_new < 64:
            lp = max(256, int(lp * budget / max(est, 1e-9) / 2))
            lo_new = max(8, min(lo, 64))
        notes.append(f"{label}: scaled the workload to fit the time budget: {b} requests x "
                     f"{lp} prompt + {min(lo, lo_new)} output tokens (estimate for the full one: "
                     f"{est:.0f} s, share {share:.0f} s)")
        lo = min(lo, lo_new)
    log(f"{label}: decode step B={b} {probe['step_wall_s'] * 1e3:.2f} ms, one prefill of {lp} "
        f"{prefill_one * 1e3:.0f} ms -> running {b} x ({lp} + {lo})")
    res = run_offline(engine, random_prompts(b, lp, engine.model_config.vocab_size, seed=0), lo)
    out.update(workload=dict(requests=b, prompt_len=lp, output_len=lo), offline=res.as_dict())
    log(f"{label}: {res.output_tokens_per_s:.0f} tok/s, ITL median "
        f"{res.itl_s['median'] * 1e3:.2f} ms, TTFT median {res.ttft_s['median']:.2f} s")
    itl = res.itl_s["median"]
    out["overhead"] = dict(
        itl_median_s=itl, forward_device_s=probe["forward_device_s"],
        forward_queued_s=probe["forward_queued_s"], attention_s=probe["attention_s"],
        beyond_forward_share=max(0.0, 1 - probe["forward_queued_s"] / itl),
        beyond_attention_share=max(0.0, 1 - probe["attention_s"] / itl))
    if extra is not None and clock.left > 30:
        out.update(extra(engine))
    engine.check_invariants()
    free(engine)
    return out


def hf_and_plain_spec(args, cfg, clock, notes):
    """On the GLA-2 engine: the HF generate() comparison and the plain side of the n-gram one."""

    def extra(engine):
        res = {}
        h = cfg["hf"]
        prompts = random_prompts(h["batch"], h["prompt_len"], engine.model_config.vocab_size, seed=5)
        ours = run_offline(engine, prompts, h["output_len"])
        res["hf_compare"] = dict(workload=h, hwattn_tok_s=ours.output_tokens_per_s)
        try:
            res["hf_compare"].update(hf_generate(engine, prompts, h["output_len"]))
            res["hf_compare"]["speedup"] = (ours.output_tokens_per_s
                                            / res["hf_compare"]["hf_tok_s"])
        except Exception as err:  # noqa: BLE001 - reported, the study goes on
            res["hf_compare"]["hf_error"] = f"{type(err).__name__}: {err}"[:300]
        log(f"hf compare: {res['hf_compare']}")
        s = cfg["spec"]
        rep = random_prompts(s["requests"], s["prompt_len"], engine.model_config.vocab_size,
                             seed=7, repetitive=True)
        plain = run_offline(engine, rep, s["output_len"])
        res["spec_plain"] = plain.as_dict()
        res["_spec_prompts"] = rep
        log(f"plain decoding on repetitive prompts: {plain.output_tokens_per_s:.0f} tok/s "
            f"(decode phase {plain.decode_tokens_per_s:.0f})")
        return res

    return extra


@torch.inference_mode()
def hf_generate(engine, prompts, output_len) -> dict:
    """Greedy `generate()` of `hwattn.hf.HwattnForCausalLM` sharing the engine's weights."""
    import transformers

    from hwattn.hf.modeling import HwattnConfig, HwattnForCausalLM

    with torch.device("meta"):
        hf = HwattnForCausalLM(HwattnConfig(**engine.model_config.to_dict()))
    hf.model.load_state_dict(engine.model.state_dict(), assign=True)  # the engine's tensors
    if engine.model_config.tie_embeddings:
        hf.model.output.weight = hf.model.tok_embeddings.weight
    hf.eval()
    ids = torch.tensor(prompts, device=engine.device)
    kw = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
              pad_token_id=0)
    hf.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = hf.generate(ids, **kw)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    return dict(hf_tok_s=out.shape[0] * new / dt, hf_s=dt, hf_new_tokens=int(new),
                transformers=transformers.__version__,
                hf_note="hwattn.hf.HwattnForCausalLM with transformers' DynamicCache (eager "
                        "PyTorch attention, no paging, no CUDA graphs)")


def spec_run(args, cfg, prompts, plain) -> dict:
    s = cfg["spec"]
    engine = build(args, cfg, "gla-2", speculative="ngram", num_speculative_tokens=3)
    run_offline(engine, prompts[:2], 4)
    res = run_offline(engine, prompts, s["output_len"])
    stats = engine.stats()
    free(engine)
    return dict(workload=s, k=3, plain=plain, ngram=res.as_dict(),
                speedup=res.output_tokens_per_s / plain["output_tokens_per_s"],
                decode_speedup=res.decode_tokens_per_s / max(plain["decode_tokens_per_s"], 1e-9),
                acceptance=stats["accepted_tokens"] / max(stats["draft_tokens"], 1))


def markdown(doc: dict) -> str:
    lines = [f"# Serving study ({doc['device']}, {doc['preset']} shape, {doc['dtype']}, page "
             f"{doc['page_size']})", "", f"torch {doc['torch']}, Triton kernels: "
             f"{doc['triton_kernels']}; {doc['wall_s']:.0f} s wall.", ""]
    lines += ["| variant | KV B/tok/layer | requests x (prompt + output) | out tok/s | TTFT p50 s | "
              "ITL p50 ms | ITL p99 ms | TPOT p50 ms | e2e p50 s | step: attention % | "
              "beyond forward % | graphs |", "|" + "---|" * 12]
    for v in doc["variants"]:
        if "error" in v:
            lines.append(f"| {v['variant']} | error: {v['error']} |")
            continue
        o, w = v["offline"], v["workload"]
        lines.append(
            f"| {v['variant']} | {v['kv_bytes_per_token_layer']} | {w['requests']} x ({w['prompt_len']} + "
            f"{w['output_len']}) | {o['output_tokens_per_s']:.0f} | {o['ttft_s']['median']:.2f} | "
            f"{o['itl_s']['median'] * 1e3:.2f} | {o['itl_s']['p99'] * 1e3:.2f} | "
            f"{o['tpot_s']['median'] * 1e3:.2f} | {o['e2e_s']['median']:.2f} | "
            f"{v['decode_step']['attention_share'] * 100:.0f} | "
            f"{v['overhead']['beyond_forward_share'] * 100:.0f} | "
            f"{'on' if v['cuda_graphs'] else 'off'} |")
    checks = [f"{v['variant']}: {v['graph_check']}" for v in doc["variants"]
              if v.get("graph_check") is not None]
    if checks:
        lines += ["", "CUDA graph replay vs eager logits (relative max diff, argmax agreement): "
                  + "; ".join(checks)]
    lines += ["", "ITL = wall time of one engine decode step (all requests advance together; "
              "prompts are all prefilled first, so TTFT grows with a request's place in the "
              "queue). 'beyond forward' = 1 - (device time of the captured forward) / ITL."]
    r = doc.get("ratios", {})
    if r:
        lines += ["", "Ratios of median ITL: " + ", ".join(f"{k} = {x:.3f}" for k, x in r.items())]
    hf = doc.get("hf_compare")
    if hf:
        lines += ["", f"HF generate() (reduced: {hf['workload']}): hwattn {hf['hwattn_tok_s']:.0f} tok/s"
                  + (f" vs HF {hf['hf_tok_s']:.1f} tok/s = {hf['speedup']:.1f}x ({hf['hf_note']})"
                     if "hf_tok_s" in hf else f"; HF not run: {hf.get('hf_error')}")]
    sp = doc.get("speculative")
    if sp:
        lines += ["", f"n-gram speculation k=3 on repetitive prompts ({sp['workload']}): "
                  f"{sp['ngram']['output_tokens_per_s']:.0f} vs plain {sp['plain']['output_tokens_per_s']:.0f} "
                  f"tok/s = {sp['speedup']:.2f}x (decode phase {sp['decode_speedup']:.2f}x), "
                  f"acceptance {sp['acceptance']:.0%}"]
    if doc.get("tp_rank_shapes"):
        lines += ["", "Attention kernel per layer at one TP rank's shape (one GPU):", "",
                  "| variant | TP | q heads | cached heads | KV B/tok/layer | µs | GB/s |",
                  "|---|---|---|---|---|---|---|"]
        for t in doc["tp_rank_shapes"]:
            lines.append(f"| {t['variant']} | {t['tp']} | {t['query_heads']} | {t['cached_heads']} | "
                         f"{t['kv_bytes_per_token_layer']} | {t['seconds'] * 1e6:.0f} | {t['gb_per_s']:.0f} |")
    if doc["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", default=os.environ.get("HWATTN_STUDY_TINY") == "1",
                   help="tiny preset and counts (CPU smoke run); also HWATTN_STUDY_TINY=1")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"),
                   help="folder for serving_study.json and serving_study.md (default: $OUT, "
                        "else benchmarks/results)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated attention variants (default %(default)s)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds of work (default 420)")
    p.add_argument("--device", default="auto",
                   help="auto or cuda: the GPU when one is present, else the CPU; cpu: the CPU "
                        "(default auto)")
    p.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="KV bytes, or fraction of free GPU memory (default 0.85 on CUDA)")
    args = p.parse_args(argv)
    cfg = settings(args.tiny)
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    args.device = "cuda" if cuda else "cpu"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.memory_budget is None and not cuda:
        args.memory_budget = 64 << 20
    if args.memory_budget is not None and args.memory_budget > 1:
        args.memory_budget = int(args.memory_budget)
    if not cuda:
        torch.set_num_threads(1)
    clock = Clock(args.budget)
    start = time.perf_counter()
    variants = [v for v in args.variants.split(",") if v]
    try:
        import hwattn.ops.triton_decode  # noqa: F401
        triton_ok = True
    except Exception:  # noqa: BLE001
        triton_ok = False
    notes = []
    if not cuda:
        notes.append("no CUDA device: CPU run, attention through the PyTorch reference, no graphs")
    doc = dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
               torch=torch.__version__, preset=cfg["preset"], dtype=args.dtype,
               page_size=cfg["page_size"], triton_kernels=triton_ok and cuda, settings=cfg,
               variants=[], notes=notes)
    log(f"serving study on {doc['device']}: {variants}, budget {args.budget:.0f} s")
    reserve = 0.3 * args.budget  # HF comparison, speculation, rank shapes
    plain_spec = None
    for i, label in enumerate(variants):
        share = (clock.left - reserve) / (len(variants) - i)
        extra = hf_and_plain_spec(args, cfg, clock, notes) if label == "gla-2" else None
        try:
            v = study_variant(args, cfg, label, clock, max(share, 10.0), notes, extra)
        except Exception as err:  # noqa: BLE001 - one variant failing must not lose the rest
            log(f"{label} failed: {type(err).__name__}: {err}")
            v = dict(variant=label, error=f"{type(err).__name__}: {err}"[:400])
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        gc.collect()  # the engine is gone now; hand its pages back before the next build
        if cuda:
            torch.cuda.empty_cache()
        if "hf_compare" in v:
            doc["hf_compare"] = v.pop("hf_compare")
        if "spec_plain" in v:
            plain_spec = (v.pop("_spec_prompts"), v.pop("spec_plain"))
        doc["variants"].append(v)
        save(args.out, doc, final=False)  # keep what is measured if the run is cut short
    itl = {v["variant"]: v["offline"]["itl_s"]["median"] for v in doc["variants"] if "offline" in v}
    ratios = {}
    if "gla-2" in itl and "mla" in itl:
        ratios["GLA-2 / MLA"] = itl["gla-2"] / itl["mla"]
    if "gta-4" in itl and "gqa-4" in itl:
        ratios["GTA-4 / GQA-4"] = itl["gta-4"] / itl["gqa-4"]
    doc["ratios"] = ratios
    if plain_spec is not None and clock.left > 20:
        try:
            doc["speculative"] = spec_run(args, cfg, *plain_spec)
            log(f"n-gram k=3: {doc['speculative']['speedup']:.2f}x, acceptance "
                f"{doc['speculative']['acceptance']:.0%}")
        except Exception as err:  # noqa: BLE001
            notes.append(f"speculation run failed: {type(err).__name__}: {err}"[:300])
    elif plain_spec is not None:
        notes.append("speculation run skipped: out of time budget")
    rank = []
    if clock.left > 5:
        r = cfg["rank"]
        for tp in (2, 4):
            for label in ("gla-2", "mla", "gqa-4", "gta-4"):
                try:
                    rank.append(rank_attention_time(label, tp, r["batch"], r["context"],
                                                    preset=cfg["preset"], page_size=cfg["page_size"],
                                                    dtype=torch.bfloat16 if cuda else torch.float32,
                                                    device=args.device, iters=20 if cuda else 2))
                except Exception as err:  # noqa: BLE001
                    notes.append(f"rank shape {label} TP={tp} failed: {err}"[:200])
        gc.collect()
    doc["tp_rank_shapes"] = rank
    doc["wall_s"] = time.perf_counter() - start
    save(args.out, doc, final=True)
    print(markdown(doc), flush=True)
    return 0


def save(folder: str, doc: dict, final: bool) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(doc, complete=final)
    (out / "serving_study.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if final:
        (out / "serving_study.md").write_text(markdown(doc))


if __name__ == "__main__":
    sys.exit(main())
