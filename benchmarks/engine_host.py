"""The engine's host cost per decode step, with the device's work taken out.

With overlapped scheduling a decode step costs max(device, host): the host must schedule,
build the step's inputs, refresh the split-KV plan, launch the captured forward and sampling,
read the previous step's tokens back and update every sequence within one device step. This
script measures that host work alone, on any machine (a CPU included): a `tiny` model whose
captured decode graphs are replaced by a replay that does nothing, behind a backend that plans
decode steps as the GPU kernels do (`plan_decode`), so every line of Python the engine runs
around a GPU decode step runs here too. On the CPU it leaves out the CUDA API's own time;
with `--device cuda` the step's uploads, plan refresh, argmax and copy back are real and only
the graph launch is missing, so the engine's launch phase in `engine_roofline.py`'s host table
minus this one's is what replaying the graph costs the host.

    python3 benchmarks/engine_host.py --batch 64 --context 1024 --steps 200
    python3 benchmarks/engine_host.py --profile tottime      # cProfile of the decode steps
    python3 benchmarks/engine_host.py --batch 32 --context 320 --steps 128 --speculative 4

`--speculative K`: n-gram drafting of K tokens a step, verified by replays of the captured
K + 1 query-token graph. A replay that did nothing would verify every draft against the same
stale logits, so with K (or `--target scripted`) each replay writes the logits of a scripted
target instead: the next token is a fixed random map of the token (onto 64 ids, so that
texts repeat and n-grams match), shifted by the position at the positions a hash picks
(about one in 12), so that some drafts are rejected. It depends only on the token and its
position, so greedy outputs are the same at every K (checked by `--check`). Its own time
lands in the forward part, which the host phases leave out. `--speculative-disable-batch-size
N` sets the engine's `speculative_disable_batch_size`: at `--batch` >= N the steps are plain
and overlapped, and should cost what K = 0's do.

Prints the median µs per phase of `LLMEngine.step` (`hwattn/engine/step_timer.py`), the
host-to-device copies the runner makes per step (uploads and plan refreshes, counted) and the
wall time per step (with `--speculative`, also the generated tokens per step, the drafts'
acceptance and the host µs per generated token), and writes them as one JSON line to `--out`
if given.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402

from hwattn.bench.engine import random_prompts  # noqa: E402
from hwattn.data.tokenizer import load_tokenizer  # noqa: E402
from hwattn.engine.block_manager import pages_for  # noqa: E402
from hwattn.engine.config import EngineConfig  # noqa: E402
from hwattn.engine.llm_engine import LLMEngine  # noqa: E402
from hwattn.engine.loader import build_model  # noqa: E402
from hwattn.engine.model_runner import ModelRunner  # noqa: E402
from hwattn.engine.sampling_params import SamplingParams  # noqa: E402
from hwattn.engine.speculative import NgramDrafter  # noqa: E402
from hwattn.engine.step_timer import PHASES  # noqa: E402
from hwattn.ops.backends.torch_backend import TorchBackend  # noqa: E402
from hwattn.ops.plan import plan_decode  # noqa: E402


class PlanningBackend(TorchBackend):
    """The PyTorch reference backend with the GPU kernels' decode plan, so that each step
    refreshes a split-KV plan as it does on a GPU."""

    name = "torch+plan"

    def plan(self, cache_seqlens, *, num_heads_kv, query_len=1, page_size, device=None,
             out=None, reserve_pieces=False):
        plan = plan_decode(cache_seqlens, num_heads_kv=num_heads_kv, query_len=query_len,
                           page_size=page_size, reserve_pieces=reserve_pieces, out=out)
        if out is not None:
            return plan
        return plan.to(device if device is not None else cache_seqlens.device)


PREFILL_TOKENS = 32768  # prompt tokens per prefill step, at most (whole prompts)


def count_copies(runner) -> Counter:
    """Count the runner's host-to-device copies from here on: each upload, each staged copy
    of a captured step's inputs (`hwattn.engine.staging.StagedInputs`), and each refreshed
    plan that is not staged with them (one copy when its tensors share a buffer, else two)."""
    copies: Counter = Counter()
    for stage in getattr(runner, "stages", {}).values():
        def staged(*args, _fn=stage.upload, **kwargs):
            copies["copies"] += 1
            return _fn(*args, **kwargs)
        stage.upload = staged
    upload = runner._upload

    def counted(*args, **kwargs):
        copies["copies"] += 1
        return upload(*args, **kwargs)
    runner._upload = counted
    plan = runner.plan

    def planned(seqlens, query_len, out=None):
        parts = runner.backend.plan_parts(out) if out is not None else []
        if out is not None and not (parts and all(p.host is not None for p in parts)):
            copies["copies"] += 1 if getattr(out, "packed", None) is not None else 2
        return plan(seqlens, query_len, out=out)  # (a staged plan rides the inputs' copy)

    runner.plan = planned
    return copies


def stub_record(forward):
    """In place of `ModelRunner._record`: run the captured step once for its output buffer
    and plan, then replay nothing."""
    with torch.inference_mode():
        out = forward()
    return (lambda: None), out


SCRIPT_IDS = 64  # the scripted target's next tokens lie in [0, SCRIPT_IDS)


def scripted_target(vocab: int, seed: int = 1, device="cpu"):
    """next(tokens (B, T) int64, positions (B, T) int64) -> (B, T) int64: the scripted
    target's next token after each token (see the module's docstring), on `device`."""
    succ = torch.randint(0, SCRIPT_IDS, (vocab,),
                         generator=torch.Generator().manual_seed(seed)).to(device)

    def next_tokens(tokens, positions):
        out = succ[tokens.clamp(0, vocab - 1)]
        shifted = (positions * 40503 + tokens * 9973) % 97 < 8
        return torch.where(shifted, (out + positions) % SCRIPT_IDS, out)

    return next_tokens


def scripted_record(runner, vocab: int):
    """A `ModelRunner._record` whose replay writes one-hot logits of `scripted_target`
    for the static inputs the runner staged (tokens and lengths) into the step's output."""
    next_tokens = scripted_target(vocab, device=runner.device)

    def record(forward):
        with torch.inference_mode():
            out = forward()  # (logits (size, t, V), argmax (size,) or (size, t))
        logits, argmax = out
        size, t = logits.shape[0], logits.shape[1]

        def replay():
            ids, _, lens = runner.static[t]
            positions = lens[:size, None].long() - t + torch.arange(t, device=ids.device)
            logits.zero_()
            logits.scatter_(-1, next_tokens(ids[:size], positions)[..., None], 1.0)
            argmax.copy_((logits[:, -1] if t == 1 else logits).argmax(-1))  # as the graph does

        return replay, out

    return record


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="gqa-4", help="attention variant (default gqa-4)")
    p.add_argument("--batch", type=int, default=64, help="decoding sequences (default 64)")
    p.add_argument("--context", type=int, default=1024,
                   help="tokens per sequence around the measured steps (default 1024)")
    p.add_argument("--steps", type=int, default=200, help="decode steps measured (default 200)")
    p.add_argument("--page-size", type=int, default=64,
                   help="tokens per KV-cache page (default %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the tiny model and the step's tensors live (default cpu)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of every request (default 0: greedy)")
    p.add_argument("--output-kind", default="final_only",
                   choices=("final_only", "cumulative", "delta"),
                   help="the requests' SamplingParams.output_kind (default final_only, as "
                        "LLM.generate; cumulative: an output per request and step holding "
                        "everything so far; delta: one holding only the step's new tokens, as "
                        "the server asks)")
    p.add_argument("--detokenize", action="store_true",
                   help="the requests detokenize their output as it grows (as LLM.generate "
                        "and the server do; default off, as in the recorded runs; the "
                        "tokenizer is the byte fallback unless --tokenizer names one)")
    p.add_argument("--tokenizer", type=Path, metavar="PATH",
                   help="a local tokenizer.json (or a folder holding one) of at most 2048 ids to "
                        "detokenize with (default: the byte fallback)")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="n-gram drafts verified per step (default 0: plain decoding)")
    p.add_argument("--speculative-disable-batch-size", type=int, default=None, metavar="N",
                   help="with --speculative: steps of N or more running sequences decode "
                        "plainly (the engine's speculative_disable_batch_size)")
    p.add_argument("--target", choices=("none", "scripted"),
                   help="what a replayed step computes: nothing (default without "
                        "--speculative) or the scripted target's logits (default with it)")
    p.add_argument("--check", action="store_true",
                   help="also decode the same prompts with K = 0 and fail unless the greedy "
                        "outputs are equal")
    p.add_argument("--profile", choices=("tottime", "cumulative"),
                   help="print a cProfile of the measured steps, sorted by this key")
    p.add_argument("--cpu-threads", type=int,
                   help="torch CPU threads of this process (default: torch's own, one per core)")
    p.add_argument("--out", type=Path, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device on this machine")
    if args.cpu_threads is not None and args.cpu_threads < 1:
        p.error(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
    if args.speculative < 0:
        p.error(f"--speculative must be >= 0, got {args.speculative}")
    if args.speculative_disable_batch_size is not None and not args.speculative:
        p.error("--speculative-disable-batch-size needs --speculative K")
    if args.target is None:
        args.target = "scripted" if args.speculative else "none"
    if args.speculative and args.target != "scripted":
        p.error("--speculative needs --target scripted (a replay doing nothing verifies "
                "every draft against stale logits)")
    if args.tokenizer is not None and not args.detokenize:
        p.error("--tokenizer is what --detokenize decodes with: give --detokenize too")
    if args.check and args.temperature != 0:
        p.error("--check compares greedy outputs: --temperature must be 0")
    for name in ("batch", "context", "steps", "page_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.context <= args.steps // 2 + 1:
        p.error(f"--context must exceed --steps / 2 + 1 ({args.steps // 2 + 1}), got {args.context}")
    return args


def build_engine(args, k: int | None = None) -> LLMEngine:
    """The engine measured: the tiny model behind stubbed decode graphs, drafting `k`
    n-gram tokens a step (default `--speculative`)."""
    k = args.speculative if k is None else k
    max_len = args.context + args.steps
    net = build_model("tiny", attention=args.variant, dtype=torch.float32, device=args.device, seed=0,
                      overrides=dict(max_seq_len=max_len))
    num_pages = args.batch * pages_for(max_len, args.page_size) + 1
    runner = ModelRunner(net, num_pages, args.page_size, max_len, max_num_seqs=args.batch,
                         backend=PlanningBackend(), cuda_graphs=False)
    # The captured graphs, with a replay that does nothing or computes the scripted target.
    runner._record = (scripted_record(runner, net.config.vocab_size)
                      if args.target == "scripted" else stub_record)
    runner._capture((1, k + 1) if k else (1,))
    if not runner.cuda_graphs:
        raise RuntimeError(f"stub capture failed: {runner.graph_error}")
    prompt_len = args.context - args.steps // 2
    # Prompts are prefilled a few at a time: one step of 64 prompts of 8K tokens would ask
    # the dense prefill for more memory than an H200 has.
    per_step = max(1, min(args.batch, PREFILL_TOKENS // prompt_len))
    config = EngineConfig(page_size=args.page_size, max_num_seqs=args.batch,
                          max_num_batched_tokens=per_step * prompt_len, max_model_len=max_len,
                          enable_prefix_caching=False, speculative="ngram" if k else None,
                          enable_mixed_batches=False,  # prefill, then decode steps, as before
                          num_speculative_tokens=k,
                          speculative_disable_batch_size=args.speculative_disable_batch_size
                          if k else None)
    tokenizer = load_tokenizer(None, net.config.vocab_size, args.tokenizer)
    return LLMEngine(runner, tokenizer, net.config, config, num_pages,
                     NgramDrafter(k) if k else None)


def measure(args, k: int | None = None) -> dict:
    engine = build_engine(args, k)
    vocab = engine.model_config.vocab_size
    prompt_len = args.context - args.steps // 2
    params = SamplingParams(max_tokens=args.steps + 2, temperature=args.temperature,
                            ignore_eos=True, detokenize=args.detokenize, seed=0,
                            output_kind=args.output_kind)
    for prompt in random_prompts(args.batch, prompt_len, vocab, seed=5):
        engine.add_request(prompt, params)
    outputs = {}  # request id -> its tokens so far ("delta" outputs joined)

    def keep_last(step_outputs) -> None:
        for out in step_outputs:
            outputs[out.request_id] = out.token_ids

    def join_deltas(step_outputs) -> None:
        for out in step_outputs:
            outputs.setdefault(out.request_id, []).extend(out.token_ids)

    # Chosen once: the timed loop does no more per output than before.
    collect = join_deltas if args.output_kind == "delta" else keep_last

    while engine.counters["decode_steps"] < 2:  # the prompts, then decoding under way
        collect(engine.step())
    engine.step_timer.steps.clear()
    copies = count_copies(engine.runner)
    generated = engine.counters["generation_tokens"]
    drafted, accepted = engine.counters["draft_tokens"], engine.counters["accepted_tokens"]
    profile = cProfile.Profile() if args.profile else None
    steps, start = 0, time.perf_counter()
    if profile:
        profile.enable()
    while engine.has_unfinished():
        collect(engine.step())
        steps += 1
    if profile:
        profile.disable()
    wall = time.perf_counter() - start
    generated = engine.counters["generation_tokens"] - generated
    drafted = engine.counters["draft_tokens"] - drafted
    accepted = engine.counters["accepted_tokens"] - accepted
    if profile:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(args.profile).print_stats(40)
        print(text.getvalue())
    engine.check_invariants()
    if engine.block_manager.num_used_pages:
        raise RuntimeError(f"{engine.block_manager.num_used_pages} pages still held at the end")
    summary = engine.step_timer.summary()
    phases = {k: round(v["median"], 1) for k, v in summary.items() if k != "n"}
    # Mean host µs per step: the medians of steps of different kinds do not add up.
    host_mean = sum(r[p] for r in engine.step_timer.steps for p in PHASES if p != "wait") \
        / max(1, len(engine.step_timer.steps)) * 1e6
    forward_mean = sum(r["forward"] for r in engine.step_timer.steps) \
        / max(1, len(engine.step_timer.steps)) * 1e6
    k = args.speculative if k is None else k
    return dict(variant=args.variant, device=args.device, batch=args.batch, context=args.context,
                steps=steps, speculative=k,
                speculative_disable_batch_size=engine.disable_batch_size, target=args.target,
                temperature=args.temperature, output_kind=args.output_kind,
                detokenize=args.detokenize, profiled=bool(profile),
                tokenizer=type(engine.tokenizer).__name__
                + (f" of {engine.tokenizer.vocab_size} ids" if args.tokenizer else ""),
                step_us=round(wall / steps * 1e6, 1), phases_us=phases,
                host_minus_forward_us=round(host_mean - forward_mean, 1),
                tokens_per_step=round(generated / steps, 3),
                host_us_per_token=round((host_mean - forward_mean) * steps / max(1, generated), 1),
                acceptance=round(accepted / drafted, 4) if drafted else None,
                copies_per_step=round(copies["copies"] / steps, 2),
                cpu_threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                python=platform.python_version(), torch=torch.__version__), outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    res, outputs = measure(args)
    if args.check:
        _, plain = measure(args, k=0)
        if outputs != plain:
            same = sum(outputs.get(r) == t for r, t in plain.items())
            print(f"--check: {same} of {len(plain)} outputs equal plain decoding's",
                  file=sys.stderr)
            return 1
        res["outputs_equal_plain"] = True
    print(" ".join(f"{k} {v:.0f}" for k, v in res["phases_us"].items()))
    print(f"host-to-device copies per step: {res['copies_per_step']:.2f}")
    if res["speculative"]:
        acceptance = "no drafts verified" if res["acceptance"] is None \
            else f"acceptance {res['acceptance']:.1%}"
        print(f"k {res['speculative']}: {res['tokens_per_step']:.2f} tokens per step, {acceptance}"
              f"; host minus forward {res['host_minus_forward_us']:.0f} µs "
              f"per step (mean), {res['host_us_per_token']:.1f} µs per generated token"
              + (", outputs equal plain decoding's" if args.check else "")
              + (f" (plain steps from {res['speculative_disable_batch_size']} sequences)"
                 if res["speculative_disable_batch_size"] else ""))
    print(f"step {res['step_us']:.0f} µs over {res['steps']} steps "
          f"(B={args.batch}, L≈{args.context}, {args.variant}, host work only)")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
