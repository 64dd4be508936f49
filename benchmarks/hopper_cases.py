"""The cases `hopper_decode.py` runs: the timed shapes, the correctness checks, and the random
paged caches and queries one batch of them is made of (`Paged`), with the error against the
fp64 truth measured as the tests measure it.

DEVICE comes from HOPPER_BENCH_DEVICE ("cuda"; "cpu" dry-runs the checks' plumbing).
"""

from __future__ import annotations

import math
import os

DEVICE = os.environ.get("HOPPER_BENCH_DEVICE", "cuda")
FP8_SCALE = 0.5  # an fp8 cache stores value / FP8_SCALE (the N(0, 1) data stay well in range)


def shapes() -> dict[str, dict]:
    """name -> (variant, h_q, tp, batch lengths, L_q, page); h_q and tp as the layer sees them."""
    shapes = {}
    for variant in ("mla", "gla-2"):
        for l_q in (1, 2, 4):
            shapes[f"{variant.replace('-', '')}-b128-16k-lq{l_q}"] = dict(
                variant=variant, heads=128, tp=1, lengths=[16384] * 128, query_len=l_q)
        for l_q in (1, 2):  # one rank of TP-8: 16 query heads on one (duplicated) latent head
            shapes[f"{variant.replace('-', '')}-tp8-b128-32k-lq{l_q}"] = dict(
                variant=variant, heads=128, tp=8, lengths=[32768] * 128, query_len=l_q)
    for length in (8192, 16384, 32768):
        shapes[f"gta4-b128-{length // 1024}k"] = dict(variant="gta-4", heads=32, tp=1,
                                                       lengths=[length] * 128, query_len=1)
    for variant, heads in (("mla", 128), ("gla-2", 128), ("gta-4", 32)):
        for batch in (1, 4):
            for length in (32768, 131072):
                shapes[f"{variant.replace('-', '')}-b{batch}-{length // 1024}k"] = dict(
                    variant=variant, heads=heads, tp=1, lengths=[length] * batch, query_len=1)
    # The engine's `xl` decode step (h_q 16 on one GPU, B 64), where MLA's attention took
    # twice GLA-2's time for the same cache bytes (docs/results/engine.md, run 9).
    for variant in ("mla", "gla-2", "gta-4"):
        for length in (1024, 8192):
            shapes[f"{variant.replace('-', '')}-xl-b64-{length // 1024}k"] = dict(
                variant=variant, heads=16, tp=1, lengths=[length] * 64, query_len=1)
    for variant in ("mla", "gla-2"):
        shapes[f"{variant.replace('-', '')}-uneven"] = dict(
            variant=variant, heads=128, tp=1, lengths=[131072] + [1024] * 63, query_len=1)
    # fp8 (e4m3) caches, beside the bf16 shapes of the same name (the fp8 target: the
    # tied kernel at L_q = 1 against itself on bf16).
    for name in ("gla2-b128-16k-lq1", "gla2-b128-16k-lq2", "gta4-b128-16k", "gta4-b1-128k",
                 "gla2-b4-32k"):
        shapes[f"{name}-fp8"] = dict(shapes[name], cache="fp8")
    for shape in shapes.values():
        shape["page"] = 64
    return shapes


# (name, variant, h_q, tp, lengths, L_q, page)
CHECKS = [
    ("mla-lq1", "mla", 128, 1, [1, 63, 64, 65, 339], 1, 64),
    ("mla-lq2-page128", "mla", 128, 1, [2, 127, 129, 700], 2, 128),
    ("mla-tp8-lq4", "mla", 128, 8, [4, 65, 257], 4, 64),
    ("gla2-lq1", "gla-2", 128, 1, [1, 64, 65, 2049], 1, 64),
    ("gla2-lq3", "gla-2", 128, 1, [3, 63, 339], 3, 256),
    ("gta4-lq1", "gta-4", 32, 1, [1, 63, 64, 65, 4100], 1, 64),
    ("gta4-lq4", "gta-4", 32, 1, [5, 130, 1000], 4, 64),
    ("gla2-lq2-fp8", "gla-2", 128, 1, [2, 63, 64, 65, 2049], 2, 64),
    ("gta4-lq1-fp8", "gta-4", 32, 1, [1, 63, 64, 65, 4100], 1, 64),
]


