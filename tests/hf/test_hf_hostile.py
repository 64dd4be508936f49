"""transformers integration under arguments the other tests do not send: chunked prefill,
position_ids given to generate(), misspelt or unsupported forward arguments, the loss
normalisation transformers' Trainer asks for, and return_dict=False."""

from __future__ import annotations

import pytest
import torch

from tests.hf.test_hf import _random_checkpoint


def _load(tmp_path, variant):
    import transformers

    ckpt, ref = _random_checkpoint(tmp_path, variant)
    return transformers.AutoModelForCausalLM.from_pretrained(ckpt), ref


@pytest.mark.parametrize("variant", ["gqa-2", "gta-4", "mla"])
@pytest.mark.parametrize("masked", [True, False])
def test_chunked_prefill_generates_what_one_prefill_does(tmp_path, variant, masked):
    """generate(prefill_chunk_size=...) feeds the prompt chunk by chunk through the cache:
    each chunk (not the whole sequence) comes to prepare_inputs_for_generation."""
    import transformers

    if not hasattr(transformers.GenerationConfig(), "prefill_chunk_size"):
        pytest.skip("this transformers has no chunked prefill")
    hf, _ = _load(tmp_path, variant)
    prompt = torch.randint(1, 512, (2, 10), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    if masked:
        mask = torch.ones_like(prompt)
        mask[0, :3] = 0  # left padding
        kw["attention_mask"] = mask
    whole = hf.generate(prompt, **kw)
    for chunk in (3, 4, 10):
        assert torch.equal(hf.generate(prompt, prefill_chunk_size=chunk, **kw), whole), chunk


@pytest.mark.parametrize("variant", ["gqa-2", "gla-2"])
def test_generate_uses_the_position_ids_it_is_given(tmp_path, variant):
    """position_ids passed to generate() (transformers extends them each step) set the
    positions, as they do in forward(); they are not replaced by 0..T-1."""
    hf, _ = _load(tmp_path, variant)
    prompt = torch.randint(1, 512, (2, 5), generator=torch.Generator().manual_seed(7))
    # RoPE sees only distances: a gap (not a shift) changes what the model reads.
    given = torch.tensor([0, 1, 2, 30, 31])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    out = hf.generate(prompt, position_ids=given[None].expand(2, 5), **kw)
    plain = hf.generate(prompt, **kw)
    with torch.no_grad():
        for k, step in enumerate(out.logits):
            pos = torch.cat((given, torch.arange(32, 32 + k)))[None].expand(2, -1)
            want = hf(out.sequences[:, :5 + k], position_ids=pos).logits[:, -1]
            torch.testing.assert_close(step, want, rtol=1e-5, atol=1e-5)
    assert (plain.logits[0] - out.logits[0]).abs().max() > 1e-3  # the gap is seen


@pytest.mark.parametrize("name", ["attn_mask", "token_type_ids", "head_mask", "labels_mask"])
def test_forward_refuses_arguments_it_does_not_take(tmp_path, name):
    hf, _ = _load(tmp_path, "gta-4")
    prompt = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match=name):
        hf(prompt, **{name: torch.zeros_like(prompt)})


def test_cache_position_must_follow_the_cache(tmp_path):
    import transformers

    hf, _ = _load(tmp_path, "gqa-2")
    prompt = torch.randint(1, 512, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = hf(prompt).logits
        assert torch.equal(hf(prompt, cache_position=torch.arange(6)).logits, want)
        cache = transformers.DynamicCache()
        hf(prompt[:, :4], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="cache_position"):
            hf(prompt[:, 4:], past_key_values=cache, cache_position=torch.arange(2))


def test_num_items_in_batch_normalises_the_summed_loss(tmp_path):
    """transformers' Trainer passes num_items_in_batch (the label count over all accumulated
    micro-batches) to a forward taking **kwargs and then does not divide the loss by the
    accumulation steps itself: the model must return sum / num_items_in_batch."""
    hf, _ = _load(tmp_path, "gqa-2")
    ids = torch.randint(1, 512, (2, 7), generator=torch.Generator().manual_seed(9))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        logits = hf(ids).logits
        total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                  labels[:, 1:].flatten(), reduction="sum")
        for n in (40, torch.tensor(40)):
            loss = hf(ids, labels=labels, num_items_in_batch=n).loss
            torch.testing.assert_close(loss, total / 40)
        torch.testing.assert_close(hf(ids, labels=labels).loss, total / labels[:, 1:].ne(-100).sum())


def test_return_dict_false_returns_a_tuple(tmp_path):
    hf, _ = _load(tmp_path, "gta-4")
    ids = torch.randint(1, 512, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = hf(ids, labels=ids)
        out = hf(ids, labels=ids, return_dict=False)
    assert type(out) is tuple and len(out) == 2
    torch.testing.assert_close(out[0], full.loss)
    assert torch.equal(out[1], full.logits)


def test_weights_missing_from_the_checkpoint_are_initialised_not_left_as_memory(tmp_path):
    """transformers 5 builds the model on the meta device and initialises only the weights
    the checkpoint lacks (its load report names them), through `_init_weights`: they come out
    as a fresh hwattn model's (unit norms, zero biases, N(0, 0.02) with the output projections
    scaled), not as whatever memory they were allocated in; the others keep the file's values."""
    import math

    import transformers
    from safetensors.torch import load_file, save_file

    ckpt, ref = _random_checkpoint(tmp_path, "gla-2", attention_bias=True)
    state = load_file(ckpt / "model.safetensors")
    gone = ["model.layers.0.attn.wo.weight", "model.layers.0.attn.w_uk",
            "model.layers.0.attn.kv_norm.weight", "model.layers.0.attn.b_uv",
            "model.layers.1.ffn.w2.weight"]
    save_file({k: v for k, v in state.items() if k not in gone}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    params = dict(hf.named_parameters())
    out_std = 0.02 / math.sqrt(2 * hf.config.n_layers)
    for name, std in (("model.layers.0.attn.wo.weight", out_std),
                      ("model.layers.1.ffn.w2.weight", out_std),
                      ("model.layers.0.attn.w_uk", 0.02)):
        assert 0.8 * std < params[name].std().item() < 1.2 * std, name
    assert torch.equal(params["model.layers.0.attn.kv_norm.weight"],
                       torch.ones_like(params["model.layers.0.attn.kv_norm.weight"]))
    assert not params["model.layers.0.attn.b_uv"].any()
    for k, v in ref.state_dict().items():
        if "model." + k not in gone:
            assert torch.equal(hf.model.state_dict()[k], v), k
