"""The vLLM-shaped engine API on a GPU, in one command (about a minute on one H100/H200):

    PYTHONUNBUFFERED=1 python benchmarks/vllm_api_gpu_check.py --out $OUT

1. `gpu_memory_utilization`: builds the engine at 0.5 of the GPU and reports the memory in
   use (whole device) before, after the build and after a batch of generation, beside the
   0.5 target; pages and KV bytes.
2. Log-probabilities on the GPU, with CUDA graphs: a request's `logprobs` and
   `prompt_logprobs` against a dense fp32 forward of the same model (max abs difference).
3. Sampler cost per decode step at B = 64: plain greedy vs greedy with presence / frequency /
   repetition penalties, min_p, min_tokens and logprobs=5 (tokens/s of each, same prompts).
4. `n = 4` sampling and an abort of an n = 4 request leave no page held.

Writes `vllm_api_gpu_check.json` under --out (default $OUT or .) and prints it.
`--device cpu --preset tiny` runs the same code on a CPU (the memory part is skipped there).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402

from hwattn.engine import LLM, SamplingParams  # noqa: E402


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def device_used(device) -> float:
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / total


def timed_generate(llm, prompts, params) -> dict:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return dict(seconds=round(seconds, 3), output_tokens=tokens,
                tokens_per_s=round(tokens / seconds, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."),
                    help="folder for vllm_api_gpu_check.json (default: $OUT, else the current "
                         "directory)")
    ap.add_argument("--preset", default="mini",
                    help="model shape, random weights (default %(default)s)")
    ap.add_argument("--attention", default="gla-2",
                    help="attention variant of the model (default %(default)s)")
    ap.add_argument("--device", default="cuda",
                    help="cuda, cuda:N or cpu; the memory part runs on CUDA only (default "
                         "%(default)s)")
    ap.add_argument("--batch", type=int, default=64,
                    help="prompts of 256 random tokens generated together in the timed "
                         "sampler runs (default %(default)s)")
    ap.add_argument("--output-len", type=int, default=128,
                    help="tokens generated per prompt in the timed sampler runs (default "
                         "%(default)s)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    report: dict = dict(preset=args.preset, attention=args.attention, device=args.device)
    kw = dict(attention=args.attention, device=args.device, seed=0, page_size=64)

    if cuda:
        dev = torch.device(args.device)
        total = torch.cuda.mem_get_info(dev)[1]
        before = device_used(dev)
        llm = LLM(args.preset, gpu_memory_utilization=0.5, **kw)
        built = device_used(dev)
    else:
        llm = LLM(args.preset, memory_budget=256 << 20, **kw)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (256,), generator=g).tolist() for _ in range(args.batch)]
    greedy = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    extras = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True,
                            presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                            min_p=0.05, min_tokens=8, logprobs=5)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8))  # warm-up
    report["plain_greedy"] = timed_generate(llm, prompts, greedy)
    report["penalties_min_p_logprobs"] = timed_generate(llm, prompts, extras)
    if cuda:
        report["memory"] = dict(
            total_gib=gib(total), target_fraction=0.5, used_before=round(before, 3),
            used_after_build=round(built, 3), used_after_generate=round(device_used(dev), 3),
            kv_cache_gib=gib(engine.runner.kv_cache_bytes), pages=engine.stats()["pages_total"],
            cuda_graphs=bool(engine.runner.graphs))

    # Log-probabilities against a dense fp32 forward of the same weights.
    out = llm.generate([prompts[0][:64]], SamplingParams(max_tokens=16, temperature=0.7, seed=1,
                                                         logprobs=3, prompt_logprobs=3,
                                                         ignore_eos=True))[0]
    ids = out.prompt_token_ids + out.token_ids
    dense = copy.deepcopy(engine.model).float()  # the engine keeps its own dtype
    with torch.no_grad():
        ref = dense(torch.tensor([ids], device=engine.device))[0].log_softmax(-1)
    del dense
    diffs = [abs(e[ids[p]].logprob - ref[p - 1, ids[p]].item())
             for p, e in enumerate(out.prompt_logprobs) if e is not None]
    diffs += [abs(e[t].logprob - ref[len(out.prompt_token_ids) + j - 1, t].item())
              for j, (t, e) in enumerate(zip(out.token_ids, out.outputs[0].logprobs))]
    report["logprobs_max_abs_diff_vs_dense_fp32"] = max(diffs)

    # n = 4 and an aborted n = 4 request hold no page afterwards.
    outs = llm.generate(prompts[:8], SamplingParams(n=4, max_tokens=32, seed=3, ignore_eos=True))
    rid = engine.add_request(prompts[-1], SamplingParams(n=4, max_tokens=200, ignore_eos=True))
    for _ in range(5):
        engine.step()
    engine.abort_request(rid)
    engine.check_invariants()
    report["n4"] = dict(outputs_per_request=[len(o.outputs) for o in outs][:3],
                        distinct_completions=len({tuple(c.token_ids) for c in outs[0].outputs}),
                        pages_used_after=engine.stats()["pages_used"])
    path = Path(args.out) / "vllm_api_gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
