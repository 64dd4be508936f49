"""`EngineConfig`: everything that assembles an engine, in one typed place.

`LLM(...)`'s keywords, `create_engine`'s and the `hwattn serve` / `hwattn bench` command lines
all build one of these; `create_engine` reads it and hands it to the engine, its runner and its
replicas. Nothing is patched onto an engine after it is built.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields

import torch

from hwattn.engine.sampling_params import INT64_LIMIT, _integer

# Tokens of the shortest sequence a decode step sees: a prompt token and the one its prefill
# sampled.
SHORTEST_DECODE = 2


@dataclass
class EngineConfig:
    """What to serve and how.

    model: a checkpoint directory (config.json + model.safetensors [+ tokenizer.json]) or a
        preset name (tiny, mini, small, medium, large, xl) with seeded random weights.
    attention: variant label for presets ("gla-2", "gqa-4", "mla", ...; default mha).
    tokenizer: a local tokenizer.json (or a folder holding one) instead of the checkpoint's.
    dtype: "bf16" | "fp16" | "fp32" | "fp64" (or vLLM's "half", "float") | a torch dtype |
        "auto" (bf16 on CUDA, fp32 on CPU).
    device: "cuda", "cpu", "cuda:1" or "auto".
    tensor_parallel_size: ranks to shard over (worker processes; gloo on CPU, NCCL on GPUs).
    data_parallel_size: replicas, each in its own process with `tensor_parallel_size` ranks.
    page_size: tokens per KV page. max_num_seqs: sequences decoded together at most.
    max_num_batched_tokens: prompt tokens prefilled per step at most (chunked prefill).
        Default 8192: on an H200 (xl GLA-2, 64 prompts of 8K arriving at 16/s) it gave TTFT
        p50 0.48 s against 4.39 s with 2048 at the same inter-token latency, since a chunk
        that reads a cached prefix runs at about half the speed of a whole prompt
        (benchmarks/results/engine_roofline_h200_2026-12-04/).
    max_model_len: context limit, >= 2 (default None: the model's max_seq_len; a draft model's
        max_seq_len must reach it too).
    memory_budget: bytes of KV cache per rank, or a fraction (0, 1] of the GPU memory free
        after loading the model; default 256 MiB on CPU, 0.85 on CUDA.
    gpu_memory_utilization: instead of memory_budget, the fraction (0, 1] of each GPU's whole
        memory the engine may fill (weights and all else on it counted; the KV cache takes the
        rest); refused on CPU and together with memory_budget.
    num_pages: the page pool's size (null page included), instead of what memory_budget or
        gpu_memory_utilization plans; given beside either, it overrides it, and the engine
        warns naming both (`overridden_by_num_pages`).
    enable_prefix_caching: share the pages of common prompt prefixes.
    speculative: None, "ngram" (prompt lookup) or a draft-model checkpoint directory.
    num_speculative_tokens: k drafts verified per step (default 3; 0 without `speculative`);
        at most max_model_len - 2, so that a sequence and its drafts fit the context.
    speculative_disable_batch_size: with `speculative`, a step that starts with at least this
        many running sequences is a plain decode step (overlapped with the host, captured in
        a CUDA graph) instead of a verify step, as vLLM's option of that name; None: always
        verify. A verify step waits for its own tokens before the next step is prepared, so
        where the host's work per step is a large share of the device's, plain steps win: on
        an H200 (a 36M-parameter model, 32 sequences of C code) n-gram speculation decoded at
        0.62-0.80x plain decoding's tokens/s although 55-75% of the drafts were accepted
        (benchmarks/results/study_speculative_h200_2026-12-05/). The best threshold depends on
        the model and the GPU; it has not been measured yet.
    cuda_graphs: capture decode steps in CUDA graphs (on CUDA), and with `prefill_graphs`
        the compiled prefill pieces between attention steps. backend: attention backend.
    compile_decode: run decode steps through `torch.compile`d decoder blocks (norms, RoPE,
        absorptions and SwiGLU fused into a few kernels; hwattn/models/compile.py); None: on
        for CUDA devices, off on the CPU. Compiling adds start-up time (tens of seconds per
        model on a GPU machine) and changes no result beyond floating-point rounding.
    compile_prefill: run prefill and mixed steps through `torch.compile`d decoder blocks of
        their own, compiled once for any number of tokens (the attention itself stays eager);
        None: on for CUDA devices, off on the CPU. Compiled at start-up, beside the decode
        blocks; on an H100 a whole 8K-token `xl` prompt took 24-27% less time through them
        (docs/results/engine.md, run 14, measured before the warm-up took its present form).
    prefill_graphs: with `cuda_graphs` and compiled prefill on (on CUDA; not under tensor
        parallelism), replay the compiled prefill pieces between attention steps from CUDA
        graphs for steps of up to 2048 tokens (hwattn/engine/prefill_graphs.py): chunks of a
        few thousand tokens otherwise spend longer launching kernels than running them. On
        an H100, one 8K-token GLA-2 `xl` prompt in chunks of 2048 took 76.8 ms with them
        against 110.1 without (63% MFU against 44%; docs/results/engine.md, run 15).
    seed: weights of presets, and the seeds of requests that bring none.
    model_overrides: presets only (refused for a checkpoint), ModelConfig fields to change
        (e.g. max_seq_len).
    enable_mixed_batches: decodes and prompt chunks share each step, decodes first, prompts
        taking the rest of `max_num_batched_tokens` (plain decoding; speculation keeps
        prefill and verify steps apart): a decoding sequence then waits for at most one
        step's chunks, instead of every prompt that arrives before it. The step is one packed
        forward, its decode rows attending through the paged decode op and its prompt rows
        as a prefill step (`AttentionMetadata.split_decode_rows`). On by default: on an H100
        (xl, 64 prompts of 8K arriving at 16/s, the default budget 8192) it cut ITL p99 from
        729 to 83 ms for GLA-2, 163 to 67 ms for GQA-4 and 152 to 102 ms for GTA-4, for
        TTFT p50 of 0.27-0.48 s against 0.08-0.16 s and about 6% fewer output tokens/s;
        docs/results/engine.md, run 16. Off: prompts first, for the shortest TTFT.
    overlap_scheduling: launch each step before reading the previous one back, so the host's
        work runs while the device computes (plain decoding in one process).
    launch_thread: with overlapped scheduling, make the launches from a thread of their own
        (`hwattn/engine/launch.py`'s `LaunchThread`): the CUDA API's time in each launch
        (graph replay, copies) then overlaps the engine's Python instead of adding to it. Off
        by default: on an H200 the step with it was within -2% ... +6% of the step without it
        (docs/results/engine.md, run 7); on the CPU it changes no output (tests).
    """

    model: str | None = None
    attention: str | None = None
    dtype: str | torch.dtype | None = "auto"
    device: str | None = "auto"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    page_size: int = 64
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    memory_budget: int | float | None = None
    gpu_memory_utilization: float | None = None
    num_pages: int | None = None
    enable_prefix_caching: bool = True
    speculative: str | None = None
    num_speculative_tokens: int = 3
    speculative_disable_batch_size: int | None = None
    cuda_graphs: bool = True
    compile_decode: bool | None = None
    compile_prefill: bool | None = None
    prefill_graphs: bool = True
    backend: str = "auto"
    seed: int = 0
    model_overrides: dict | None = None
    enable_mixed_batches: bool = True
    overlap_scheduling: bool = True
    launch_thread: bool = False
    tokenizer: str | None = None

    def __post_init__(self):
        # Integers (numpy's too, stored as int); a bool, a float or a string is refused rather
        # than read as a number (True as 1, 2.5 failing deep inside torch).
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens",
                     "tensor_parallel_size", "data_parallel_size"):
            setattr(self, name, _integer(name, getattr(self, name), 1))
        self.num_speculative_tokens = _integer("num_speculative_tokens",
                                               self.num_speculative_tokens, 0)
        if self.num_pages is not None:
            self.num_pages = _integer("num_pages", self.num_pages, 1)
        if self.max_model_len is not None:
            # 0 is refused, not taken as "the model's": a prompt token and a generated one.
            self.max_model_len = _integer("max_model_len", self.max_model_len, 2,
                                          what=" (None: the model's max_seq_len)")
        self.seed = _integer("seed", self.seed, -INT64_LIMIT)
        for name in ("enable_prefix_caching", "cuda_graphs", "enable_mixed_batches",
                     "overlap_scheduling", "launch_thread", "prefill_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("compile_decode", "compile_prefill"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True, False or None, got "
                                 f"{getattr(self, name)!r}")
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool)
                                   or not isinstance(budget, (numbers.Integral, float))
                                   or not 0 < budget < math.inf):
            raise ValueError(f"memory_budget must be bytes (an integer > 0) or a fraction in "
                             f"(0, 1] of free GPU memory, got {budget!r}")
        spec = self.speculative
        if spec is not None and (not isinstance(spec, (str, os.PathLike)) or not str(spec)):
            raise ValueError(f"speculative must be None, 'ngram' or a draft checkpoint "
                             f"directory, got {spec!r}")
        if self.speculative is None:
            self.num_speculative_tokens = 0  # k means nothing without a drafter
        elif self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1 with speculative="
                             f"{self.speculative!r}, got {self.num_speculative_tokens}")
        elif self.max_model_len is not None \
                and self.num_speculative_tokens > self.max_model_len - SHORTEST_DECODE:
            # A verify step holds the sequence and its k drafts (`LLMEngine._lookahead` in
            # hwattn/engine/llm_engine.py), and a decoding sequence has at least a prompt token
            # and a sampled one: a larger k built an engine that never speculated. When
            # max_model_len is left to the model, create_engine's copy of the config with the
            # model's max_seq_len is checked here.
            k, limit = self.num_speculative_tokens, self.max_model_len
            raise ValueError(f"num_speculative_tokens={k} leaves no room to speculate within "
                             f"max_model_len {limit}: a verify step holds a sequence of at "
                             f"least {SHORTEST_DECODE} tokens plus its k drafts, so k must be "
                             f"at most max_model_len - {SHORTEST_DECODE} = "
                             f"{limit - SHORTEST_DECODE}")
        self._check_disable_batch_size()
        util = self.gpu_memory_utilization
        if util is not None:
            if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
                raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {util!r}")
            if self.memory_budget is not None:
                raise ValueError("give memory_budget or gpu_memory_utilization, not both")

    def _check_disable_batch_size(self) -> None:
        size = self.speculative_disable_batch_size
        if size is None:
            return
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"speculative_disable_batch_size must be a positive integer or None, "
                             f"got {size!r}")
        if self.speculative is None:
            # Refused rather than ignored: it would otherwise read as speculation configured.
            raise ValueError(f"speculative_disable_batch_size={size} needs speculative "
                             "('ngram' or a draft checkpoint directory)")

    def overridden_by_num_pages(self) -> dict:
        """The memory settings given beside `num_pages` (name -> value), which it overrides:
        the page pool then has num_pages pages whatever the memory."""
        if self.num_pages is None:
            return {}
        return {name: getattr(self, name) for name in ("gpu_memory_utilization", "memory_budget")
                if getattr(self, name) is not None}

    def as_kwargs(self) -> dict:
        """The fields as keywords (`EngineConfig(**config.as_kwargs())` is a copy), for
        processes that build their own engine from it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
