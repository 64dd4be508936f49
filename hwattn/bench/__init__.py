"""Benchmarks of the decode kernels, the engine and the server, built on public APIs only.

- `decode`: each variant's paged decode kernel against the roofline measured in the same run,
  PyTorch SDPA and the measured FlashMLA / FA3 `anchors` (data files with their provenance).
- `engine`: offline throughput and latency of an engine, and one captured decode step split
  into attention, cache writes, GEMMs, other kernels, gaps and host time, beside its floor.
- `prefill`: the paged prefill op per variant and form against the matmul peak.
- `timing`: the device timer and the copy / matmul peaks measured once per process.
- `serve`: a bounded load generator against a running server or an engine served in process.
- `plot`: the engine's decode step against its floor, drawn from `benchmarks/engine_roofline.py`'s
  JSON (matplotlib).

The `hwattn bench decode|engine|prefill|serve` commands parse their arguments and call these.
"""
