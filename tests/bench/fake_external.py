"""Stand-ins for the `flash_mla` and `flash_attn_interface` packages, in plain PyTorch.

They do what those libraries document (paged caches read through the block table, softmax
attention, the causal mask aligned bottom-right, FA3's extra `qv · v` score term, FlashMLA's
value = the first `head_dim_v` dims of its one cache) and refuse what the real kernels refuse
(wrong shapes, dtypes, page size, a non-contiguous last dim, schedule metadata made for another
call), so the adapters' layout conversion is tested against the documented contract, not
against our own reference. They share no code with `hwattn.ops`.
"""

from __future__ import annotations

import types

import torch


def _paged_attention(qk_pairs, values, table, seqlens, scale, causal, kv_heads):
    """Attention of every sequence over its cached tokens.

    qk_pairs: [(q (B, L_q, H, E_i), cache (P, page, H_kv, E_i))]: the score is the sum of the
    pairs' dot products. values: (P, page, H_kv, D_v). Query head h reads KV head
    h // (H / H_kv). Returns (out (B, L_q, H, D_v) in the queries' dtype, lse (B, H, L_q))."""
    batch, l_q, heads, _ = qk_pairs[0][0].shape
    page = values.shape[1]
    group = heads // kv_heads
    outs, lses = [], []
    for b in range(batch):
        length = int(seqlens[b])
        slots = torch.arange(length)
        pages = table[b, : -(-length // page)].long()[slots // page]  # page of every token
        offsets = slots % page

        def tokens(cache):  # (L, H, E): this sequence's tokens, KV heads repeated per query head
            return cache[pages, offsets].float().repeat_interleave(group, dim=1)

        scores = sum(torch.einsum("qhe,lhe->hql", q[b].float(), tokens(cache))
                     for q, cache in qk_pairs) * scale  # (H, L_q, L)
        if causal:
            last_seen = length - l_q + torch.arange(l_q)  # (L_q,)
            scores = scores.masked_fill(slots[None, :] > last_seen[:, None], float("-inf"))
        lse = scores.logsumexp(-1)  # (H, L_q)
        out = torch.einsum("hql,lhd->qhd", (scores - lse[..., None]).exp(), tokens(values))
        outs.append(out.to(qk_pairs[0][0].dtype))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _check_paging(table, seqlens, batch):
    assert table.dtype == torch.int32 and table.dim() == 2 and table.shape[0] == batch, table.shape
    assert seqlens.dtype == torch.int32 and tuple(seqlens.shape) == (batch,), seqlens.shape


def flash_mla_module(version: str = "fake-1.0") -> types.ModuleType:
    """A `flash_mla` with `get_mla_metadata` and `flash_mla_with_kvcache` (dense, bf16/fp16)."""
    module = types.ModuleType("flash_mla")
    module.__version__ = version

    def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k):
        return dict(seqlens=cache_seqlens, tokens_per_head_k=num_q_tokens_per_head_k,
                    heads_k=num_heads_k), torch.ones(1, dtype=torch.int32)

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                               tile_scheduler_metadata, num_splits, softmax_scale=None,
                               causal=False):
        batch, s_q, h_q, d = q.shape
        _, page, h_k, d_k = k_cache.shape
        assert (d, d_k, head_dim_v, page, h_k) == (576, 576, 512, 64, 1), (q.shape, k_cache.shape)
        assert q.dtype == k_cache.dtype and q.dtype in (torch.bfloat16, torch.float16), q.dtype
        assert k_cache.stride(-1) == 1
        _check_paging(block_table, cache_seqlens, batch)
        meta = tile_scheduler_metadata
        assert meta["seqlens"] is cache_seqlens and meta["heads_k"] == h_k, meta
        assert meta["tokens_per_head_k"] == s_q * h_q // h_k, meta
        assert num_splits is not None
        scale = softmax_scale if softmax_scale is not None else d ** -0.5
        return _paged_attention([(q, k_cache)], k_cache[..., :head_dim_v], block_table,
                                cache_seqlens, scale, causal, h_k)

    module.get_mla_metadata = get_mla_metadata
    module.flash_mla_with_kvcache = flash_mla_with_kvcache
    return module


