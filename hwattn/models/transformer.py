"""A Llama-style decoder whose attention is any registered variant (the paper's six built in).

RMSNorm pre-norm blocks, SwiGLU feed-forward, RoPE (theta from the config) and tied input /
output embeddings. The model is single-device; tensor parallelism, compilation and checkpoint
conversion are applied from outside.

    model = Transformer(ModelConfig.from_preset("tiny", attention="gta"))
    logits = model(tokens)                                   # training: (B, T) -> (B, T, V)
    caches = model.allocate_kv_cache(num_pages, page_size)   # paged KV cache, one tuple a layer
    logits = model(tokens, meta=meta, kv_caches=caches)      # prefill / decode through the cache

`forward` is the one decoder loop: training, regionally compiled training (`blocks=`) and the
serving engine (`meta=`, `hidden_only=`) all run it.

Cost accounting (KV bytes per token, FLOPs per token for MFU) sits beside the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwattn.config import ModelConfig
from hwattn.layers import (AttentionMetadata, FusedLinear, Linear, RMSNorm, build_attention,
                           fuse_linears, rope_table)


def check_tokens(tokens: Tensor, vocab_size: int, name: str = "tokens") -> None:
    """Raise ValueError naming `name` unless `tokens` is a non-empty (B, T) integer tensor of ids
    in [0, vocab_size). The ids are checked only on the CPU: on a GPU the check would sync
    every step (an out-of-range id there fails in the embedding's device assert)."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a (batch, length) tensor of token ids, got {shape}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer token ids (int64 or int32), got {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError(f"{name} must hold at least one token in each of at least one row, got "
                         f"shape {tuple(tokens.shape)}")
    if tokens.device.type == "cpu":
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds id {bad}, outside [0, vocab_size = {vocab_size})")


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.w1 = Linear(dim, hidden_dim, **kw)
        self.w3 = Linear(dim, hidden_dim, **kw)
        self.w2 = Linear(hidden_dim, dim, **kw)
        self._w13: FusedLinear | None = None

    def forward(self, x: Tensor) -> Tensor:
        gate, up = (self.w1(x), self.w3(x)) if self._w13 is None else self._w13(x)
        return self.w2(F.silu(gate) * up)

    def fuse_projections(self) -> None:
        """w1 and w3 as one matrix product (see `Attention.fuse_projections`)."""
        self._w13 = fuse_linears([self.w1, self.w3])


