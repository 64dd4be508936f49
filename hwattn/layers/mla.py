"""Multi-head Latent Attention (MLA, DeepSeek-V2 style) and the latent machinery GLA shares.

Query: x -> `wq_a` (D -> 8·d_h) -> RMSNorm -> `wq_b` -> per head [q_nope (d_h) | q_rope (d_R)].
KV: `wkv_a` (D -> h_c·d_c + d_R) gives h_c latents c (each RMSNorm'd) and one RoPE key shared
by every head. Training / prefill up-projects each head's latent to K_nope = W_UK c and
V = W_UV c (d_h each) and attends with K = [K_nope, k_rope] at scale 1/sqrt(d_h + d_R).

Decode absorbs the up-projections: q_abs = q_nope · W_UK (a d_c-wide query per head) attends
the cached latent directly through the backend's `decode_tied` (the latent is both the key's
un-rotated part and the value), and W_UV maps the attended latent back to d_h. The scale stays
the training scale. Per token per layer the cache holds h_c · d_c + d_R elements; MLA has one
latent head of d_c = 4·d_h. Query head i uses latent head i // (h_q / h_c).

Prefill has two forms (`prefill_forms`), chosen per step by their FLOPs (`prefill_form`):
absorbed, as decode (`prefill_tied` over the latent cache: ~2·(d_c + d_R + d_c) FLOPs per
query-key pair per head), or expanded (each sequence's cached latent pages gathered and
up-projected to per-head K_nope = W_UK c and V = W_UV c, attended by `prefill_tied` with
values of their own beside the one shared RoPE key: ~2·(d_h + d_R + d_h) per pair, plus the
up-projection of every context token). Long prompts take the expanded form, a few queries
over a long context (decode rows, short chunks) the absorbed one.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from hwattn.config import ModelConfig
from hwattn.layers.base import (Linear, TiedStateAttention, causal_attention, select_heads,
                                set_weight)
from hwattn.layers.metadata import AttentionMetadata, PrefillForm
from hwattn.layers.norm import RMSNorm
from hwattn.layers.rope import apply_rope
from hwattn.switches import env_flag
from hwattn.variants import VariantSpec, register_variant


# `LatentAttention.absorb_output` through `_absorb_rows` (off: the einsum, for comparison).
ABSORB_INTO_ROWS = not env_flag("HWATTN_LATENT_OUT_COPY")


@torch.library.custom_op("hwattn::absorb_rows", mutates_args=())
def absorb_rows_op(rows: Tensor, w_uv: Tensor) -> Tensor:
    """rows (N, H, d_c), w_uv (H, d_h, d_c) -> (N, H, d_h), contiguous: per head h,
    out[:, h] = rows[:, h] @ w_uv[h].T, as one `bmm` whose output is the (H, N, d_h)
    transposed view of the result (row stride H·d_h, head stride d_h), which cuBLAS writes in
    place. A custom op (as `hwattn/ops/linear.py`'s), so a compiled block keeps it whole:
    traced, the `out=` would become a GEMM into a buffer of its own and a copy."""
    out = rows.new_empty(rows.shape[0], rows.shape[1], w_uv.shape[1])
    torch.bmm(rows.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
    return out


@absorb_rows_op.register_fake
def _(rows: Tensor, w_uv: Tensor) -> Tensor:
    return rows.new_empty(rows.shape[0], rows.shape[1], w_uv.shape[1])


def _absorb_rows(out_latent: Tensor, w_uv: Tensor) -> Tensor:
    """out_latent (..., H, d_c) -> (..., H, d_h) through `absorb_rows_op`."""
    *lead, heads, width = out_latent.shape
    out = torch.ops.hwattn.absorb_rows(out_latent.reshape(-1, heads, width), w_uv)
    return out.view(*lead, heads, w_uv.shape[1])


# Whether `ModelRunner` composes the absorptions into the projections
# (`LatentAttention.compose_absorptions`). Off: on an H100 the `xl` decode step took the same
# time with them for GLA-2 and 2-5% longer for MLA (docs/results/engine.md, run 17).
COMPOSE_ABSORPTIONS = env_flag("HWATTN_COMPOSE_ABSORB")


class ComposedProjections(NamedTuple):
    """A latent layer's decode projections with W_UK and W_UV multiplied in
    (`LatentAttention.compose_absorptions`): `query` maps the normed query latent
    (..., q_latent_dim) to per head [q_abs (d_c) | q_rope (d_R)]; `output` maps the attended
    latents (..., H·d_c) to the model width, as `wo` does (its all-reduce included under
    tensor parallelism)."""

    query: nn.Module
    output: nn.Module


def _linear_like(module: nn.Module, weight: Tensor) -> nn.Module:
    """A shallow copy of the linear layer `module` (a `Linear`, or a tensor-parallel
    `RowParallelLinear` with its all-reduce) whose weight is `weight` instead; `module` keeps
    its own parameters."""
    clone = copy.copy(module)
    # Registries of its own (parameters, buffers, submodules, hooks), not `module`'s.
    vars(clone).update({k: v.copy() for k, v in vars(module).items() if isinstance(v, dict)})
    clone.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    clone.out_features, clone.in_features = weight.shape
    return clone


def _recompose(layer: nn.Module, incompatible_keys) -> None:
    """After `load_state_dict`: compose the absorptions of a layer that had them again, from
    the weights just loaded."""
    if layer._composed is not None:
        layer.compose_absorptions()


class LatentAttention(TiedStateAttention):
    """Latent attention with `n_latent_heads` latents of `latent_dim` each (MLA: 1, GLA: h_c)."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__(config)
        d, h, dh = config.dim, config.n_heads, self.head_dim
        self.n_latent_heads = config.n_latent_heads
        self.latent_dim = config.latent_dim
        self.group = h // self.n_latent_heads
        self.scale = 1.0 / math.sqrt(dh + self.rope_dim)
        kw = dict(bias=False, device=device, dtype=dtype)
        biased = dict(bias=config.attention_bias, device=device, dtype=dtype)
        self.wq_a = Linear(d, config.q_latent_dim, **biased)
        self.q_norm = RMSNorm(config.q_latent_dim, eps=config.norm_eps, device=device, dtype=dtype)
        self.wq_b = Linear(config.q_latent_dim, h * (dh + self.rope_dim), **biased)
        self.wkv_a = Linear(d, self.n_latent_heads * self.latent_dim + self.rope_dim, **biased)
        self.kv_norm = RMSNorm(self.n_latent_heads, self.latent_dim, eps=config.norm_eps,
                               device=device, dtype=dtype)
        # Up-projections, one (d_h, d_c) matrix per query head; head i reads latent i // group.
        self.w_uk = nn.Parameter(torch.empty(h, dh, self.latent_dim, device=device, dtype=dtype))
        self.w_uv = nn.Parameter(torch.empty(h, dh, self.latent_dim, device=device, dtype=dtype))
        # Their biases (attention_bias), one d_h row per query head.
        self.b_uk = self.b_uv = None
        if config.attention_bias:
            self.b_uk = nn.Parameter(torch.zeros(h, dh, device=device, dtype=dtype))
            self.b_uv = nn.Parameter(torch.zeros(h, dh, device=device, dtype=dtype))
        self.wo = Linear(h * dh, d, **kw)
        # Set by `compose_absorptions` (inference only; not parameters of the module).
        self._composed: ComposedProjections | None = None
        self.register_load_state_dict_post_hook(_recompose)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.latent_dim)
        for w in (self.w_uk, self.w_uv):
            if not w.is_meta:
                nn.init.uniform_(w, -bound, bound)

    input_projections = ("wq_a", "wkv_a")
    # kv_norm and the RoPE key's rotation done in a decode step's cache write
    finishes_states_in_store = True
    store_fusion_pays = True  # two kernels fewer a layer (hwattn/layers/base.py)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor, finish: bool = True):
        return self._project(x, cos, sin, self.wq_b, self.head_dim, finish)

    def state_norm(self) -> tuple[Tensor, float]:
        return self.kv_norm.weight, self.kv_norm.eps

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor, wq_b: nn.Module, width: int,
                 finish: bool = True):
        """`project` through the query projection `wq_b`, whose output per head is
        [`width` un-rotated dims | d_R RoPE dims]: `self.wq_b` (q_nope, d_h), or the composed
        query (q_abs, d_c; `compose_absorptions`)."""
        b, t, _ = x.shape
        q_latent, kv = self.in_proj(x)  # (B, T, 8·d_h), (B, T, h_c·d_c + d_R)
        q = wq_b(self.q_norm(q_latent)).view(b, t, self.n_heads, -1)  # (B, T, H, width + d_R)
        q_first, q_rope = q.split([width, self.rope_dim], dim=-1)
        latent, k_rope = kv.split([self.n_latent_heads * self.latent_dim, self.rope_dim], dim=-1)
        latent = latent.view(b, t, self.n_latent_heads, self.latent_dim)  # (B, T, h_c, d_c)
        if finish:
            latent, k_rope = self.kv_norm(latent), apply_rope(k_rope, cos, sin)
        return (q_first, apply_rope(q_rope, cos, sin)), (latent, k_rope)

    @torch.no_grad()
    def compose_absorptions(self, on: bool = True) -> bool:
        """For inference, once the layer is on its device and sharded: multiply W_UK into the
        query rows of `wq_b` and W_UV into `wo` (in fp32 or wider, stored in the weights'
        dtype), so that a decode step's queries leave `wq_b` already absorbed and its attended
        latents go straight through the output projection. Per layer that is two batched GEMMs
        fewer (the absorptions), for H·(d_c − d_h)·(q_latent_dim + D) − 2·H·d_h·d_c more weight
        elements read; prefill and mixed steps keep the separate products (the composed
        weights are held beside them). Returns whether the layer composed them: not with
        `b_uv` (attention_bias), which `wo` would have to carry as a bias. `on=False` drops the composed weights. `load_state_dict` composes them again;
        `.to()` and dtype casts carry them along; replacing or writing into `wq_b`'s, `wo`'s,
        W_UK's or W_UV's weight in any other way needs this again."""
        self._composed = None
        if not on or self.b_uv is not None:
            return False
        h, dh, dr = self.n_heads, self.head_dim, self.rope_dim
        dtype = self.wq_b.weight.dtype
        wide = torch.promote_types(dtype, torch.float32)  # fp32 at least
        w_uk, w_uv = self.w_uk.to(wide), self.w_uv.to(wide)  # (H, d_h, d_c)
        wq = self.wq_b.weight.to(wide).view(h, dh + dr, -1)  # (H, d_h + d_R, Q)
        wq = torch.cat((torch.einsum("hdc,hdq->hcq", w_uk, wq[:, :dh]), wq[:, dh:]), 1)
        bias = None
        if self.wq_b.bias is not None:
            bq = self.wq_b.bias.to(wide).view(h, dh + dr)
            bias = torch.cat((torch.einsum("hdc,hd->hc", w_uk, bq[:, :dh]), bq[:, dh:]), 1)
            bias = bias.flatten().to(dtype)
        query = Linear(1, 1, bias=bias is not None, device="meta")
        set_weight(query, wq.flatten(0, 1).to(dtype), bias)
        wo = self.wo.weight.to(wide).view(self.wo.weight.shape[0], h, dh)  # (D, H, d_h)
        wo = torch.einsum("ohd,hdc->ohc", wo, w_uv).flatten(1)  # (D, H·d_c)
        self._composed = ComposedProjections(query, _linear_like(self.wo, wo.to(dtype)))
        return True

    def _apply(self, fn, recurse: bool = True):
        """`nn.Module._apply` (`.to()`, `.double()`, ...), the composed weights included."""
        super()._apply(fn, recurse)
        if self._composed is not None:
            self._composed = ComposedProjections(*(m._apply(fn) for m in self._composed))
        return self

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata | None = None,
                cache: tuple[Tensor, ...] | None = None) -> Tensor:
        """`Attention.forward`; a decode step (neither prefill nor mixed) through the composed
        projections once `compose_absorptions` made them."""
        composed = self._composed
        if composed is None or meta is None or meta.is_prefill or meta.parts is not None:
            return super().forward(x, cos, sin, meta, cache)
        self.check_step(x, cos, sin, meta, cache)
        finish = not self.finishes_in_store(meta)
        q, states = self._project(x, cos, sin, composed.query, self.latent_dim,  # q_abs, q_rope
                                  finish)
        if finish:
            self._store(cache, states, meta)
        else:
            self._store_unfinished(cache, states, cos, sin, meta)
        out_latent = self.kernel_call(meta.backend, q, cache, meta.block_table, meta.cache_seqlens,
                                      plan=meta.plan)  # (B, T, H, d_c)
        return composed.output(out_latent.reshape(*x.shape[:2], -1))

    def _up(self, latent: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Per-head up-projection: latent (B, L, h_c, d_c) -> (B, L, H, d_h)."""
        b, n = latent.shape[:2]
        w = weight.view(self.n_latent_heads, self.group, self.head_dim, self.latent_dim)
        out = torch.einsum("bljc,jgdc->bljgd", latent, w).reshape(b, n, self.n_heads, self.head_dim)
        return out if bias is None else out + bias

    def expand(self, latent: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values of latents (B, L, h_c, d_c) and RoPE keys (B, L, d_R):
        K (B, L, H, d_h + d_R) = [W_UK c, k_rope], V (B, L, H, d_h) = W_UV c."""
        b, n = latent.shape[:2]
        k = torch.cat((self._up(latent, self.w_uk, self.b_uk),
                       k_rope[:, :, None, :].expand(b, n, self.n_heads, self.rope_dim)), -1)
        return k, self._up(latent, self.w_uv, self.b_uv)

    def attend(self, q, states) -> Tensor:
        q_nope, q_rope = q
        k, v = self.expand(*states)
        return causal_attention(torch.cat((q_nope, q_rope), -1), k, v, self.scale)

    def absorb_query(self, q_nope: Tensor) -> Tensor:
        """q_nope (..., H, d_h) -> q_abs (..., H, d_c): W_UK folded into the query. The key
        bias b_uk adds q_nope · b_uk to every score of a query alike, which softmax drops."""
        return torch.einsum("...hd,hdc->...hc", q_nope, self.w_uk)

    def absorb_output(self, out_latent: Tensor) -> Tensor:
        """Attended latent (..., H, d_c) -> per-head output (..., H, d_h) through W_UV (plus
        b_uv whole: the attention weights sum to one).

        Without autograd the product is one batched GEMM over the heads that writes its
        (H, N, d_h) result straight into the rows of an (N, H, d_h) tensor (`_absorb_rows`),
        so `wo` reads it as it is. As an einsum, Inductor gives the GEMM a head-major buffer
        and then copies it into rows before `wo`: one more kernel a layer in a compiled
        decode step (HWATTN_LATENT_OUT_COPY=1 keeps that path, to measure the two)."""
        if ABSORB_INTO_ROWS and not (torch.is_grad_enabled() and (
                out_latent.requires_grad or self.w_uv.requires_grad)):
            out = _absorb_rows(out_latent, self.w_uv)
        else:
            out = torch.einsum("...hc,hdc->...hd", out_latent, self.w_uv)
        return out if self.b_uv is None else out + self.b_uv

    def decode(self, q, cache, meta: AttentionMetadata) -> Tensor:
        q_nope, q_rope = q
        out_latent = self.kernel_call(meta.backend, (self.absorb_query(q_nope), q_rope), cache,
                                      meta.block_table, meta.cache_seqlens,
                                      plan=meta.plan)  # (B, T, H, d_c)
        return self.absorb_output(out_latent)

    def prefill_forms(self) -> tuple[PrefillForm, PrefillForm]:
        """(absorbed, expanded); see the module docstring. Costs per query token (absorbing
        W_UK and W_UV) and per context token (up-projecting K_nope and V) on local heads."""
        h, dh, dc = self.n_heads, self.head_dim, self.latent_dim
        absorbed = self.tied_form(dc, "absorbed", query_flops=2 * 2 * h * dh * dc)
        expanded = PrefillForm("expanded", True, h, h, dh, dh, self.rope_dim, self.scale,
                               context_flops=2 * 2 * h * dc * dh, split_values=True)
        return absorbed, expanded

    def prefill_form(self, plan) -> PrefillForm:
        """The form of fewer FLOPs for a step's lengths (`PrefillPlan`); absorbed on a tie."""
        return min(self.prefill_forms(), key=lambda f: f.step_flops(plan))

    def prefill(self, q, cache, meta: AttentionMetadata) -> Tensor:
        return self.prefill_as(self.prefill_form(meta.plan), q, cache, meta)

    def prefill_as(self, form: PrefillForm, q, cache, meta: AttentionMetadata) -> Tensor:
        """`prefill` in the given form (one of `prefill_forms()`): q_nope (N, H, d_h),
        q_rope (N, H, d_R) -> (N, H, d_h)."""
        q_nope, q_rope = q
        args = (meta.cu_seqlens_q, meta.cache_seqlens)
        if form.name == "absorbed":
            out_latent = form.run(meta.backend, (self.absorb_query(q_nope), q_rope), cache,
                                  meta.block_table, *args, plan=meta.plan)  # (N, H, d_c)
            return self.absorb_output(out_latent)
        *caches, table = self.expand_context(cache, meta)
        return form.run(meta.backend, (q_nope, q_rope), tuple(caches), table, *args,
                        plan=meta.plan)

    def expand_context(self, cache: tuple[Tensor, Tensor],
                       meta: AttentionMetadata) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every sequence's cached latent pages, gathered and up-projected to per-head keys
        and values: K_nope (n, page, H, d_h) = W_UK c, the RoPE keys of those pages
        (n, page, d_R), V (n, page, H, d_h) = W_UV c, and the block table (B, max_pages)
        int32 that maps each sequence onto them (`meta.context_pages`)."""
        kv_cache, rope_cache = cache
        pages, table = meta.context_pages(kv_cache.shape[1])
        latent, rope = kv_cache[pages], rope_cache[pages]  # (n, page, h_c, d_c), (n, page, d_R)
        n, page = latent.shape[:2]
        flat = latent.view(1, n * page, self.n_latent_heads, self.latent_dim)
        k_nope = self._up(flat, self.w_uk, self.b_uk)  # (1, n·page, H, d_h)
        v = self._up(flat, self.w_uv, self.b_uv)
        return (k_nope.view(n, page, self.n_heads, -1), rope.to(k_nope.dtype),
                v.view(n, page, self.n_heads, -1), table)

    def cache_layout(self, tp: int = 1) -> dict[str, tuple[int, ...]]:
        return {"kv": (self.local_heads(tp)[1], self.latent_dim), "rope": (self.rope_dim,)}

    def decode_widths(self) -> tuple[int, int]:
        return self.latent_dim + self.rope_dim, self.latent_dim

    def attend_widths(self) -> tuple[int, int]:
        return self.head_dim + self.rope_dim, self.head_dim

    def decode_query_shapes(self, batch: int, query_len: int, tp: int = 1):
        heads = self.local_heads(tp)[0]  # absorbed: a d_c-wide query per head
        return (batch, query_len, heads, self.latent_dim), (batch, query_len, heads, self.rope_dim)

    def shard_heads(self, q_heads: range, c_heads: range) -> dict:
        dc, dr = self.latent_dim, self.rope_dim
        latent_rows = self.n_latent_heads * dc

        def latents(t: Tensor) -> Tensor:  # (h_c * d_c + d_R, ...): this rank's latents + RoPE rows
            return torch.cat((select_heads(t[:latent_rows], c_heads, dc), t[latent_rows:]))

        def rows(p: Tensor | None, heads: range) -> nn.Parameter | None:
            return None if p is None else nn.Parameter(p[heads.start:heads.stop].clone(),
                                                       requires_grad=False)

        bias_q, bias_kv = self.wq_b.bias, self.wkv_a.bias  # None without attention_bias
        set_weight(self.wq_b, select_heads(self.wq_b.weight, q_heads, self.head_dim + dr),
                   None if bias_q is None else select_heads(bias_q, q_heads, self.head_dim + dr))
        set_weight(self.wkv_a, latents(self.wkv_a.weight), None if bias_kv is None else latents(bias_kv))
        self.kv_norm.weight = rows(self.kv_norm.weight, c_heads)
        self.w_uk, self.w_uv = rows(self.w_uk, q_heads), rows(self.w_uv, q_heads)
        self.b_uk, self.b_uv = rows(self.b_uk, q_heads), rows(self.b_uv, q_heads)
        self.n_latent_heads = len(c_heads)
        self.group = len(q_heads) // len(c_heads)
        return dict(n_latent_heads=len(c_heads))


class MultiHeadLatentAttention(LatentAttention):
    """MLA: one latent of d_c = 4·d_h shared by all query heads, plus one RoPE key.

    Under tensor parallelism the latent cannot be split, so every rank keeps a full copy.
    """


MLA = register_variant(VariantSpec(
    "mla", MultiHeadLatentAttention, "multi-head latent attention: one latent of 4·d_h + a RoPE key",
    groups=1, fixed_groups=True, latent_width=4, partial_rope=True, bench_heads=128, takes_bias=True))
