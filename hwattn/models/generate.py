"""Greedy decoding through the paged KV cache, one batch of equal-length prompts.

The minimal decode loop the tests and the demo use: every sequence gets a contiguous run of
pages, the prompt is prefilled in one step, then one token a step goes through the decode
path. The serving engine (`hwattn.engine`) does the same with a shared page pool,
continuous batching and speculation.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from hwattn.layers import AttentionMetadata
from hwattn.models.transformer import check_tokens


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    kv_cache_bytes: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("inf")


@torch.no_grad()
def greedy_generate(model, prompt: Tensor, max_new_tokens: int, page_size: int = 16,
                    cache_dtype: torch.dtype | None = None, backend: str = "auto",
                    return_logits: bool = False):
    """Greedy continuation of `prompt` (B, T0) int64 by `max_new_tokens` tokens.

    Returns (tokens (B, T0 + n), stats), plus the logits of every decode step
    (B, n, V) stacked when `return_logits` (step 0 is the prefill's last position).
    Raises ValueError for a prompt that is not a non-empty (B, T0) integer tensor of ids in
    [0, vocab_size) (ids checked on the CPU only), `max_new_tokens` or `page_size` not a
    positive integer, or T0 + max_new_tokens past the model's max_seq_len.
    """
    check_tokens(prompt, model.config.vocab_size, name="prompt")
    for name, value in (("max_new_tokens", max_new_tokens), ("page_size", page_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    max_new_tokens, page_size = int(max_new_tokens), int(page_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    batch, t0 = prompt.shape
    total = t0 + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len "
                         f"{model.config.max_seq_len}")
    device = prompt.device
    pages_per_seq = -(-total // page_size)
    block_table = torch.arange(batch * pages_per_seq, dtype=torch.int32,
                               device=device).view(batch, pages_per_seq)
    caches = model.allocate_kv_cache(batch * pages_per_seq, page_size, dtype=cache_dtype)
    cache_bytes = sum(t.numel() * t.element_size() for layer in caches for t in layer)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    seqlens = torch.full((batch,), t0, dtype=torch.int32, device=device)
    meta = AttentionMetadata.for_step(block_table, seqlens, t0, page_size, is_prefill=True,
                                      backend=backend)
    logits = model(prompt, meta=meta, kv_caches=caches, last_only=True)[:, -1]  # (B, V)
    sync()
    prefill_s = time.perf_counter() - start
    out, step_logits = [prompt], [logits]
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        token = logits.argmax(-1, keepdim=True)  # (B, 1)
        out.append(token)
        seqlens = seqlens + 1
        meta = AttentionMetadata.for_step(block_table, seqlens, 1, page_size, backend=backend)
        logits = model(token, meta=meta, kv_caches=caches)[:, -1]
        step_logits.append(logits)
    out.append(logits.argmax(-1, keepdim=True))
    sync()
    stats = GenerationStats(batch * t0, batch * max_new_tokens, prefill_s,
                            time.perf_counter() - start, cache_bytes)
    tokens = torch.cat(out, dim=1)
    if return_logits:
        return tokens, stats, torch.stack(step_logits, dim=1)
    return tokens, stats
