"""Hostile model configurations and checkpoint folders: each is refused with a ValueError
naming the bad field, tensor or file, and a failed save leaves the checkpoint it was
replacing whole. Each case records what happened before it was refused."""

from __future__ import annotations

import json

import pytest
import torch

from hwattn import ModelConfig, Transformer
from hwattn.models.checkpoint import load_checkpoint, save_checkpoint

pytest.importorskip("safetensors")

SMALL = dict(n_layers=1, dim=64, n_heads=4, mha_hidden_dim=192, vocab_size=256)


def _model(attention: str = "gqa", **kw) -> Transformer:
    return Transformer(ModelConfig.from_preset("tiny", attention=attention, **{**SMALL, **kw}))


def _edit_config(path, **changes):
    doc = json.loads((path / "config.json").read_text())
    doc.update(changes)
    for k in [k for k, v in changes.items() if v is _DROP]:
        del doc[k]
    (path / "config.json").write_text(json.dumps(doc))


def _edit_weights(path, fn):
    from safetensors.torch import load_file, save_file

    state = dict(load_file(str(path / "model.safetensors")))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


_DROP = object()
TOKENS = torch.arange(8)[None]


# --- ModelConfig values -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    # Observed: TypeError "empty(): argument 'size' ... must be tuple of ints" from torch.
    (dict(n_heads=4.0), "n_heads"),
    (dict(head_dim=16.0), "head_dim"),
    (dict(attention="gqa", n_kv_heads=2.0), "n_kv_heads"),
    (dict(attention="gla", q_latent_dim=64.5), "q_latent_dim"),
    # Observed: TypeError "'<=' not supported between instances of 'str' and 'int'".
    (dict(vocab_size="256"), "vocab_size"),
    (dict(dim=None), "dim"),
    # Observed: accepted; the string is truthy, so "false" ties and "no" adds biases.
    (dict(tie_embeddings="false"), "tie_embeddings"),
    (dict(attention="gta", attention_bias="no"), "attention_bias"),
    (dict(max_seq_len=64.0), "max_seq_len"),
    (dict(rope_theta="1e4"), "rope_theta"),
    (dict(n_layers=True), "n_layers"),
])
def test_wrongly_typed_config_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**SMALL, **kwargs})


@pytest.mark.parametrize("kwargs, field", [
    # Observed: accepted; the model's RoPE tables are NaN (0 ** -x is inf, inf * 0 is NaN).
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rope_theta=-10_000.0), "rope_theta"),
    (dict(rope_theta=float("nan")), "rope_theta"),
    # Observed: accepted; RMSNorm takes the root of a negative number or NaN: NaN logits.
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
])
def test_config_values_that_make_nan_models_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**SMALL, **kwargs})


def test_integer_like_sizes_are_kept_as_ints():
    np = pytest.importorskip("numpy")
    cfg = ModelConfig(**{**SMALL, "n_heads": np.int64(4)})
    assert type(cfg.n_heads) is int and cfg.head_dim == 16
    json.dumps(cfg.to_dict())  # a checkpoint's config.json can hold it


# --- config.json --------------------------------------------------------------------------

