"""Hostile paged-cache test data and an fp64 truth computed without `hwattn.ops`.

Hostile means: pages handed out in shuffled order from a pool with spare pages, NaN in every
cache slot that no sequence owns below its length (the rest of a sequence's last page, spare
pages), and block-table entries past a sequence's last page pointing far out of range.
"""

from __future__ import annotations

import math
import os

import torch

from tests.conftest import assert_close_derived

# Where the kernels run: the CPU under Triton's interpreter (CI), or "cuda" to run the same
# tests compiled on a GPU (HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest tests/ops).
DEVICE = torch.device(os.environ.get("HWATTN_TEST_DEVICE", "cpu"))

OUT_OF_RANGE = (2**30, -7)  # garbage page ids the kernels must never follow


def on_device(*tensors) -> list[torch.Tensor]:
    """The tensors moved to the device the tests run on (HWATTN_TEST_DEVICE), laid out as they
    were (`same_layout_on`): `.to` would hand a kernel contiguous copies of padded or
    interleaved views, and the GPU run would not test the layout the CPU run tests."""
    return same_layout_on(DEVICE, *tensors)


def same_layout_on(device: torch.device, *tensors) -> list[torch.Tensor]:
    """`tensors` on `device` with their shapes, strides and storage offsets, and tensors that
    were views of one buffer views of one buffer again; what lies between their elements (the
    NaN of a padded row, another view's data) comes along. Tensors already on `device`'s type
    of device are returned as they are."""
    device = torch.device(device)
    if all(t.device.type == device.type for t in tensors):
        return list(tensors)
    return copied_with_layout(device, *tensors)


def copied_with_layout(device: torch.device, *tensors) -> list[torch.Tensor]:
    """`same_layout_on`'s copy, made whatever device the tensors are on: each buffer's bytes
    once, then each tensor as the same view of the copy."""
    copies: dict[int, torch.Tensor] = {}
    moved = []
    for t in tensors:
        src = t.untyped_storage()
        if src.data_ptr() not in copies:
            raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(src, 0, (src.nbytes(),))
            copies[src.data_ptr()] = raw.to(device, copy=True)
        moved.append(torch.empty(0, dtype=t.dtype, device=device).set_(
            copies[src.data_ptr()].untyped_storage(), t.storage_offset(), t.shape, t.stride()))
    return moved


def check_out_lse(name: str, got, truth, baseline) -> None:
    """Assert a kernel's (out, lse) against the fp64 truth, within the error of `baseline`
    (the plain reference's (out, lse)) as `assert_close_derived` allows."""
    out, lse = (t.cpu() for t in got)
    assert_close_derived(out, truth[0], baseline[0], what=f"{name} out")
    assert_close_derived(lse, truth[1], baseline[1], what=f"{name} lse")


