"""Decoding through the paged cache must reproduce the full causal forward."""

import pytest
import torch

from hwattn import AttentionMetadata, ModelConfig, Transformer, greedy_generate
from hwattn.config import ATTENTION_KINDS
from tests.conftest import assert_close_derived

SHAPES = [  # (batch, prompt, new tokens, page size)
    pytest.param((1, 1, 6, 1), id="b1-p1-page1"),
    pytest.param((2, 7, 9, 4), id="b2-p7-page4"),
    pytest.param((3, 16, 5, 16), id="b3-p16-page16"),
]


def tiny(attention, **kw):
    cfg = ModelConfig.from_preset("tiny", attention=attention, n_layers=2, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_prefill_then_decode_matches_forward(attention, shape):
    batch, prompt_len, new, page = shape
    model = tiny(attention)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len))
    tokens, _, logits = greedy_generate(model, prompt, new, page_size=page, return_logits=True)
    seq = tokens[:, :-1]
    with torch.no_grad():
        fwd32 = model(seq)[:, prompt_len - 1:]
        truth = model.double()(seq)[:, prompt_len - 1:]
    assert_close_derived(logits, truth, fwd32, what=f"{attention} decode logits")


@pytest.mark.parametrize("attention", ["gta", "mla", "gla"])
def test_biased_projections_decode_like_forward(attention):
    model = tiny(attention, attention_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "b_uk", "b_uv")):
                p.normal_(std=0.5)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7))
    tokens, _, logits = greedy_generate(model, prompt, 9, page_size=4, return_logits=True)
    with torch.no_grad():
        fwd32 = model(tokens[:, :-1])[:, 6:]
        truth = model.double()(tokens[:, :-1])[:, 6:]
    assert_close_derived(logits, truth, fwd32, what=f"{attention} biased decode logits")


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_token_by_token_and_chunked_prefill(attention):
    """Prefill in uneven chunks (the cache already holds earlier tokens), then decode one
    token at a time; every position's logits must match the full forward."""
    model = tiny(attention)
    batch, total, page = 2, 23, 4
    seq = torch.randint(0, model.config.vocab_size, (batch, total))
    pages = -(-total // page)
    # A shuffled page table: sequences own scattered pages of a shared pool.
    perm = torch.randperm(batch * pages + 3)[: batch * pages].to(torch.int32)
    table = perm.view(batch, pages)
    caches = model.allocate_kv_cache(batch * pages + 3, page)
    for c in caches:
        for t in c:
            t.fill_(float("nan"))  # unwritten slots must never be read
    out, pos = [], 0
    with torch.no_grad():
        for chunk, prefill in ((5, True), (8, True), *[(1, False)] * 6, (3, False), (1, False)):
            lens = torch.full((batch,), pos + chunk, dtype=torch.int32)
            meta = AttentionMetadata.for_step(table, lens, chunk, page, is_prefill=prefill)
            out.append(model(seq[:, pos:pos + chunk], meta=meta, kv_caches=caches))
            pos += chunk
        got = torch.cat(out, dim=1)
        fwd32 = model(seq[:, :pos])
        truth = model.double()(seq[:, :pos])
    assert_close_derived(got, truth, fwd32, what=f"{attention} chunked logits")


@pytest.mark.parametrize("attention, latent_heads, bias", [
    ("mla", None, False), ("gla", None, False), ("gla", 4, False), ("mla", None, True),
    ("gla", None, True)])
def test_absorbed_decode_equals_unabsorbed(attention, latent_heads, bias):
    """Layer level: the absorbed path (W_UK in the query, W_UV on the output, attention over
    the cached latent) equals attention with explicitly up-projected keys and values, also
    with biased up-projections (the key bias cancels in softmax, the value bias passes)."""
    kw = {"n_latent_heads": latent_heads} if latent_heads else {}
    cfg = ModelConfig.from_preset("tiny", attention=attention, attention_bias=bias, **kw)
    model = Transformer(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "b_uk", "b_uv")):
                p.normal_()
    layer = model.layers[0].attn
    b, t, page = 2, 11, 4
    x = torch.randn(b, t, cfg.dim, dtype=torch.float64)
    cos, sin = model.rope(torch.arange(t)[None].expand(b, t))
    q, states = layer.project(x, cos, sin)
    unabsorbed = layer.attend(q, states)[:, -3:]  # (B, 3, H, d_h), last 3 rows
    table = torch.arange(b * 3, dtype=torch.int32).view(b, 3)
    cache = layer.allocate_cache(b * 3, page, dtype=torch.float64)
    slots = AttentionMetadata.slots(table, torch.arange(t)[None].expand(b, t), page)
    from hwattn import ops
    for c, s in zip(cache, states):
        ops.store_kv(c, s.flatten(0, 1), slots)
    lens = torch.full((b,), t, dtype=torch.int32)
    meta = AttentionMetadata(table, lens, slots)
    absorbed = layer.decode(tuple(p[:, -3:] for p in q), cache, meta)
    torch.testing.assert_close(absorbed, unabsorbed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_absorbed_output_rows_match_the_einsum(bias, monkeypatch):
    """`absorb_output` without autograd writes the batched product straight into (N, H, d_h)
    rows (`_absorb_rows`): the einsum's numbers up to fp32 rounding (the two sum in their own
    orders), bias included, contiguous for `wo`;
    with autograd it takes the einsum, whose gradient flows."""
    from hwattn.layers import mla

    cfg = ModelConfig.from_preset("tiny", attention="gla", attention_bias=bias)
    layer = Transformer(cfg).layers[0].attn
    if bias:
        with torch.no_grad():
            layer.b_uv.normal_()
    latent = torch.randn(3, 2, cfg.n_heads, layer.latent_dim)
    with torch.no_grad():
        rows = layer.absorb_output(latent)
        monkeypatch.setattr(mla, "ABSORB_INTO_ROWS", False)
        einsum = layer.absorb_output(latent)
        monkeypatch.setattr(mla, "ABSORB_INTO_ROWS", True)
        strided = layer.absorb_output(latent.transpose(0, 1))  # rows not contiguous
    assert rows.is_contiguous() and rows.shape == (3, 2, cfg.n_heads, layer.head_dim)
    torch.testing.assert_close(rows, einsum)
    torch.testing.assert_close(strided, einsum.transpose(0, 1))
    latent.requires_grad_(True)
    layer.absorb_output(latent).sum().backward()  # the einsum: bmm(out=) has no gradient
    assert latent.grad is not None and layer.w_uv.grad is not None


@pytest.mark.parametrize("attention, latent_heads, bias", [
    ("mla", None, False), ("gla", None, False), ("gla", 4, False), ("gla", None, True)])
def test_composed_absorptions_decode_as_the_separate_products(attention, latent_heads, bias):
    """`compose_absorptions` (W_UK in `wq_b`'s query rows, W_UV in `wo`): chunked prefill,
    then decode steps of one and of three query tokens (verification) give the logits of the
    separate products, in float64 to rounding, with `wq_b`'s bias composed too; a layer with
    `b_uv` keeps the separate products, and `on=False` restores them."""
    kw = {"n_latent_heads": latent_heads} if latent_heads else {}
    cfg = ModelConfig.from_preset("tiny", attention=attention, n_layers=2, attention_bias=bias, **kw)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "b_uk")):
                p.normal_(std=0.5)
            if name.endswith("b_uv"):
                p.zero_()
    if bias:  # a value bias is not composed: its layers keep the separate products
        assert model.compose_absorptions() == 0
        for blk in model.layers:
            blk.attn.b_uv = None
    batch, page, steps = 2, 4, [(6, True), (1, False), (3, False), (1, False)]
    seq = torch.randint(0, cfg.vocab_size, (batch, sum(n for n, _ in steps)))
    table = torch.randperm(batch * 4 + 1)[: batch * 4].to(torch.int32).view(batch, 4)

    def run():
        caches = model.allocate_kv_cache(batch * 4 + 1, page, dtype=torch.float64)
        out, pos = [], 0
        with torch.no_grad():
            for n, prefill in steps:
                lens = torch.full((batch,), pos + n, dtype=torch.int32)
                meta = AttentionMetadata.for_step(table, lens, n, page, is_prefill=prefill)
                out.append(model(seq[:, pos:pos + n], meta=meta, kv_caches=caches))
                pos += n
        return torch.cat(out, 1)

    separate = run()
    assert model.compose_absorptions() == cfg.n_layers
    calls = []  # the composed projections run in the three decode steps only
    for blk in model.layers:
        for m in blk.attn._composed:
            m.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    composed = run()
    torch.testing.assert_close(composed, separate, rtol=1e-9, atol=1e-10)
    assert sorted(calls) == sorted([1, 3, 1] * 2 * cfg.n_layers), calls
    assert model.compose_absorptions(on=False) == 0
    assert torch.equal(run(), separate)


