"""Triton kernels of the paged decode ops, one file per phase: attend, combine, store."""
