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

Prints the median µs per phase of `LLMEngine.step` (`hwattn/engine/step_timer.py`), the
host-to-device copies the runner makes per step (uploads and plan refreshes, counted) and the
wall time per step, and writes them as one JSON line to `--out` if given.
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
from hwattn.ops.backends.torch_backend import TorchBackend  # noqa: E402
from hwattn.ops.plan import plan_decode  # noqa: E402


class PlanningBackend(TorchBackend):
    """The PyTorch reference backend with the GPU kernels' decode plan, so that each step
    refreshes a split-KV plan as it does on a GPU."""

    name = "torch+plan"

    def plan(self, cache_seqlens, *, num_heads_kv, query_len=1, page_size, device=None,
             out=None):
        plan = plan_decode(cache_seqlens, num_heads_kv=num_heads_kv, query_len=query_len,
                           page_size=page_size, out=out)
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="gqa-4", help="attention variant (default gqa-4)")
    p.add_argument("--batch", type=int, default=64, help="decoding sequences (default 64)")
    p.add_argument("--context", type=int, default=1024,
                   help="tokens per sequence around the measured steps (default 1024)")
    p.add_argument("--steps", type=int, default=200, help="decode steps measured (default 200)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the tiny model and the step's tensors live (default cpu)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of every request (default 0: greedy)")
    p.add_argument("--output-kind", default="final_only", choices=("final_only", "cumulative"),
                   help="the requests' SamplingParams.output_kind (default final_only, as "
                        "LLM.generate; cumulative: an output per request and step, as streaming)")
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
    for name in ("batch", "context", "steps", "page_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.context <= args.steps // 2 + 1:
        p.error(f"--context must exceed --steps / 2 + 1 ({args.steps // 2 + 1}), got {args.context}")
    return args


def build_engine(args) -> LLMEngine:
    max_len = args.context + args.steps
    net = build_model("tiny", attention=args.variant, dtype=torch.float32, device=args.device, seed=0,
                      overrides=dict(max_seq_len=max_len))
    num_pages = args.batch * pages_for(max_len, args.page_size) + 1
    runner = ModelRunner(net, num_pages, args.page_size, max_len, max_num_seqs=args.batch,
                         backend=PlanningBackend(), cuda_graphs=False)
    runner._record = stub_record  # the captured graphs, with a replay that does nothing
    runner._capture((1,))
    if not runner.cuda_graphs:
        raise RuntimeError(f"stub capture failed: {runner.graph_error}")
    prompt_len = args.context - args.steps // 2
    # Prompts are prefilled a few at a time: one step of 64 prompts of 8K tokens would ask
    # the dense prefill for more memory than an H200 has.
    per_step = max(1, min(args.batch, PREFILL_TOKENS // prompt_len))
    config = EngineConfig(page_size=args.page_size, max_num_seqs=args.batch,
                          max_num_batched_tokens=per_step * prompt_len, max_model_len=max_len,
                          enable_prefix_caching=False)
    return LLMEngine(runner, load_tokenizer(None, net.config.vocab_size), net.config, config,
                     num_pages)


def measure(args) -> dict:
    engine = build_engine(args)
    vocab = engine.model_config.vocab_size
    prompt_len = args.context - args.steps // 2
    params = SamplingParams(max_tokens=args.steps + 2, temperature=args.temperature,
                            ignore_eos=True, detokenize=False, seed=0,
                            output_kind=args.output_kind)
    for prompt in random_prompts(args.batch, prompt_len, vocab, seed=5):
        engine.add_request(prompt, params)
    while engine.counters["decode_steps"] < 2:  # the prompts, then decoding under way
        engine.step()
    engine.step_timer.steps.clear()
    copies = count_copies(engine.runner)
    profile = cProfile.Profile() if args.profile else None
    steps, start = 0, time.perf_counter()
    if profile:
        profile.enable()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    if profile:
        profile.disable()
    wall = time.perf_counter() - start
    if profile:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(args.profile).print_stats(40)
        print(text.getvalue())
    phases = {k: round(v["median"], 1) for k, v in engine.step_timer.summary().items() if k != "n"}
    return dict(variant=args.variant, device=args.device, batch=args.batch, context=args.context,
                steps=steps,
                temperature=args.temperature, output_kind=args.output_kind,
                profiled=bool(profile),
                step_us=round(wall / steps * 1e6, 1), phases_us=phases,
                copies_per_step=round(copies["copies"] / steps, 2),
                cpu_threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                python=platform.python_version(), torch=torch.__version__)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    res = measure(args)
    print(" ".join(f"{k} {v:.0f}" for k, v in res["phases_us"].items()))
    print(f"host-to-device copies per step: {res['copies_per_step']:.2f}")
    print(f"step {res['step_us']:.0f} µs over {res['steps']} steps "
          f"(B={args.batch}, L≈{args.context}, {args.variant}, host work only)")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
