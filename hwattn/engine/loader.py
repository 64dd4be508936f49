"""Building the model the engine serves: a checkpoint directory or a preset with random
weights, on a device in a dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from hwattn.config import PRESETS, ModelConfig, parse_variant
from hwattn.device import resolve_device, resolve_dtype
from hwattn.models import Transformer

def is_checkpoint(model: str | Path) -> bool:
    return (Path(model) / "config.json").is_file()


def model_config(model: str, attention: str | None = None, overrides: dict | None = None) -> ModelConfig:
    """The config a checkpoint or a preset describes (no weights are built)."""
    if is_checkpoint(model):
        from hwattn.models.checkpoint import load_config

        if overrides:  # a checkpoint's shape is its weights'
            raise ValueError(f"model_overrides apply to presets only, got {overrides!r} for the "
                             f"checkpoint {str(model)!r} (max_model_len lowers the engine's "
                             f"context)")
        config = load_config(model)
        # The whole label, group count included: --attention gqa-4 on a gqa-2 checkpoint
        # is refused, not ignored.
        if attention is not None and any(getattr(config, k) != v
                                         for k, v in parse_variant(attention).items()):
            raise ValueError(f"attention {attention!r} does not match the checkpoint's "
                             f"{config.label!r}; leave it out for checkpoints")
        return config
    if model not in PRESETS:
        raise ValueError(f"model must be a checkpoint directory (with config.json) or a preset "
                         f"{tuple(PRESETS)}, got {model!r}")
    return ModelConfig.from_preset(model, **parse_variant(attention or "mha"), **(overrides or {}))


@torch.no_grad()
def build_model(model: str, attention: str | None = None, dtype=None, device=None,
                seed: int = 0, overrides: dict | None = None) -> Transformer:
    """A checkpoint's model, or a preset's with seeded random weights, in eval mode.

    Random weights are drawn on the CPU (same values on every process and device) for models
    up to 100M parameters; larger ones are drawn on the target device directly (fast; same
    values for the same device type and seed).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if is_checkpoint(model):
        from hwattn.models.checkpoint import load_checkpoint

        model_config(model, attention, overrides)  # refuses overrides, a differing attention
        return load_checkpoint(model, device=device, dtype=dtype).eval()
    config = model_config(model, attention, overrides)
    with torch.device("meta"):
        net = Transformer(config)
    if net.num_params() <= 100e6:
        net = Transformer(config)
        net.init_weights(seed=seed)
        return net.to(device=device, dtype=dtype).eval()
    net = net.to_empty(device=device).to(dtype)
    if config.tie_embeddings:
        net.output.weight = net.tok_embeddings.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in net.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return net.eval()
