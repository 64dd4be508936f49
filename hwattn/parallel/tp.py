"""Megatron-style tensor parallelism for `Transformer`, applied to a built model in place.

Each rank keeps a contiguous block of query heads and the cached heads they read, following
`Attention.local_heads(tp)`: KV heads (MHA/GQA/GTA) and latent heads (GLA) are split while
there are at least as many as ranks, else each rank keeps (duplicates) the one its query heads
use; MLA's single latent is therefore replicated on every rank, and the shared RoPE key of
GTA/MLA/GLA is replicated too. Projections into heads are split by output rows
(column-parallel), the output projection by input columns (row-parallel) followed by an
all-reduce; the SwiGLU hidden units are split the same way. Embeddings, norms and the output
head stay replicated, so every rank computes the same logits.

After sharding, each attention layer's `config` describes its local shard, so its
`cache_layout(1)`, `allocate_cache` and `kv_bytes_per_token(1)` are the per-rank ones.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from hwattn.layers import GroupedQueryAttention, GroupedTiedAttention, LatentAttention


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T): the input features are split across ranks."""

    def __init__(self, weight: Tensor, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.group = group
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        if self.group is not None:
            dist.all_reduce(y, group=self.group)
        return y


def _heads(weight: Tensor, heads: range, width: int) -> Tensor:
    """Rows of `weight` (H * width, ...) belonging to `heads` (a weight or a bias)."""
    return weight.reshape(-1, width, *weight.shape[1:])[heads.start:heads.stop].flatten(0, 1)


def _set(linear: nn.Linear, weight: Tensor, bias: Tensor | None = None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)


def _slice(param: Tensor | None, heads: range) -> nn.Parameter | None:
    return None if param is None else nn.Parameter(param[heads.start:heads.stop].clone(),
                                                   requires_grad=False)


def _row_parallel(linear: nn.Linear, heads: range, width: int, group) -> RowParallelLinear:
    d_out = linear.weight.shape[0]
    w = linear.weight.view(d_out, -1, width)[:, heads.start:heads.stop].reshape(d_out, -1)
    return RowParallelLinear(w, group)


def shard_attention(attn, rank: int, world: int, group=None) -> None:
    cfg = attn.config
    n_q, n_c = attn.local_heads(world)
    group_size = cfg.n_heads // cfg.cache_heads
    q_heads = range(rank * n_q, (rank + 1) * n_q)
    first = rank * n_q // group_size
    c_heads = range(first, first + n_c)
    dh = cfg.head_dim
    if isinstance(attn, GroupedQueryAttention):
        _set(attn.wq, _heads(attn.wq.weight, q_heads, dh))
        _set(attn.wk, _heads(attn.wk.weight, c_heads, dh))
        _set(attn.wv, _heads(attn.wv.weight, c_heads, dh))
        attn.n_kv_heads = n_c
        local = dict(n_kv_heads=n_c)
    elif isinstance(attn, GroupedTiedAttention):
        _set(attn.wq, _heads(attn.wq.weight, q_heads, dh))
        _set(attn.wkv, _heads(attn.wkv.weight, c_heads, dh))
        attn.n_kv_heads = n_c
        local = dict(n_kv_heads=n_c)
    elif isinstance(attn, LatentAttention):
        dc, dr = attn.latent_dim, attn.rope_dim
        bias_q, bias_kv = attn.wq_b.bias, attn.wkv_a.bias  # None without attention_bias
        _set(attn.wq_b, _heads(attn.wq_b.weight, q_heads, dh + dr),
             None if bias_q is None else _heads(bias_q, q_heads, dh + dr))
        latent_rows = cfg.n_latent_heads * dc

        def latent_split(t):  # (h_c * d_c + d_R, ...) -> this rank's latents and the RoPE rows
            return torch.cat((_heads(t[:latent_rows], c_heads, dc), t[latent_rows:]))

        _set(attn.wkv_a, latent_split(attn.wkv_a.weight),
             None if bias_kv is None else latent_split(bias_kv))
        attn.kv_norm.weight = _slice(attn.kv_norm.weight, c_heads)
        attn.w_uk, attn.w_uv = _slice(attn.w_uk, q_heads), _slice(attn.w_uv, q_heads)
        attn.b_uk, attn.b_uv = _slice(attn.b_uk, q_heads), _slice(attn.b_uv, q_heads)
        attn.n_latent_heads = n_c
        attn.group = n_q // n_c
        local = dict(n_latent_heads=n_c)
    else:
        raise ValueError(f"no tensor-parallel rule for {type(attn).__name__}")
    attn.wo = _row_parallel(attn.wo, q_heads, dh, group)
    attn.n_heads = n_q
    attn.config = dataclasses.replace(cfg, n_heads=n_q, **local)


def shard_ffn(ffn, rank: int, world: int, group=None) -> None:
    units = torch.tensor_split(torch.arange(ffn.w1.weight.shape[0]), world)[rank]
    lo, hi = int(units[0]), int(units[-1]) + 1
    _set(ffn.w1, ffn.w1.weight[lo:hi])
    _set(ffn.w3, ffn.w3.weight[lo:hi])
    ffn.w2 = RowParallelLinear(ffn.w2.weight[:, lo:hi], group)


@torch.no_grad()
def shard_model(model, rank: int, world: int, group=None):
    """Keep rank `rank`'s shard of every layer of `model` (in place; returns it).

    `group` is the process group of the all-reduces (None with world 1: no communication).
    Raises ValueError if `world` does not divide the heads as `Attention.local_heads` needs.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank {rank}, world {world}")
    if world == 1:
        return model
    model.layers[0].attn.local_heads(world)  # validates the split before changing anything
    for block in model.layers:
        shard_attention(block.attn, rank, world, group)
        shard_ffn(block.ffn, rank, world, group)
    model.tp_world = world
    return model


def local_kv_bytes_per_token(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV bytes per token of a (possibly sharded) model on this rank, from its real layout."""
    return sum(blk.attn.kv_bytes_per_token(1, dtype) for blk in model.layers)
