"""Cost analysis of the variants: KV cache, arithmetic intensity, roofline times."""

from hwattn.analysis.cost import GPUS, GPUSpec, analyze, format_table, roofline_us

__all__ = ["GPUS", "GPUSpec", "analyze", "format_table", "roofline_us"]
