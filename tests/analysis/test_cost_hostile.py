"""`hwattn.analysis.cost.analyze` and `hwattn analyze` under arguments that describe no
workload: each is refused by name, and the KV figures agree with what the engine allocates."""

from __future__ import annotations

import pytest
import torch

from hwattn.analysis.cost import analyze


@pytest.mark.parametrize("kw, match", [
    (dict(batch=0), "batch must be a positive integer, got 0"),
    (dict(batch=1.5), "batch must be a positive integer, got 1.5"),
    (dict(batch=True), "batch must be a positive integer, got True"),
    (dict(context=-1), "context must be a positive integer, got -1"),
    (dict(context=8192.0), "context must be a positive integer"),
    (dict(variants=()), "variants must name at least one variant"),
    (dict(tps=()), "tps must hold at least one TP degree"),
    (dict(tps=(2.0,)), "tps must hold positive integers, got 2.0"),  # was float byte counts
    (dict(tps=(1, True)), "tps must hold positive integers, got True"),
    # a string was iterated letter by letter: "variant must start with ..., got 'm'"
    (dict(variants="mha"), "variants must be a sequence of labels, got the string 'mha'"),
])
def test_analyze_refuses_a_workload_that_is_none_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        analyze("tiny", **kw)


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--context", "-8")])
def test_analyze_cli_names_the_bad_option(capsys, flag, value):
    from tests.cli.test_arguments import assert_error, run_cli

    result = run_cli(capsys, "analyze", "--preset", "tiny", flag, value)
    assert_error(result, f"{flag} must be", value)
    other = "context" if flag == "--batch" else "batch"
    assert other not in result[2], result[2]


@pytest.mark.parametrize("variant", ["mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_kv_bytes_match_the_caches_each_rank_allocates(variant, tp):
    """The cost model's bytes per token (per rank) against the paged caches a sharded model
    allocates on every rank, in bf16 and fp8."""
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.models.transformer import Transformer
    from hwattn.parallel.tp import shard_model

    cfg = ModelConfig.from_preset("small", **parse_variant(variant))
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float8_e4m3fn, "fp8")):
        row = analyze("small", [variant], [tp], batch=3, context=16, dtype=name)[0]
        for rank in range(tp):
            model = shard_model(Transformer(cfg, device="meta"), rank, tp)
            caches = model.allocate_kv_cache(4, 16, dtype=dtype, device="meta")
            per_token = sum(t.numel() * t.element_size() for layer in caches for t in layer) // 64
            assert per_token == row["kv_bytes_per_token"], (name, rank)
            assert row["kv_cache_bytes"] == per_token * 3 * 16


@pytest.mark.parametrize("variant", ["gla-2", "gqa-4"])
def test_fp8_cache_counts_queries_and_outputs_in_bf16(variant):
    """Over an fp8 cache the queries and outputs stay bf16 (the engine's and `hwattn bench
    decode`'s accounting): the roofline's bytes are the cache at one byte an element plus q and
    out at two, not q and out at one byte."""
    from hwattn.analysis.cost import GPUS, roofline_us
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.models.transformer import Transformer

    batch, context = 2, 8
    row = analyze("small", [variant], [1], batch=batch, context=context, dtype="fp8")[0]
    cfg = ModelConfig.from_preset("small", **parse_variant(variant))
    attn = Transformer(cfg, device="meta").layers[0].attn
    for lq in (1, 2):
        cache = context * attn.kv_bytes_per_token(1, torch.float8_e4m3fn)
        q_and_out = attn.decode_bytes(0, lq, 1, torch.bfloat16)
        nbytes = (cache + q_and_out) * batch * cfg.n_layers
        flops = attn.decode_flops(context, lq, 1) * batch * cfg.n_layers
        assert row[f"arithmetic_intensity_lq{lq}"] == pytest.approx(flops / nbytes, rel=1e-12)
        us, _ = roofline_us(flops, nbytes, GPUS["h100"])
        assert row[f"decode_attention_us_lq{lq}"] == pytest.approx(us, rel=1e-12)
