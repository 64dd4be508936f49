"""Other people's paged decode kernels, called on the inputs `hwattn bench decode` builds.

`hwattn bench decode` times FlashMLA and FlashAttention-3 in its own process, on the same
random paged caches, block table, lengths and queries as our kernels, when their Python packages
import (docs/external_baselines.md says how to build them) or, with $HWATTN_EXTERNAL_DIR set,
from the prebuilt libraries carried in that folder (`external_carried`: no package needed).
This module holds one adapter per kernel: it takes our call's operands (what
`Attention.kernel_call` takes: the queries of `decode_query_shapes`, the caches of
`cache_layout`, the block table, `cache_seqlens`), converts them to the layout the kernel wants
once, and returns an `ExternalCall`: a zero-argument callable that runs only the kernel (what is
timed) and a function turning its result into our output layout, (B, L_q, H_q, D_v).

Which call a case is, the adapters read from the operands alone, as `hwattn.ops` does:

- two queries (q_nope (B, L_q, H_q, D_nope), q_rope (B, L_q, H_q, D_R)) over a state cache
  (P, page, H_kv, D_v) and a shared RoPE cache (P, page, D_R) is `decode_tied`; with
  D_nope == D_v (the whole latent is key, MLA and GLA absorbed) FlashMLA and FA3's `qv` form
  compute it; GTA's partial key (D_nope < D_v) neither does.
- one query (B, L_q, H_q, D) over K and V caches (P, page, H_kv, D) is `decode` (MHA/MQA/GQA):
  FA3's plain paged call.

Layouts (reference.py in hwattn/ops states ours):

- FlashMLA takes q (B, L_q, H_q, 576) = [q_nope | q_rope] and one cache (P, 64, 1, 576) whose
  token is [latent (512) | rope key (64)], the value being its first 512 dims. Ours keeps the two
  parts in two tensors, so the cache and the query are concatenated once before timing (a copy
  the size of the cache: it needs that much free GPU memory).
- FA3's `qv` form scores q·k + qv·v: q = q_rope over k_cache = the RoPE cache, qv = q_nope over
  v_cache = the state cache, which is also the value. The state cache and one shared RoPE head
  (MLA: H_kv = 1) pass as views; with H_kv > 1 (GLA) FA3 wants one RoPE head per KV head, so the
  RoPE cache is copied H_kv times once before timing (it then reads D_R·H_kv RoPE values per
  token where our kernels read D_R).
- FA3's plain call takes our K and V caches and query as they are.

fp8 caches are not converted (FlashMLA's fp8 cache is its own 656-byte format with per-tile
scales; FA3's fp8 path wants fp8 queries too): those rows say why instead. Queries are cast to
the cache's dtype (bf16 or fp16) once.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from hwattn.bench import external_carried

# name -> (module imported, distributions whose version it may carry)
PACKAGES = {
    "FlashMLA": ("flash_mla", ("flash_mla", "flash-mla")),
    "FA3": ("flash_attn_interface", ("flash_attn_3", "flash-attn-3", "flashattn-hopper")),
}
HALF_DTYPES = (torch.bfloat16, torch.float16)


class Unsupported(ValueError):
    """The external kernel has no call for this case (the message says why)."""


class Availability(NamedTuple):
    """One package's state: `version` (a string, "version unknown" if it does not say) when it
    imports, else None and `why` (the import error)."""

    version: str | None
    why: str | None = None


@dataclass
class ExternalCall:
    """One external kernel bound to converted operands.

    run: zero-argument callable running only the kernel (converted tensors are held here, so
    nothing is copied while it is timed). to_ours: run's result -> out (B, L_q, H_q, D_v).
    converted: what was copied before timing ("" if everything passed as a view)."""

    name: str
    run: Callable[[], Any]
    to_ours: Callable[[Any], Tensor]
    converted: str


def _version(module, distributions: tuple[str, ...]) -> str:
    version = getattr(module, "__version__", None)
    for dist in distributions:
        if version:
            break
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return str(version) if version else "version unknown"


def _import(name: str):
    """(module, None) or (None, why) for the kernel behind `name`.

    With $HWATTN_EXTERNAL_DIR set (a folder `benchmarks/fetch_external_kernels.sh` filled), a
    kernel its manifest lists comes from there and only from there (`external_carried`: a
    library that cannot load gives its reason, not an installed package's timing); the others,
    and all of them without the variable, come from their Python packages."""
    module_name, _ = PACKAGES[name]
    directory = os.environ.get(external_carried.ENV)
    if directory:
        try:
            if external_carried.lists(directory, name):
                return external_carried.load(name, directory), None
        except external_carried.CarriedUnavailable as err:
            return None, f"carried build in {directory} not loaded: {err}"
    try:
        return importlib.import_module(module_name), None
    except Exception as err:  # noqa: BLE001 - a broken build (missing symbol) does not import
        return None, f"{module_name} does not import ({type(err).__name__}: {str(err)[:160]})"


def available() -> dict[str, Availability]:
    """Every known external kernel: its version if its package imports, else why not."""
    out = {}
    for name, (_, distributions) in PACKAGES.items():
        module, why = _import(name)
        out[name] = (Availability(_version(module, distributions)) if module is not None
                     else Availability(None, why))
    return out


def load() -> dict[str, Any]:
    """{name: module} of the external kernels that import now."""
    modules = {name: _import(name)[0] for name in PACKAGES}
    return {name: module for name, module in modules.items() if module is not None}


def _operands(queries: tuple[Tensor, ...], caches: tuple[Tensor, ...], cache_scale):
    """Queries cast to the caches' dtype; raises Unsupported for caches neither kernel reads."""
    if cache_scale is not None or caches[0].dtype not in HALF_DTYPES:
        raise Unsupported(f"{caches[0].dtype} cache: external kernels are timed on bf16/fp16 "
                          "caches only (their fp8 formats differ from ours)")
    return tuple(q.to(caches[0].dtype) for q in queries)


def _latent_tied(queries, caches) -> bool:
    """True for MLA/GLA's absorbed call (the whole state is the key), False for GTA's."""
    return queries[0].shape[-1] == caches[0].shape[-1]


def _causal(queries) -> bool:
    return queries[0].shape[1] > 1  # bottom-right causal, as ours; one query sees everything


def flash_mla_call(module, queries: tuple[Tensor, ...], caches: tuple[Tensor, ...],
                   block_table: Tensor, cache_seqlens: Tensor, softmax_scale: float,
                   cache_scale: float | None = None) -> ExternalCall:
    """FlashMLA's dense paged decode on an MLA `decode_tied` call.

    queries: q_nope (B, L_q, H_q, 512), q_rope (B, L_q, H_q, 64); caches: state (P, 64, 1, 512),
    rope (P, 64, 64); block_table (B, max_pages) int32; cache_seqlens (B,) int32. Raises
    Unsupported for any other shape (FlashMLA's kernel is built for exactly these)."""
    if len(queries) != 2:
        raise Unsupported("FlashMLA computes MLA only (separate K/V caches here)")
    q_nope, q_rope = _operands(queries, caches, cache_scale)
    state, rope = caches
    _, page, h_kv, d_v = state.shape
    if not _latent_tied(queries, caches):
        raise Unsupported("FlashMLA computes MLA only (partial key: GTA)")
    if (h_kv, d_v, rope.shape[-1], page) != (1, 512, 64, 64):
        raise Unsupported(f"FlashMLA takes one latent of 512 + RoPE 64 on pages of 64, this "
                          f"call has {h_kv} latent(s) of {d_v} + RoPE {rope.shape[-1]}, page {page}")
    _, l_q, h_q, _ = q_nope.shape
    q = torch.cat((q_nope, q_rope), -1)  # (B, L_q, H_q, 576)
    k_cache = torch.cat((state, rope[:, :, None, :]), -1)  # (P, 64, 1, 576): [latent | rope]
    table, seqlens = block_table.contiguous(), cache_seqlens.contiguous()
    causal = _causal(queries)
    # Older releases compute the schedule here from these arguments; newer ones return an empty
    # holder (and None for num_splits) that the first call fills in, before any timing.
    metadata, num_splits = module.get_mla_metadata(seqlens, l_q * h_q // h_kv, h_kv)

    def run():
        return module.flash_mla_with_kvcache(q, k_cache, table, seqlens, d_v, metadata, num_splits,
                                             softmax_scale=softmax_scale, causal=causal)

    return ExternalCall("FlashMLA", run, lambda result: result[0],
                        "q and cache concatenated to [nope | rope] (576)")


def fa3_call(module, queries: tuple[Tensor, ...], caches: tuple[Tensor, ...], block_table: Tensor,
             cache_seqlens: Tensor, softmax_scale: float,
             cache_scale: float | None = None) -> ExternalCall:
    """FlashAttention-3's `flash_attn_with_kvcache` on our paged call.

    `decode_tied` with the whole state as key (MLA, GLA): the `qv` form, q = q_rope (D_R <= 64),
    k_cache = the RoPE cache per KV head, v_cache = the state cache, qv = q_nope.
    `decode` (MHA/MQA/GQA): q (B, L_q, H_q, D), k_cache and v_cache (P, page, H_kv, D) as given.
    block_table (B, max_pages) int32 is FA3's page_table. Raises Unsupported for GTA's partial key
    and for a RoPE key wider than the 64 FA3's `qv` form takes."""
    qs = _operands(queries, caches, cache_scale)
    table, seqlens = block_table.contiguous(), cache_seqlens.contiguous()
    causal = _causal(queries)
    converted = ""
    if len(qs) == 2:
        if not _latent_tied(queries, caches):
            raise Unsupported("FA3 has no form for GTA's partial key (D_nope < D_v)")
        q_nope, q_rope = qs
        state, rope = caches
        if rope.shape[-1] > 64:
            raise Unsupported(f"FA3's qv form takes q up to 64 wide, the RoPE key is "
                              f"{rope.shape[-1]}")
        h_kv = state.shape[2]
        k_cache = rope[:, :, None, :]  # (P, page, 1, D_R), a view
        if h_kv > 1:
            k_cache = k_cache.expand(-1, -1, h_kv, -1).contiguous()  # (P, page, H_kv, D_R)
            converted = f"RoPE cache copied to {h_kv} heads"
        q, v_cache, qv = q_rope, state, q_nope
    else:
        (q,), (k_cache, v_cache), qv = qs, caches, None
    options = dict(cache_seqlens=seqlens, page_table=table, softmax_scale=softmax_scale,
                   causal=causal)
    if qv is not None:
        options["qv"] = qv
    metadata = _fa3_schedule(module, q, k_cache, v_cache, seqlens, causal)
    if metadata is not None:  # builds without it take no such argument
        options["scheduler_metadata"] = metadata

    def run():
        return module.flash_attn_with_kvcache(q, k_cache, v_cache, **options)

    return ExternalCall("FA3", run, lambda out: out, converted)


def _fa3_schedule(module, q, k_cache, v_cache, seqlens, causal):
    """FA3's scheduler metadata for this call, computed once (as an engine does once per step for
    all layers) so it stays out of the timed window; None where this build has no
    `get_scheduler_metadata` (or one taking other arguments), and FA3 computes it inside every
    call."""
    schedule = getattr(module, "get_scheduler_metadata", None)
    if schedule is None:
        return None
    batch, l_q, h_q, d = q.shape
    try:
        return schedule(batch, l_q, int(seqlens.max()), h_q, k_cache.shape[2], d, seqlens,
                        qkv_dtype=q.dtype, headdim_v=v_cache.shape[-1],
                        page_size=k_cache.shape[1], causal=causal)
    except TypeError:
        return None


ADAPTERS: dict[str, Callable[..., ExternalCall]] = {"FlashMLA": flash_mla_call, "FA3": fa3_call}


def build(name: str, module, queries: tuple[Tensor, ...], caches: tuple[Tensor, ...],
          block_table: Tensor, cache_seqlens: Tensor, softmax_scale: float,
          cache_scale: float | None = None) -> ExternalCall:
    """The `name` adapter (a key of ADAPTERS) on `module` and our call's operands."""
    if name not in ADAPTERS:
        raise ValueError(f"name must be one of {tuple(ADAPTERS)}, got {name!r}")
    return ADAPTERS[name](module, queries, caches, block_table, cache_seqlens, softmax_scale,
                          cache_scale)
