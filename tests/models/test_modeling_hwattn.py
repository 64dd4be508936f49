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


SHAPE = dict(attention="gla", vocab_size=64, n_layers=2, max_seq_len=32)


def _fields(config) -> dict:
    from hwattn.models.modeling_hwattn import MODEL_FIELDS

    return {k: getattr(config, k) for k in MODEL_FIELDS}


def test_transformers_names_of_the_fields_derive_what_the_fields_do():
    # Were set after the derived fields: hidden_size=256 with num_attention_heads=4 kept the
    # head_dim (16) of the default dim 128 over 8 heads, so the model built was another one.
    aliased = HwattnConfig(attention="gla", vocab_size=64, hidden_size=256, num_attention_heads=4,
                           num_hidden_layers=3, max_position_embeddings=64, rms_norm_eps=1e-6)
    named = HwattnConfig(attention="gla", vocab_size=64, dim=256, n_heads=4, n_layers=3,
                         max_seq_len=64, norm_eps=1e-6)
    assert _fields(aliased) == _fields(named) and aliased.head_dim == 64
    with pytest.raises(ValueError, match="hidden_size.*dim"):
        HwattnConfig(dim=128, hidden_size=256, **SHAPE)


def test_tie_word_embeddings_is_not_ignored():
    # Was: tie_embeddings kept its default (True) and the model tied its output matrix to the
    # embedding although transformers' own name for the flag said not to.
    config = HwattnConfig(tie_word_embeddings=False, dim=64, n_heads=4, **SHAPE)
    assert config.tie_embeddings is False
    net = HwattnForCausalLM(config)
    assert net.model.output.weight is not net.model.tok_embeddings.weight
    with pytest.raises(ValueError, match="tie_word_embeddings.*tie_embeddings"):
        HwattnConfig(tie_embeddings=True, tie_word_embeddings=False, **SHAPE)
    config = HwattnConfig(dim=64, n_heads=4, **SHAPE)
    config.tie_word_embeddings = False  # as from_pretrained(..., tie_word_embeddings=False) does
    with pytest.raises(ValueError, match="tie_word_embeddings.*tie_embeddings"):
        HwattnForCausalLM(config)


def test_rope_parameters_are_read_or_refused():
    # Were accepted and ignored: the model rotated with the default rope_theta (500000),
    # unscaled, whatever transformers' rope_parameters / rope_scaling said.
    config = HwattnConfig(rope_parameters={"rope_type": "default", "rope_theta": 77.0},
                          dim=64, n_heads=4, **SHAPE)
    assert config.rope_theta == 77.0
    for key in ("rope_parameters", "rope_scaling"):
        with pytest.raises(ValueError, match=f"{key}.*linear"):
            HwattnConfig(**{key: {"rope_type": "linear", "factor": 2.0}}, dim=64, n_heads=4,
                         **SHAPE)
    with pytest.raises(ValueError, match="rope_theta"):
        HwattnConfig(rope_theta=10.0, rope_parameters={"rope_type": "default", "rope_theta": 77.0},
                     dim=64, n_heads=4, **SHAPE)