def test_composed_absorptions_stay_out_of_the_state_dict_and_follow_the_weights():
    """Not in the state dict or the parameters; a dtype cast carries them along, and
    `load_state_dict` composes them again from the loaded weights."""
    model = tiny("gla")
    names = set(model.state_dict())
    model.compose_absorptions()
    assert set(model.state_dict()) == names
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in tiny("gla").parameters())
    model.double()
    assert all(m.weight.dtype == torch.float64 for blk in model.layers for m in blk.attn._composed)
    other = tiny("gla").double()
    other.compose_absorptions()
    other.load_state_dict(model.state_dict())
    for mine, theirs in zip(model.layers, other.layers):
        for a, b in zip(mine.attn._composed, theirs.attn._composed):
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)


def test_meta_without_cache_is_rejected():
    model = tiny("gqa")
    meta = AttentionMetadata.for_step(torch.zeros(1, 1, dtype=torch.int32),
                                      torch.ones(1, dtype=torch.int32), 1, 4)
    with pytest.raises(ValueError, match="kv_caches"):
        model(torch.zeros(1, 1, dtype=torch.long), meta=meta)


def test_generate_rejects_too_long():
    model = tiny("gta")
    with pytest.raises(ValueError, match="max_seq_len"):
        greedy_generate(model, torch.zeros(1, 1000, dtype=torch.long), 100)