class Block(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps, device=device, dtype=dtype)
        self.attn = build_attention(config, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps, device=device, dtype=dtype)
        self.ffn = FeedForward(config.dim, config.hidden_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata | None,
                cache: tuple[Tensor, ...] | None) -> Tensor:
        # The residual add stays in this frame: inside a helper of its own, the graph break at
        # the attention step left it a compiled graph and a kernel of its own a layer (run 19,
        # docs/results/engine.md).
        return self.feed_forward(x + self.attn(self.attn_norm(x), cos, sin, meta, cache))

    def feed_forward(self, x: Tensor) -> Tensor:
        """The block after its attention's residual add: x (B, T, D) -> (B, T, D)."""
        return x + self.ffn(self.ffn_norm(x))

    # `forward` in pieces, for callers that run the attention step between them themselves
    # (the serving engine's compiled prefill, hwattn/models/compile.py::compile_pieces):
    # attention_outputs(x, attn.attend_step(*attention_inputs(x, cos, sin), meta, cache)).
    def attention_inputs(self, x: Tensor, cos: Tensor,
                         sin: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """x (B, T, D) -> the queries and states (`Attention.project`) of the normed x."""
        return self.attn.project(self.attn_norm(x), cos, sin)

    def attention_outputs(self, x: Tensor, out: Tensor) -> Tensor:
        """The block's input x (B, T, D) and its attention step's output
        (`Attention.attend_step`: B·T rows of H·d_h) -> the block's output (B, T, D)."""
        return self.feed_forward(x + self.attn.wo(out.reshape(*x.shape[:2], -1)))


@torch.no_grad()
def init_parameter_(p: Tensor, name: str, in_norm: bool, n_layers: int,
                    generator: torch.Generator | None = None) -> None:
    """hwattn's initialisation of one parameter, in place: unit weights in a norm (`in_norm`),
    zero biases, N(0, 0.02) elsewhere, output projections (`wo`, `w2`) scaled to
    0.02 / sqrt(2 · n_layers). `name` is the parameter's dotted name (its ending decides)."""
    if in_norm:
        p.fill_(1.0)
    elif name.endswith(("bias", "b_uk", "b_uv")):
        p.zero_()
    else:
        std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
        p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, device=device, dtype=dtype)
                                    for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps, device=device, dtype=dtype)
        self.output = Linear(config.dim, config.vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # fp32 (max_seq_len, d_R / 2) cos / sin tables per device; kept out of the module's
        # buffers so that casting the model to bf16 never quantises them.
        self._rope_tables: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """hwattn's initialisation of every parameter (`init_parameter_`)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if not p.is_meta:
                init_parameter_(p, name, isinstance(self.get_submodule(name.rsplit(".", 1)[0]),
                                                    RMSNorm), self.config.n_layers, gen)

    def forward(self, tokens: Tensor, meta: AttentionMetadata | None = None,
                kv_caches: Sequence[tuple[Tensor, ...]] | None = None, last_only: bool = False,
                blocks: Sequence[Callable] | None = None, hidden_only: bool = False) -> Tensor:
        """tokens (B, T) int64 -> logits (B, T, V), or (B, 1, V) with `last_only`; with
        `hidden_only`, the final-norm hidden states (B, T, D) that the output matrix turns into
        logits (training computes its loss from these without materializing the logits).

        Without `meta`, positions are 0..T-1 and attention is causal over the input (training).
        With `meta` and `kv_caches` (from `allocate_kv_cache`), the T tokens are the last T of
        each cached sequence: they are written to the cache and attend to everything before.
        last_only: project only the last position to the vocabulary (a prompt's next token).
        blocks: callables run in place of `self.layers`, with `Block.forward`'s signature
            (e.g. compiled copies of the blocks, sharing their parameters); what one returns
            is the next one's input (a pair, for `compile.DeferredResidual`), the last's the
            hidden states (B, T, D).

        Raises ValueError for tokens that are not a non-empty (B, T) integer tensor, or (on
        the CPU) hold an id outside [0, vocab_size), or for `meta` of another step's shape.
        """
        x, cos, sin = self.embed(tokens, meta, kv_caches)
        blocks = self.layers if blocks is None else blocks
        if len(blocks) != len(self.layers):
            raise ValueError(f"blocks must hold one callable per layer ({len(self.layers)})")
        for i, block in enumerate(blocks):
            x = block(x, cos, sin, meta, None if meta is None else kv_caches[i])
        if last_only:
            x = x[:, -1:]  # (B, 1, D)
        x = self.norm(x)  # (B, T, D)
        return x if hidden_only else self.output(x)

    def embed(self, tokens: Tensor, meta: AttentionMetadata | None = None,
              kv_caches: Sequence[tuple[Tensor, ...]] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`forward` up to the first block: tokens (B, T) -> their embeddings x (B, T, D) and
        the RoPE cos, sin (B, T, d_R / 2) of their positions (`forward`'s checks included)."""
        check_tokens(tokens, self.config.vocab_size)
        b, t = tokens.shape
        if meta is None:
            positions = torch.arange(t, device=tokens.device)[None].expand(b, t)
        else:
            if kv_caches is None or len(kv_caches) != len(self.layers):
                raise ValueError(f"kv_caches must hold one cache per layer ({len(self.layers)})")
            positions = meta.positions(t)
            if positions.shape != tokens.shape:
                raise ValueError(f"meta's token positions {tuple(positions.shape)} (token_positions, "
                                 f"else the last T of each of its sequences) must be shaped as "
                                 f"the tokens {tuple(tokens.shape)}: it describes another step")
        cos, sin = self.rope(positions)  # (B, T, d_R / 2) each
        return self.tok_embeddings(tokens), cos, sin

    @torch.no_grad()
    def fuse_projections(self) -> "Transformer":
        """For inference: every layer's projections of one input become one matrix product
        (attention's input projections, SwiGLU's w1 and w3), their weights views of the
        fused ones; results are unchanged up to the matmuls' rounding. Call once the model
        is on its device (and sharded); returns the model."""
        for blk in self.layers:
            blk.attn.fuse_projections()
            blk.ffn.fuse_projections()
        return self

    @torch.no_grad()
    def compose_absorptions(self, on: bool = True) -> int:
        """For inference: every latent layer's decode projections with W_UK and W_UV
        multiplied in (`LatentAttention.compose_absorptions`; `on=False` drops them). Call
        once the model is on its device and sharded; returns how many layers composed them."""
        return sum(bool(blk.attn.compose_absorptions(on)) for blk in self.layers
                   if hasattr(blk.attn, "compose_absorptions"))

    @property
    def composed_layers(self) -> int:
        """How many layers hold composed absorptions (`compose_absorptions`)."""
        return sum(getattr(blk.attn, "_composed", None) is not None for blk in self.layers)

    @property
    def cache_heads(self) -> int:
        """Cached heads per layer on this rank (KV or latent heads), from the layers' own
        configs, which describe the local shard once the model is tensor-parallel."""
        return self.layers[0].attn.config.cache_heads

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, T, d_R / 2) fp32 for positions (B, T). Positions outside
        [0, max_seq_len) raise on CPU (a negative one would index the table from its end); on
        a GPU the check would sync inside a decode step, so callers bound them."""
        if positions.device.type == "cpu" and positions.numel():
            lo, hi = int(positions.min()), int(positions.max())
            if hi >= self.config.max_seq_len:
                raise ValueError(f"position {hi} exceeds max_seq_len {self.config.max_seq_len}")
            if lo < 0:
                raise ValueError(f"position {lo} is negative")
        tables = self._rope_tables.get(positions.device)
        if tables is None:
            cfg = self.config
            tables = rope_table(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, positions.device)
            self._rope_tables[positions.device] = tables
        cos, sin = tables
        return cos[positions], sin[positions]

    def allocate_kv_cache(self, num_pages: int, page_size: int, dtype: torch.dtype | None = None,
                          device=None) -> list[tuple[Tensor, ...]]:
        """One tuple of paged cache tensors per layer (see `Attention.allocate_cache`)."""
        ref = self.tok_embeddings.weight
        dtype = dtype or ref.dtype
        device = device or ref.device
        return [blk.attn.allocate_cache(num_pages, page_size, dtype, device) for blk in self.layers]

    def kv_bytes_per_token(self, tp: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV cache bytes per token for the whole model on one rank of a `tp`-way split."""
        return sum(blk.attn.kv_bytes_per_token(tp, dtype) for blk in self.layers)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); `non_embedding` drops the embedding matrix."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`:
        6 per matmul weight plus attention's QK^T and PV over the (full) context. The input
        embedding is a lookup, not a product: its matrix counts only when it is also the
        output matrix (tied embeddings)."""
        lookup = self.tok_embeddings.weight
        tied = self.output.weight is lookup
        matmul = sum(p.numel() for n, p in self.named_parameters()
                     if not n.endswith("norm.weight") and (tied or p is not lookup))
        return 6 * matmul + self.attention_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """The attention part of `flops_per_token`: QK^T and PV over the full `seq_len`
        context, forward and backward, summed over layers."""
        return sum(6 * blk.attn.n_heads * seq_len * sum(blk.attn.attend_widths())
                   for blk in self.layers)