def layer_of(variant: str, heads: int):
    """A meta-device layer (d_h 128, d_R 64): its cache layout and cost accounting."""
    import torch

    from hwattn.config import ModelConfig, parse_variant
    from hwattn.layers import build_attention

    spec = parse_variant(variant)
    if spec["attention"] in ("gta", "mla", "gla"):
        spec["rope_dim"] = 64
    cfg = ModelConfig(n_heads=heads, head_dim=128, dim=heads * 128, hidden_dim=4 * heads * 128, **spec)
    return build_attention(cfg, device=torch.device("meta"))


class Paged:
    """Random paged caches and queries for one batch on the GPU (tied or separate K/V)."""

    def __init__(self, torch, layer, tp, lengths, l_q, page, hostile=False, dtype=None,
                 fp8=False):
        dtype = dtype or torch.bfloat16
        h_q, _ = layer.local_heads(tp)
        layout = layer.cache_layout(tp)
        pages = [-(-n // page) for n in lengths]
        width = max(pages) + 1
        n_pool = sum(pages) + 3
        order = torch.randperm(n_pool, device=DEVICE).to(torch.int32)
        table = torch.full((len(lengths), width), 2**30, dtype=torch.int32, device=DEVICE)
        owner = torch.zeros(n_pool, page, dtype=torch.bool, device=DEVICE)
        used = 0
        for b, (n, p) in enumerate(zip(lengths, pages)):
            table[b, :p] = order[used:used + p]
            slots = torch.arange(p * page, device=DEVICE) < n
            owner[order[used:used + p].long()] = slots.view(p, page)
            used += p
        if hostile:
            table[:, 1::2] = torch.where(table[:, 1::2] == 2**30, -7, table[:, 1::2])

        def cache(shape):  # random where a sequence owns the slot; NaN elsewhere when hostile
            data = torch.randn(n_pool, page, *shape, device=DEVICE, dtype=dtype)
            if hostile:
                data[~owner] = float("nan")
            return (data / FP8_SCALE).to(torch.float8_e4m3fn) if fp8 else data

        self.kv_scale = FP8_SCALE if fp8 else None

        self.block_table, self.lengths = table, lengths
        self.seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        d_qk, d_v = layer.decode_widths()
        self.tied = "kv" in layout
        if self.tied:
            self.kv_cache, self.rope_cache = cache(layout["kv"]), cache(layout["rope"])
            d_rope = layout["rope"][0]
            self.q_nope = torch.randn(len(lengths), l_q, h_q, d_qk - d_rope, device=DEVICE, dtype=dtype)
            self.q_rope = torch.randn(len(lengths), l_q, h_q, d_rope, device=DEVICE, dtype=dtype)
        else:
            self.k_cache, self.v_cache = cache(layout["k"]), cache(layout["v"])
            self.q = torch.randn(len(lengths), l_q, h_q, d_qk, device=DEVICE, dtype=dtype)
        self.scale = 1 / math.sqrt(d_qk)

    def tied_args(self):
        return (self.q_nope, self.q_rope, self.kv_cache, self.rope_cache, self.block_table,
                self.seqlens)


def errors(torch, got, truth, base):
    """(max |err|, ratio to the tests' bound) of `got` against the fp64 truth."""
    err = (got.double() - truth).abs().max().item()
    if not math.isfinite(err) or not torch.isfinite(got).all():
        return float("inf"), float("inf")
    bound = 4 * (base.double() - truth).abs().max().item() + \
        torch.finfo(got.dtype).eps * truth.abs().max().item()
    return err, err / bound
