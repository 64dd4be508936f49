"""Packed variable-length prefill through the paged prefill op: every sequence's chunk (any
length, cached prefix or not, one-token rows as in a mixed step, rows with nothing this step)
in one forward must reproduce the full causal forward; the latent families' two prefill forms
agree, and the cheaper one is chosen."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from hwattn import AttentionMetadata, ModelConfig, Transformer, ops  # noqa: E402
from hwattn.config import ATTENTION_KINDS  # noqa: E402
from hwattn.layers import PrefillForm, build_attention  # noqa: E402
from tests.conftest import assert_close_derived  # noqa: E402

# Per step, the tokens each of three sequences feeds (0: nothing this step).
STEPS = [(5, 1, 9), (7, 1, 0), (1, 13, 2), (4, 1, 1)]
PAGE = 4


def _tiny(attention: str) -> Transformer:
    return Transformer(ModelConfig.from_preset("tiny", attention=attention, n_layers=2)).eval()


# Mixed steps: per step, the tokens of each sequence and how many leading one-token rows
# attend as decode rows (`AttentionMetadata.split_decode_rows`).
MIXED_STEPS = [((6, 3, 9), 0), ((1, 1, 5), 2), ((1, 1, 3), 2), ((1, 7, 2), 1)]


def run_packed(model: Transformer, seqs: torch.Tensor, backend: str, steps=None) -> list[torch.Tensor]:
    """Feed `seqs` (3, L) through STEPS (or `steps`, MIXED_STEPS' form) as packed prefill
    steps over a NaN-filled cache with shuffled pages; per sequence, the logits of every
    position it fed, in order."""
    batch, total = seqs.shape
    pages = -(-total // PAGE)
    order = torch.randperm(batch * pages + 5)[: batch * pages].to(torch.int32)
    table = order.view(batch, pages)
    caches = model.allocate_kv_cache(batch * pages + 5, PAGE)
    for layer in caches:
        for t in layer:
            t.fill_(float("nan"))  # no unwritten slot may be read
    cached = [0] * batch
    logits = [[] for _ in range(batch)]
    with torch.no_grad():
        for lens, num_decode in steps or [(lens, 0) for lens in STEPS]:
            tokens = torch.cat([seqs[b, cached[b]:cached[b] + n] for b, n in enumerate(lens)])
            meta = AttentionMetadata.for_prefill(table, lens, cached, PAGE, backend=backend)
            if num_decode:
                seqlens = torch.tensor([c + 1 for c in cached[:num_decode]], dtype=torch.int32)
                meta.split_decode_rows(num_decode, meta.backend.plan(
                    seqlens, num_heads_kv=model.cache_heads, page_size=PAGE))
            out = model(tokens[None], meta=meta, kv_caches=caches)[0]  # (N, V)
            cu = meta.plan.cu_seqlens_q
            for b, n in enumerate(lens):
                logits[b].append(out[cu[b]:cu[b + 1]])
                cached[b] += n
    return [torch.cat(rows) for rows in logits]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_packed_prefill_matches_forward(attention, backend):
    model = _tiny(attention)
    total = sum(s[0] for s in STEPS), sum(s[1] for s in STEPS), sum(s[2] for s in STEPS)
    seqs = torch.randint(0, model.config.vocab_size, (3, max(total)))
    check_against_forward(model, seqs, total, run_packed(model, seqs, backend),
                          f"{attention}/{backend}")


def check_against_forward(model: Transformer, seqs: torch.Tensor, total, got, what: str) -> None:
    """Each sequence's packed logits `got[b]` against the full causal forward over its first
    `total[b]` tokens (fp64 truth, the model's own dtype for the tolerance)."""
    with torch.no_grad():
        fwd32 = [model(seqs[b:b + 1, :n])[0] for b, n in enumerate(total)]
        model.double()
        truth = [model(seqs[b:b + 1, :n])[0] for b, n in enumerate(total)]
    for b in range(len(total)):
        assert_close_derived(got[b], truth[b], fwd32[b], what=f"{what} seq {b}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_mixed_steps_attend_decode_rows_through_the_decode_op(monkeypatch, attention, backend):
    """A mixed step's leading one-token rows go through the paged decode op (one call per
    layer, batch = those rows) and its prompt rows through the prefill path; every position's
    logits still match the full causal forward."""
    model = _tiny(attention)
    family = type(model.layers[0].attn)
    decoded, decode = [], family.decode

    def spy(self, q, cache, meta):
        decoded.append(tuple(q[0].shape[:2]))
        return decode(self, q, cache, meta)

    monkeypatch.setattr(family, "decode", spy)
    total = [sum(lens[b] for lens, _ in MIXED_STEPS) for b in range(3)]
    seqs = torch.randint(0, model.config.vocab_size, (3, max(total)))
    got = run_packed(model, seqs, backend, MIXED_STEPS)
    layers = len(model.layers)
    assert decoded == [(nd, 1) for _, nd in MIXED_STEPS if nd for _ in range(layers)]
    check_against_forward(model, seqs, total, got, f"{attention}/{backend}")


def test_split_decode_rows_refuses_bad_rows():
    table = torch.arange(12, dtype=torch.int32).view(3, 4)
    meta = AttentionMetadata.for_prefill(table, [1, 2, 3], [4, 0, 0], PAGE, backend="torch")
    with pytest.raises(ValueError, match="num_decode must be in"):
        meta.split_decode_rows(3)
    with pytest.raises(ValueError, match="num_decode must be in"):
        meta.split_decode_rows(0)
    with pytest.raises(ValueError, match="one query token each"):
        meta.split_decode_rows(2)
    decode = AttentionMetadata.for_step(table, torch.tensor([5, 5, 5], dtype=torch.int32), 1, PAGE,
                                        backend="torch")
    with pytest.raises(ValueError, match="prefill step's metadata"):
        decode.split_decode_rows(1)
    rows = AttentionMetadata.for_step(table, torch.tensor([5, 5, 5], dtype=torch.int32), 1, PAGE,
                                      is_prefill=True, backend="torch")  # (B, T), not packed
    with pytest.raises(ValueError, match="packed rows"):
        rows.split_decode_rows(1)
    assert meta.parts is None
    meta.split_decode_rows(1)
    assert meta.parts.num_decode == 1 and meta.parts.prompts.plan.query_lens == (2, 3)
    assert meta.parts.prompts.cu_seqlens_q.tolist() == [0, 2, 5]
    assert meta.parts.decode.cache_seqlens.tolist() == [5] and not meta.parts.decode.is_prefill


@pytest.mark.parametrize("attention, latent_heads, bias", [
    ("mla", None, False), ("gla", None, True), ("gla", 4, False)])
def test_latent_prefill_forms_agree(attention, latent_heads, bias):
    """The absorbed form (prefill_tied over the latent) and the expanded one (prefill_tied
    over per-head K_nope and V up-projected from the gathered latent pages, beside their RoPE
    keys) give one result."""
    kw = {"n_latent_heads": latent_heads} if latent_heads else {}
    cfg = ModelConfig.from_preset("tiny", attention=attention, attention_bias=bias, **kw)
    model = Transformer(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "b_uk", "b_uv")):
                p.normal_()
    layer = model.layers[0].attn
    lens, cached = [3, 1, 0, 6], [9, 20, 4, 0]
    table = torch.randperm(40)[:32].to(torch.int32).view(4, 8)
    meta = AttentionMetadata.for_prefill(table, lens, cached, PAGE)
    cache = layer.allocate_cache(40, PAGE, dtype=torch.float64)
    for t in cache:
        t.fill_(float("nan"))
    n_total = [c + n for c, n in zip(cached, lens)]
    xs = torch.randn(1, sum(n_total), cfg.dim, dtype=torch.float64)  # every token, packed
    history = AttentionMetadata.for_prefill(table, n_total, [0] * 4, PAGE)
    cos, sin = model.rope(history.token_positions)
    q, states = layer.project(xs, cos, sin)
    for c, s in zip(cache, states):
        ops.store_kv(c, s.flatten(0, 1), history.slot_mapping)
    absorbed, expanded = layer.prefill_forms()
    mine = torch.cat([torch.arange(c, c + n) + sum(n_total[:b]) for b, (c, n)
                      in enumerate(zip(cached, lens))])  # this step's rows among them
    step_q = tuple(t.flatten(0, 1)[mine] for t in q)
    out_a = layer.prefill_as(absorbed, step_q, cache, meta)
    out_e = layer.prefill_as(expanded, step_q, cache, meta)
    torch.testing.assert_close(out_a, out_e, rtol=1e-10, atol=1e-12)
    # Both are the dense training attention of each sequence's new rows over its states.
    dense, start = [], 0
    for c, n in zip(cached, lens):
        if n:
            dense.append(layer.attend(tuple(t[:, start + c:start + c + n] for t in q),
                                      tuple(t[:, start:start + c + n] for t in states))[0])
        start += c + n
    torch.testing.assert_close(out_e, torch.cat(dense), rtol=1e-10, atol=1e-12)


def test_latent_form_choice_follows_flops():
    """At the xl shape a long fresh prompt takes the expanded form, decode rows and a short
    chunk over a long prefix the absorbed one; the choice is the form of fewer FLOPs."""
    for attention in ("mla", "gla"):
        layer = build_attention(ModelConfig.from_preset("xl", attention=attention), device="meta")
        absorbed, expanded = layer.prefill_forms()
        long_prompt = ops.plan_prefill([0, 8192], [8192])
        decodes = ops.plan_prefill(list(range(65)), [1024] * 64)
        short_chunk = ops.plan_prefill([0, 16], [8192])
        assert layer.prefill_form(long_prompt).name == "expanded"
        assert layer.prefill_form(decodes).name == "absorbed"
        assert layer.prefill_form(short_chunk).name == "absorbed"
        for plan in (long_prompt, decodes, short_chunk):
            chosen = layer.prefill_form(plan)
            other = expanded if chosen is absorbed else absorbed
            assert chosen.flops(plan.query_lens, plan.seqlens) <= other.flops(plan.query_lens,
                                                                                plan.seqlens)


def test_prefill_form_flops_by_hand():
    # 3 queries over 10 keys: 8 + 9 + 10 visible pairs.
    assert PrefillForm.pairs([3, 0], [10, 4]) == 27
    gqa = build_attention(ModelConfig.from_preset("xl", attention="gqa"), device="meta")
    (paged,) = gqa.prefill_forms()
    assert paged.flops([3], [10]) == 2 * 16 * 27 * (128 + 128)
    assert paged.cache_shapes() == tuple(gqa.cache_layout(1).values())
    gla = build_attention(ModelConfig.from_preset("xl", attention="gla"), device="meta")
    absorbed, expanded = gla.prefill_forms()
    assert absorbed.cache_shapes() == tuple(gla.cache_layout(1).values())
    # absorbed: widths 256 + 64 + 256, plus W_UK and W_UV on each query (16 heads, 128 x 256).
    assert absorbed.flops([3], [10]) == 2 * 16 * 27 * 576 + 3 * 4 * 16 * 128 * 256
    # expanded: widths 128 + 64 + 128, plus K_nope and V up-projected for every context token.
    assert expanded.flops([3], [10]) == 2 * 16 * 27 * 320 + 10 * 4 * 16 * 256 * 128


@pytest.mark.parametrize("backend, lens, threshold, dense", [
    ("triton", (5, 1, 9), None, False),  # short unequal prompts: one call of the paged op
    ("triton", (6, 6, 6), None, True),   # one length: one dense batch
    ("torch", (5, 1, 9), None, True),    # the reference op loops over sequences anyway
    ("triton", (20, 11, 3), 10, True),   # prompts averaging >= the threshold: the dense loop
    ("triton", (20, 11, 0), 16, False),  # an empty row does not count: mean 15.5 < 16
])
def test_whole_prompts_route_by_length(monkeypatch, backend, lens, threshold, dense):
    """A step of whole prompts attends densely (`_attend_fresh`) or through the paged op
    (`prefill`) as `Attention._attends_densely` says, and either way as the forward does.
    `threshold` stands in for `DENSE_LOOP_MIN_MEAN_LEN` (2048) to keep the prompts short."""
    from hwattn.layers import base

    model = _tiny("gqa")
    calls = []
    cls = type(model.layers[0].attn)
    for name in ("_attend_fresh", "prefill"):
        def counted(self, *args, _original=getattr(cls, name), _name=name):
            calls.append(_name)
            return _original(self, *args)
        monkeypatch.setattr(cls, name, counted)
    if threshold is not None:
        monkeypatch.setattr(base, "DENSE_LOOP_MIN_MEAN_LEN", threshold)
    seqs = torch.randint(0, model.config.vocab_size, (3, max(lens)))
    pages = -(-max(lens) // PAGE)
    table = torch.arange(1, 3 * pages + 1, dtype=torch.int32).view(3, pages)
    caches = model.allocate_kv_cache(3 * pages + 1, PAGE)
    tokens = torch.cat([seqs[b, :n] for b, n in enumerate(lens)])
    with torch.no_grad():
        meta = AttentionMetadata.for_prefill(table, lens, [0, 0, 0], PAGE, backend=backend)
        out = model(tokens[None], meta=meta, kv_caches=caches)[0]
        cu = meta.plan.cu_seqlens_q
        for b, n in enumerate(lens):
            if n:
                torch.testing.assert_close(out[cu[b]:cu[b + 1]], model(seqs[b:b + 1, :n])[0],
                                           rtol=1e-4, atol=1e-4)
    assert set(calls) == {"_attend_fresh" if dense else "prefill"}, calls
