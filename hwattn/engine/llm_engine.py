"""The engine loop: requests in, one scheduled step at a time, outputs back.

`LLMEngine` ties the parts together: `Scheduler` (who runs: policy), `BlockManager` (pages:
mechanism), `ModelRunner` (the model over the paged cache), the sampler and an optional
speculative drafter. Each `step()` runs one prefill or decode step, samples on the device,
reads the new tokens back once, and updates the sequences: stop conditions, detokenized text,
cache bookkeeping (including rolling back rejected draft slots).
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass

import torch

from hwattn.engine.block_manager import BlockManager, num_pages_for_budget, pages_for
from hwattn.engine.model_runner import ModelRunner, StepInput
from hwattn.engine.sampler import SamplingInput
from hwattn.engine.sampling_params import SamplingParams
from hwattn.engine.scheduler import Scheduler
from hwattn.engine.sequence import RequestOutput, Sequence
from hwattn.engine.speculative import DraftModelDrafter
from hwattn.engine.tokenizer import IncrementalDetokenizer

MiB = 1 << 20


@dataclass
class EngineConfig:
    """Engine sizes. memory_budget: bytes of KV cache, or a fraction (0, 1] of the GPU memory
    free after loading the model; default 256 MiB on CPU, 0.85 on CUDA. num_pages overrides it."""

    page_size: int = 64
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    memory_budget: int | float | None = None
    num_pages: int | None = None
    enable_prefix_caching: bool = True
    num_speculative_tokens: int = 0
    cuda_graphs: bool = True
    backend: str = "auto"
    seed: int = 0

    def __post_init__(self):
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")


def plan_pages(config: EngineConfig, kv_bytes_per_token: int, device: torch.device,
               max_model_len: int) -> int:
    """Pages in the pool (null page included), from `num_pages` or the memory budget."""
    if config.num_pages is not None:
        num_pages = config.num_pages
    else:
        budget = config.memory_budget
        if budget is None:
            budget = 0.85 if device.type == "cuda" else 256 * MiB
        if isinstance(budget, float):
            if not 0 < budget <= 1:
                raise ValueError(f"memory_budget as a fraction must be in (0, 1], got {budget}")
            if device.type != "cuda":
                raise ValueError("memory_budget as a fraction needs a CUDA device; give bytes")
            free, _ = torch.cuda.mem_get_info(device)
            # Blocks PyTorch has cached but not handed out are free to this process too.
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            budget = int(free * budget)
        num_pages = num_pages_for_budget(int(budget), kv_bytes_per_token, config.page_size)
    need = pages_for(max_model_len + config.num_speculative_tokens + 1, config.page_size) + 1
    if num_pages < need:
        raise ValueError(f"memory_budget / num_pages gives {num_pages} pages of {config.page_size} "
                         f"tokens, fewer than the {need} one sequence of max_model_len "
                         f"{max_model_len} needs: raise memory_budget or lower max_model_len")
    return num_pages


def validate_prompt(prompt: str | list[int], tokenizer, vocab_size: int, max_model_len: int) -> list[int]:
    """The prompt's token ids; ValueError if it is empty, has ids outside [0, vocab_size) or
    leaves no room to generate within max_model_len."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("prompt must not be empty")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens; the model's context is "
                         f"{max_model_len}, leaving no room to generate")
    return ids


