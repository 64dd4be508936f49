"""Benchmarks of the decode kernels, the engine and the server, built on public APIs only.

- `decode`: each variant's paged decode kernel against the roofline measured in the same run,
  PyTorch SDPA and the measured FlashMLA / FA3 `anchors` (data files with their provenance).
- `engine`: offline throughput and latency of an engine, and one decode step split into
  attention kernels, the rest of the forward, and host overhead.
- `serve`: a bounded load generator against a running server or an engine served in process.

The `hwattn bench decode|engine|serve` commands parse their arguments and call these.
"""
