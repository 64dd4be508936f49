"""hwattn: hardware-efficient attention (GTA, GLA, MLA, GQA, MQA, MHA) from
"Hardware-Efficient Attention for Fast Decoding" (Zadouri, Strauss, Dao, 2025)."""

from hwattn.config import ATTENTION_KINDS, VERSION, ModelConfig
from hwattn.hf import install as _install_hf
from hwattn.layers import AttentionMetadata, build_attention  # registers the built-in variants
from hwattn.models import Transformer, greedy_generate

__version__ = VERSION

_install_hf()  # registers the transformers Auto classes lazily (see hwattn.hf)

__all__ = ["ATTENTION_KINDS", "AttentionMetadata", "LLM", "ModelConfig", "SamplingParams",
           "Transformer", "build_attention", "greedy_generate", "__version__"]


def __getattr__(name: str):
    # The engine is imported on first use so that `import hwattn` stays light.
    if name in ("LLM", "SamplingParams"):
        from hwattn import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'hwattn' has no attribute {name!r}")
