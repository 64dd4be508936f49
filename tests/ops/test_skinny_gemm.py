"""The skinny GEMM (hwattn/ops/skinny_gemm.py) against an fp64 truth: the Triton kernel on CPU
under the interpreter, or compiled (HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0).

Tolerances are derived (tests/conftest.py): the kernel may be off the truth by a small multiple
of the error `skinny_linear_reference` (fp32, rounded once) makes in the same dtype. Shapes are
ragged on purpose: one row, a prime number of rows, rows just past a power of two, N and K that
are not multiples of any tile, K splits that do not divide K's blocks, more splits asked for
than K has blocks.
"""

from __future__ import annotations

import pytest
import torch

from hwattn.ops.reference import skinny_linear_reference
from tests.conftest import assert_close_derived
from tests.ops.paged import DEVICE


def _kernel():
    from hwattn.ops import skinny_gemm  # imported lazily: triton after TRITON_INTERPRET is set

    return skinny_gemm


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, lead: tuple[int, ...] | None = None):
    x = torch.randn(*(lead or (m,)), k, dtype=dtype, device=DEVICE)
    w = torch.randn(n, k, dtype=dtype, device=DEVICE)
    return x, w


def _assert_matches(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, what: str):
    truth = (x.double() @ w.double().T).cpu()
    assert y.shape == truth.shape and y.dtype == x.dtype, what
    assert_close_derived(y.cpu(), truth, skinny_linear_reference(x, w).cpu(), what=what)


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (M, N, K, dtype, (block_n, block_k, split_k)); K = 328 stands in for the MLP's K = 6488:
# a multiple of 8 but not of 16.
CASES = [
    pytest.param((1, 200, 328, BF16, (32, 64, 1)), id="m1-n200-k328-bf16-split1"),
    pytest.param((7, 200, 328, BF16, (32, 32, 3)), id="m7-prime-n200-k328-bf16-split3"),
    pytest.param((64, 200, 328, FP32, (32, 64, 2)), id="m64-n200-k328-fp32-split2"),
    pytest.param((100, 96, 200, BF16, (64, 32, 4)), id="m100-n96-k200-bf16-split4-tail"),
    pytest.param((17, 64, 64, FP16, (64, 64, 1)), id="m17-whole-tiles-fp16"),
    pytest.param((7, 33, 40, BF16, (16, 16, 8)), id="split8-over-3-k-blocks"),
    pytest.param((5, 50, 37, FP32, (32, 16, 2)), id="k37-unaligned-fp32"),
    pytest.param((128, 40, 96, BF16, (16, 32, 3)), id="m128-max-rows"),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_truth(case):
    m, n, k, dtype, tiles = case
    sk = _kernel()
    x, w = _inputs(m, n, k, dtype)
    y = sk.skinny_linear(x, w, config=sk.SkinnyConfig(*tiles, num_stages=2))
    _assert_matches(y, x, w, f"M={m} N={n} K={k} {dtype} tiles {tiles}")


def test_chosen_config_and_leading_dims():
    """config=None takes `choose_config`'s tiles; x (2, 3, K) and x (K,) keep their leading
    dimensions."""
    sk = _kernel()
    x, w = _inputs(6, 200, 328, BF16, lead=(2, 3))
    y = sk.skinny_linear(x, w)
    assert y.shape == (2, 3, 200)
    _assert_matches(y, x, w, "x (2, 3, K)")
    x1 = torch.randn(328, dtype=BF16, device=DEVICE)
    _assert_matches(sk.skinny_linear(x1, w), x1, w, "x (K,)")


def test_split_k_repeats_bit_for_bit():
    """The split-K counters are left at zero by every launch: a second call with other inputs
    is right, and the first inputs again give the same bits."""
    sk = _kernel()
    config = sk.SkinnyConfig(block_n=32, block_k=32, split_k=4, num_stages=2)
    x, w = _inputs(9, 70, 200, BF16)
    first = sk.skinny_linear(x, w, config=config)
    x2, w2 = _inputs(9, 70, 200, BF16)
    _assert_matches(sk.skinny_linear(x2, w2, config=config), x2, w2, "second call")
    assert torch.equal(sk.skinny_linear(x, w, config=config), first)


def test_strided_rows_and_out():
    """Rows of x, weight and out may be strided (slices of wider tensors); out is written in
    place and returned."""
    sk = _kernel()
    m, n, k = 7, 72, 96
    x = torch.randn(m, k + 24, dtype=BF16, device=DEVICE)[:, 8:8 + k]
    w = torch.randn(n, k + 40, dtype=BF16, device=DEVICE)[:, :k]
    out_wide = torch.full((m, n + 8), float("nan"), dtype=BF16, device=DEVICE)
    out = out_wide[:, :n]
    config = sk.SkinnyConfig(block_n=32, block_k=32, split_k=2, num_stages=2)
    assert sk.skinny_linear(x, w, config=config, out=out) is out
    _assert_matches(out, x, w, "strided rows")
    assert torch.isnan(out_wide[:, n:]).all(), "wrote past out's columns"


def test_rejects_non_contiguous_k():
    """A last dimension that is not contiguous (x.t(), permuted leading dimensions that do not
    flatten) is refused, not copied behind the caller's back."""
    sk = _kernel()
    w = torch.randn(16, 32, dtype=BF16)
    with pytest.raises(ValueError, match="x must be contiguous in its last dimension"):
        sk.skinny_linear(torch.randn(32, 4, dtype=BF16).t(), w)
    with pytest.raises(ValueError, match="x: its leading dimensions must flatten"):
        sk.skinny_linear(torch.randn(3, 5, 32, dtype=BF16).transpose(0, 1), w)
    with pytest.raises(ValueError, match="weight must be contiguous"):
        sk.skinny_linear(torch.randn(4, 32, dtype=BF16), torch.randn(32, 16, dtype=BF16).t())


META = torch.device("meta")
X = torch.randn(4, 32, dtype=BF16)
W = torch.randn(16, 32, dtype=BF16)

BAD_ARGUMENTS = [
    pytest.param(dict(x=X.to(torch.int32)), "x is torch.int32", id="x-dtype"),
    pytest.param(dict(x=torch.tensor(1.0, dtype=BF16)), "x must be", id="x-scalar"),
    pytest.param(dict(x=torch.randn(129, 32, dtype=BF16)), "x has 129 rows", id="x-too-many-rows"),
    pytest.param(dict(weight=W.float()), "weight is torch.float32", id="weight-dtype"),
    pytest.param(dict(weight=W[0]), "weight must be a 2-D", id="weight-rank"),
    pytest.param(dict(weight=torch.randn(16, 24, dtype=BF16)), "weight", id="weight-width"),
    pytest.param(dict(weight=torch.empty(16, 32, dtype=BF16, device=META)), "weight is on meta",
                 id="weight-device"),
    pytest.param(dict(out=torch.empty(4, 8, dtype=BF16)), "out must be", id="out-shape"),
    pytest.param(dict(out=torch.empty(4, 16)), "out must be", id="out-dtype"),
    pytest.param(dict(out=torch.empty(16, 4, dtype=BF16).t()), "out must be contiguous",
                 id="out-columns-strided"),
]


@pytest.mark.parametrize("override, message", BAD_ARGUMENTS)
def test_rejects_bad_arguments(override, message):
    sk = _kernel()
    args = dict(x=X, weight=W)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        sk.skinny_linear(**args)


@pytest.mark.parametrize("field, value", [("block_n", 48), ("block_k", 8), ("split_k", 0),
                                          ("num_warps", 3), ("num_stages", 0)])
def test_config_rejects(field, value):
    sk = _kernel()
    with pytest.raises(ValueError, match=field):
        sk.SkinnyConfig(**{field: value})


def test_split_layout_leaves_no_split_empty():
    sk = _kernel()
    for k in (1, 15, 16, 17, 200, 328, 6488):
        for block_k in (16, 64, 128):
            for split in (1, 2, 3, 5, 8, 64):
                per_split, launched = sk.split_layout(k, block_k, split)
                assert per_split % block_k == 0 and launched <= split
                assert (launched - 1) * per_split < k <= launched * per_split, (k, block_k, split)


# The decode GEMMs of the xl model (the `skinny` part of benchmarks/engine_diagnostics.py).
DECODE_SHAPES = [(3072, 2048), (2048, 2048), (12976, 2048), (2048, 6488), (1600, 2048),
                 (3072, 1024)]


@pytest.mark.parametrize("m", [16, 64, 128])
def test_choose_config_fills_the_gpu_in_one_wave(m):
    """On 132 SMs every decode GEMM gets at least one program per SM, at most one wave of
    PROGRAMS_PER_SM, and pipeline buffers that let two programs share an SM; the LM head
    (2004 N blocks) is not split."""
    sk = _kernel()
    sms = 132
    for n, k in DECODE_SHAPES:
        config = sk.choose_config(m, n, k, sms)
        _, launched = sk.split_layout(k, config.block_k, config.split_k)
        programs = -(-n // config.block_n) * launched
        assert sms <= programs <= sk.PROGRAMS_PER_SM * sms, (m, n, k, config, programs)
        stage = (config.block_n + sk.block_rows(m)) * config.block_k * 2
        assert stage * config.num_stages <= sk.SMEM_PER_PROGRAM, (m, n, k, config)
    assert sk.choose_config(m, 128256, 2048, sms).split_k == 1


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_split_k_in_a_cuda_graph():
    """Captured once, replayed on new inputs written into the captured x: right every time."""
    sk = _kernel()
    config = sk.SkinnyConfig(block_n=64, block_k=64, split_k=4)
    x, w = _inputs(64, 2048, 2048, BF16)
    sk.skinny_linear(x, w, config=config)  # allocates the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sk.skinny_linear(x, w, config=config)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        _assert_matches(y, x, w, "graph replay")


def test_tile_configs_name_the_bad_field():
    """The skinny GEMM's and the prefill kernel's tile shapes share one check
    (`triton_decode.check_tile`), which names the field it refuses."""
    from hwattn.ops.triton_prefill import PrefillConfig

    sk = _kernel()
    for make, block in ((sk.SkinnyConfig, "block_k"), (PrefillConfig, "block_m")):
        with pytest.raises(ValueError, match=f"{block} must be a power of two >= 16, got 48"):
            make(**{block: 48})
        with pytest.raises(ValueError, match="num_warps must be 1, 2, 4, 8 or 16, got 3"):
            make(num_warps=3)
        with pytest.raises(ValueError, match="num_stages must be >= 1, got 0"):
            make(num_stages=0)
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        sk.SkinnyConfig(split_k=0)
