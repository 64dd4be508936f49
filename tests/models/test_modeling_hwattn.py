"""HwattnForCausalLM.forward refuses what it cannot do, and malformed inputs, by name: it never
silently ignores output_attentions / output_hidden_states, and never fails deep inside with an
unpacking, IndexError or broadcasting error."""

import pytest
import torch

pytest.importorskip("transformers")

from hwattn.models.modeling_hwattn import HwattnConfig, HwattnForCausalLM  # noqa: E402


@pytest.fixture(scope="module", params=["gta", "gla"])
def model(request):
    cfg = HwattnConfig(attention=request.param, vocab_size=64, dim=64, n_layers=1, n_heads=4,
                       head_dim=16, max_seq_len=32)
    return HwattnForCausalLM(cfg).eval()


IDS = torch.arange(10).view(2, 5)


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(input_ids=torch.zeros(5, dtype=torch.long)), "input_ids must be .*batch",
                 id="1-D ids"),
    pytest.param(dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids must hold",
                 id="empty ids"),
    pytest.param(dict(input_ids=torch.zeros(1, 3)), "input_ids must hold integer", id="float ids"),
    pytest.param(dict(input_ids=torch.full((1, 3), 64)), "input_ids .*vocab_size", id="id=vocab"),
    pytest.param(dict(input_ids=torch.full((1, 3), -1)), "input_ids .*vocab_size", id="negative id"),
    pytest.param(dict(input_ids=None, inputs_embeds=torch.randn(2, 5, 64)), "inputs_embeds",
                 id="inputs_embeds"),
    pytest.param(dict(output_attentions=True), "output_attentions", id="output_attentions"),
    pytest.param(dict(output_hidden_states=True), "output_hidden_states", id="hidden_states"),
    pytest.param(dict(attention_mask=torch.ones(1, 5, dtype=torch.long)), "attention_mask",
                 id="mask of one row for two"),
    pytest.param(dict(attention_mask=torch.ones(3, 5, dtype=torch.long)), "attention_mask",
                 id="mask of three rows for two"),
    pytest.param(dict(position_ids=torch.arange(4)[None]), "position_ids", id="short positions"),
    # Was run as a rotation by a negative angle, without a word (hwattn's model refuses it).
    pytest.param(dict(position_ids=torch.arange(-1, 4)[None]), "position -1",
                 id="negative position"),
    pytest.param(dict(labels=IDS, logits_to_keep=1), "labels", id="labels with logits_to_keep"),
    pytest.param(dict(labels=IDS[:, :3]), "labels", id="labels of another shape"),
])
def test_unsupported_or_malformed_inputs_are_refused_by_name(model, kwargs, match):
    kwargs = {"input_ids": IDS, **kwargs}
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_false_flags_and_a_broadcast_free_mask_still_run(model):
    with torch.no_grad():
        ref = model(IDS).logits
        out = model(IDS, output_attentions=False, output_hidden_states=False,
                    attention_mask=torch.ones(2, 5, dtype=torch.long),
                    position_ids=torch.arange(5)[None].expand(2, 5), labels=IDS)
    torch.testing.assert_close(out.logits, ref)
    assert out.loss is not None


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_generate_refuses_what_forward_cannot_return(model, flag):
    with pytest.raises(ValueError, match=flag):
        model.generate(IDS[:1], max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                       **{flag: True})


def test_generate_continues_from_the_cache_it_is_given(model):
    # Observed (transformers 5.24+, which renamed past_key_values to cache): generate()
    # refused the cache a caller passed back ("model_kwargs are not used by the model:
    # ['cache']"), so a conversation could not reuse its prefix's cache.
    from transformers import DynamicCache

    ids = torch.tensor([[0, 0, 7, 8, 9], [3, 4, 5, 6, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(do_sample=False, pad_token_id=0)
    whole = model.generate(ids, attention_mask=mask, max_new_tokens=6, **kw)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True,
                           past_key_values=DynamicCache(), **kw)
    seq = first.sequences
    cache = getattr(first, "cache", None) or first.past_key_values
    more = model.generate(seq, attention_mask=torch.cat((mask, torch.ones_like(seq[:, 5:])), 1),
                          past_key_values=cache, max_new_tokens=3, **kw)
    assert more.tolist() == whole.tolist()
