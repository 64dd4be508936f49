"""Perplexity and bits per byte on held-out token shards.

Every token of a shard after the first is predicted once, from non-overlapping windows of
`seq_len` (so contexts restart at each window, as in the paper's evaluation), up to the last
whole window: the final (n - 1) mod seq_len tokens of a shard of n are not scored. Bits per byte
divide the summed loss in bits by the UTF-8 bytes the predicted tokens stand for, counted
exactly from the tokenizer's byte lengths, which makes numbers comparable across tokenizers.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from hwattn.data.loader import eval_window_count, eval_windows
from hwattn.data.progress import progress_bar


# The `dtype` values `autocast_for` knows (any other would read as "fp32").
AMP_CHOICES = ("auto", "bf16", "fp32")


def autocast_for(device: torch.device | str, dtype: str = "auto"):
    """bf16 autocast on CUDA (dtype "auto" or "bf16"), nothing on CPU or for "fp32"."""
    device = torch.device(device)
    if device.type == "cuda" and dtype in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def check_window_args(model, seq_len: int, max_tokens: int | None = None,
                      batch_size: int = 16) -> None:
    """ValueError naming the argument, before any forward pass, unless `seq_len` and
    `batch_size` are integers >= 1, `max_tokens` is None or one, and `seq_len` is within the
    model's context (`config.max_seq_len`, where the model has one). A `seq_len` of 0 was a
    ZeroDivisionError, a `batch_size` of 0 "range() arg 3 must not be zero", a `seq_len`
    beyond the context failed inside the model, and a negative `max_tokens` was read as
    "-4 tokens are fewer than one evaluation window"."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                        ("max_tokens", max_tokens)):
        if name == "max_tokens" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    context = getattr(getattr(model, "config", None), "max_seq_len", None)
    if context is not None and seq_len > context:
        raise ValueError(f"seq_len {seq_len} exceeds the model's context of {context} tokens "
                         "(max_seq_len)")


@torch.no_grad()
def token_losses(model, windows: torch.Tensor, batch_size: int = 16, amp: str = "auto",
                 bar=None) -> torch.Tensor:
    """Per-token losses (n, T) in nats of `windows` (n, T + 1) int64. `bar` (a progress bar,
    optional) advances by the tokens of each batch scored."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        with autocast_for(device, amp):
            logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.float().transpose(1, 2), w[:, 1:], reduction="none")
        out.append(loss.cpu())
        if bar is not None:
            bar.update(loss.numel())
    return torch.cat(out)


@torch.no_grad()
def evaluate_perplexity(model, tokens: np.ndarray, seq_len: int, token_bytes: np.ndarray | None = None,
                        max_tokens: int | None = None, batch_size: int = 16, amp: str = "auto",
                        bar=None) -> dict:
    """Loss (nats/token), perplexity, and bits per byte when `token_bytes` (V,) is given.

    tokens: (N,) held-out token ids; at most `max_tokens` of them are scored, in whole
        windows of `seq_len` (the largest multiple of seq_len within both max_tokens and
        N - 1): the record's "tokens" is the number actually scored.
    token_bytes: (V,) UTF-8 bytes per id, covering every id of the scored windows.
    bar: a progress bar (optional), advanced by the tokens scored.
    ValueError naming the argument, before any forward pass, for a bad `seq_len`,
    `max_tokens` or `batch_size` (`check_window_args`) or a `token_bytes` too short.
    """
    check_window_args(model, seq_len, max_tokens, batch_size)
    windows = eval_windows(tokens, seq_len, max_tokens)
    if token_bytes is not None and len(token_bytes) <= int(windows.max()):
        raise ValueError(f"token_bytes has {len(token_bytes)} entries but the tokens hold id "
                         f"{int(windows.max())}: give the byte lengths of the tokenizer "
                         "that made them")
    losses = token_losses(model, windows, batch_size, amp, bar)
    total = float(losses.double().sum())
    n = losses.numel()
    loss = total / n
    # A diverged model's loss can exceed what exp() holds (about 709 nats): its perplexity is
    # inf, not an OverflowError after the whole run.
    out = {"tokens": n, "loss": loss, "ppl": float("inf") if loss > 709 else math.exp(loss)}
    if token_bytes is not None:
        n_bytes = int(token_bytes[windows[:, 1:].numpy()].sum())
        out["bytes"] = n_bytes
        out["bpb"] = total / math.log(2) / n_bytes if n_bytes else float("nan")
    return out


def evaluate_domains(model, dataset, seq_len: int, max_tokens: int | None = None,
                     batch_size: int = 16, amp: str = "auto", progress: bool = False) -> dict:
    """{domain: perplexity record} for every held-out domain of a `TokenDataset`, plus
    "average": the unweighted mean over domains of loss, ppl and bpb. `progress`: a bar on
    stderr of the tokens scored, all domains together."""
    check_window_args(model, seq_len, max_tokens, batch_size)
    lengths = dataset.tokenizer.token_byte_lengths
    total = seq_len * sum(eval_window_count(len(dataset.val[d]), seq_len, max_tokens)
                          for d in dataset.domains)
    bar = progress_bar(total=total, desc="perplexity", unit="tok", unit_scale=True,
                       disable=not progress)
    res = {d: evaluate_perplexity(model, dataset.val[d], seq_len, lengths, max_tokens, batch_size,
                                  amp, bar)
           for d in dataset.domains}
    bar.close()
    if res:
        res["average"] = {k: sum(r[k] for r in res.values()) / len(res)
                          for k in ("loss", "ppl", "bpb")}
    return res
