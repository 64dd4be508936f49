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
import shutil
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


def save_checkpoint(model: Transformer, path: str | Path, extra: dict | None = None,
                    eos_token_id: int | None = None) -> Path:
    """Write `model` to directory `path` (created); `extra` keys are added to config.json.
    `eos_token_id` (the tokenizer's end-of-text id) goes to config.json and
    generation_config.json, so `generate()` stops there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    doc = config_document(model.config, eos_token_id)
    doc.update(extra or {})
    state = {PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_embeddings and k == "output.weight")}
    _safetensors().save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    generation = special_tokens(eos_token_id)
    (path / GENERATION_CONFIG_NAME).write_text(json.dumps(generation, indent=2) + "\n")
    shutil.copyfile(MODELING_FILE, path / MODELING_FILE.name)
    return path


def load_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of checkpoint directory `path`; ValueError naming the file when it
    is missing or unreadable."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"{path} is not an hwattn checkpoint: no {CONFIG_NAME}")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(doc).__name__}")
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

    A missing, truncated or corrupt file, or weights that do not fit config.json, raise a
    ValueError naming the file.
    """
    config = load_config(path)
    state = read_weights(path)
    # safetensors returns views at 16-byte offsets into one buffer; CPU matmuls on them ran
    # 6-8x slower (measured on the tiny model), so each tensor gets its own allocation.
    state = {k[len(PREFIX):]: v.clone() for k, v in state.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(f"{Path(path) / WEIGHTS_NAME} does not fit {Path(path) / CONFIG_NAME}: "
                         + " ".join(ln.strip() for ln in first[:3])[:400]) from None
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device=device, dtype=dtype)


def load_model(path: str | Path, device: str | torch.device | None = None) -> Transformer:
    """A checkpoint's model in fp32 on `device` ("auto": CUDA when available; None: the CPU),
    the way training resumes it and evaluation reads it."""
    from hwattn.device import resolve_device

    return load_checkpoint(path, device=None if device is None else resolve_device(device),
                           dtype=torch.float32)
