"""Engine speed on one GPU, before and after, from one command.

For GLA-2, MLA, GQA-4 and GTA-4 at the `xl` shape (random weights, bf16, page 64, CUDA
graphs), on one engine per variant:

- serving: `--requests` prompts of `--prompt-len` random tokens arriving by a Poisson process
  of `--rate` requests/s, `--output-len` greedy tokens each -> TTFT p50/p99, inter-token
  latency (ITL) p50/p99 and their ratio, output throughput;
- decode step at batch `--batch`: the median engine `step()` while every sequence decodes,
  against the device time of the captured forward alone (`decode_breakdown`) -> the share of
  the step that is not the forward (host work the device waits for, sampling);
- speculation (GLA-2 by default): prompts that repeat a short phrase, n-gram drafting with
  k = 1..4 against k = 0 -> acceptance, decode tokens/s speed-up, verify-step time over the
  plain step time.

`--before DIR` first runs the same measurement in a subprocess that imports `hwattn` from DIR
(another copy of the repository), so both sides come from one run on one machine. Results:
`engine_speed.json` and `engine_speed.md` under `--out` (default `$OUT`, else the current
directory); the table is printed, then one line of JSON. `--tiny` runs the same code with the
tiny preset on the CPU in seconds.

    PYTHONUNBUFFERED=1 python benchmarks/engine_speed.py --before before --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
VARIANTS = ("gla-2", "mla", "gqa-4", "gta-4")


def settings(tiny: bool) -> dict:
    if tiny:
        return dict(preset="tiny", device="cpu", dtype="fp32", requests=6, prompt_len=48,
                    output_len=10, rate=400.0, batch=6, decode_prompt=32, decode_output=8,
                    spec_requests=3, spec_prompt=48, spec_output=16, page_size=16,
                    max_num_batched_tokens=64, memory_budget=64 << 20, mixed=0, overlap=1)
    return dict(preset="xl", device="cuda", dtype="bf16", requests=64, prompt_len=8192,
                output_len=128, rate=16.0, batch=64, decode_prompt=1024, decode_output=48,
                spec_requests=64, spec_prompt=2048, spec_output=128, page_size=64,
                max_num_batched_tokens=8192, memory_budget=0.5, mixed=0, overlap=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class Variant:
    """One model and runner (its KV cache and CUDA graphs) shared by every engine built on it,
    through the engine's public constructors, so that each measurement reuses the captures."""

    def __init__(self, cfg: dict, label: str, ks: tuple[int, ...]):
        import torch

        from hwattn.engine.config import EngineConfig
        from hwattn.engine.block_manager import plan_pages
        from hwattn.engine.loader import build_model, resolve_dtype
        from hwattn.engine.model_runner import ModelRunner
        from hwattn.engine.tokenizer import load_tokenizer

        self.cfg, self.label = cfg, label
        self.max_len = max(cfg["prompt_len"] + cfg["output_len"],
                           cfg["decode_prompt"] + cfg["decode_output"],
                           cfg["spec_prompt"] + cfg["spec_output"]) + 16
        kmax = max(ks, default=0)
        device = torch.device(cfg["device"])
        dtype = resolve_dtype(cfg["dtype"], device)
        self.net = build_model(cfg["preset"], attention=label, dtype=dtype, device=device,
                               seed=0, overrides=dict(max_seq_len=self.max_len + kmax + 8))
        self.engine_config = lambda k, budget=None: EngineConfig(  # noqa: E731
            page_size=cfg["page_size"], max_num_seqs=cfg["batch"],
            max_num_batched_tokens=budget or cfg["max_num_batched_tokens"],
            max_model_len=self.max_len, memory_budget=cfg["memory_budget"],
            speculative="ngram" if k else None, num_speculative_tokens=k,
            **self.modes())
        self.kv_bytes = self.net.kv_bytes_per_token(1, dtype)
        self.num_pages = plan_pages(self.engine_config(kmax), self.kv_bytes, device, self.max_len)
        lens = (1,) + tuple(k + 1 for k in ks if k)
        self.runner = ModelRunner(self.net, num_pages=self.num_pages, page_size=cfg["page_size"],
                                  max_model_len=self.max_len + kmax + 1,
                                  max_num_seqs=cfg["batch"], cache_dtype=dtype,
                                  cuda_graphs=True, graph_query_lens=lens)
        self.tokenizer = load_tokenizer(None, self.net.config.vocab_size)

    def modes(self) -> dict:
        """The engine's defaults (mixed steps off, overlapped scheduling on); `--set mixed=1` /
        `overlap=0` change them (in a tree whose engine knows them: a --before tree may not)."""
        from hwattn.engine.config import EngineConfig

        known = EngineConfig.__dataclass_fields__
        out = {}
        if "enable_mixed_batches" in known:
            out["enable_mixed_batches"] = bool(self.cfg.get("mixed", 0))
        if "overlap_scheduling" in known:
            out["overlap_scheduling"] = bool(self.cfg.get("overlap", 1))
        return out

    def engine(self, k: int = 0, budget: int | None = None):
        """An engine on the shared runner: n-gram drafting with k tokens (0: none), and
        `budget` tokens per step (default the serving one)."""
        from hwattn.engine.llm_engine import LLMEngine
        from hwattn.engine.speculative import NgramDrafter

        return LLMEngine(self.runner, self.tokenizer, self.net.config,
                         self.engine_config(k, budget),
                         self.num_pages, NgramDrafter(k) if k else None,
                         kv_bytes_per_token=self.kv_bytes)


