"""GLA against MLA served across GPUs: tensor parallelism (TP) against data parallelism (DP),
through the live HTTP server, as the paper measures it.

For each configuration the study starts `hwattn serve serving ...` (random weights, the
`serving` preset: h_q = 128, d_h = 128, d_R = 64, MLA latent 512, GLA latent heads of 256,
bf16, page 64, CUDA graphs) as a subprocess, drives it with `hwattn bench serve --url` (every
request streamed over HTTP, `ignore_eos`), then stops it. Workloads, the same prompts for
every configuration (seeded):

- 8K / 1K at concurrency 16, 64 and 128: prompts of 8192 tokens, 1024 output tokens,
  `--prompts-per-concurrency` (default 2) x concurrency requests (32, 128, 256);
- long, imbalanced: 8 prompts with lengths uniform in [1014, 66570], 1024 output tokens,
  concurrency 4.

It reports output throughput, TTFT, inter-token latency and end-to-end latency (median and
p99), KV bytes per token per layer held by each GPU, the KV pool per GPU and the most 8K+1K
sequences that fit, and compares GLA with MLA beside the paper's ratios (GLA-8 at TP=8 over
MLA: 1.17x / 1.70x / 1.60x output throughput at concurrency 16 / 64 / 128, 2.7x on the long
imbalanced workload). JSON is rewritten after every configuration, so a run cut short keeps
what it measured. Each configuration gets its share of `--minutes`; a workload whose
predicted time does not fit its share runs with fewer requests (never fewer than its
concurrency) and the output says so; `hwattn bench serve --max-duration` stops the rest.

Configurations (`--gpus 4`, default): GLA-4 TP=4; MLA TP=4; MLA TP=1 x DP=4; MLA TP=2 x DP=2;
GQA-8 TP=4; GTA-8 TP=4. With `--gpus 2`: GLA-2 TP=2; GLA-2 TP=1; MLA TP=2; MLA TP=1 x DP=2.
With `--gpus 1`: GLA-2 and MLA at TP=1 (the single-GPU baseline).
`--configs gla-4:tp4,mla:tp1:dp4` picks any.

On the GPU machine (Python 3.12, no FastAPI / uvicorn / pydantic, no network): first, here,
`bash benchmarks/fetch_serving_wheels.sh` (fills the git-ignored .whl/), then carry `.whl`
and run, for 4 GPUs, two commands of under 10 minutes each:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/multi_gpu_serving_study.py --gpus 4 --configs gla-4:tp4,mla:tp4,mla:tp1:dp4 --minutes 8.5 --name part1 --out $OUT
    (same install) ; PYTHONUNBUFFERED=1 python3 benchmarks/multi_gpu_serving_study.py --gpus 4 --configs mla:tp2:dp2,gqa-8:tp4,gta-8:tp4 --minutes 8.5 --name part2 --out $OUT

for 8 GPUs (the paper's own setting: GLA-8 TP=8, MLA TP=8, MLA TP=2 x DP=4 on 8K prompts at
concurrency 16 / 64 / 128, 32K and 64K prompts at 16, prompts uniform up to 128K at 4) two:

    (same install) ; PYTHONUNBUFFERED=1 python3 benchmarks/multi_gpu_serving_study.py --gpus 8 --configs gla-8:tp8,mla:tp8 --minutes 9 --name eight_a --out $OUT
    (same install) ; PYTHONUNBUFFERED=1 python3 benchmarks/multi_gpu_serving_study.py --gpus 8 --configs mla:tp2:dp4 --minutes 9 --name eight_b --out $OUT

and for 2 GPUs one command:

    (same install) ; PYTHONUNBUFFERED=1 python3 benchmarks/multi_gpu_serving_study.py --gpus 2 --minutes 8.5 --name two_gpus --out $OUT

`--report A.json B.json ...` prints the combined tables of finished runs. `--tiny` runs the
same code on CPU: the tiny preset, short prompts, configurations of two processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The paper's GLA-8 (TP=8) over MLA output throughput, 8 GPUs (8K prompts / 4K outputs, and
# the long imbalanced workload of prompts up to 131K).
PAPER_RATIOS = {"c16": 1.17, "c64": 1.70, "c128": 1.60, "long": 2.7, "imb_r0": 2.7}
CONFIGS = {8: "gla-8:tp8,mla:tp8,mla:tp2:dp4",
           4: "gla-4:tp4,mla:tp4,mla:tp1:dp4,mla:tp2:dp2,gqa-8:tp4,gta-8:tp4",
           2: "gla-2:tp2,gla-2:tp1,mla:tp2,mla:tp1:dp2",
           1: "gla-2:tp1,mla:tp1"}  # the pipeline and the single-GPU baseline, on one H200


def uniform(lo: int, hi: int) -> dict:
    """Prompt lengths uniform in [lo, hi], as `hwattn bench serve` takes them (mean, spread)."""
    return dict(mean=(lo + hi) // 2, spread=round((hi - lo) / (hi + lo), 4))


def workloads(gpus: int, tiny: bool) -> dict:
    """name -> prompt lengths (mean, spread), concurrency, requests (None: the run's
    requests-per-concurrency x concurrency) and the share of a configuration's time it may
    take, in the order they run. Eight GPUs get the paper's own set (section 5.2): 8K prompts
    at 16 / 64 / 128, 32K and 64K prompts at 16, and prompts uniform up to 128K with the
    shortest at r = 0 and r = 0.125 of the longest, at 4."""
    k = 1 / 256 if tiny else 1  # the tiny preset's 8K is 32 tokens
    fixed = lambda n, c, w, prompts=None: dict(mean=int(n * k) or 1, spread=0.0, concurrency=c,  # noqa: E731
                                               prompts=prompts, weight=w)
    if tiny:
        scale = {16: 2, 64: 4, 128: 8, 4: 2}
    else:
        scale = {16: 16, 64: 64, 128: 128, 4: 4}
    out = {"c16": fixed(8192, scale[16], 0.15), "c64": fixed(8192, scale[64], 0.25),
           "c128": fixed(8192, scale[128], 0.35)}
    if gpus < 8:
        long = dict(mean=160, spread=0.9) if tiny else dict(mean=33792, spread=0.97)  # [1014, 66570]
        out["long"] = dict(long, concurrency=scale[4], prompts=4 if tiny else 8, weight=0.25)
        return out
    for name in out:
        out[name]["weight"] *= 0.5
    top = 320 if tiny else 131072
    out["ctx32k"] = fixed(32768, scale[16], 0.125, 2 if tiny else 16)
    out["ctx64k"] = fixed(65536, scale[16], 0.15, 2 if tiny else 16)
    out["imb_r0"] = dict(uniform(max(1, top // 128), top), concurrency=scale[4],
                         prompts=4 if tiny else 8, weight=0.175)
    out["imb_r0.125"] = dict(uniform(top // 8, top), concurrency=scale[4],
                             prompts=4 if tiny else 8, weight=0.175)
    return out


def settings(tiny: bool, per_concurrency: int, gpus: int = 4) -> dict:
    loads = workloads(gpus, tiny)
    longest = max(int(w["mean"] * (1 + w["spread"])) + 1 for w in loads.values())
    if tiny:
        return dict(preset="tiny", page_size=16, output_len=8, prompt_len=loads["c64"]["mean"],
                    workloads=loads, per_concurrency=per_concurrency,
                    serve=["--device", "cpu", "--dtype", "fp32", "--max-seq-len",
                           str(max(512, longest + 64)), "--memory-budget", "4e6",
                           "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
                           "--cpu-threads", "1"])
    serve = ["--max-num-seqs", "128", "--max-num-batched-tokens", "8192"]
    if longest + 1024 > 68 * 1024:  # beyond the serving preset's context
        serve += ["--max-seq-len", str(-(-(longest + 1024) // 1024) * 1024)]
    return dict(preset="serving", page_size=64, output_len=1024, prompt_len=8192,
                workloads=loads, per_concurrency=per_concurrency, serve=serve)


def parse_config(text: str) -> dict:
    """'mla:tp2:dp2' -> {'variant': 'mla', 'tp': 2, 'dp': 2}."""
    parts = text.strip().split(":")
    cfg = dict(variant=parts[0], tp=1, dp=1)
    for part in parts[1:]:
        key, value = part[:2], part[2:]
        if key not in ("tp", "dp") or not value.isdigit() or int(value) < 1:
            raise ValueError(f"configuration parts are tpN / dpN, got {part!r} in {text!r}")
        cfg[key] = int(value)
    cfg["name"] = f"{cfg['variant']} TP={cfg['tp']}" + (f" x DP={cfg['dp']}" if cfg["dp"] > 1 else "")
    return cfg


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def device_name(tiny: bool) -> str:
    if not tiny:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.split("\n")
            names = [n.strip() for n in out if n.strip()]
            if names:
                return f"{len(names)} x {names[0]}"
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or "cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    from hwattn.parallel.launch import NO_MULTICAST

    env = dict(os.environ, **NO_MULTICAST)  # NVLink multicast stays off in every process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kv_bytes_per_gpu(preset: str, variant: str, tp: int, tiny: bool) -> int:
    """Bytes of KV cache per token per layer held by one GPU (the layer's own accounting)."""
    import torch

    from hwattn.config import ModelConfig, parse_variant
    from hwattn.models import Transformer

    cfg = ModelConfig.from_preset(preset, **parse_variant(variant))
    attn = Transformer(cfg, device="meta").layers[0].attn
    return attn.kv_bytes_per_token(tp, torch.float32 if tiny else torch.bfloat16)


class Server:
    """`hwattn serve` in its own session: started, waited for, and stopped for sure."""

    def __init__(self, cfg: dict, st: dict, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "hwattn", "serve", st["preset"], "--attention",
               cfg["variant"], "--tp", str(cfg["tp"]), "--dp", str(cfg["dp"]), "--port",
               str(self.port), "--page-size", str(st["page_size"]), *st["serve"]]
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=child_env(), cwd=ROOT, start_new_session=True)
        self.log_path = log_path

    def wait_ready(self, timeout: float) -> float:
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}: "
                                   + self.log_path.read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the server was not ready within {timeout:.0f} s: "
                                   + self.log_path.read_text()[-2000:])
            time.sleep(0.5)

    def metrics(self) -> dict:
        from hwattn.server.metrics import read_metrics

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return read_metrics(r.read().decode())

    def stop(self) -> None:
        """SIGINT (graceful), then SIGKILL to the whole session after 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log_file.close()


def run_workload(server: Server, name: str, st: dict, prompts: int, cap_s: float,
                 work_dir: Path) -> dict:
    """`hwattn bench serve --url` for one workload; its JSON document."""
    w = st["workloads"][name]
    mean, spread, concurrency = w["mean"], w["spread"], w["concurrency"]
    out = work_dir / f"bench_{name}.json"
    cmd = [sys.executable, "-m", "hwattn", "bench", "serve", "--url", server.url,
           "--num-prompts", str(prompts), "--prompt-len", str(mean), "--prompt-spread",
           str(spread), "--output-len", str(st["output_len"]), "--max-concurrency",
           str(concurrency), "--max-duration", f"{max(cap_s, 5.0):.0f}", "--seed", "0",
           "--json", "--out", str(out)]
    proc = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=max(cap_s, 5.0) + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"bench serve failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc = json.loads(out.read_text())
    doc.update(workload=name, concurrency=concurrency, prompt_len_mean=mean,
               prompt_spread=spread, output_len=st["output_len"])
    return doc


def plan_prompts(name: str, st: dict, cap_s: float, rate: float | None, notes: list,
                 cfg_name: str) -> int:
    """Requests for a workload: the planned count, fewer if the measured token rate says it
    would not fit `cap_s` (but at least one full wave of `concurrency`)."""
    w = st["workloads"][name]
    concurrency = w["concurrency"]
    planned = w["prompts"] or st["per_concurrency"] * concurrency
    tokens = w["mean"] + st["output_len"]
    if rate is None:
        return planned
    fit = int(0.8 * cap_s * rate / tokens)
    if fit >= planned:
        return planned
    chosen = max(concurrency, fit)
    notes.append(f"{cfg_name}, {name}: {chosen} requests instead of {planned} to fit "
                 f"{cap_s:.0f} s (measured {rate:.0f} prompt+output tok/s)")
    return chosen


def study_config(cfg: dict, st: dict, share_s: float, tiny: bool, notes: list) -> dict:
    t0 = time.perf_counter()
    row = dict(cfg, kv_bytes_per_token_per_layer_per_gpu=kv_bytes_per_gpu(
        st["preset"], cfg["variant"], cfg["tp"], tiny), workloads={})
    cfg_dir = Path(tempfile.mkdtemp(prefix="hwattn-study-"))
    server = Server(cfg, st, cfg_dir / "server.log")
    try:
        row["startup_s"] = server.wait_ready(min(share_s * 0.7, 480.0))
        m = server.metrics()
        pages = m["hwattn_kv_pages_capacity"] / cfg["dp"]  # per replica (the sum over replicas)
        page = m["hwattn_kv_page_size_tokens"]
        from hwattn.config import ModelConfig, parse_variant

        layers = ModelConfig.from_preset(st["preset"], **parse_variant(cfg["variant"])).n_layers
        per_seq = -(-(st["prompt_len"] + st["output_len"]) // int(page))
        row.update(kv_pages_per_replica=pages, page_size=page,
                   kv_pool_bytes_per_gpu=pages * page * layers
                   * row["kv_bytes_per_token_per_layer_per_gpu"],
                   max_sequences=int(pages // per_seq) * cfg["dp"])
        log(f"{cfg['name']}: ready in {row['startup_s']:.0f} s, {pages:.0f} pages/replica, "
            f"up to {row['max_sequences']} sequences of {st['prompt_len']}+{st['output_len']}")
        rate, skipped = None, set()
        weights = {n: w["weight"] for n, w in st["workloads"].items()}
        for name, weight in weights.items():
            left = share_s - (time.perf_counter() - t0)
            weights_left = sum(w for n, w in weights.items() if n not in row["workloads"]
                               and n not in skipped)
            cap = left * weight / weights_left
            if cap < 5:
                notes.append(f"{cfg['name']}, {name}: skipped, out of its time share")
                skipped.add(name)
                continue
            prompts = plan_prompts(name, st, cap, rate, notes, cfg["name"])
            doc = run_workload(server, name, st, prompts, cap, cfg_dir)
            row["workloads"][name] = doc
            if doc["wall_s"] > 0 and not st["workloads"][name]["spread"]:
                rate = (doc["prompt_tokens"] + doc["output_tokens"]) / doc["wall_s"]
            if doc["itl_s"]["median"] < doc["tpot_s"]["median"] / 3:
                notes.append(f"{cfg['name']}, {name}: streamed chunks arrived in bursts (ITL "
                             f"p50 {doc['itl_s']['median'] * 1e3:.2f} ms against TPOT p50 "
                             f"{doc['tpot_s']['median'] * 1e3:.2f} ms): the HTTP server or the "
                             "client fell behind the engine; read TPOT, not ITL")
            if doc["timed_out"] or doc["failed"]:
                notes.append(f"{cfg['name']}, {name}: {doc['completed']}/{doc['requests']} "
                             f"completed{' (time limit)' if doc['timed_out'] else ''}"
                             f"{'; errors: ' + str(doc['errors']) if doc['errors'] else ''}")
            log(f"{cfg['name']}, {name}: {doc['completed']} requests, "
                f"{doc['output_tokens_per_s']:.0f} out tok/s, TTFT p50 "
                f"{doc['ttft_s']['median']:.2f} s, ITL p50 {doc['itl_s']['median'] * 1e3:.1f} ms")
    finally:
        server.stop()
        log_lines = server.log_path.read_text(errors="replace").splitlines()
        row["server_log"] = [line for line in log_lines if line.startswith("hwattn serve:")][:1] \
            + log_lines[-15:]
        shutil.rmtree(cfg_dir, ignore_errors=True)
    row["wall_s"] = time.perf_counter() - t0
    return row


def table(doc: dict) -> str:
    lines = [f"# Multi-GPU serving study ({doc['device']}, {doc['preset']} preset)", "",
             f"torch {doc.get('torch')}; {doc.get('wall_s', 0):.0f} s wall; requests per "
             f"workload as listed; output {doc['settings']['output_len']} tokens.", "",
             "| config | workload | requests | out tok/s | TTFT p50 / p99 s | ITL p50 / p99 ms | "
             "TPOT p50 ms | e2e p50 / p99 s | KV B/tok/layer per GPU | KV pool per GPU MiB | "
             f"most sequences of {doc['settings']['prompt_len']}+{doc['settings']['output_len']} |",
             "|" + "---|" * 11]
    for row in doc["configs"]:
        if "error" in row:
            lines.append(f"| {row['name']} | error: {row['error'][:200]} |" + " |" * 9)
            continue
        for name, w in row["workloads"].items():
            lines.append(
                f"| {row['name']} | {name} | {w['completed']}/{w['requests']} at c={w['concurrency']} | "
                f"{w['output_tokens_per_s']:.0f} | {w['ttft_s']['median']:.2f} / "
                f"{w['ttft_s']['p99']:.2f} | {w['itl_s']['median'] * 1e3:.1f} / "
                f"{w['itl_s']['p99'] * 1e3:.1f} | {w['tpot_s']['median'] * 1e3:.1f} | "
                f"{w['e2e_s']['median']:.1f} / "
                f"{w['e2e_s']['p99']:.1f} | {row['kv_bytes_per_token_per_layer_per_gpu']} | "
                f"{row['kv_pool_bytes_per_gpu'] / 2**20:.0f} | {row['max_sequences']} |")
    names = list(doc["settings"]["workloads"])
    lines += ["", "Output throughput of GLA over each other configuration, beside the paper's "
              "GLA-8 (TP=8) over MLA:", "", "| GLA / other | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names),
              "| paper: GLA-8 TP=8 / MLA (8 GPUs) | " + " | ".join(
                  f"{PAPER_RATIOS[k]:.2f}x" if k in PAPER_RATIOS else "-" for k in names) + " |"]
    for gla, other, ratios in doc.get("ratios", []):
        lines.append(f"| {gla} / {other} | " + " | ".join(
            f"{ratios[k]:.2f}x" if k in ratios else "-" for k in names) + " |")
    if doc.get("targets"):
        lines += ["", "Targets:"] + [f"- {t}" for t in doc["targets"]]
    if doc.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def ratios(rows: list[dict]) -> list:
    ok = {r["name"]: r for r in rows if "error" not in r}
    out = []
    for gla in [n for n in ok if n.startswith("gla")]:
        for other in [n for n in ok if n != gla]:
            r = {k: ok[gla]["workloads"][k]["output_tokens_per_s"]
                 / max(ok[other]["workloads"][k]["output_tokens_per_s"], 1e-9)
                 for k in ok[gla]["workloads"] if k in ok[other]["workloads"]}
            out.append((gla, other, r))
    return out


def targets(rows: list[dict]) -> list[str]:
    ok = {r["name"]: r["workloads"] for r in rows if "error" not in r}
    out = []

    def check(a, b, wl, want, what):
        if a in ok and b in ok and wl in ok[a] and wl in ok[b]:
            x = ok[a][wl]["output_tokens_per_s"] / max(ok[b][wl]["output_tokens_per_s"], 1e-9)
            out.append(f"{a} / {b} output throughput, {wl}: {x:.2f}x (target >= {want}x): "
                       f"{'met' if x >= want else 'missed'}{what}")

    check("gla-4 TP=4", "mla TP=4", "c64", 1.5, "")
    if "gla-4 TP=4" in ok and "mla TP=4" in ok and "c64" in ok["gla-4 TP=4"] and "c64" in ok["mla TP=4"]:
        a, b = ok["gla-4 TP=4"]["c64"]["ttft_s"]["p99"], ok["mla TP=4"]["c64"]["ttft_s"]["p99"]
        out.append(f"gla-4 TP=4 p99 TTFT at c64 {a:.2f} s vs mla TP=4 {b:.2f} s (target lower): "
                   f"{'met' if a < b else 'missed'}")
    check("gla-4 TP=4", "mla TP=1 x DP=4", "long", 2.0, "")
    check("gla-2 TP=2", "gla-2 TP=1", "c64", 1.7, "")
    check("gla-8 TP=8", "mla TP=8", "c64", 1.5, "")
    for imbalanced in ("imb_r0", "imb_r0.125"):
        check("gla-8 TP=8", "mla TP=2 x DP=4", imbalanced, 2.0, "")
    return out


def save(out_dir: Path, name: str, doc: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"multi_gpu_serving_{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / f"multi_gpu_serving_{name}.md").write_text(table(doc))


def report(paths: list[str]) -> int:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    doc = dict(docs[0], configs=[r for d in docs for r in d["configs"]],
               notes=[n for d in docs for n in d.get("notes", [])],
               wall_s=sum(d.get("wall_s", 0) for d in docs))
    doc["ratios"] = ratios(doc["configs"])
    doc["targets"] = targets(doc["configs"])
    print(table(doc), end="")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=4, choices=(1, 2, 4, 8),
                   help="which configuration set (default 4)")
    p.add_argument("--configs", default=None, help="comma-separated, e.g. gla-4:tp4,mla:tp1:dp4")
    p.add_argument("--minutes", type=float, default=9.0, help="time for all configurations")
    p.add_argument("--prompts-per-concurrency", type=int, default=2,
                   help="requests per 8K workload = this x its concurrency (default 2)")
    p.add_argument("--name", default="all", help="results go to multi_gpu_serving_NAME.json/.md")
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"),
                   help="folder for the results (default: $OUT, else benchmarks/results)")
    p.add_argument("--tiny", action="store_true", help="tiny preset on CPU (a smoke run)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="print the tables of finished runs")
    args = p.parse_args(argv)
    if args.report:
        return report(args.report)
    st = settings(args.tiny, args.prompts_per_concurrency, args.gpus)
    configs = [parse_config(c) for c in (args.configs or CONFIGS[args.gpus]).split(",") if c]
    if not args.tiny:
        for c in configs:
            if c["tp"] * c["dp"] > args.gpus:
                raise SystemExit(f"{c['name']} needs {c['tp'] * c['dp']} GPUs; --gpus is {args.gpus}")
    import torch

    out_dir = Path(args.out)
    start = time.perf_counter()
    budget = args.minutes * 60
    notes = ["no GPU: tiny preset on CPU, attention through the PyTorch reference"] if args.tiny else []
    doc = dict(device=device_name(args.tiny), torch=torch.__version__, preset=st["preset"],
               settings=st, configs=[], notes=notes, complete=False)
    log(f"multi-GPU serving study on {doc['device']}: {[c['name'] for c in configs]}, "
        f"{args.minutes:g} min")
    for i, cfg in enumerate(configs):
        left = budget - (time.perf_counter() - start)
        share = left / (len(configs) - i)
        if share < 20:
            doc["configs"].append(dict(cfg, error=f"skipped: {left:.0f} s left of the budget"))
            continue
        try:
            row = study_config(cfg, st, share, args.tiny, notes)
        except Exception as err:  # noqa: BLE001 - one configuration failing must not lose the rest
            log(f"{cfg['name']} failed: {type(err).__name__}: {err}")
            row = dict(cfg, error=f"{type(err).__name__}: {err}"[-1500:])
        doc["configs"].append(row)
        doc["ratios"] = ratios(doc["configs"])
        doc["targets"] = targets(doc["configs"])
        doc["wall_s"] = time.perf_counter() - start
        save(out_dir, args.name, doc)
    doc["complete"] = True
    doc["wall_s"] = time.perf_counter() - start
    save(out_dir, args.name, doc)
    print(table(doc), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
