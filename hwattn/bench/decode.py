"""The paged decode kernels against the roofline and baselines (`hwattn bench decode`).

For each variant and (B, L, L_q, page size): the median kernel time (CUDA events around CUDA-graph
replays, after warm-up, L2 flushed before every call by `triton.testing.do_bench`), GB/s on the
fewest bytes the step must read (the layer's `decode_bytes`: the cache once, q and out), TFLOP/s
(`decode_flops`), arithmetic intensity, the roofline time from the copy bandwidth and bf16 matmul
rate measured in the same run, the % of that roofline reached, and the speed-up over PyTorch SDPA
on the cache gathered into contiguous tensors (query heads of a KV head packed as rows, as the
kernel does; gather not timed). Whether FlashMLA / FlashAttention-3 / FlashInfer are importable
is reported; their measured timings (`hwattn.bench.anchors`, another process and day) are
printed beside matching rows, and FlashMLA and FA3 are timed in this process, on the same paged
data, where their packages import (`hwattn.bench.external`: the layout conversion is done once,
before timing). On an sm_90 GPU the Hopper backend
(`hwattn.ops.backends.hopper_backend`) is timed beside Triton with its own plan, % of the same
roofline and speed-up over Triton, on the tied-state calls it takes (MLA, GLA, GTA; the rest it
hands to Triton); elsewhere the header says why it is unavailable. Every row is checked against
SDPA before it is timed.

A case is uniform (B sequences of L tokens each) or uneven (`lengths`: one length per
sequence, e.g. one sequence of 128K tokens beside 63 of 1K, from `parse_mixed`): every
sequence holds only the pages its own length needs, the byte floor and FLOPs are summed over
the sequences, and the SDPA baseline runs one call per distinct length (none padded).

The cases come from `decode_cases`, the human table from `decode_table`; this module builds
each case's inputs, times it and checks it.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
import time
from dataclasses import dataclass

from hwattn.bench.anchors import AnchorSet, anchors_for
from hwattn.bench.decode_cases import case_lengths
from hwattn.bench.decode_table import format_table
from hwattn.bench.timing import graphed
from hwattn.files import write_text

EXTERNAL_KERNELS = {"FlashMLA": "flash_mla", "FA3": "flash_attn_interface", "FlashInfer": "flashinfer"}
CHECK_LIMIT = 2e-2  # relative L2 error vs SDPA; bf16 operands land near 3e-3
CACHE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}


@dataclass
class DecodeOptions:
    """How every case is built and timed.

    head_dim: d_h. rope_dim: d_R of the partial-RoPE variants (gta/mla/gla).
    cache_dtype: "bf16", "fp16" or "fp8" (queries stay bf16; fp8 uses a per-tensor scale).
    no_sdpa: skip the SDPA baseline and its check. no_hopper: skip the Hopper backend (timed
    by default on sm_90 GPUs). external: time FlashMLA / FA3 in this process where their
    packages import (default True). programs_per_sm: split-KV plans to time the Triton
    kernel under (`plan_decode`'s programs in flight per SM; empty: its default alone), each
    with every tile config; the row keeps the fastest. warmup_ms, rep_ms: `do_bench`'s budgets.
    """

    head_dim: int = 128
    rope_dim: int = 64
    cache_dtype: str = "bf16"
    no_sdpa: bool = False
    no_hopper: bool = False
    external: bool = True
    programs_per_sm: tuple[int, ...] = ()
    warmup_ms: int = 25
    rep_ms: int = 100

    def __post_init__(self):
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {tuple(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if any(p < 1 for p in self.programs_per_sm):
            raise ValueError(f"programs_per_sm must be positive, got {self.programs_per_sm}")


def parse_configs(text: str):
    """Kernel tile configs from 'block_n:warps:stages:max_rows;...', each checked as the
    kernel's launch would check it (ValueError naming --configs and the entry): on the GPU a
    bad entry was an error inside the row's `configs` map while the row reported the default
    config's time, the config asked for dropped without a word in the table."""
    from hwattn.ops.triton_decode import KernelConfig

    configs = []
    for item in (i.strip() for i in text.split(";")):
        if not item:
            continue
        try:
            block_n, warps, stages, rows = (int(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"--configs entries must be block_n:warps:stages:max_rows, got {item!r}")
        why = None
        if block_n not in (16, 32, 64):  # pieces of the split-KV plan start on multiples of 64
            why = f"block_n must be 16, 32 or 64, got {block_n}"
        elif warps not in (1, 2, 4, 8, 16):
            why = f"warps must be 1, 2, 4, 8 or 16, got {warps}"
        elif stages < 1:
            why = f"stages must be >= 1, got {stages}"
        elif rows < 1:
            why = f"max_rows must be >= 1, got {rows}"
        if why:
            raise ValueError(f"--configs {item!r}: {why}")
        config = KernelConfig(block_n, warps, stages, rows)
        if config in configs:
            raise ValueError(f"--configs names {item!r} more than once")
        configs.append(config)
    if text.strip() and not configs:
        raise ValueError(f"--configs {text!r} names no config; leave it out for the default")
    return configs


def layer_for(variant: str, heads: int, head_dim: int, rope_dim: int):
    """A meta-device layer of the variant: its cost accounting and cache layout."""
    import torch

    from hwattn.config import ModelConfig
    from hwattn.layers import build_attention
    from hwattn.variants import get_variant, parse_variant

    fields = parse_variant(variant)
    if get_variant(fields["attention"]).partial_rope:
        fields["rope_dim"] = rope_dim
    dim = heads * head_dim
    cfg = ModelConfig(n_heads=heads, head_dim=head_dim, dim=dim, hidden_dim=4 * dim, **fields)
    return build_attention(cfg, device=torch.device("meta"))


def check_shapes(shapes, head_dim: int, rope_dim: int | None = None) -> dict:
    """ValueError, naming the options, for a shape no layer can take, before any GPU work:
    `shapes` are (variant, heads, tp) triples; each builds its meta-device layer (`layer_for`,
    with `rope_dim` or `DecodeOptions`' default) and splits its heads over `tp` ranks. A
    `rope_dim` given (not None) must be read by at least one variant (the partial-RoPE ones:
    gta, mla, gla), else the option would be ignored. Returns {(variant, heads): layer}."""
    from hwattn.variants import get_variant, parse_variant

    layers = {}
    for variant, heads, tp in shapes:
        try:
            if (variant, heads) not in layers:
                layers[variant, heads] = layer_for(variant, heads, head_dim,
                                                   DecodeOptions.rope_dim if rope_dim is None
                                                   else rope_dim)
            layers[variant, heads].local_heads(tp)
        except ValueError as err:
            where = f"--variants {variant} --heads {heads}" + (f" --tp {tp}" if tp != 1 else "")
            raise ValueError(f"{where}: {err}") from None
    variants = sorted({v for v, _ in layers})
    if rope_dim is not None and not any(get_variant(parse_variant(v)["attention"]).partial_rope
                                  for v in variants):
        raise ValueError(f"--rope-dim only applies to the partial-RoPE variants (gta, mla, gla), "
                         f"not to {', '.join(variants)}")
    return layers


def measure_peaks(torch, do_bench) -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s), measured on this GPU now."""
    src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    del src, dst, a, b
    return 2 * 2**30 / copy_ms / 1e6, 2 * n**3 / mm_ms / 1e9


class Inputs:
    """Random paged cache, shuffled block table and queries for one case, on the GPU: the
    layer's cache tensors (`cache_layout`) and the queries its kernel takes
    (`decode_query_shapes`), called through `Attention.kernel_call`.

    Each sequence holds the pages its own length needs (`case_lengths`), drawn without overlap
    from a pool with a few spare pages in shuffled order: block_table (B, max pages) int32,
    a shorter sequence's row padded with page 0 (a valid id, never read past its length);
    seqlens (B,) int32."""

    def __init__(self, torch, layer, case: dict, cache_dtype, device="cuda"):
        batch, l_q, page = case["batch"], case["query_len"], case["page"]
        self.layer = layer
        self.lengths = case_lengths(case)
        if len(self.lengths) != batch:
            raise ValueError(f"case lengths has {len(self.lengths)} entries for batch {batch}")
        pages = [-(-n // page) for n in self.lengths]
        n_pool = sum(pages) + 7  # spare pages, table shuffled across the pool
        self.device = device
        ids = torch.randperm(n_pool, device=device)[: sum(pages)].to(torch.int32)
        self.block_table = torch.zeros(batch, max(pages), dtype=torch.int32, device=device)
        for row, own in zip(self.block_table, ids.split(pages)):
            row[: len(own)] = own
        self.seqlens = torch.tensor(self.lengths, dtype=torch.int32, device=device)
        fp8 = cache_dtype == torch.float8_e4m3fn
        self.scale = 0.05 if fp8 else None

        def cache(shape):  # random, never zeros; fp8 stores value / scale
            data = torch.randn(n_pool, page, *shape, device=device, dtype=torch.bfloat16)
            return (data.float() / self.scale).to(cache_dtype) if fp8 else data.to(cache_dtype)

        self.caches = tuple(cache(shape) for shape in layer.cache_layout(case["tp"]).values())
        self.queries = tuple(torch.randn(shape, device=device, dtype=torch.bfloat16)
                             for shape in layer.decode_query_shapes(batch, l_q, case["tp"]))
        # decode takes one query tensor, decode_tied two (q_nope, q_rope).
        self.tied = len(self.queries) == 2

    def min_piece(self) -> int:
        from hwattn.ops import triton_decode

        _, l_q, h_q = self.queries[0].shape[:3]
        per_token = sum(c[0, 0].numel() * c.element_size() for c in self.caches)
        return triton_decode.min_piece_for(h_q, l_q, self.layer.decode_widths()[1], per_token)

    def kernel(self, plan, config):
        from hwattn.ops.backends.triton_backend import TritonBackend

        backend = TritonBackend(config)
        return lambda: self.layer.kernel_call(backend, self.queries, self.caches, self.block_table,
                                              self.seqlens, plan=plan, cache_scale=self.scale)

    def hopper_declines(self) -> str | None:
        """None if the Hopper kernels take this call, else why Triton runs it."""
        if not self.tied:
            return "separate K/V: the Triton kernels"
        from hwattn.ops import hopper_decode

        return hopper_decode.why_unsupported(*self.queries, *self.caches, kv_scale=self.scale)

    def hopper(self, backend, case: dict):
        """(fn, plan) of the Hopper backend: its own step plan, as the engine makes it."""
        h_kv = self.caches[0].shape[2]
        plan = backend.plan(self.seqlens.cpu(), num_heads_kv=h_kv, query_len=case["query_len"],
                            page_size=case["page"], device=self.device)
        return (lambda: self.layer.kernel_call(backend, self.queries, self.caches,
                                               self.block_table, self.seqlens, plan=plan,
                                               cache_scale=self.scale)), plan

    def sdpa(self, torch):
        """SDPA on the gathered cache with query heads packed as rows: (fn, unpack). The
        sequences of one length share a call, so an uneven batch makes one call per distinct
        length (none padded, no key mask): fn returns their outputs, unpack puts them back
        in batch order as (B, L_q, H_q, D_v)."""
        groups = {}  # length -> the batch rows of that length
        for b, length in enumerate(self.lengths):
            groups.setdefault(length, []).append(b)
        calls = [(torch.tensor(rows, device=self.device), *self._sdpa_group(torch, rows, length))
                 for length, rows in groups.items()]

        def fn():
            return [call() for _, call, _ in calls]

        def unpack(outs):
            parts = [unpack_one(out) for (_, _, unpack_one), out in zip(calls, outs)]
            whole = parts[0].new_empty(len(self.lengths), *parts[0].shape[1:])  # (B, L_q, H_q, D_v)
            for (rows, _, _), part in zip(calls, parts):
                whole[rows] = part
            return whole

        return fn, unpack

    def _sdpa_group(self, torch, rows: list[int], length: int):
        """(fn, unpack) of SDPA over the batch rows `rows`, every one `length` tokens long."""
        import torch.nn.functional as F

        index = torch.tensor(rows, device=self.device)
        table = self.block_table[index, : -(-length // self.caches[0].shape[1])].long()

        def gathered(cache):  # (P, page, *feat) -> (b, L, *feat) bf16
            x = cache[table].flatten(1, 2)[:, :length]
            return x.to(torch.bfloat16) * (self.scale or 1.0)

        q, keys, values = self.layer.kernel_operands(tuple(q[index] for q in self.queries),
                                                     tuple(gathered(c) for c in self.caches))
        keys, values = keys.transpose(1, 2).contiguous(), values.transpose(1, 2).contiguous()  # (b, H_kv, L, E)
        batch, l_q, h_q, d_qk = q.shape
        h_kv = keys.shape[1]
        g = h_q // h_kv
        # (b, L_q, H_kv, g, E) -> (b, H_kv, g * L_q, E): row = head * L_q + query
        packed = q.reshape(batch, l_q, h_kv, g, d_qk).permute(0, 2, 3, 1, 4).reshape(batch, h_kv, g * l_q, d_qk)
        mask = None
        if l_q > 1:
            query = torch.arange(g * l_q, device=self.device) % l_q
            mask = torch.arange(length, device=self.device)[None, :] <= (length - l_q + query)[:, None]
        softmax_scale = self.layer.scale

        def fn():
            return F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask,
                                                  scale=softmax_scale)

        def unpack(out):  # (b, H_kv, g * L_q, D_v) -> (b, L_q, H_q, D_v)
            d_v = out.shape[-1]
            return out.view(batch, h_kv, g, l_q, d_v).permute(0, 3, 1, 2, 4).reshape(batch, l_q, h_q, d_v)

        return fn, unpack


def _sdpa_bytes(case: dict, h_q: int, h_kv: int, widths: tuple[int, int]) -> int:
    """GPU memory the SDPA baseline needs: gathered bf16 K and V, and fp32 scores should it
    fall back to the math kernel (each sequence at its own length: `Inputs.sdpa` pads none)."""
    tokens = sum(case_lengths(case))
    scores = tokens * h_q * case["query_len"] * 4
    return tokens * h_kv * sum(widths) * 2 + scores


def hopper_status(torch) -> str | None:
    """None if the Hopper backend runs on this GPU, else why not (printed, never an error)."""
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return (f"unavailable: needs compute capability 9.0 (Hopper), "
                f"{torch.cuda.get_device_name()} is {major}.{minor}")
    from hwattn.ops import get_backend

    try:
        get_backend("hopper")
    except ImportError as err:
        return f"unavailable: {err} (Triton without Gluon)"
    return None


def _time_hopper(torch, do_bench, inputs, case, options, backend, roofline_us, triton_us, device):
    """The Hopper backend's columns of a row (and its output, under "_hopper_out")."""
    why = inputs.hopper_declines()
    if why is not None:
        return dict(hopper_note=f"Triton runs it ({why})")
    from hwattn.ops import hopper_decode

    fn, plan = inputs.hopper(backend, case)
    out = fn()
    timed, how = graphed(fn, device)
    hopper_us = do_bench(timed, warmup=options.warmup_ms, rep=options.rep_ms,
                         return_mode="median") * 1e3
    config = hopper_decode.call_config(inputs.queries[0], inputs.caches[0], inputs.caches[1])
    return dict(hopper_us=hopper_us, hopper_pct_roofline=100 * roofline_us / hopper_us,
                hopper_speedup_triton=triton_us / hopper_us, hopper_timing=how,
                hopper_config=f"{config.schedule}{'-ovl' if config.overlap else ''} "
                              f"{config.ctas_per_sm}/SM p{config.programs_per_sm or 2}"
                              f"{f'-m{config.min_piece}' if config.min_piece else ''}",
                hopper_items=[p.capacity for p in plan.plans.values()], _hopper_out=out)


def _time_external(torch, do_bench, name, module, inputs, layer, options, hw_us, device):
    """One external kernel's columns of a row (`ext_<name>_...`) and its output in our layout
    (None if it has no call for this case or failed). The operands are converted before
    timing; only the kernel call is timed, graphed as ours is."""
    from hwattn.bench import external

    try:
        call = external.build(name, module, inputs.queries, inputs.caches, inputs.block_table,
                              inputs.seqlens, layer.scale, inputs.scale)
    except external.Unsupported as why:
        return {f"ext_{name}_note": str(why)}, None
    except Exception as err:  # noqa: BLE001 - e.g. out of memory for a converted copy
        return {f"ext_{name}_error": f"{type(err).__name__}: {str(err)[:200]}"}, None
    try:
        out = call.to_ours(call.run())
        timed, how = graphed(call.run, device)
        ext_us = do_bench(timed, warmup=options.warmup_ms, rep=options.rep_ms,
                          return_mode="median") * 1e3
    except Exception as err:  # noqa: BLE001 - their failure at a shape is a result, our row stands
        return {f"ext_{name}_error": f"{type(err).__name__}: {str(err)[:200]}"}, None
    cols = {f"ext_{name}_us": ext_us, f"ext_{name}_ratio": hw_us / ext_us,
            f"ext_{name}_timing": how}
    if call.converted:
        cols[f"ext_{name}_converted"] = call.converted
    return cols, out


def _rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_case(torch, do_bench, case: dict, options: DecodeOptions, peaks: tuple[float, float],
               configs, device="cuda", anchors: AnchorSet | None = None, hopper=None,
               external: dict | None = None) -> dict:
    """Time one case with each tile config (the default and `configs`, keeping the fastest),
    then the Hopper backend if given (`hopper`: an AttentionBackend), then each external kernel
    in `external` ({name: module}, from `hwattn.bench.external.load`), then SDPA; check each
    against SDPA. Returns the table row: the case (an uneven one with its `lengths` and
    `mixed` spec; bytes and FLOPs summed over its sequences), µs, GB/s, TFLOP/s, AI, the
    roofline from `peaks` (copy GB/s, matmul TFLOP/s), SDPA µs and error, per external kernel
    `ext_<name>_us`, `ext_<name>_rel_err` and `ext_<name>_ratio` (hwattn's fastest µs over
    its µs: above 1 it is faster) or `ext_<name>_note` / `_error` saying why it has no time,
    and the `anchors` timings taken at this shape. `do_bench(fn, warmup, rep, return_mode)`
    returns ms."""
    from hwattn.ops import plan_decode
    from hwattn.ops.plan import PROGRAMS_PER_SM
    from hwattn.ops.triton_decode import choose_config, head_layout

    cache_dtype = getattr(torch, CACHE_DTYPES[options.cache_dtype])
    layer = layer_for(case["variant"], case["heads"], options.head_dim, options.rope_dim)
    h_q, h_kv = layer.local_heads(case["tp"])
    inputs = Inputs(torch, layer, case, cache_dtype, device)
    d_qk, d_v = layer.decode_widths()
    default = choose_config(max(16, 1 << (d_v - 1).bit_length()), case["query_len"], h_q // h_kv,
                            inputs.tied)
    row = dict(case, heads_local=h_q, kv_heads_local=h_kv, cache_dtype=options.cache_dtype)
    length, l_q, lengths = case["context"], case["query_len"], case_lengths(case)
    flops = sum(layer.decode_flops(n, l_q, case["tp"]) for n in lengths)
    # Each sequence's cache once at its own width; q and out stay bf16 (decode_bytes counts
    # them at `dtype`).
    nbytes = (len(lengths) * layer.decode_bytes(0, l_q, case["tp"], torch.bfloat16)
              + sum(lengths) * layer.kv_bytes_per_token(case["tp"], cache_dtype))
    copy_gbps, mm_tflops = peaks
    roofline_us = max(nbytes / copy_gbps / 1e3, flops / mm_tflops / 1e6)

    timings = {}
    for config, programs in itertools.product([default, *configs], options.programs_per_sm or (None,)):
        key = str(config) if programs is None else f"{config} programs_per_sm={programs}"
        _, head_blocks, _ = head_layout(h_q // h_kv, l_q, config.max_rows)
        plan = plan_decode(inputs.seqlens, num_heads_kv=h_kv, query_len=l_q, page_size=case["page"],
                           head_blocks=head_blocks, min_piece=inputs.min_piece(),
                           programs_per_sm=programs or PROGRAMS_PER_SM)
        fn = inputs.kernel(plan, config)
        try:
            out = fn()
            timed, how = graphed(fn, device)
        except Exception as err:  # a tile config the GPU cannot hold (shared memory, registers)
            timings[key] = dict(error=f"{type(err).__name__}: {str(err)[:120]}")
            continue
        ms = do_bench(timed, warmup=options.warmup_ms, rep=options.rep_ms, return_mode="median")
        timings[key] = dict(us=ms * 1e3, splits=plan.capacity, out=out, timing=how)
    ok = {k: v for k, v in timings.items() if "us" in v}
    if not ok:
        raise RuntimeError(f"no kernel config ran: {timings}")
    best_key = min(ok, key=lambda k: ok[k]["us"])
    best = ok[best_key]
    us = best["us"]
    row.update(us=us, GBps=nbytes / us / 1e3, TFLOPs=flops / us / 1e6, AI=flops / nbytes,
               roofline_us=roofline_us, pct_roofline=100 * roofline_us / us, bytes=nbytes,
               flops=flops, config=best_key, items=best["splits"], timing=best["timing"],
               configs={k: round(v["us"], 2) if "us" in v else v["error"] for k, v in timings.items()})
    if hopper is not None:
        try:
            row.update(_time_hopper(torch, do_bench, inputs, case, options, hopper, roofline_us,
                                    us, device))
        except Exception as err:  # noqa: BLE001 - a Hopper failure is a result, Triton's row stands
            row["hopper_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    hopper_out = row.pop("_hopper_out", None)
    if hopper_out is not None:  # against Triton until SDPA is there to compare with
        row["hopper_check_rel_err"] = _rel_err(hopper_out, best["out"])
    hw_us = min(us, row.get("hopper_us", us))
    ext_outs = {}
    for name, module in (external or {}).items():
        cols, ext_out = _time_external(torch, do_bench, name, module, inputs, layer, options,
                                       hw_us, device)
        row.update(cols)
        if ext_out is not None:  # against Triton until SDPA is there to compare with
            ext_outs[name] = ext_out
            row[f"ext_{name}_rel_err"] = _rel_err(ext_out, best["out"])

    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 2**34
    if not options.no_sdpa and _sdpa_bytes(case, h_q, h_kv, (d_qk, d_v)) < 0.5 * free:
        sdpa, unpack = inputs.sdpa(torch)
        try:
            ref = unpack(sdpa()).float()
            err = _rel_err(best["out"], ref)
            if hopper_out is not None:
                row["hopper_check_rel_err"] = _rel_err(hopper_out, ref)
            for name, ext_out in ext_outs.items():
                row[f"ext_{name}_rel_err"] = _rel_err(ext_out, ref)
            timed, _ = graphed(sdpa, device)
            sdpa_ms = do_bench(timed, warmup=options.warmup_ms, rep=options.rep_ms, return_mode="median")
            row.update(sdpa_us=sdpa_ms * 1e3, speedup_sdpa=sdpa_ms * 1e3 / us, check_rel_err=err)
        except torch.OutOfMemoryError:
            row.update(sdpa_us=None, note="SDPA baseline out of memory")
        del sdpa
    uniform = "lengths" not in case  # the anchors were timed on uniform batches only
    if anchors is not None and uniform and anchors.matches(dict(case, heads=h_q,
                                                                cache_dtype=options.cache_dtype,
                                                                head_dim=options.head_dim,
                                                                rope_dim=options.rope_dim)):
        for name in EXTERNAL_KERNELS:
            anchor = anchors.lookup(name, case["variant"], l_q, length)
            if anchor is not None:
                row[f"anchor_{name}_us"] = anchor
    return row


def run(cases: list[dict], options: DecodeOptions, configs=(), out: str | None = None,
        name: str = "hwattn bench decode") -> int:
    """Time every case on the GPU; print one JSON line per row, the table, then the whole
    document as one JSON line. `out`: the document is also written there after every row
    (each time replacing the file whole), with "complete" false until the last row is in.
    Returns the exit status: 0, 1 if a row failed or disagreed with SDPA, 2 without a CUDA
    GPU or Triton."""
    try:
        import torch
    except ImportError:
        print(f"{name}: error: PyTorch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"{name}: error: needs a CUDA GPU (torch.cuda.is_available() is False). "
              "The kernels' correctness runs on CPU under Triton's interpreter: pytest tests/ops",
              file=sys.stderr)
        return 2
    try:
        from triton.testing import do_bench

        from hwattn.ops import triton_decode  # noqa: F401
    except ImportError as err:
        print(f"{name}: error: Triton is not importable ({err})", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    anchors = anchors_for(gpu)
    peaks = measure_peaks(torch, do_bench)
    external = {k: importlib.util.find_spec(mod) is not None for k, mod in EXTERNAL_KERNELS.items()}
    print(f"device: {gpu}; torch {torch.__version__}; external kernel packages installed: "
          f"{', '.join(k for k, v in external.items() if v) or 'none'}", flush=True)
    timed_external, external_line = external_kernels(options)
    print(external_line, flush=True)
    hopper_why = "skipped (no_hopper)" if options.no_hopper else hopper_status(torch)
    hopper = None
    if hopper_why is None:
        from hwattn.ops import get_backend

        hopper = get_backend("hopper")
    print(f"hopper backend: {hopper_why or 'timed beside Triton'}", flush=True)
    rows = []

    def document(complete: bool) -> dict:
        return dict(device=gpu, torch=torch.__version__, copy_GBps=peaks[0], mm_TFLOPs=peaks[1],
                    external_kernels=external, hopper=hopper_why or "timed", rows=rows,
                    external_timed=external_line,
                    anchors=None if anchors is None else dict(file=anchors.name, gpu=anchors.gpu,
                                                              date=anchors.date,
                                                              source=anchors.source),
                    complete=complete)

    for case in cases:
        start = time.perf_counter()
        try:
            row = bench_case(torch, do_bench, case, options, peaks, configs, anchors=anchors,
                             hopper=hopper, external=timed_external)
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as err:
            row = dict(case, error=f"{type(err).__name__}: {str(err)[:200]}")
        row["wall_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print("row " + json.dumps(row), flush=True)
        if out:  # the rows so far, replaced whole: a run cut off keeps what it measured
            write_text(out, json.dumps(document(complete=False), indent=1) + "\n")
        torch.cuda.empty_cache()
    doc = document(complete=True)
    print(format_table(rows, peaks, anchors))
    print(json.dumps(doc))
    if out:
        write_text(out, json.dumps(doc, indent=1) + "\n")
    failed = [r for r in rows if _failed(r)]
    return 1 if failed else 0


def _failed(row: dict) -> bool:
    """Whether a row failed: an error, or an output (Triton's, Hopper's, an external kernel's)
    not within CHECK_LIMIT of its reference; a NaN error is not within it."""
    return "error" in row or "hopper_error" in row or any(
        k.endswith("rel_err") and v is not None and not v <= CHECK_LIMIT for k, v in row.items())


def external_kernels(options: DecodeOptions) -> tuple[dict, str]:
    """({name: module} of the external kernels to time, the header line saying which run and
    why the others do not)."""
    from hwattn.bench import external

    if not options.external:
        return {}, "external kernels in this process: skipped (--no-external)"
    status = external.available()
    parts = [f"{name} {s.version}" if s.version else f"{name} not timed: {s.why}"
             for name, s in status.items()]
    return external.load(), "external kernels in this process: " + "; ".join(parts)
