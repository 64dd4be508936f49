"""Tensor parallelism applied from outside the single-device model (`shard_model`), and the
worker processes that run one rank each (`launch`)."""

from hwattn.parallel.tp import RowParallelLinear, local_kv_bytes_per_token, shard_model

__all__ = ["RowParallelLinear", "local_kv_bytes_per_token", "shard_model"]
