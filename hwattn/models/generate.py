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

from hwattn import ops
from hwattn.layers import AttentionMetadata
from hwattn.models.transformer import check_tokens


@dataclass
class GenerationStats:
    """Counts and times of one `greedy_generate` call. The prefill step yields each
    sequence's first new token, so the decode steps (timed by `decode_s`) yield
    `decode_tokens` = B · (max_new_tokens - 1) of the `new_tokens` = B · max_new_tokens."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    kv_cache_bytes: int
    decode_tokens: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens the decode steps yielded per second of decoding (NaN without a decode
        step: max_new_tokens = 1)."""
        if not self.decode_tokens:
            return float("nan")
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("inf")


@torch.no_grad()
def greedy_generate(model, prompt: Tensor, max_new_tokens: int, page_size: int = 16,
                    cache_dtype: torch.dtype | None = None, backend: str = "auto",
                    return_logits: bool = False):
    """Greedy continuation of `prompt` (B, T0) int64 by `max_new_tokens` tokens.

    Returns (tokens (B, T0 + n), stats), plus the logits of every decode step
    (B, n, V) stacked when `return_logits` (step 0 is the prefill's last position).
    `cache_dtype` (default the model's dtype) must be the model's dtype: the decode op takes
    queries and cache of one dtype. `backend` names the `AttentionBackend` (or is one).

    Raises ValueError for a prompt that is not a non-empty (B, T0) integer tensor of ids in
    [0, vocab_size) (ids checked on the CPU only), `max_new_tokens` or `page_size` not a
    positive integer, T0 + max_new_tokens past the model's max_seq_len, or a cache dtype
    other than the model's or one the backend cannot read (before any step runs).
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
    model_dtype = model.tok_embeddings.weight.dtype
    if cache_dtype is not None and cache_dtype != model_dtype:
        raise ValueError(f"cache_dtype {cache_dtype} must be the model's dtype {model_dtype} (or "
                         "None): the decode op takes queries and cache of one dtype")
    backend = ops.get_backend(backend, device)
    backend.check_cache(page_size, model_dtype)
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
                            time.perf_counter() - start, cache_bytes,
                            decode_tokens=batch * (max_new_tokens - 1))
    tokens = torch.cat(out, dim=1)
    if return_logits:
        return tokens, stats, torch.stack(step_logits, dim=1)
    return tokens, stats