def test_float_head_count_in_config_json_names_the_file_and_field(tmp_path):
    # Observed: TypeError from torch while building the model, naming neither.
    save_checkpoint(_model(), tmp_path)
    _edit_config(tmp_path, n_heads=4.0)
    with pytest.raises(ValueError, match=r"config\.json.*n_heads"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("field", ["rope_theta", "norm_eps", "max_seq_len", "tie_embeddings"])
def test_config_json_missing_a_model_field_is_refused(tmp_path, field):
    # Observed: the default (rope_theta 500000, norm_eps 1e-5, max_seq_len 1024, tied) stood
    # in silently: a model loaded that computes something else than the one saved (untied:
    # its output matrix was replaced by the embeddings).
    save_checkpoint(_model(rope_theta=10_000.0, norm_eps=1e-6, max_seq_len=64,
                           tie_embeddings=False), tmp_path)
    _edit_config(tmp_path, **{field: _DROP})
    with pytest.raises(ValueError, match=rf"config\.json.*{field}"):
        load_checkpoint(tmp_path)


def test_config_json_of_another_model_type_is_refused(tmp_path):
    # Observed: read as an hwattn config (unknown keys dropped, defaults filled in).
    save_checkpoint(_model(), tmp_path)
    _edit_config(tmp_path, model_type="llama")
    with pytest.raises(ValueError, match=r"config\.json.*model_type.*llama"):
        load_checkpoint(tmp_path)


# --- model.safetensors --------------------------------------------------------------------

def test_tensor_outside_the_model_prefix_is_refused(tmp_path):
    # Observed: dropped without a word.
    save_checkpoint(_model(), tmp_path)
    _edit_weights(tmp_path, lambda sd: sd.update({"lm_head.weight": torch.zeros(256, 64)}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*lm_head\.weight"):
        load_checkpoint(tmp_path)


def test_untied_output_matrix_under_a_tied_config_is_refused(tmp_path):
    # Observed: the stored output matrix was replaced by the embeddings without a word.
    model = _model()
    save_checkpoint(model, tmp_path)
    _edit_weights(tmp_path, lambda sd: sd.update({"model.output.weight": torch.randn(256, 64)}))
    with pytest.raises(ValueError, match=r"output\.weight.*tie_embeddings"):
        load_checkpoint(tmp_path)
    # A copy equal to the embeddings (tools that store tied matrices twice) loses nothing.
    _edit_weights(tmp_path, lambda sd: sd.update(
        {"model.output.weight": sd["model.tok_embeddings.weight"].clone()}))
    loaded = load_checkpoint(tmp_path)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), model(TOKENS), rtol=0, atol=0)


def test_mixed_dtype_weights_are_refused_unless_a_dtype_is_given(tmp_path):
    # Observed: loaded; the first forward failed inside torch ("expected m1 and m2 to have
    # the same dtype, but got: float != c10::Half").
    save_checkpoint(_model(), tmp_path)
    key = "model.layers.0.attn.wq.weight"
    _edit_weights(tmp_path, lambda sd: sd.update({key: sd[key].half()}))
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.wq\.weight.*float16.*dtype="):
        load_checkpoint(tmp_path)
    with torch.no_grad():
        assert load_checkpoint(tmp_path, dtype=torch.float32)(TOKENS).dtype == torch.float32


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, value, dtype):
    # Observed: loaded without a word; every logit of the model came out NaN.
    save_checkpoint(_model(), tmp_path)
    key = "model.layers.0.attn.wk.weight"

    def poison(sd):
        sd[key] = sd[key].clone()
        sd[key][3, 5] = value

    _edit_weights(tmp_path, poison)
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.layers\.0\.attn\.wk\.weight "
                                         r"holds 1 non-finite value.*\(3, 5\)"):
        load_checkpoint(tmp_path, dtype=dtype)


def test_weights_that_overflow_the_asked_dtype_are_refused(tmp_path):
    # Finite in fp32 but past fp16's largest value (65504): loading as fp16 made it inf.
    model = _model()
    save_checkpoint(model, tmp_path)
    key = "model.layers.0.ffn.w1.weight"

    def big(sd):
        sd[key] = sd[key].clone()
        sd[key][0, 1] = 1e6

    _edit_weights(tmp_path, big)
    with pytest.raises(ValueError, match=r"ffn\.w1\.weight.*1e\+06.*float16"):
        load_checkpoint(tmp_path, dtype=torch.float16)
    # The same weights load as they are in fp32 and bf16, whose range holds them.
    for dtype in (None, torch.float32, torch.bfloat16):
        loaded = load_checkpoint(tmp_path, dtype=dtype)
        assert loaded.layers[0].ffn.w1.weight[0, 1].item() == pytest.approx(1e6, rel=1e-2)


def test_engine_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    from hwattn.engine import LLM

    save_checkpoint(_model(), tmp_path)
    _edit_weights(tmp_path, lambda sd: sd.update(
        {"model.norm.weight": torch.full_like(sd["model.norm.weight"], float("nan"))}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight holds 64 non-finite values"):
        LLM(str(tmp_path), device="cpu", page_size=8, num_pages=64)


# --- saving -------------------------------------------------------------------------------

def test_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    # Observed: model.safetensors was overwritten in place; a save that failed half-way
    # (here: the disk fills up) left a truncated file and the old checkpoint was lost.
    import safetensors.torch

    old = _model(attention="gqa")
    save_checkpoint(old, tmp_path)
    real = safetensors.torch.save_file

    def disk_full(state, filename, metadata=None):
        real(state, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(_model(attention="gla"), tmp_path)
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == old.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS), old(TOKENS), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "modeling_hwattn.py"]


def _two_saves():
    """Two models of one shape with other weights, and the config.json extras telling their
    saves apart: a mix of the two loads without a word unless the save prevents it."""
    old, new = _model(), _model()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.5)
    return (old, {"note": "old"}), (new, {"note": "new"})