def fa3_module(version: str = "fake-3.0", with_schedule: bool = True) -> types.ModuleType:
    """A `flash_attn_interface` with a paged `flash_attn_with_kvcache` (and, if `with_schedule`,
    `get_scheduler_metadata`, whose result the call checks against its own arguments)."""
    module = types.ModuleType("flash_attn_interface")
    module.__version__ = version

    def get_scheduler_metadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv,
                               headdim, cache_seqlens, qkv_dtype=torch.bfloat16, headdim_v=None,
                               page_size=None, causal=False):
        assert max_seqlen_k == int(cache_seqlens.max())
        return dict(shape=(batch_size, max_seqlen_q, num_heads_q, num_heads_kv, headdim,
                           headdim_v or headdim, page_size), dtype=qkv_dtype, causal=causal)

    def flash_attn_with_kvcache(q, k_cache, v_cache, qv=None, cache_seqlens=None, page_table=None,
                                softmax_scale=None, causal=False, scheduler_metadata=None):
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        batch, s_q, heads, d = q.shape
        pages, page, h_k, _ = k_cache.shape
        d_v = v_cache.shape[-1]
        assert tuple(k_cache.shape) == (pages, page, h_k, d), (k_cache.shape, q.shape)
        assert tuple(v_cache.shape) == (pages, page, h_k, d_v), (v_cache.shape, k_cache.shape)
        assert heads % h_k == 0 and k_cache.dtype == v_cache.dtype == q.dtype, (heads, h_k)
        _check_paging(page_table, cache_seqlens, batch)
        pairs = [(q, k_cache)]
        if qv is not None:
            assert d <= 64, "q_v is only supported for head_size <= 64"
            assert tuple(qv.shape) == (batch, s_q, heads, d_v) and qv.dtype == q.dtype, qv.shape
            pairs.append((qv, v_cache))
        if scheduler_metadata is not None:
            assert scheduler_metadata == dict(shape=(batch, s_q, heads, h_k, d, d_v, page),
                                              dtype=q.dtype, causal=causal), scheduler_metadata
        if softmax_scale is None:
            softmax_scale = (d + (d_v if qv is not None else 0)) ** -0.5
        out, _ = _paged_attention(pairs, v_cache, page_table, cache_seqlens, softmax_scale,
                                  causal, h_k)
        return out

    if with_schedule:
        module.get_scheduler_metadata = get_scheduler_metadata
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    return module


class _Op:
    """A stand-in for a torch op overload: `_schema` as torch parses it, called with the
    arguments in that schema's order, handed to `impl` by name."""

    def __init__(self, schema: str, impl):
        self._schema = torch._C.parse_schema(schema)
        self._names = [a.name for a in self._schema.arguments]
        self._impl = impl

    def __call__(self, *args):
        assert len(args) == len(self._names), (len(args), self._names)
        return self._impl(**dict(zip(self._names, args)))


def _off(**given):
    """Assert every argument a decode call leaves off has its 'off' value."""
    for name, (value, off) in given.items():
        assert value is off or value == off, (name, value)