def paged_table(lengths: list[int], page_size: int, spare_pages: int = 3):
    """Shuffled block table (B, max_pages) int32 for `lengths`, and the pool's page count."""
    pages = [-(-n // page_size) for n in lengths]
    max_pages = max(pages) + 1  # one more column: unused entries exist in every row
    n_pool = sum(pages) + spare_pages
    order = torch.randperm(n_pool)
    table = torch.empty(len(lengths), max_pages, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[used:used + n].to(torch.int32)
        table[b, n:] = torch.tensor(OUT_OF_RANGE * max_pages)[: max_pages - n]
        used += n
    return table, n_pool


def shared_table(lengths: list[int], page_size: int, spare_pages: int = 3):
    """`paged_table` with pages shared and reused: every sequence's first page is one page of
    the pool (a common prefix, as prefix caching hands out), and a sequence of three pages or
    more reads its first page again as its third (one page at two positions of one row).
    Filled by `fill_cache`, a shared page holds what the last sequence wrote there: the truth
    (`gather_truth` of the returned `real`) reads the same slots the kernels do."""
    table, n_pool = paged_table(lengths, page_size, spare_pages)
    pages = [-(-n // page_size) for n in lengths]
    shared = table[next(b for b, n in enumerate(pages) if n), 0].clone()
    for b, n in enumerate(pages):
        if n:
            table[b, 0] = shared
        if n >= 3:
            table[b, 2] = shared
    return table, n_pool


def fill_cache(shape_per_token: tuple[int, ...], lengths: list[int], table: torch.Tensor,
               n_pool: int, page_size: int, dtype: torch.dtype, scale: float | None = None,
               garbage: float = float("nan")):
    """A cache (n_pool, page_size, *shape) holding random tokens below each length, `garbage`
    (NaN unless given: inf, -inf) elsewhere.

    Returns (cache, real) where `real` is the fp64 value of every slot (stored * scale for fp8).
    """
    real = torch.full((n_pool, page_size, *shape_per_token), garbage, dtype=torch.float64)
    for b, n in enumerate(lengths):
        for t in range(n):
            real[table[b, t // page_size], t % page_size] = torch.randn(shape_per_token,
                                                                          dtype=torch.float64)
    if dtype == torch.float8_e4m3fn:
        stored = (real / scale).to(dtype)  # NaN stays NaN in e4m3fn
        return stored, stored.double() * scale
    stored = real.to(dtype)
    return stored, stored.double()


def gather_truth(real: torch.Tensor, table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """Tokens 0..length-1 of sequence b: (length, *shape), through explicit slot arithmetic."""
    page_size = real.shape[1]
    pos = torch.arange(length)
    pages = table[b].long()[pos // page_size]
    return real.flatten(0, 1)[pages * page_size + pos % page_size]


def attention_truth(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                    scale: float):
    """fp64 attention per sequence. q (B, L_q, H_q, E); keys[b] (L, H_kv, E); values[b]
    (L, H_kv, E_v). Query head h reads KV head h * H_kv // H_q. Returns out, lse (B, H_q, L_q)."""
    batch, l_q, n_heads, _ = q.shape
    outs, lses = [], []
    for b in range(batch):
        k, v = keys[b], values[b]
        length, n_kv = k.shape[0], k.shape[1]
        kv_of_head = torch.arange(n_heads) * n_kv // n_heads
        scores = torch.einsum("jhe,lhe->hjl", q[b].double(), k[:, kv_of_head]) * scale  # (H_q, L_q, L)
        last_visible = length - l_q + torch.arange(l_q)  # (L_q,)
        hidden = torch.arange(length)[None, :] > last_visible[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
        lse = torch.logsumexp(scores, -1)  # (H_q, L_q)
        probs = torch.exp(scores - lse[..., None])
        outs.append(torch.einsum("hjl,lhe->jhe", probs, v[:, kv_of_head]))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def tied_case(lengths: list[int], l_q: int, h_q: int, h_kv: int, d_nope: int, d_v: int,
              d_rope: int, page: int, dtype, cache_dtype=None, scale: float | None = None) -> dict:
    """A tied-state decode case on hostile paged caches (CPU tensors): the queries q_nope /
    q_rope (B, L_q, H_q, d_nope / d_R), the state cache (pool, page, H_kv, d_v) and the shared
    RoPE cache (pool, page, d_R), the shuffled block table, seqlens, the softmax scale, and
    `truth`: the fp64 (out, lse) of attention over keys [state[:d_nope], rope] and values
    state, as `attention_truth` gives them."""
    cache_dtype = cache_dtype or dtype
    table, n_pool = paged_table(lengths, page)
    kv_cache, kv_real = fill_cache((h_kv, d_v), lengths, table, n_pool, page, cache_dtype, scale)
    rope_cache, rope_real = fill_cache((d_rope,), lengths, table, n_pool, page, cache_dtype, scale)
    batch = len(lengths)
    q_nope = torch.randn(batch, l_q, h_q, d_nope).to(dtype)
    q_rope = torch.randn(batch, l_q, h_q, d_rope).to(dtype)
    softmax_scale = 1 / math.sqrt(d_nope + d_rope)
    keys, values = [], []
    for b, n in enumerate(lengths):
        state = gather_truth(kv_real, table, b, n)  # (L, H_kv, D_v)
        rope = gather_truth(rope_real, table, b, n)[:, None, :].expand(n, h_kv, d_rope)
        keys.append(torch.cat([state[..., :d_nope], rope], -1))
        values.append(state)
    truth = attention_truth(torch.cat([q_nope, q_rope], -1), keys, values, softmax_scale)
    return dict(q_nope=q_nope, q_rope=q_rope, kv_cache=kv_cache, rope_cache=rope_cache,
                table=table, seqlens=torch.tensor(lengths, dtype=torch.int32),
                softmax_scale=softmax_scale, truth=truth)
