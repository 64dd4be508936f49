"""Megatron-style tensor parallelism for `Transformer`, applied to a built model in place.

Each rank keeps a contiguous block of query heads and the cached heads they read, following
`Attention.local_heads(tp)`: KV heads (MHA/GQA/GTA) and latent heads (GLA) are split while
there are at least as many as ranks, else each rank keeps (duplicates) the one its query heads
use; MLA's single latent is therefore replicated on every rank, and the shared RoPE key of
GTA/MLA/GLA is replicated too. Projections into heads are split by output rows
(column-parallel), which each family does for itself (`Attention.shard_heads`); the output
projection is split here by input columns (row-parallel) followed by an all-reduce, and the
SwiGLU hidden units the same way. Embeddings, norms and the output head stay replicated, so
every rank computes the same logits.

After sharding, each attention layer's `config` describes its local shard, so its
`cache_layout(1)`, `allocate_cache` and `kv_bytes_per_token(1)` are the per-rank ones.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hwattn.layers import set_weight
from hwattn.ops.linear import linear


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T): the input features are split across ranks."""

    def __init__(self, weight: Tensor, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.group = group
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        y = linear(x, self.weight)
        if self.group is not None:
            _all_reduce(y, self.group)
        return y


@torch.compiler.disable
def _all_reduce(y: Tensor, group) -> None:
    """In-place sum over `group`; a compiled block breaks its graph here and runs the
    collective as the eager model does (and as a captured CUDA graph records it)."""
    dist.all_reduce(y, group=group)


def _row_parallel(linear: nn.Linear, heads: range, width: int, group) -> RowParallelLinear:
    d_out = linear.weight.shape[0]
    w = linear.weight.view(d_out, -1, width)[:, heads.start:heads.stop].reshape(d_out, -1)
    return RowParallelLinear(w, group)


def shard_attention(attn, rank: int, world: int, group=None) -> None:
    """Keep rank `rank`'s query heads and the cached heads they read (in place)."""
    cfg = attn.config
    n_q, n_c = attn.local_heads(world)
    q_heads = range(rank * n_q, (rank + 1) * n_q)
    first = rank * n_q // cfg.group_size
    c_heads = range(first, first + n_c)
    local = attn.shard_heads(q_heads, c_heads)
    attn.wo = _row_parallel(attn.wo, q_heads, attn.head_dim, group)
    attn.n_heads = n_q
    attn.config = dataclasses.replace(cfg, n_heads=n_q, **local)


def shard_ffn(ffn, rank: int, world: int, group=None) -> None:
    units = torch.tensor_split(torch.arange(ffn.w1.weight.shape[0]), world)[rank]
    lo, hi = int(units[0]), int(units[-1]) + 1
    set_weight(ffn.w1, ffn.w1.weight[lo:hi])
    set_weight(ffn.w3, ffn.w3.weight[lo:hi])
    ffn.w2 = RowParallelLinear(ffn.w2.weight[:, lo:hi], group)


@torch.no_grad()
def shard_model(model, rank: int, world: int, group=None):
    """Keep rank `rank`'s shard of every layer of `model` (in place; returns it).

    `group` is the process group of the all-reduces (None with world 1: no communication).
    A model whose projections were fused (`Transformer.fuse_projections`, as `ModelRunner`
    does) is fused again from its shards, and composed absorptions are composed again.
    Raises ValueError, before changing anything, if `world` does not divide the heads as
    `Attention.local_heads` needs, or if `model` is sharded already.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank {rank}, world {world}")
    if world == 1:
        return model
    if getattr(model, "tp_world", 1) != 1:  # its layers would be split again, silently wrong
        raise ValueError(f"the model is sharded already (over {model.tp_world} ranks): shard "
                         f"a model as built, once")
    try:
        model.layers[0].attn.local_heads(world)  # validates the split before changing anything
    except ValueError as err:
        raise ValueError(f"world {world} (ranks to shard over) does not split the model's "
                         f"heads: {err}") from None
    for block in model.layers:
        # A fused projection holds the whole layer's weights, not this rank's: fused anew
        # from the shards below (else the layer would multiply by the unsharded matrix).
        fused = getattr(block.attn, "_fused_in", None) is not None
        fused_ffn = getattr(block.ffn, "_w13", None) is not None
        # Composed absorptions (`LatentAttention.compose_absorptions`): composed anew too.
        composed = getattr(block.attn, "_composed", None) is not None
        shard_attention(block.attn, rank, world, group)
        shard_ffn(block.ffn, rank, world, group)
        if fused:
            block.attn.fuse_projections()
        if fused_ffn:
            block.ffn.fuse_projections()
        if composed:
            block.attn.compose_absorptions()
    model.tp_world = world
    return model


def local_kv_bytes_per_token(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV bytes per token of a (possibly sharded) model on this rank, from its real layout."""
    return sum(blk.attn.kv_bytes_per_token(1, dtype) for blk in model.layers)
