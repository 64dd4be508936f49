"""`transformers` classes for hwattn checkpoints: `HwattnConfig` and `HwattnForCausalLM`.

They live in `hwattn/models/modeling_hwattn.py`, a file that needs only torch and
transformers because every checkpoint carries a copy of it for `trust_remote_code=True`
loading without hwattn; this module re-exports them and converts the configuration.
"""

from __future__ import annotations

from hwattn.config import ModelConfig
from hwattn.models.modeling_hwattn import MODEL_FIELDS, HwattnBlock, HwattnConfig, HwattnForCausalLM


def to_model_config(config: HwattnConfig) -> ModelConfig:
    """The hwattn `ModelConfig` a `HwattnConfig` describes."""
    return ModelConfig.from_dict({k: getattr(config, k) for k in MODEL_FIELDS})


__all__ = ["HwattnBlock", "HwattnConfig", "HwattnForCausalLM", "to_model_config"]
