"""`transformers` classes for hwattn checkpoints: `HwattnConfig` and `HwattnForCausalLM`.

The wrapper keeps the `Transformer` as its attribute `model`, so the checkpoint's weight
names (`model.<Transformer state dict key>`, written by `hwattn.models.checkpoint`) load
unchanged, and config.json (every `ModelConfig` field at top level, `model_type: "hwattn"`) is
the `HwattnConfig`. `generate()` works without a KV cache: each step runs the whole prefix
through the training path (hwattn's paged-cache decoding is `hwattn.greedy_generate` and the
serving engine). Padding masks with zeros are refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hwattn.config import ModelConfig
from hwattn.models.transformer import Block, Transformer

_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
_V5 = int(transformers.__version__.split(".")[0]) >= 5


class HwattnConfig(PretrainedConfig):
    """Every `ModelConfig` field as an attribute; `to_model_config()` gives the dataclass."""

    model_type = "hwattn"
    # The names other Hugging Face tools look for.
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers",
                     "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len"}

    def __init__(self, **kwargs):
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS}
        defaults = ModelConfig.from_dict(fields).to_dict() if fields else ModelConfig().to_dict()
        kwargs.setdefault("tie_word_embeddings", defaults["tie_embeddings"])
        kwargs.setdefault("architectures", ["HwattnForCausalLM"])
        for k, v in defaults.items():
            setattr(self, k, v)
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({k: getattr(self, k) for k in _FIELDS})


class HwattnForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM head over `hwattn.models.Transformer` (logits (B, T, V))."""

    config_class = HwattnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = ({"model.output.weight": "model.tok_embeddings.weight"} if _V5
                          else ["model.output.weight"])
    _supports_cache_class = False

    def __init__(self, config: HwattnConfig):
        super().__init__(config)
        self.model = Transformer(config.to_model_config())
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generation keeps no cache object (see the module docstring)

    def _init_weights(self, module):
        # The Transformer initialises itself; loading a checkpoint overwrites everything.
        pass

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.output

    def set_output_embeddings(self, value):
        self.model.output = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int = 0,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, V) (the last `logits_to_keep` positions when > 0);
        `labels` (B, T) gives the mean next-token loss, -100 ignored."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask with padding is not supported by HwattnForCausalLM; "
                             "pass equal-length, unpadded sequences")
        logits = self.model(input_ids)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No KV cache: the whole prefix every step, and only the last position's logits.
        return {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": 1}


__all__ = ["Block", "HwattnConfig", "HwattnForCausalLM"]
