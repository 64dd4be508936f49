"""Prefill steps in CUDA graphs, piecewise: everything but the attention step.

A prefill (or mixed) step runs each decoder block as two compiled pieces around an eager
attention step (`hwattn.models.compile.compile_pieces`): the attention step reads the step's
host lengths (the cache write, the dense path or the paged prefill op), so it cannot be
replayed from a graph, but the pieces can. Launched one by one, a chunk of a few thousand
tokens spends longer launching the pieces' kernels than the GPU spends running them
(docs/results/engine.md, runs 13 and 14: chunks of 2048 tokens host-bound on the device
machines, 20-80 µs a launch). `PrefillGraphs` records, for each token count of
`prefill_graph_sizes`, one graph per gap between two attention steps:

    graph 0:        layer 0's attention_inputs
    graph i:        layer i-1's attention_outputs, then layer i's attention_inputs
    graph L:        layer L-1's attention_outputs and the final norm

over static buffers sized for the largest count (the hidden state, the RoPE cos / sin, the
attention step's queries, states and output). A step of N tokens runs in the smallest
recorded count n >= N: its embeddings and RoPE rows go into the first N rows of the buffers,
the graphs run on n rows, and each eager attention step reads the first N rows of the queries
and states and writes the first N rows of the output. The n - N rows past the step hold
whatever an earlier step left there; every piece treats rows independently (RMSNorm, the
projections, RoPE, SwiGLU), so they change nothing in the first N.

On a CPU (the tests) the same code runs without graphs: each "replay" calls its pieces.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hwattn.layers import AttentionMetadata
from hwattn.models.compile import distinct_sizes

log = logging.getLogger(__name__)

# Token counts that get graphs. A step of 48 to 2048 tokens is padded by at most a third
# (64 / 48, 256 / 192, 512 / 384), from 512 up by at most a quarter; shorter steps are
# launch-bound whatever their padding. Longer steps keep enough work on the GPU per launch to
# run the compiled pieces directly.
PREFILL_GRAPH_SIZES = (16, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768,
                       896, 1024, 1280, 1536, 1792, 2048)


def prefill_graph_sizes(most: int) -> list[int]:
    """The token counts to record for steps of at most `most` tokens: those of
    `PREFILL_GRAPH_SIZES` below it, and `most` itself where it is below the largest (a full
    step of the scheduler's budget then runs unpadded)."""
    sizes = [n for n in PREFILL_GRAPH_SIZES if n < most]
    if 2 <= most <= PREFILL_GRAPH_SIZES[-1]:
        sizes.append(most)
    return sizes


class PrefillGraphs:
    """Graphs of a runner's prefill pieces (see the module docstring).

    model: the runner's (fused) `Transformer`; pieces: its `PiecewiseBlock`s (compiled, and
    already compiled for any token count: `ModelRunner._warm_prefill`); sizes: the token
    counts to record; capture: record CUDA graphs (else every replay calls its pieces, for
    tests on a CPU).
    """

    def __init__(self, model, pieces: Sequence, sizes: Sequence[int], capture: bool = True):
        if not sizes or min(sizes) < 2:
            raise ValueError(f"sizes must be token counts of at least 2, got {list(sizes)}")
        self.model = model
        self.pieces = list(pieces)
        self.sizes = sorted(set(sizes))
        ref = model.tok_embeddings.weight
        big = self.sizes[-1]
        # Every buffer has the tokens first and no batch dimension: a step's rows, `rows`,
        # are then laid out (strides included) as the eager pieces' contiguous (1, N, ...)
        # inputs are, so the compiled pieces' guards hold and nothing compiles again. Made
        # in inference mode, as the eager steps' activations are.
        with torch.inference_mode(), distinct_sizes():
            self.x = torch.zeros(big, model.config.dim, dtype=ref.dtype, device=ref.device)
            cos, _ = model.rope(torch.zeros(1, 1, dtype=torch.long, device=ref.device))
            self.cos = torch.zeros(big, cos.shape[-1], dtype=cos.dtype, device=ref.device)
            self.sin = torch.zeros_like(self.cos)
            attn = self.pieces[0].block.attn
            self.heads = attn.n_heads  # the attention step's output: (N, H, d_h)
            self.out = torch.zeros(big, attn.wo.in_features, dtype=ref.dtype, device=ref.device)
            # The queries and states (`Attention.project`'s parts), shaped by one run.
            q, states = self.pieces[0].inputs(self.pieces[0].block, self.x[None],
                                              self.cos[None], self.sin[None])
            self.q = tuple(torch.zeros_like(t[0]) for t in q)
            self.states = tuple(torch.zeros_like(t[0]) for t in states)
            self.graphs: dict[int, list[Callable[[], None]]] = {}
            self._pool = None
            for n in reversed(self.sizes):  # largest first: the smaller reuse its memory
                self.graphs[n] = [self._record(lambda i=i, n=n: self._segment(i, n), capture)
                                  for i in range(len(self.pieces) + 1)]
        if capture:
            torch.cuda.synchronize(ref.device)

    def size_for(self, n_tokens: int) -> int | None:
        """The recorded token count a step of `n_tokens` runs in (None: none fits)."""
        i = bisect.bisect_left(self.sizes, n_tokens)
        return self.sizes[i] if i < len(self.sizes) else None

    @staticmethod
    def rows(buffer: Tensor, n: int) -> Tensor:
        """The first n rows of a static buffer as one batch row: (1, n, ...)."""
        return buffer[:n].unsqueeze(0)

    def _segment(self, i: int, n: int) -> None:
        """What graph i of count n runs: layer i-1's second piece (the hidden state updated
        in place), then layer i's first (the queries and states into their buffers), or the
        final norm after the last layer."""
        x = self.rows(self.x, n)
        if i > 0:
            prev = self.pieces[i - 1]
            out = self.out[:n].view(n, self.heads, -1)  # (n, H, d_h), as eager
            x.copy_(prev.outputs(prev.block, x, out))
        if i == len(self.pieces):
            x.copy_(self.model.norm(x))
            return
        piece = self.pieces[i]
        q, states = piece.inputs(piece.block, x, self.rows(self.cos, n), self.rows(self.sin, n))
        for buf, t in zip(self.q + self.states, q + states):
            self.rows(buf, n).copy_(t)

    def _record(self, segment: Callable[[], None], capture: bool) -> Callable[[], None]:
        """`segment` run once (compiling nothing new, settling the allocator and cuBLAS's
        workspace), then captured: its replay (without `capture`, itself)."""
        segment()
        if not capture:
            return segment
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            segment()
        self._pool = graph.pool()
        return graph.replay

    def forward(self, tokens: Tensor, meta: AttentionMetadata,
                kv_caches: Sequence[tuple[Tensor, ...]]) -> Tensor:
        """`Transformer.forward(tokens, meta, kv_caches, hidden_only=True)` for a prefill step
        of tokens (1, N), N <= the largest recorded count -> the final-norm hidden states
        (1, N, D): a view of the static buffer, valid until the next step through here."""
        n_tokens = tokens.shape[1]
        n = self.size_for(n_tokens)
        if tokens.shape[0] != 1 or n is None:
            raise ValueError(f"tokens must be (1, N) with N <= {self.sizes[-1]}, got "
                             f"{tuple(tokens.shape)}")
        x, cos, sin = self.model.embed(tokens, meta, kv_caches)
        self.pieces[0].block.attn.check_step(x, cos, sin, meta, kv_caches[0])
        self.x[:n_tokens].copy_(x[0])
        self.cos[:n_tokens].copy_(cos[0])
        self.sin[:n_tokens].copy_(sin[0])
        graphs = self.graphs[n]
        graphs[0]()
        for i, piece in enumerate(self.pieces):
            q = tuple(self.rows(t, n_tokens) for t in self.q)
            states = tuple(self.rows(t, n_tokens) for t in self.states)
            out = piece.block.attn.attend_step(q, states, meta, kv_caches[i])  # (N, H, d_h)
            self.out[:n_tokens].copy_(out.view(n_tokens, -1))
            graphs[i + 1]()
        return self.rows(self.x, n_tokens)