def params(n: int):
    from hwattn.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)


def serve_poisson(engine, prompts: list[list[int]], output_len: int, rate: float,
                  seed: int = 0) -> dict:
    """Requests arrive at Poisson times; each token's arrival is when `step()` returns it.
    TTFT counts from the scheduled arrival; ITL is the gap between a request's tokens.
    `slowest_steps`: the five longest `step()` calls, each (seconds, seconds since the start,
    requests that got their first token in it, requests that got a later one)."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        t += rng.expovariate(rate)
    sp = params(output_len)
    start = time.perf_counter()
    due, seen, last, ttft, itl, steps = {}, {}, {}, [], [], []
    i = 0
    while i < len(prompts) or engine.has_unfinished():
        now = time.perf_counter() - start
        while i < len(prompts) and arrivals[i] <= now:
            due[engine.add_request(prompts[i], sp)] = start + arrivals[i]
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - start)))
            continue
        t0 = time.perf_counter()
        outs = engine.step()
        t = time.perf_counter()
        firsts = later = 0
        for out in outs:
            n = len(out.token_ids) - seen.get(out.request_id, 0)
            if n <= 0:
                continue
            if out.request_id not in seen:
                ttft.append(t - due[out.request_id])
                n -= 1
                firsts += 1
            elif n:
                itl += [(t - last[out.request_id]) / n] * n
                later += 1
            seen[out.request_id], last[out.request_id] = len(out.token_ids), t
        steps.append((t - t0, t0 - start, firsts, later))
    wall = time.perf_counter() - start
    tokens = sum(seen.values())
    return dict(requests=len(prompts), output_tokens=tokens, wall_s=wall,
                output_tok_s=tokens / wall, ttft_p50_s=pct(ttft, 0.5), ttft_p99_s=pct(ttft, 0.99),
                itl_p50_s=pct(itl, 0.5), itl_p99_s=pct(itl, 0.99),
                itl_p99_over_p50=pct(itl, 0.99) / pct(itl, 0.5), steps=len(steps),
                slowest_steps=sorted(steps, reverse=True)[:5])


def run_batch(engine, prompts: list[list[int]], output_len: int) -> list[dict]:
    """Submit everything at once and step to the end; per step: wall seconds, whether it
    ran prompt tokens, whether it launched work, tokens generated, sequences running."""
    for p in prompts:
        engine.add_request(p, params(output_len))
    steps = []
    while engine.has_unfinished():
        c0 = dict(engine.counters)
        running = engine.stats()["running"]
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        c = engine.counters
        steps.append(dict(s=dt, prefill=c["prefill_steps"] > c0["prefill_steps"],
                          launched=c["steps"] > c0["steps"], running=running,
                          tokens=c["generation_tokens"] - c0["generation_tokens"],
                          drafted=c["draft_tokens"] - c0["draft_tokens"],
                          accepted=c["accepted_tokens"] - c0["accepted_tokens"]))
    return steps


def decode_share(v: Variant, cfg: dict) -> dict:
    from hwattn.bench.engine import decode_breakdown, random_prompts

    b, lp, lo = cfg["batch"], cfg["decode_prompt"], cfg["decode_output"]
    engine = v.engine(budget=b * lp)  # every prompt in one step: then B decode together
    steps = run_batch(engine, random_prompts(b, lp, v.net.config.vocab_size, seed=3), lo)
    steady = [s["s"] for s in steps if s["launched"] and not s["prefill"] and s["running"] == b]
    step_s = statistics.median(steady) if steady else float("nan")
    probe = decode_breakdown(engine, b, lp + lo // 2)
    forward = probe["forward_queued_s"]  # the forward's device time with steps queued ahead
    return dict(batch=b, context=lp + lo // 2, step_s=step_s, steps=len(steady),
                forward_s=forward, beyond_forward_share=max(0.0, 1 - forward / step_s),
                cuda_graphs=probe.get("cuda_graphs"))


def speculation(v: Variant, cfg: dict, ks: tuple[int, ...], clock) -> dict:
    from hwattn.bench.engine import random_prompts

    prompts = random_prompts(cfg["spec_requests"], cfg["spec_prompt"], v.net.config.vocab_size,
                             seed=5, repetitive=True)
    rows = {}
    budget = cfg["spec_requests"] * cfg["spec_prompt"]  # all prompts first, then decoding
    for k in (0,) + tuple(ks):
        if clock() < 0:
            rows[k] = dict(skipped="time budget")
            continue
        steps = run_batch(v.engine(k, budget), prompts, cfg["spec_output"])
        dec = [s for s in steps if not s["prefill"]]
        timed = [s["s"] for s in dec if s["launched"]]
        drafted = sum(s["drafted"] for s in dec)
        rows[k] = dict(decode_tok_s=sum(s["tokens"] for s in dec) / sum(s["s"] for s in dec),
                       step_s=statistics.median(timed), steps=len(timed),
                       acceptance=sum(s["accepted"] for s in dec) / drafted if drafted else None)
    base = rows[0]
    for k, row in rows.items():
        if k and "skipped" not in row:
            row["speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
            row["step_over_plain"] = row["step_s"] / base["step_s"]
    return {str(k): row for k, row in rows.items()}


def measure(cfg: dict, variants: list[str], spec_variants: list[str], ks: tuple[int, ...],
            budget_s: float) -> dict:
    """Every measurement on the `hwattn` this process imports."""
    import gc

    import torch

    import hwattn
    from hwattn.bench.engine import random_prompts

    start = time.perf_counter()
    clock = lambda: budget_s - (time.perf_counter() - start)  # noqa: E731
    report = dict(hwattn=str(Path(hwattn.__file__).resolve().parent.parent),
                  torch=torch.__version__, settings=cfg, variants={})
    if cfg["device"] == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    for label in variants:
        if clock() < 0:
            report["variants"][label] = dict(skipped="time budget")
            continue
        t0 = time.perf_counter()
        v = Variant(cfg, label, ks if label in spec_variants else ())
        row = dict(build_s=time.perf_counter() - t0, cuda_graphs=bool(v.runner.graphs),
                   graph_error=v.runner.graph_error)
        log(f"{label}: built in {row['build_s']:.1f} s")
        vocab = v.net.config.vocab_size
        run_batch(v.engine(), random_prompts(2, 64, vocab, seed=9), 4)  # warm-up
        row["serving"] = serve_poisson(v.engine(), random_prompts(
            cfg["requests"], cfg["prompt_len"], vocab, seed=1), cfg["output_len"], cfg["rate"])
        log(f"{label}: serving {row['serving']['output_tok_s']:.0f} tok/s, ITL p50 "
            f"{row['serving']['itl_p50_s'] * 1e3:.2f} ms p99 {row['serving']['itl_p99_s'] * 1e3:.2f} ms")
        row["decode"] = decode_share(v, cfg)
        log(f"{label}: decode step {row['decode']['step_s'] * 1e3:.2f} ms, forward "
            f"{row['decode']['forward_s'] * 1e3:.2f} ms")
        if label in spec_variants and ks:
            row["speculation"] = speculation(v, cfg, ks, clock)
            log(f"{label}: speculation {json.dumps(row['speculation'])}")
        report["variants"][label] = row
        del v
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - start
    return report


def table(before: dict | None, after: dict) -> str:
    """Markdown: one row per variant and metric, before / after / after over before."""
    rows = [("serving", "ttft_p50_s", "TTFT p50 (s)"), ("serving", "ttft_p99_s", "TTFT p99 (s)"),
            ("serving", "itl_p50_s", "ITL p50 (s)"), ("serving", "itl_p99_s", "ITL p99 (s)"),
            ("serving", "itl_p99_over_p50", "ITL p99 / p50"),
            ("serving", "output_tok_s", "output tok/s"),
            ("decode", "step_s", "decode step, batch B (s)"),
            ("decode", "forward_s", "captured forward (s)"),
            ("decode", "beyond_forward_share", "step beyond the forward")]
    lines = ["| variant | metric | before | after | after / before |", "|---|---|---|---|---|"]

    def get(rep, label, part, key):
        try:
            return rep["variants"][label][part][key]
        except (KeyError, TypeError):
            return None

    def fmt(x):
        return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))

    for label in after["variants"]:
        for part, key, name in rows:
            a, b = get(after, label, part, key), get(before, label, part, key)
            ratio = a / b if isinstance(a, float) and isinstance(b, float) and b else None
            lines.append(f"| {label} | {name} | {fmt(b)} | {fmt(a)} | {fmt(ratio)} |")
        for side, rep in (("before", before), ("after", after)):
            spec = get(rep, label, "speculation", "0") and rep["variants"][label]["speculation"]
            for k, row in (spec or {}).items():
                if k != "0" and "speedup" in row:
                    lines.append(f"| {label} | n-gram k={k} ({side}) | acceptance "
                                 f"{fmt(row['acceptance'])} | speed-up {fmt(row['speedup'])} | "
                                 f"verify/plain step {fmt(row['step_over_plain'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="another checkout of the repository to measure first")
    p.add_argument("--out", default=os.environ.get("OUT", "."),
                   help="folder for engine_speed.json and engine_speed.md (default: $OUT, else "
                        "the current directory)")
    p.add_argument("--tiny", action="store_true", help="tiny preset on the CPU (tests)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated attention variants to measure (default %(default)s)")
    p.add_argument("--spec-variants", default="gla-2",
                   help="comma-separated variants, of those in --variants, whose n-gram "
                        "speculation is also measured (default %(default)s)")
    p.add_argument("--ks", default="1,2,3,4", help="n-gram draft lengths to measure")
    p.add_argument("--budget-s", type=float, default=320.0,
                   help="work budget in seconds for everything (half each with --before)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a workload setting (requests, prompt_len, rate, ...)")
    p.add_argument("--tree", help=argparse.SUPPRESS)  # the child of --before
    p.add_argument("--json-to", help=argparse.SUPPRESS)
    args = p.parse_args()
    cfg = settings(args.tiny)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            raise SystemExit(f"--set: unknown setting {key!r}; known: {', '.join(cfg)}")
        cfg[key] = type(cfg[key])(float(value)) if isinstance(cfg[key], (int, float)) else value
    variants = [v for v in args.variants.split(",") if v]
    spec_variants = [v for v in args.spec_variants.split(",") if v]
    ks = tuple(int(k) for k in args.ks.split(",") if k)
    tree = Path(args.tree or HERE).resolve()
    sys.path.insert(0, str(tree))
    if args.tree:  # the child: measure and hand the report back
        report = measure(cfg, variants, spec_variants, ks, args.budget_s)
        Path(args.json_to).write_text(json.dumps(report))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before, budget = None, args.budget_s
    if args.before:
        child_json = out / "engine_speed_before.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--tree", str(Path(args.before)),
               "--json-to", str(child_json), "--variants", args.variants, "--spec-variants",
               args.spec_variants, "--ks", args.ks, "--budget-s", str(budget / 2)]
        cmd += ["--tiny"] if args.tiny else []
        for item in args.set:
            cmd += ["--set", item]
        env = dict(os.environ, PYTHONPATH=str(Path(args.before).resolve()))
        log(f"before: measuring {Path(args.before).resolve()} in a subprocess")
        subprocess.run(cmd, check=True, env=env)
        before = json.loads(child_json.read_text())
        budget /= 2
    log(f"after: measuring {tree}")
    after = measure(cfg, variants, spec_variants, ks, budget)
    report = dict(before=before, after=after)
    md = table(before, after)
    (out / "engine_speed.json").write_text(json.dumps(report, indent=1))
    (out / "engine_speed.md").write_text(md + "\n")
    print(md)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