def _loaded(path):
    """(note, weights) of the checkpoint at `path`."""
    weights = {k: v.clone() for k, v in load_checkpoint(path).state_dict().items()}
    return json.loads((path / "config.json").read_text())["note"], weights


def test_a_save_failing_between_its_renames_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    # Observed: the files were renamed into place one after another, so a failure after
    # model.safetensors had been replaced left the new weights beside the old config.json (and
    # its `extra`), a checkpoint of neither save that loaded without a word.
    import hwattn.models.checkpoint as ckpt

    (old, old_extra), (new, new_extra) = _two_saves()
    save_checkpoint(old, tmp_path, extra=old_extra)
    want = _loaded(tmp_path)
    real = ckpt.os.replace

    def fail_at_config(src, dst):
        if str(src).endswith(".config.json.partial"):
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", fail_at_config)
    with pytest.raises(OSError, match="Input/output"):
        save_checkpoint(new, tmp_path, extra=new_extra)
    monkeypatch.undo()
    note, weights = _loaded(tmp_path)
    assert note == "old" and all(torch.equal(weights[k], want[1][k]) for k in weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "modeling_hwattn.py"]


def test_a_save_killed_between_its_renames_never_leaves_a_mix_of_two_saves(
        tmp_path, monkeypatch):
    # A kill runs no clean-up: the folder as it stands before each rename is what a kill
    # there leaves. Each must load as the old save or the new one, or be refused by name.
    # Observed: after model.safetensors was renamed, the folder loaded the new weights under
    # the old config.json.
    import shutil

    import hwattn.models.checkpoint as ckpt

    (old, old_extra), (new, new_extra) = _two_saves()
    save_checkpoint(new, tmp_path / "want-new", extra=new_extra)
    save_checkpoint(old, tmp_path / "run", extra=old_extra)
    saves = {"old": _loaded(tmp_path / "run"), "new": _loaded(tmp_path / "want-new")}
    real, kills = ckpt.os.replace, []

    def snapshot_then_replace(src, dst):
        kills.append(shutil.copytree(tmp_path / "run", tmp_path / f"kill-{len(kills)}"))
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", snapshot_then_replace)
    save_checkpoint(new, tmp_path / "run", extra=new_extra)
    monkeypatch.undo()
    kills.append(tmp_path / "run")
    assert len(kills) > 2
    for folder in kills:
        try:
            note, weights = _loaded(folder)
        except ValueError as err:
            assert "interrupted" in str(err), err
            continue
        assert all(torch.equal(weights[k], saves[note][1][k]) for k in weights), \
            (folder.name, f"config.json of the {note} save beside other weights")
    assert _loaded(tmp_path / "run")[0] == "new"


def test_unserialisable_extra_is_named_and_loses_nothing(tmp_path):
    # Observed: TypeError "Object of type set is not JSON serializable" after the new
    # weights had replaced the old ones: the folder held one model's weights under the
    # other's config.json and loaded neither.
    old = _model(attention="gqa")
    save_checkpoint(old, tmp_path)
    with pytest.raises(ValueError, match="note"):
        save_checkpoint(_model(attention="gla"), tmp_path, extra={"note": {1, 2}})
    assert load_checkpoint(tmp_path).config == old.config


@pytest.mark.parametrize("key", ["dim", "attention", "model_type", "tie_word_embeddings"])
def test_extra_may_not_override_the_model_config(tmp_path, key):
    # Observed: written over the model's own value, so config.json no longer described the
    # weights beside it.
    with pytest.raises(ValueError, match=key):
        save_checkpoint(_model(), tmp_path, extra={key: "x"})
    assert not (tmp_path / "model.safetensors").exists()


def test_saving_an_untied_output_matrix_under_a_tied_config_is_refused(tmp_path):
    # Observed: saved without it (a tied checkpoint stores the embeddings once); the loaded
    # model's output matrix was the embeddings. Here the model was loaded with
    # load_state_dict(assign=True), which replaces both parameters and leaves them apart.
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["output.weight"] = torch.randn(256, 64)
    model.load_state_dict(state, assign=True)
    with pytest.raises(ValueError, match=r"output\.weight.*tie_embeddings"):
        save_checkpoint(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("attention", ["gqa", "gla"])
def test_saving_a_tensor_parallel_shard_is_refused_and_nothing_written(tmp_path, attention):
    # Observed: saved; config.json described the whole model beside one rank's slices, and
    # only loading it failed ("size mismatch for layers.0.attn.wq.weight").
    from hwattn.parallel import shard_model

    model = shard_model(_model(attention), 0, 2)
    with pytest.raises(ValueError, match=r"tensor-parallel shard.*layers\.0\.attn\."):
        save_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_saving_into_a_file_is_refused(tmp_path):
    # Observed: FileExistsError "[Errno 17] File exists".
    target = tmp_path / "weights.bin"
    target.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="is a file"):
        save_checkpoint(_model(), target)
    assert target.read_bytes() == b"keep me"