class LLMEngine:
    """Continuous-batching engine over one model, in this process or sharded over
    tensor-parallel worker processes.

    runner: runs the model and samples: `sample_step`, `verify_step`, `device` (a
        `ModelRunner`, or a `TensorParallelExecutor` driving worker processes).
    drafter: a speculative drafter (`NgramDrafter`, `DraftModelDrafter`) or None.
    """

    def __init__(self, runner, tokenizer, model_config, config: EngineConfig, num_pages: int,
                 drafter=None, kv_bytes_per_token: int | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.config = config
        self.max_model_len = config.max_model_len or model_config.max_seq_len
        self.block_manager = BlockManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len)
        self.drafter = drafter
        self.k = config.num_speculative_tokens if drafter is not None else 0
        self.kv_bytes_per_token = kv_bytes_per_token
        self.device = runner.device
        self.seqs: dict[str, Sequence] = {}
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self._rng = random.Random(config.seed)
        self._ids = itertools.count()
        self.counters = dict(prompt_tokens=0, generation_tokens=0, steps=0, prefill_steps=0,
                             decode_steps=0, draft_tokens=0, accepted_tokens=0, finished=0,
                             aborted=0)

    # Requests.
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (text or token ids); returns its id. Raises ValueError if the
        prompt is empty, has ids outside the vocabulary or does not fit the context."""
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        ids = self.validate_prompt(prompt)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request_id, ids, params, seed, prompt=text)
        self.seqs[request_id] = seq
        self.detok[request_id] = IncrementalDetokenizer(self.tokenizer)
        self.scheduler.add(seq)
        return request_id

    def validate_prompt(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids; ValueError if it is empty, has ids outside the vocabulary
        or leaves no room in the context. Safe to call from another thread."""
        return validate_prompt(prompt, self.tokenizer, self.model_config.vocab_size,
                               self.max_model_len)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its pages; None if it is unknown or already done."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.detok.pop(request_id, None)
        seq.finish_reason = "abort"
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)
        self.counters["aborted"] += 1
        return seq.output()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def unfinished_request_ids(self) -> list[str]:
        return list(self.seqs)

    # One step.
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one prefill or decode step; returns the outputs of requests that advanced."""
        k = self.k
        if k and any(len(s) + k > self.max_model_len for s in self.scheduler.running):
            k = 0  # someone is at the end of the context: plain decoding this step
        batch = self.scheduler.schedule(lookahead=k)
        if batch is None or not batch.seqs:
            return []
        self.counters["steps"] += 1
        if batch.kind == "prefill":
            touched = self._prefill(batch)
        elif k:
            touched = self._speculative_decode(batch.seqs, k)
        else:
            touched = self._decode(batch.seqs)
        outputs = []
        for seq in touched:
            outputs.append(seq.output())
            if seq.finish_reason is not None:
                self.seqs.pop(seq.request_id, None)
                self.detok.pop(seq.request_id, None)
                self.scheduler.finish(seq)
                self.counters["finished"] += 1
        return outputs

    @staticmethod
    def _sampling(seqs: list[Sequence]) -> SamplingInput:
        return SamplingInput.of([s.params for s in seqs], [s.seed for s in seqs],
                                [len(s) for s in seqs])

    def _prefill(self, batch) -> list[Sequence]:
        self.counters["prefill_steps"] += 1
        seqs = batch.seqs
        step = StepInput("prefill", [s.token_ids[s.num_cached:s.num_cached + n]
                                     for s, n in zip(seqs, batch.chunks)],
                         [s.num_cached for s in seqs], [list(s.block_table) for s in seqs],
                         need_logits=[s.num_cached + n == len(s) for s, n in zip(seqs, batch.chunks)])
        done = [s for s, need in zip(seqs, step.need_logits) if need]
        tokens = self.runner.sample_step(step, self._sampling(done) if done else None)
        if self.drafter is not None and hasattr(self.drafter, "prefill"):
            self.drafter.prefill(step)
        for seq, n in zip(seqs, batch.chunks):
            seq.num_cached += n
            seq.draft_cached = seq.num_cached
            self.counters["prompt_tokens"] += n
            self._register(seq)
        for seq, token in zip(done, tokens):
            self._append(seq, [token])
        return done

    def _decode(self, seqs: list[Sequence]) -> list[Sequence]:
        self.counters["decode_steps"] += 1
        step = StepInput("decode", [[s.token_ids[-1]] for s in seqs], [s.num_cached for s in seqs],
                         [list(s.block_table) for s in seqs])
        tokens = self.runner.sample_step(step, self._sampling(seqs))
        for seq, token in zip(seqs, tokens):
            old = seq.num_cached
            appended = self._append(seq, [token])
            seq.num_cached = old + appended
            self._register(seq)
        return seqs

    def _speculative_decode(self, seqs: list[Sequence], k: int) -> list[Sequence]:
        self.counters["decode_steps"] += 1
        sampling = self._sampling(seqs)
        deterministic = getattr(self.drafter, "deterministic", False)
        # A deterministic drafter's tokens travel as lists (to other processes, too); a draft
        # model's stay on its device with the distributions they were drawn from.
        device = "cpu" if deterministic else self.device
        drafts, draft_probs = self.drafter.propose(seqs, sampling.tensors(device))  # (B, k)
        last = torch.tensor([[s.token_ids[-1]] for s in seqs], dtype=torch.int64, device=device)
        fed = torch.cat((last, drafts.to(device)), 1)
        step = StepInput("decode", fed.tolist() if deterministic else fed,
                         [s.num_cached for s in seqs], [list(s.block_table) for s in seqs])
        tokens, accepted = self.runner.verify_step(step, sampling, draft_probs)
        for seq, row, n_acc in zip(seqs, tokens, accepted):
            old_len, old = len(seq), seq.num_cached
            appended = self._append(seq, row[:n_acc + 1])
            seq.num_cached = old + appended
            seq.draft_cached = min(seq.draft_cached, old_len + n_acc)
            self.counters["draft_tokens"] += k
            self.counters["accepted_tokens"] += n_acc
            self.block_manager.trim(seq, seq.num_cached + 1)
            self._register(seq)
        return seqs

    def _register(self, seq: Sequence) -> None:
        # With a draft model, a page is shared only once both caches hold all its tokens.
        drafted = isinstance(self.drafter, DraftModelDrafter)
        self.block_manager.register_full_pages(seq, seq.draft_cached if drafted else None)

    def _append(self, seq: Sequence, tokens: list[int]) -> int:
        """Append sampled tokens until a stop condition; returns how many were kept."""
        params = seq.params
        eos = getattr(self.tokenizer, "eos_token_id", None)
        kept = 0
        now = time.perf_counter()
        if seq.first_token_time is None:
            seq.first_token_time = now
        for token in tokens:
            seq.token_ids.append(token)
            kept += 1
            self.counters["generation_tokens"] += 1
            if (token == eos and not params.ignore_eos) or token in params.stop_token_ids:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
                seq.finish_reason = "length"
            if params.detokenize:
                shown = seq.output_token_ids if seq.finish_reason != "stop" or token != eos \
                    else seq.output_token_ids[:-1]
                delta = self.detok[seq.request_id].step(shown)
                if delta:
                    seq.text += delta
                    if params.stop and self._hit_stop(seq, len(delta)):
                        seq.finish_reason = "stop"
            if seq.finish_reason is not None:
                seq.finish_time = now
                break
        return kept

    @staticmethod
    def _hit_stop(seq: Sequence, delta_len: int) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, len(seq.text) - delta_len - longest + 1)
        cut = [i for i in (seq.text.find(s, start) for s in seq.params.stop) if i >= 0]
        if not cut:
            return False
        seq.text = seq.text[:min(cut)]
        return True

    # Introspection for metrics and tests.
    def stats(self) -> dict:
        bm = self.block_manager
        return dict(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                    pages_total=bm.num_usable_pages, pages_used=bm.num_used_pages,
                    page_size=bm.page_size, preemptions=self.scheduler.num_preemptions,
                    prefix_hit_pages=bm.prefix_hits, **self.counters)

    def check_invariants(self) -> None:
        """Raise if any page is leaked or double-counted."""
        live = self.scheduler.running + list(self.scheduler.waiting)
        self.block_manager.check(live)

    def shutdown(self) -> None:
        if hasattr(self.runner, "shutdown"):
            self.runner.shutdown()