def carried_namespace(name: str, schemas: dict) -> types.SimpleNamespace:
    """A torch.ops namespace like the one vLLM's `_flashmla_C` ("FlashMLA") or `_vllm_fa3_C`
    ("FA3") library registers: each op of `schemas` ({op: schema string}) takes its arguments
    in that schema's order and does what the library documents (FlashMLA's `dense_decode_fwd`
    computes its schedule when given none and returns it; FA3's `fwd` checks that the schedule
    it is given was made for its call)."""

    def dense_decode_fwd(q, kcache, head_size_v, seqlens_k, block_table, softmax_scale,
                         is_causal, tile_scheduler_metadata, num_splits, out_):
        batch, s_q, h_q, d = q.shape
        _, page, h_k, d_k = kcache.shape
        assert (d, d_k, head_size_v, page, h_k) == (576, 576, 512, 64, 1), (q.shape, kcache.shape)
        assert q.dtype == kcache.dtype and q.dtype in (torch.bfloat16, torch.float16), q.dtype
        assert kcache.stride(-1) == 1 and out_ is None
        assert isinstance(softmax_scale, float) and isinstance(is_causal, bool)
        _check_paging(block_table, seqlens_k, batch)
        made_for = torch.tensor([batch, s_q, h_q, int(is_causal)], dtype=torch.int32)
        if tile_scheduler_metadata is None:  # the first call computes the schedule
            assert num_splits is None
            tile_scheduler_metadata = made_for
            num_splits = torch.zeros(batch + 1, dtype=torch.int32)
        assert torch.equal(tile_scheduler_metadata, made_for), "schedule of another call"
        out, lse = _paged_attention([(q, kcache)], kcache[..., :head_size_v], block_table,
                                    seqlens_k, softmax_scale, is_causal, h_k)
        return out, lse, tile_scheduler_metadata, num_splits

    def _schedule_key(batch, s_q, heads, h_k, d, d_v, page, causal):
        return torch.tensor([batch, s_q, heads, h_k, d, d_v, page, int(causal)], dtype=torch.int32)

    def get_scheduler_metadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads, num_heads_k,
                               headdim, headdim_v, qkv_dtype, seqused_k, cu_seqlens_q,
                               cu_seqlens_k, cu_seqlens_k_new, seqused_q, leftpad_k, page_size,
                               max_seqlen_k_new, is_causal, window_size_left, window_size_right,
                               has_softcap, num_splits, pack_gqa, sm_margin):
        _off(cu_seqlens_q=(cu_seqlens_q, None), cu_seqlens_k=(cu_seqlens_k, None),
             cu_seqlens_k_new=(cu_seqlens_k_new, None), seqused_q=(seqused_q, None),
             leftpad_k=(leftpad_k, None), max_seqlen_k_new=(max_seqlen_k_new, 0),
             window_size_left=(window_size_left, -1), window_size_right=(window_size_right, -1),
             has_softcap=(has_softcap, False), sm_margin=(sm_margin, 0))
        assert max_seqlen_k == int(seqused_k.max()) and qkv_dtype in (torch.bfloat16, torch.float16)
        return _schedule_key(batch_size, max_seqlen_q, num_heads, num_heads_k, headdim, headdim_v,
                             page_size, is_causal)

    def fwd(q, k, v, k_new, v_new, q_v, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new,
            seqused_q, seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx,
            leftpad_k, rotary_cos, rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale,
            softmax_scale, is_causal, window_size_left, window_size_right, softcap,
            is_rotary_interleaved, scheduler_metadata, num_splits, pack_gqa, sm_margin, s_aux,
            cp_world_size, cp_rank, cp_tot_seqused_k):
        _off(k_new=(k_new, None), v_new=(v_new, None), out=(out, None),
             cu_seqlens_q=(cu_seqlens_q, None), cu_seqlens_k=(cu_seqlens_k, None),
             cu_seqlens_k_new=(cu_seqlens_k_new, None), seqused_q=(seqused_q, None),
             max_seqlen_q=(max_seqlen_q, None), max_seqlen_k=(max_seqlen_k, None),
             kv_batch_idx=(kv_batch_idx, None), leftpad_k=(leftpad_k, None),
             rotary_cos=(rotary_cos, None), rotary_sin=(rotary_sin, None),
             seqlens_rotary=(seqlens_rotary, None), q_descale=(q_descale, None),
             k_descale=(k_descale, None), v_descale=(v_descale, None),
             window_size_left=(window_size_left, -1), window_size_right=(window_size_right, -1),
             softcap=(softcap, 0.0), s_aux=(s_aux, None), cp_world_size=(cp_world_size, 1),
             cp_rank=(cp_rank, 0), cp_tot_seqused_k=(cp_tot_seqused_k, None),
             sm_margin=(sm_margin, 0))
        assert k.stride(-1) == 1 and v.stride(-1) == 1 and q.stride(-1) == 1
        batch, s_q, heads, d = q.shape
        pages, page, h_k, _ = k.shape
        d_v = v.shape[-1]
        assert tuple(k.shape) == (pages, page, h_k, d) and tuple(v.shape) == (pages, page, h_k, d_v)
        assert heads % h_k == 0 and k.dtype == v.dtype == q.dtype, (heads, h_k)
        _check_paging(page_table, seqused_k, batch)
        pairs = [(q, k)]
        if q_v is not None:
            assert d <= 64 and d_v >= 256, "q_v needs head_size <= 64 and head_size_v >= 256"
            assert tuple(q_v.shape) == (batch, s_q, heads, d_v) and q_v.dtype == q.dtype
            pairs.append((q_v, v))
        if scheduler_metadata is not None:
            key = _schedule_key(batch, s_q, heads, h_k, d, d_v, page, is_causal)
            assert torch.equal(scheduler_metadata, key), (scheduler_metadata, key)
        out, lse = _paged_attention(pairs, v, page_table, seqused_k, softmax_scale, is_causal, h_k)
        return [out, lse, torch.empty(0), torch.empty(0)]

    impls = dict(dense_decode_fwd=dense_decode_fwd, get_scheduler_metadata=get_scheduler_metadata,
                 fwd=fwd)
    return types.SimpleNamespace(**{op: types.SimpleNamespace(default=_Op(schema, impls[op]))
                                     for op, schema in schemas.items()})
