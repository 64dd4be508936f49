"""Model checkpoints in the Hugging Face layout: `config.json` + `model.safetensors`, plus
`generation_config.json` and `modeling_hwattn.py`.

config.json holds every `ModelConfig` field at top level plus `model_type: "hwattn"`,
`architectures`, the end-of-text id when the tokenizer is known, and an `auto_map` naming the
classes in the copied `modeling_hwattn.py`, so `transformers` loads the directory either after
`import hwattn` or, without hwattn, with `trust_remote_code=True`. Weights are the
`Transformer` state dict under the prefix `model.` (the Hugging Face model keeps the decoder as
its `model` attribute); the tied output matrix is stored once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import torch

from hwattn.config import ModelConfig
from hwattn.models.transformer import Transformer

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
PREFIX = "model."
# The self-contained transformers classes, copied into every checkpoint.
MODELING_FILE = Path(__file__).with_name("modeling_hwattn.py")
AUTO_MAP = {"AutoConfig": "modeling_hwattn.HwattnConfig",
            "AutoModelForCausalLM": "modeling_hwattn.HwattnForCausalLM"}
# The `ModelConfig` fields every hwattn config.json has held since the format began; a file
# without one would get the default in place of the saved model's value. Fields added later
# (hidden_multiple, attention_bias) default to what the older checkpoints meant.
REQUIRED_FIELDS = ("attention", "vocab_size", "dim", "n_layers", "n_heads", "head_dim",
                   "n_kv_heads", "n_latent_heads", "latent_dim", "q_latent_dim", "rope_dim",
                   "mha_hidden_dim", "hidden_dim", "max_seq_len", "rope_theta", "norm_eps",
                   "tie_embeddings")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("checkpoints need safetensors: pip install 'hwattn[train]'") from err
    return safetensors.torch


def special_tokens(eos_token_id: int | None) -> dict:
    """The token ids `generate()` needs: hwattn's tokenizers have one end-of-text token, which
    also opens a document and pads a batch."""
    if eos_token_id is None:
        return {}
    return {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": eos_token_id}


def config_document(config: ModelConfig, eos_token_id: int | None = None) -> dict:
    doc = config.to_dict()
    doc.update(model_type="hwattn", architectures=["HwattnForCausalLM"],
               tie_word_embeddings=config.tie_embeddings, auto_map=dict(AUTO_MAP),
               **special_tokens(eos_token_id))
    return doc


def _config_text(config: ModelConfig, eos_token_id: int | None, extra: dict) -> str:
    """config.json's text; ValueError naming an `extra` key that would overwrite what
    describes the weights, or whose value JSON cannot hold."""
    doc = config_document(config, eos_token_id)
    reserved = sorted(set(extra) & set(config_document(config, 0)))
    if reserved:
        raise ValueError(f"extra keys {reserved} would overwrite config.json's description of "
                         "the model (its fields, model_type, auto_map, token ids); choose "
                         "other names, or pass eos_token_id= for the token ids")
    for key, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"extra[{key!r}] cannot be written to config.json: {err}") from None
    doc.update(extra)
    return json.dumps(doc, indent=2) + "\n"


def save_checkpoint(model: Transformer, path: str | Path, extra: dict | None = None,
                    eos_token_id: int | None = None) -> Path:
    """Write `model` to directory `path` (created); `extra` keys are added to config.json.
    `eos_token_id` (the tokenizer's end-of-text id) goes to config.json and
    generation_config.json, so `generate()` stops there.

    Every file is written under a temporary name first and renamed into place only when all
    are written, so a save that fails (a full disk, an `extra` value JSON cannot hold) leaves
    a checkpoint already at `path` as it was. The old files step aside (config.json first)
    before the new come in (config.json last), and are put back if a rename fails: a save
    killed between its renames leaves no config.json (`load_config` names the interrupted
    save), never one save's config.json beside another's weights."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder: a checkpoint is a folder")
    config_text = _config_text(model.config, eos_token_id, dict(extra or {}))
    emb, out = model.tok_embeddings.weight, model.output.weight
    if model.config.tie_embeddings and out is not emb and not (
            out.shape == emb.shape and torch.equal(out.detach(), emb.detach().to(out.dtype))):
        raise ValueError("the model's output.weight is no longer tok_embeddings.weight although "
                         "its config says tie_embeddings=True, and a tied checkpoint stores one "
                         "matrix: saving would drop it; re-tie them (model.output.weight = "
                         "model.tok_embeddings.weight) or save a config with "
                         "tie_embeddings=False")
    generation_text = json.dumps(special_tokens(eos_token_id), indent=2) + "\n"
    _check_fits_config(model)
    state = {PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_embeddings and k == "output.weight")}
    path.mkdir(parents=True, exist_ok=True)
    names = (WEIGHTS_NAME, GENERATION_CONFIG_NAME, MODELING_FILE.name, CONFIG_NAME)
    staged = {name: path / f".{name}.partial" for name in names}
    aside = {name: path / f".{name}.old" for name in names}
    moved, placed = [], []
    try:
        _safetensors().save_file(state, str(staged[WEIGHTS_NAME]), metadata={"format": "pt"})
        staged[CONFIG_NAME].write_text(config_text)
        staged[GENERATION_CONFIG_NAME].write_text(generation_text)
        shutil.copyfile(MODELING_FILE, staged[MODELING_FILE.name])
        for name in (CONFIG_NAME, *names[:-1]):
            if (path / name).exists():
                os.replace(path / name, aside[name])
                moved.append(name)
        for name in names:
            os.replace(staged[name], path / name)
            placed.append(name)
        for name in names:  # the new checkpoint is whole: the old files go
            aside[name].unlink(missing_ok=True)
    except BaseException:
        for name in placed:
            if name not in moved:
                (path / name).unlink(missing_ok=True)
        for name in reversed(moved):  # config.json back last
            os.replace(aside[name], path / name)
        raise
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return path