# --- the paper's checkpoints (hwattn.models.convert) --------------------------------------

def _paper_dir(tmp_path, variant="gla", config=None, state=None):
    from safetensors.torch import save_file

    from tests.models.test_convert import their_config, their_state_dict

    src = tmp_path / "theirs"
    src.mkdir(exist_ok=True)
    sd = {k: v.float() for k, v in their_state_dict(variant).items()}
    sd.update(state or {})
    save_file(sd, str(src / "model.safetensors"))
    (src / "config.json").write_text(config if isinstance(config, str)
                                     else json.dumps({**their_config(variant), **(config or {})}))
    return src


@pytest.mark.parametrize("config, match", [
    # Observed: JSONDecodeError "Expecting property name ..." naming no file.
    ("{oops", r"config\.json"),
    # Observed: AttributeError "'list' object has no attribute 'get'".
    ("[1, 2]", r"config\.json"),
    # Observed: KeyError 'hidden_size'.
    ({"hidden_size": _DROP}, "hidden_size"),
])
def test_paper_config_json_errors_name_the_file_or_key(tmp_path, config, match):
    from hwattn.models.convert import load_paper_checkpoint
    from tests.models.test_convert import their_config

    if isinstance(config, dict):
        config = json.dumps({k: v for k, v in their_config("gla").items() if k not in config})
    with pytest.raises(ValueError, match=match):
        load_paper_checkpoint(_paper_dir(tmp_path, config=config))


