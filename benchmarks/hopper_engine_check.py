"""The engine on an sm_90 GPU with the Hopper backend ("auto") against the Triton backend, for
GLA-2, MLA and GTA-4 models with seeded random weights (the mini preset widened to d_h = 128,
so the Hopper kernels take every layer: MLA's 512-wide latent, GLA-2's 256-wide latents,
GTA-4's 128-wide tied state with a 64-wide RoPE key).

Two checks per model:
- teacher-forced: one model, a `ModelRunner` per backend (auto, Triton, and the PyTorch
  references as the oracle; CUDA graphs on, so every kernel-backend decode step replays a graph
  after its backend refreshes the plan in place); the same prompts prefilled, then `--steps`
  decode steps feeding every runner the oracle's greedy token; each backend's logits compared
  with the oracle's at every step (max |difference| over max |logit|, argmax agreement);
- generation: `LLM(..., backend="auto")` and `LLM(..., backend="triton")` generating greedily
  from the same prompts; tokens compared (random weights have near-ties, so a late divergence
  is reported, not failed).

    python benchmarks/hopper_engine_check.py            # writes $OUT/hopper_engine.json
    HOPPER_CHECK_DEVICE=cpu python benchmarks/hopper_engine_check.py --steps 2 --max-tokens 2
        # the plumbing on a CPU: "auto" (PyTorch there) against PyTorch

Exit status 1 if auto did not choose the Hopper backend, no Hopper kernel ran, or Hopper's
teacher-forced logits are further from the oracle's than 4 × Triton's (+ 1e-3) or agree with
its argmax on 5 points fewer rows than Triton's do.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

LABELS = ("gla-2", "mla", "gta-4")
OVERRIDES = dict(head_dim=128, n_heads=8, dim=1024, n_layers=4)
PROMPT_LENS = (1, 63, 64, 65, 700, 1500)
PAGE = 64
AGREE_SLACK = 0.05
DEVICE = os.environ.get("HOPPER_CHECK_DEVICE", "cuda")
OTHER = "triton" if DEVICE == "cuda" else "torch"
DTYPE = "bf16" if DEVICE == "cuda" else "fp32"


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def teacher_forced(label: str, steps: int) -> dict:
    """One model, a runner per backend (auto, the other kernel backend, and the PyTorch
    references as the oracle); every runner is fed the oracle's greedy tokens."""
    from hwattn.engine.loader import build_model
    from hwattn.engine.model_runner import ModelRunner, StepInput

    model = build_model("mini", label, dtype=DTYPE, device=DEVICE, seed=0,
                        overrides=OVERRIDES)
    prompts = _prompts(model.config.vocab_size)
    tables, first = [], 1  # page 0 is the null page
    for n in PROMPT_LENS:
        pages = -(-(n + steps) // PAGE)
        tables.append(list(range(first, first + pages)))
        first += pages
    names = ("auto", OTHER, "torch") if OTHER != "torch" else ("auto", "torch")
    # The references read the lengths on the host: no CUDA graphs for them.
    runners = {name: ModelRunner(model, num_pages=first, page_size=PAGE, max_model_len=2048,
                                 max_num_seqs=8, backend=name, cuda_graphs=name != "torch")
               for name in names}
    logits = {name: r.execute(StepInput("prefill", prompts, [0] * len(prompts), tables,
                                        need_logits=[True] * len(prompts))).float()
              for name, r in runners.items()}
    lens = list(PROMPT_LENS)
    worst = {name: 0.0 for name in names}
    agree = {name: 0 for name in names}
    n_rows = 0
    for _ in range(steps):
        tokens = [[t] for t in logits["torch"].argmax(-1).tolist()]
        logits = {name: r.execute(StepInput("decode", tokens, lens, tables))[:, -1].float()
                  for name, r in runners.items()}
        lens = [n + 1 for n in lens]
        truth = logits["torch"]
        for name in names:
            diff = (logits[name] - truth).abs().max().item()
            worst[name] = max(worst[name], diff / truth.abs().max().item())
            agree[name] += (logits[name].argmax(-1) == truth.argmax(-1)).sum().item()
        n_rows += len(tokens)
    return dict(backend=runners["auto"].backend.name,
                graphs={name: len(r.graphs) for name, r in runners.items()},
                graph_error={name: r.graph_error for name, r in runners.items()},
                rel_max_diff_vs_torch={name: worst[name] for name in names if name != "torch"},
                argmax_agreement_vs_torch={name: agree[name] / n_rows for name in names
                                           if name != "torch"},
                steps=steps)


def generation(label: str, max_tokens: int) -> dict:
    from hwattn import LLM, SamplingParams

    outputs, chosen = {}, None
    for backend in ("auto", OTHER):
        llm = LLM("mini", attention=label, device=DEVICE, dtype=DTYPE, seed=0,
                  max_num_seqs=8, max_model_len=2048, memory_budget=1 << 30, backend=backend,
                  model_overrides=OVERRIDES)
        if backend == "auto":
            chosen = llm.engine.runner.backend.name
        prompts = _prompts(llm.engine.model_config.vocab_size)
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                detokenize=False)
        outputs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
        llm.shutdown()
        del llm
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    prefixes = []
    for a, b in zip(outputs["auto"], outputs[OTHER]):
        same = 0
        while same < min(len(a), len(b)) and a[same] == b[same]:
            same += 1
        prefixes.append(same)
    return dict(backend=chosen, max_tokens=max_tokens, identical=sum(p == max_tokens for p in prefixes),
                prompts=len(prefixes), common_prefix=prefixes)


