"""`hwattn analyze`: parameters, KV cache and decode roofline of every variant of a preset.

All numbers come from the attention layers' own accounting (`Attention.kv_bytes_per_token`,
`decode_flops`, `decode_bytes`) on meta-device models, so nothing is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hwattn.config import ModelConfig, parse_variant
from hwattn.models.transformer import Transformer

DEFAULT_VARIANTS = ("mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet peaks: dense bf16 TFLOP/s and memory bandwidth in TB/s."""

    name: str
    tflops: float
    tb_per_s: float

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the memory and compute roofs meet."""
        return self.tflops / self.tb_per_s


GPUS = {
    "h100": GPUSpec("H100 SXM", 989.0, 3.35),
    "h200": GPUSpec("H200 SXM", 989.0, 4.8),
    "a100": GPUSpec("A100 SXM", 312.0, 2.039),
}


def roofline_us(flops: float, nbytes: float, gpu: GPUSpec) -> tuple[float, str]:
    """Lower bound on time (µs) from the two roofs, and which one binds."""
    t_compute = flops / (gpu.tflops * 1e12)
    t_memory = nbytes / (gpu.tb_per_s * 1e12)
    return max(t_compute, t_memory) * 1e6, "compute" if t_compute > t_memory else "memory"


def analyze(preset: str = "xl", variants=DEFAULT_VARIANTS, tps=(1,), batch: int = 128,
            context: int = 8192, dtype: str = "bf16", gpu: GPUSpec = GPUS["h100"]) -> list[dict]:
    """One row per (variant, TP degree); byte and time figures are per rank. ValueError
    naming `batch` or `context` unless a positive integer, `tps` unless positive integers,
    `variants` or `tps` when empty, `variants` when a string (not a sequence of labels)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    for name, value in (("batch", batch), ("context", context)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(variants, str):  # iterated letter by letter: "variant ... got 'm'"
        raise ValueError(f"variants must be a sequence of labels, got the string {variants!r} "
                         f"(give [{variants!r}], or split a comma-separated list)")
    variants, tps = tuple(variants), tuple(tps)
    if not variants:
        raise ValueError("variants must name at least one variant")
    if not tps:
        raise ValueError("tps must hold at least one TP degree")
    for tp in tps:  # a float or bool degree went through, giving float byte counts
        if not isinstance(tp, int) or isinstance(tp, bool) or tp <= 0:
            raise ValueError(f"tps must hold positive integers, got {tp!r}")
    torch_dtype = DTYPES[dtype]
    # Queries and outputs stay 16-bit over an fp8 cache (as the engine and `hwattn bench
    # decode` run it); over a 16/32-bit cache they are the cache's dtype.
    io_dtype = torch.bfloat16 if torch_dtype.itemsize == 1 else torch_dtype
    rows = []
    for label in variants:
        cfg = ModelConfig.from_preset(preset, **parse_variant(label))
        model = Transformer(cfg, device="meta")
        attn = model.layers[0].attn
        for tp in tps:
            per_layer = attn.kv_bytes_per_token(tp, torch_dtype)
            row = {
                "variant": cfg.label, "preset": preset, "tp": tp,
                "params": model.num_params(), "hidden_dim": cfg.hidden_dim,
                "kv_bytes_per_token_per_layer": per_layer,
                "kv_bytes_per_token": per_layer * cfg.n_layers,
                "kv_cache_bytes": per_layer * cfg.n_layers * batch * context,
                "batch": batch, "context": context, "dtype": dtype,
            }
            for lq in (1, 2):
                flops = attn.decode_flops(context, lq, tp) * batch * cfg.n_layers
                nbytes = (attn.decode_bytes(0, lq, tp, io_dtype) + context * per_layer
                          ) * batch * cfg.n_layers
                us, bound = roofline_us(flops, nbytes, gpu)
                row[f"arithmetic_intensity_lq{lq}"] = flops / nbytes
                row[f"decode_attention_us_lq{lq}"] = us
                row[f"bound_lq{lq}"] = bound
            rows.append(row)
    return rows


def format_table(rows: list[dict], gpu: GPUSpec) -> str:
    head = (f"{'variant':<8} {'tp':>3} {'params':>8} {'KV B/tok/layer':>15} {'KV cache':>10} "
            f"{'AI Lq=1':>8} {'AI Lq=2':>8} {'attn µs Lq=1':>13} {'attn µs Lq=2':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<8} {r['tp']:>3} {r['params'] / 1e6:>7.1f}M "
            f"{r['kv_bytes_per_token_per_layer']:>15,} {r['kv_cache_bytes'] / 2**30:>7.2f}GiB "
            f"{r['arithmetic_intensity_lq1']:>8.1f} {r['arithmetic_intensity_lq2']:>8.1f} "
            f"{r['decode_attention_us_lq1']:>9.0f} ({r['bound_lq1'][0]}) "
            f"{r['decode_attention_us_lq2']:>9.0f} ({r['bound_lq2'][0]})")
    r0 = rows[0]
    lines.append(f"per rank; batch {r0['batch']}, context {r0['context']}, {r0['dtype']} cache; "
                 f"attention decode time over all layers at the roofline of {gpu.name} "
                 f"({gpu.tflops:g} TFLOP/s, {gpu.tb_per_s:g} TB/s, ridge {gpu.ridge:.0f} FLOP/B); "
                 "(m) memory-bound, (c) compute-bound")
    return "\n".join(lines)
