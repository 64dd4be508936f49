"""Regional compilation: `torch.compile` each decoder block instead of the whole model.

Every block of a model runs the same code, so dynamo compiles one block graph and reuses it
for all layers: compile time is that of one layer (three for the engine's decode blocks,
whose first and last differ from the rest while they defer their residual add:
`DeferredResidual`). Training (`hwattn.train.compile`) and the
engine's decode step (`hwattn.engine.model_runner`) both run `Transformer.forward` with the
compiled blocks in place of the model's own (`blocks=`); the model itself is untouched.

Inside a block, the paged-cache ops are opaque to the compiler: the checked op entry points
of `hwattn.ops.AttentionBackend` (decode, prefill, store_kv) and the layers' cache write
(`Attention._store`) are `torch.compiler.disable`d, so the graph breaks around the cache write
and the attention kernel and Inductor fuses what lies between (RMSNorm, RoPE, the
latent absorptions, SwiGLU's activation, residual adds) into a few kernels.

The engine's prefill steps run the blocks in two compiled pieces instead (`compile_pieces`),
the attention step between them eager: two frames a layer (more under tensor parallelism,
whose all-reduces break the second piece).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor

from hwattn.layers import AttentionMetadata
from hwattn.models.transformer import Block, Transformer
from hwattn.switches import env_flag

# One process may compile many models (the quality study trains 16 in one worker; a benchmark
# builds an engine per variant): many graphs for the one code object of `Block.forward`, where
# dynamo's default limit (8) would soon fall back to eager without a word.
RECOMPILE_LIMIT = 256

# Whether the engine's compiled decode blocks defer each feed-forward's residual add to the
# next block (`compile_blocks(defer_residual=)`; HWATTN_DEFER_RESIDUAL, 1 by default, 0 for
# whole blocks). One kernel fewer a layer, and the `xl` decode step's queued forward 0.3-0.6%
# shorter on an H100 (run 20, docs/results/engine.md).
DEFER_RESIDUAL = env_flag("HWATTN_DEFER_RESIDUAL", default=True)


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-code-object recompile limits to at least `limit`."""
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across versions
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 4 * limit))


def compile_blocks(model: Transformer, eager_numerics: bool = False,
                   defer_residual: bool = False, **compile_kwargs) -> list:
    """One `torch.compile`d callable per block of `model`, sharing its parameters, for
    `Transformer.forward(..., blocks=)`. Compilation happens on first call.

    eager_numerics: have Inductor round each intermediate result to the model's dtype where
        the eager model does (`emulate_precision_casts`), instead of keeping fused
        intermediates in fp32: a bf16 model then decodes as its eager self does, up to the
        order of reductions (the serving engine asks for it).
    defer_residual: each block but the last leaves its feed-forward's residual add to the
        next block (`DeferredResidual`), where Inductor fuses it into that block's first
        RMSNorm: one kernel fewer a layer, the same sums in the same order.
    """
    compile_kwargs = _compile_kwargs(eager_numerics, compile_kwargs)
    if not defer_residual:
        return [torch.compile(blk, **compile_kwargs) for blk in model.layers]
    last = len(model.layers) - 1
    return [torch.compile(DeferredResidual(blk, i == last), **compile_kwargs)
            for i, blk in enumerate(model.layers)]


class DeferredResidual(torch.nn.Module):
    """A block (`Block.forward`'s signature) that takes its input as a Tensor or as the pair
    (h, ffn_out) the block before it returned, adds the pair itself (Inductor then fuses the
    add into this block's attention RMSNorm), and returns its own pair unless it is the last
    block, which returns h + ffn_out. The sums are the eager block's, in its order.

    `forward` spells the block's two residual steps out in one frame, as `Block.forward`
    does: in a helper of their own, the graph break at the attention step leaves the residual
    add after it a compiled graph and a kernel of its own (run 19, docs/results/engine.md)."""

    def __init__(self, block: Block, last: bool):
        super().__init__()
        self.block = block
        self.last = last

    def forward(self, x: Tensor | tuple[Tensor, Tensor], cos: Tensor, sin: Tensor,
                meta: AttentionMetadata | None, cache: tuple[Tensor, ...] | None):
        if isinstance(x, tuple):
            x = x[0] + x[1]
        blk = self.block
        h = x + blk.attn(blk.attn_norm(x), cos, sin, meta, cache)
        out = blk.ffn(blk.ffn_norm(h))
        return h + out if self.last else (h, out)


def _compile_kwargs(eager_numerics: bool, compile_kwargs: dict) -> dict:
    """`torch.compile`'s arguments for `compile_blocks` / `compile_pieces` (recompile limits
    raised; Inductor's `emulate_precision_casts` with `eager_numerics`)."""
    allow_recompiles()
    compile_kwargs = dict(compile_kwargs)
    if eager_numerics and compile_kwargs.get("backend", "inductor") == "inductor":
        import torch._inductor.config as inductor_config

        if hasattr(inductor_config, "emulate_precision_casts"):
            options = dict(compile_kwargs.pop("options", None) or {})
            options.setdefault("emulate_precision_casts", True)
            compile_kwargs["options"] = options
    return compile_kwargs


class PiecewiseBlock:
    """A block's forward (`Block.forward`'s signature, for `Transformer.forward(blocks=)`) as
    two compiled pieces around an eager attention step: `Block.attention_inputs` (RMSNorm,
    the input projections, RoPE), then `Attention.attend_step` (the cache write and the
    attention kernel, which read the step's host lengths), then `Block.attention_outputs` (the
    output projection, residual adds, RMSNorm and SwiGLU).

    Compiling the whole block instead breaks its graph inside the attention module (the cache
    write, the attention dispatch): dynamo then runs five frames a layer (the block, the
    attention module and their resume functions), each with its guards, where these pieces
    run two. Shared by every layer: `inputs` and `outputs` are compiled once, the block an
    argument."""

    def __init__(self, block: Block, inputs: Callable, outputs: Callable):
        self.block = block
        self.inputs = inputs
        self.outputs = outputs

    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata | None,
                 cache: tuple[Tensor, ...] | None) -> Tensor:
        attn = self.block.attn
        attn.check_step(x, cos, sin, meta, cache)
        q, states = self.inputs(self.block, x, cos, sin)
        return self.outputs(self.block, x, attn.attend_step(q, states, meta, cache))


def compile_pieces(model: Transformer, eager_numerics: bool = False,
                   **compile_kwargs) -> list[PiecewiseBlock]:
    """One `PiecewiseBlock` per block of `model`, for `Transformer.forward(..., blocks=)`:
    the blocks compiled in two pieces, the attention step between them eager (the serving
    engine's prefill). Arguments as `compile_blocks`'."""
    compile_kwargs = _compile_kwargs(eager_numerics, compile_kwargs)
    inputs = torch.compile(Block.attention_inputs, **compile_kwargs)
    outputs = torch.compile(Block.attention_outputs, **compile_kwargs)
    return [PiecewiseBlock(blk, inputs, outputs) for blk in model.layers]


@contextmanager
def distinct_sizes():
    """Inside the block, dynamo gives every dimension a symbol of its own instead of one
    symbol to all sizes that happen to be equal ("duck sizing"), where this PyTorch has the
    switch (`torch.fx.experimental._config.use_duck_shape`): graphs compiled from example
    inputs whose unrelated sizes coincide are then not guarded on that coincidence."""
    import torch.fx.experimental._config as fx_config

    if not hasattr(fx_config, "use_duck_shape"):
        yield
        return
    with fx_config.patch(use_duck_shape=False):
        yield