def _within(tf: dict) -> bool:
    """Hopper's logits against the references' may differ by at most 4 × Triton's difference
    (+ 1e-3 of the largest logit), and agree on the argmax nearly as often (- 5 points)."""
    diff, agree = tf["rel_max_diff_vs_torch"], tf["argmax_agreement_vs_torch"]
    return (diff["auto"] <= 4 * diff[OTHER] + 1e-3
            and agree["auto"] >= agree[OTHER] - AGREE_SLACK)


def main() -> int:
    import argparse

    from hwattn.ops import hopper_decode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="teacher-forced decode steps")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--labels", default=",".join(LABELS),
                        help="comma-separated attention variants to check (default %(default)s)")
    args = parser.parse_args()
    calls = {"n": 0}
    launch = hopper_decode.decode_tied

    def counted(*a, **k):
        calls["n"] += 1
        return launch(*a, **k)

    hopper_decode.decode_tied = counted  # the backend looks the launcher up on each call
    rows, ok = [], True
    if DEVICE == "cuda":
        print(f"{torch.cuda.get_device_name()} capability {torch.cuda.get_device_capability()}",
              flush=True)
    for label in args.labels.split(","):
        start, before = time.perf_counter(), calls["n"]
        row = dict(variant=label)
        try:
            row["teacher_forced"] = teacher_forced(label, args.steps)
            row["generation"] = generation(label, args.max_tokens)
        except Exception as err:  # noqa: BLE001 - report and go on with the next model
            row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        row["hopper_launches"] = calls["n"] - before
        row["wall_s"] = round(time.perf_counter() - start, 1)
        tf = row.get("teacher_forced", {})
        good = ("error" not in row and tf.get("backend") == "hopper"
                and row.get("generation", {}).get("backend") == "hopper"
                and row["hopper_launches"] > 0 and _within(tf))
        row["ok"] = good
        ok &= good
        print(json.dumps(row), flush=True)
        rows.append(row)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"teacher-forced logits against the PyTorch references (max |diff| / max |logit|, "
          f"argmax agreement); generation: {args.max_tokens} greedy tokens, auto vs {OTHER}")
    print(f"{'variant':8} {'auto':>7} {'launches':>8} {'diff auto':>9} {'diff ' + OTHER:>12} "
          f"{'agree auto':>10} {'agree ' + OTHER:>12} {'identical':>9}  common prefix  ok")
    nan = float("nan")
    for r in rows:
        tf, gen = r.get("teacher_forced", {}), r.get("generation", {})
        diff = tf.get("rel_max_diff_vs_torch", {})
        agree = tf.get("argmax_agreement_vs_torch", {})
        print(f"{r['variant']:8} {tf.get('backend', '-'):>7} {r['hopper_launches']:8} "
              f"{diff.get('auto', nan):9.2e} {diff.get(OTHER, nan):12.2e} "
              f"{agree.get('auto', nan):10.3f} {agree.get(OTHER, nan):12.3f} "
              f"{gen.get('identical', '-'):>4}/{gen.get('prompts', '-'):<4}  "
              f"{gen.get('common_prefix', r.get('error', ''))}  {r['ok']}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "hopper_engine.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