@pytest.mark.parametrize("config, match", [
    # Observed: ZeroDivisionError "integer division or modulo by zero".
    ({"num_attention_heads": 0}, "num_attention_heads"),
    # Observed: TypeError "unsupported operand type(s) for //: 'str' and 'int'".
    ({"hidden_size": "64"}, "hidden_size"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers"),
])
def test_paper_config_values_of_the_wrong_kind_are_named(tmp_path, config, match):
    from hwattn.models.convert import load_paper_checkpoint

    with pytest.raises(ValueError, match=match):
        load_paper_checkpoint(_paper_dir(tmp_path, config=config))


@pytest.mark.parametrize("eos", [["2"], "2", 2.5, True, -1, 128])
def test_paper_eos_token_id_that_is_no_token_is_refused_and_nothing_written(tmp_path, capsys, eos):
    # Observed: written to config.json and generation_config.json as the end-of-text id,
    # which generate() cannot use.
    from hwattn.cli import main

    src = _paper_dir(tmp_path, config={"eos_token_id": eos})
    assert main(["convert", str(src), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "eos_token_id" in err, err
    assert not (tmp_path / "ours").exists()


def test_paper_empty_eos_token_id_list_converts_without_one(tmp_path, capsys):
    # Observed: IndexError "list index out of range", a traceback.
    from hwattn.cli import main

    src = _paper_dir(tmp_path, config={"eos_token_id": []})
    assert main(["convert", str(src), str(tmp_path / "ours")]) == 0
    assert "eos_token_id" not in json.loads((tmp_path / "ours" / "config.json").read_text())


def test_paper_truncated_weights_name_the_file(tmp_path):
    # Observed: SafetensorError "incomplete metadata, file not fully covered", no file name.
    from hwattn.models.convert import load_paper_checkpoint

    src = _paper_dir(tmp_path)
    blob = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_paper_checkpoint(src)


@pytest.mark.parametrize("variant, key, shape", [
    # Observed: RuntimeError "shape '[2, 2, 16, 32]' is invalid for input of size 1920".
    ("gla", "model.layers.0.self_attn.W_ukv_1.weight", (60, 32)),
    # Observed: RuntimeError "Error(s) in loading state_dict for Transformer: size mismatch".
    ("gta", "model.layers.1.self_attn.q_proj.weight", (60, 64)),
])
def test_paper_weights_of_the_wrong_shape_are_named(tmp_path, variant, key, shape):
    from hwattn.models.convert import load_paper_checkpoint

    src = _paper_dir(tmp_path, variant, state={key: torch.zeros(shape)})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_paper_checkpoint(src)


def test_paper_non_finite_weights_are_named(tmp_path):
    # Observed: converted without a word into a model whose every output was NaN.
    from hwattn.models.convert import load_paper_checkpoint

    norm = torch.ones(64)
    norm[7] = float("inf")
    src = _paper_dir(tmp_path, state={"model.norm.weight": norm})
    with pytest.raises(ValueError, match=r"model\.safetensors: model\.norm\.weight holds 1 "
                                         r"non-finite value.*\(7,\)"):
        load_paper_checkpoint(src)


def test_paper_tensor_in_two_weight_files_is_refused(tmp_path):
    # Observed: the later file's tensor replaced the earlier one's without a word (a stray
    # copy beside the weights silently zeroed the final norm).
    from safetensors.torch import save_file

    from hwattn.models.convert import load_paper_checkpoint

    src = _paper_dir(tmp_path)
    save_file({"model.norm.weight": torch.zeros(64)}, str(src / "z-stray.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*z-stray\.safetensors"):
        load_paper_checkpoint(src)



_ATTN = "model.layers.{}.self_attn."


@pytest.mark.parametrize("variant, drop, add, named", [
    # Observed (each): RuntimeError "Error(s) in loading state_dict for Transformer: Missing
    # key(s) in state_dict: "layers.1.attn.wk_rope.bias"", hwattn's name, not the file's.
    ("gta", _ATTN.format(1) + "W_rope_k.bias", None, _ATTN.format(1) + "W_rope_k.bias"),
    ("gla", _ATTN.format(0) + "W_dQ.bias", None, _ATTN.format(0) + "W_dQ.bias"),
    ("gla", _ATTN.format(1) + "W_dKV.bias", None, _ATTN.format(1) + "W_dKV.bias"),
    # Observed: RuntimeError "Unexpected key(s) in state_dict: "layers.0.attn.wkv.bias"".
    ("gta", None, _ATTN.format(0) + "kv_proj.bias", _ATTN.format(0) + "kv_proj.bias"),
    # Observed: ValueError "layers.0.attn.b_uk has shape (2, 16); the config implies (4, 16)".
    ("gla", _ATTN.format(0) + "W_ukv_2.bias", None, _ATTN.format(0) + "W_ukv_2.bias"),
])
def test_paper_biases_that_differ_from_layer_0s_are_named(tmp_path, variant, drop, add, named):
    from hwattn.models.convert import load_paper_checkpoint

    def edit(state):
        state.pop(drop, None)
        if add:
            state[add] = torch.zeros(32)

    src = _paper_dir(tmp_path, variant)
    _edit_weights(src, edit)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_paper_checkpoint(src)


def test_paper_lm_head_that_differs_from_tied_embeddings_is_refused(tmp_path):
    # Observed: converted as tied: lm_head.weight dropped without a word (hwattn's own
    # checkpoints refuse the same contradiction).
    from hwattn.models.convert import load_paper_checkpoint

    src = _paper_dir(tmp_path, config={"tie_word_embeddings": True})
    with pytest.raises(ValueError, match=r"lm_head\.weight.*tie_word_embeddings"):
        load_paper_checkpoint(src)
    _edit_weights(src, lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    model = load_paper_checkpoint(src)  # the same matrix twice is one tied matrix
    assert model.config.tie_embeddings and model.output.weight is model.tok_embeddings.weight

# --- transformers integration -------------------------------------------------------------

@pytest.mark.parametrize("fields, field", [
    # Observed: built; the first forward failed in SDPA ("Number of heads in key and value
    # must divide the number of heads in query").
    (dict(attention="gqa", n_kv_heads=3, rope_dim=16), "n_kv_heads"),
    # Observed: built; the first forward failed ("The size of tensor a (8) must match ...").
    (dict(attention="gta", n_kv_heads=2, rope_dim=32), "rope_dim"),
    (dict(attention="gqa", n_kv_heads=2, rope_dim=8), "rope_dim"),
    (dict(attention="gla", n_latent_heads=3, latent_dim=32, q_latent_dim=64, rope_dim=8),
     "n_latent_heads"),
    (dict(attention="gqa", n_kv_heads=2, rope_dim=16, dim=0), "dim"),
])
def test_hf_config_that_cannot_run_is_refused_when_built(fields, field):
    pytest.importorskip("transformers")
    from hwattn.models.modeling_hwattn import HwattnConfig, HwattnForCausalLM

    config = HwattnConfig(**{"n_heads": 8, "head_dim": 16, "hidden_dim": 64, "vocab_size": 256,
                             "n_layers": 1, **fields})
    with pytest.raises(ValueError, match=field):
        HwattnForCausalLM(config)