def _check_fits_config(model: Transformer) -> None:
    """ValueError naming the first tensor of `model`'s state dict that the model its
    config describes would not have, lack or shape otherwise (a tensor-parallel shard, whose
    layers hold a slice of each projection, or a model edited by hand): saved, config.json
    would describe other weights than model.safetensors holds."""
    with torch.device("meta"):
        want = Transformer(model.config).state_dict()
    have = model.state_dict()
    shard = f" (a tensor-parallel shard, tp_world={model.tp_world})" if hasattr(model, "tp_world") else ""
    for key in sorted(set(want) | set(have)):
        if key not in have or key not in want or have[key].shape != want[key].shape:
            got = tuple(have[key].shape) if key in have else "nothing"
            expected = tuple(want[key].shape) if key in want else "no such tensor"
            raise ValueError(f"the model{shard} does not fit its config: {key} is {got} where "
                             f"the config gives {expected}; config.json would not describe "
                             "the saved weights")


def read_json_object(file: Path) -> dict:
    """The JSON object in `file` (a config.json); ValueError naming the file when it is not
    valid JSON or holds something else."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(doc).__name__}")
    return doc


def load_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of checkpoint directory `path`; ValueError naming the file when it
    is missing or unreadable."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        if (Path(path) / f".{CONFIG_NAME}.old").is_file():  # left by `save_checkpoint`
            raise ValueError(f"{path} holds no {CONFIG_NAME}: a save into it was interrupted "
                             f"between its renames (the previous one is .{CONFIG_NAME}.old); "
                             "save the checkpoint again")
        raise ValueError(f"{path} is not an hwattn checkpoint: no {CONFIG_NAME}")
    doc = read_json_object(file)
    if doc.get("model_type", "hwattn") != "hwattn":
        raise ValueError(f"{file}: model_type is {doc['model_type']!r}, not 'hwattn'; the "
                         "paper's GTA/GLA checkpoints convert with `hwattn convert`")
    missing = [k for k in REQUIRED_FIELDS if k not in doc]
    if missing:
        raise ValueError(f"{file}: missing {missing}; an hwattn config.json holds every model "
                         "field, and defaults would silently stand in for the saved model's")
    try:
        return ModelConfig.from_dict(doc)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: not a valid model configuration ({err})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `path/model.safetensors` on the CPU; ValueError naming the file when it
    is missing, truncated or not a safetensors file."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(f"{file} is missing: the checkpoint holds no weights")
    st = _safetensors()
    try:
        return st.load_file(str(file), device="cpu")
    except Exception as err:  # SafetensorError (bad header, truncation) is a bare Exception
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt: "
                         f"{err})") from None


def load_checkpoint(path: str | Path, device=None, dtype: torch.dtype | None = None) -> Transformer:
    """The `Transformer` saved in directory `path`, on `device` in `dtype`.

    A missing, truncated or corrupt file, weights that do not fit config.json, or a weight
    that is NaN or infinite (or would become infinite in `dtype`, `check_finite`) raise a
    ValueError naming the file (and the tensor).
    """
    config = load_config(path)
    state = read_weights(path)
    file = Path(path) / WEIGHTS_NAME
    _check_tensors(file, state, dtype)
    check_finite(file, state, dtype)
    # safetensors returns views at 16-byte offsets into one buffer; CPU matmuls on them ran
    # 6-8x slower (measured on the tiny model), so each tensor gets its own allocation.
    state = {k[len(PREFIX):]: v.clone() for k, v in state.items()}
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        emb, out = state["tok_embeddings.weight"], state.get("output.weight")
        if out is not None and not (out.shape == emb.shape and torch.equal(out.to(emb.dtype), emb)):
            raise ValueError(f"{file} holds a {PREFIX}output.weight that differs from "
                             f"{PREFIX}tok_embeddings.weight, but {Path(path) / CONFIG_NAME} "
                             "says tie_embeddings: true; tying would drop the output matrix")
        state["output.weight"] = emb
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(f"{Path(path) / WEIGHTS_NAME} does not fit {Path(path) / CONFIG_NAME}: "
                         + " ".join(ln.strip() for ln in first[:3])[:400]) from None
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype)


def _check_tensors(file: Path, state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    """ValueError naming a tensor of `file` that is not the model's (outside the `model.`
    prefix) or not floating point, or, when no `dtype` is asked for, the tensors whose dtype
    differs from the rest (the model would fail at its first matrix product)."""
    foreign = sorted(k for k in state if not k.startswith(PREFIX))
    if foreign:
        raise ValueError(f"{file} holds {len(foreign)} tensors outside the model (no "
                         f"{PREFIX!r} prefix), e.g. {foreign[:4]}; they would be dropped")
    for k, v in state.items():
        if not v.is_floating_point():
            raise ValueError(f"{file}: {k} is {v.dtype}, not a floating-point tensor")
    if dtype is None:
        counts = Counter(v.dtype for v in state.values())
        if len(counts) > 1:
            common = counts.most_common(1)[0][0]
            odd = sorted(k for k, v in state.items() if v.dtype != common)
            raise ValueError(f"{file} holds tensors of several dtypes ({odd[0]}: "
                             f"{state[odd[0]].dtype} where {counts[common]} are {common}"
                             + (f"; {len(odd) - 1} more" if len(odd) > 1 else "")
                             + "); pass dtype= to load them as one")


def check_finite(file: Path, state: dict[str, torch.Tensor],
                 dtype: torch.dtype | None = None) -> None:
    """ValueError naming the first tensor of `file` that holds NaN or an infinity (a model
    loaded from it computes NaN from its first step on), or, with `dtype`, a value past that
    dtype's range (cast to it, the value would become an infinity). One pass over each
    floating-point tensor of `state`, at load time."""
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
            continue
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            t = t.float()  # (fp8: abs and amax need a wider type)
        largest = float(t.abs().amax())  # NaN and infinities propagate
        if not math.isfinite(largest):
            bad = ~torch.isfinite(t)
            count, where = int(bad.sum()), tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"{file}: {name} holds {count} non-finite value{'s' * (count > 1)} "
                             f"(NaN or infinity), e.g. {t[where].item()} at {where}; a model "
                             "loaded from it would compute NaN")
        if dtype is not None and dtype.is_floating_point and largest > torch.finfo(dtype).max:
            raise ValueError(f"{file}: {name} holds {largest:g}, past the largest {dtype} "
                             f"({torch.finfo(dtype).max:g}): loaded as {dtype} it would become "
                             "an infinity; load it in a wider dtype")


def load_model(path: str | Path, device: str | torch.device | None = None) -> Transformer:
    """A checkpoint's model in fp32 on `device` ("auto": CUDA when available; None: the CPU),
    the way training resumes it and evaluation reads it."""
    from hwattn.device import resolve_device

    return load_checkpoint(path, device=None if device is None else resolve_device(device),
                           dtype=torch.float32)
