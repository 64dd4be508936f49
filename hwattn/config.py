"""Typed model configuration with the paper's presets.

`ModelConfig` describes a Llama-style decoder (RMSNorm, SwiGLU, RoPE, tied embeddings) whose
attention is one of the registered variants (`hwattn.variants`; the paper's six are built in).
Everything derivable is derived in `__post_init__`: per-variant head counts, latent and RoPE
widths (each variant's `VariantSpec` says how), and the SwiGLU hidden size that makes the
model parameter-matched to the MHA model of the same shape (the paper's protocol).

    cfg = ModelConfig.from_preset("xl", attention="gla")        # GLA-2, hidden 6296
    cfg = ModelConfig.from_preset("tiny", attention="gqa", n_kv_heads=2)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

from hwattn.variants import get_variant, parse_variant

VERSION = "0.1.0"  # the package's version (`hwattn.__version__`; the server's /version)

# The paper's six variants, built in; `hwattn.variants.variant_names()` lists every registered one.
ATTENTION_KINDS = ("mha", "mqa", "gqa", "gta", "mla", "gla")

# Llama-3 tokenizer vocabulary, used by the paper for every model.
LLAMA3_VOCAB = 128_256
# GPT-2's 50,257 tokens rounded up to a multiple of 64 for the matrix units.
GPT2_VOCAB_PADDED = 50_304
# Which SDPA kernels dense attention may use in training (`hwattn.layers.sdpa_choice`,
# `TrainConfig.sdpa`, `hwattn train --sdpa`): "auto" (PyTorch's choice) or "cudnn".
SDPA_CHOICES = ("auto", "cudnn")

# Shape of each preset; `mha_hidden_dim` is the MHA model's SwiGLU width, which fixes the
# parameter budget every other variant is matched to.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=4, dim=128, n_heads=8, head_dim=16, mha_hidden_dim=384,
                 vocab_size=2048, max_seq_len=1024, rope_theta=10_000.0,
                 hidden_multiple=1),  # a CPU model: exact matching beats alignment
    "mini": dict(n_layers=8, dim=512, n_heads=8, head_dim=64, mha_hidden_dim=1408,
                 vocab_size=GPT2_VOCAB_PADDED, max_seq_len=2048),
    # The GPU quality study (benchmarks/quality_study.py): 19.3M non-embedding parameters,
    # so 20 tokens per parameter (393M) is a few minutes on one H200 and under four epochs
    # of the 102M-token registry corpus with its 32,768-id BPE.
    "study": dict(n_layers=6, dim=512, n_heads=8, head_dim=64, mha_hidden_dim=1408,
                  vocab_size=32_768, max_seq_len=1024),
    "small": dict(n_layers=12, dim=768, n_heads=12, head_dim=64, mha_hidden_dim=2048,
                  vocab_size=LLAMA3_VOCAB, max_seq_len=2048),
    "medium": dict(n_layers=24, dim=1024, n_heads=16, head_dim=64, mha_hidden_dim=2736,
                   vocab_size=LLAMA3_VOCAB, max_seq_len=2048),
    "large": dict(n_layers=24, dim=1536, n_heads=16, head_dim=96, mha_hidden_dim=4096,
                  vocab_size=LLAMA3_VOCAB, max_seq_len=2048, rope_dim=32),
    "xl": dict(n_layers=24, dim=2048, n_heads=16, head_dim=128, mha_hidden_dim=5464,
               vocab_size=LLAMA3_VOCAB, max_seq_len=2048, rope_dim=64),
    # The paper's serving attention (h_q 128, d_h 128, d_R 64: MLA latent 512, GLA latent heads
    # of 256) on a shallow, narrow trunk with one FFN width for every variant, so that
    # random-weight multi-GPU serving studies spend their time in attention and fit in minutes.
    "serving": dict(n_layers=8, dim=2048, n_heads=128, head_dim=128, rope_dim=64,
                    mha_hidden_dim=8192, hidden_dim=8192, vocab_size=LLAMA3_VOCAB,
                    max_seq_len=69_632),
}

# Parameter counts the paper reports for the MHA model of each preset.
PAPER_PARAMS = {"small": 183e6, "medium": 433e6, "large": 876e6, "xl": 1.47e9}

# Published SwiGLU hidden sizes of the parameter-matched variants (docs/design.md §3).
PAPER_HIDDEN = {
    "mha": {"small": 2048, "medium": 2736, "large": 4096, "xl": 5464},
    "gqa": {"small": 2392, "medium": 3248, "large": 4864, "xl": 6486},
    "gta": {"small": 2462, "medium": 3320, "large": 4976, "xl": 6638},
    "mla": {"small": 2128, "medium": 3062, "large": 4640, "xl": 6120},
    "gla": {"small": 2208, "medium": 3152, "large": 4768, "xl": 6292},
    "mqa": {"small": 2520, "medium": 3376, "large": 5056},
}


@dataclass
class ModelConfig:
    """A decoder-only transformer and its attention variant.

    Fields left as None are derived from `attention`'s `VariantSpec` in `__post_init__`; for
    the built-in variants:

    - `n_kv_heads`: KV heads for mha (= n_heads), mqa (1), gqa and gta (4).
    - `n_latent_heads` (h_c): 1 for mla, 2 for gla.
    - `latent_dim` (d_c, per latent head): 4·d_h for mla, 2·d_h for gla.
    - `q_latent_dim`: width of the query low-rank bottleneck of mla/gla, 8·d_h.
    - `rope_dim` (d_R): rotated width of gta/mla/gla, d_h/2. mha/mqa/gqa rotate all of d_h.
    - `attention_bias`: biases on the RoPE-key projection (gta) and on the query-latent and KV
      down / up projections (mla, gla), as in the paper's released modeling code; the other
      families have no such projections.
    - `hidden_dim`: the SwiGLU width that matches the MHA model's parameter count, rounded to
      a multiple of `hidden_multiple` (8: an odd width breaks the 16-byte alignment GPU matrix
      kernels need and, measured on an H100, sends the feed-forward GEMMs to a kernel several
      times slower).
    """

    attention: str = "mha"
    vocab_size: int = 2048
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 8
    head_dim: int | None = None
    n_kv_heads: int | None = None
    n_latent_heads: int | None = None
    latent_dim: int | None = None
    q_latent_dim: int | None = None
    rope_dim: int | None = None
    mha_hidden_dim: int = 384
    hidden_dim: int | None = None
    hidden_multiple: int = 8
    max_seq_len: int = 1024
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self._check_types()
        spec = get_variant(self.attention)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "mha_hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        # 0 ** -x is inf and a negative base has no real powers: NaN RoPE tables.
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive finite number, got {self.rope_theta}")
        # RMSNorm takes 1 / sqrt(mean(x^2) + eps): a negative or NaN eps gives NaN.
        if not (math.isfinite(self.norm_eps) and self.norm_eps >= 0):
            raise ValueError(f"norm_eps must be a finite number >= 0, got {self.norm_eps}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "unless head_dim is given")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number, got {self.head_dim}")
        spec.derive(self)
        if self.hidden_dim is None:
            self.hidden_dim = self._matched_hidden_dim()
        if self.hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be positive, got {self.hidden_dim}")

    def _check_types(self) -> None:
        """Each field holds what its annotation says (a float size or a string flag from a
        hand-edited config.json would otherwise fail deep inside torch, or a "false" count as
        true); integers and numbers of other types (numpy's) become Python ints and floats.
        Fields annotated otherwise than `int`, `float`, `bool` or `str` (each optionally
        `| None`) are not checked."""
        what = {"int": "an integer", "float": "a number", "bool": "true or false",
                "str": "a string"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, _, optional = str(f.type).partition(" | ")
            if kind not in what or optional not in ("", "None") or value is None and optional:
                continue
            number = not isinstance(value, bool)
            if kind == "int" and number and isinstance(value, numbers.Integral):
                setattr(self, f.name, int(value))
            elif kind == "float" and number and isinstance(value, numbers.Real):
                setattr(self, f.name, float(value))
            elif not (kind == "bool" and isinstance(value, bool)
                      or kind == "str" and isinstance(value, str)):
                raise ValueError(f"{f.name} must be {what[kind]}{' or None' if optional else ''}, "
                                 f"got {value!r} ({type(value).__name__})")

    def _matched_hidden_dim(self) -> int:
        """SwiGLU width whose parameters make up for this attention's saving over MHA."""
        mha = dataclasses.replace(self, attention="mha", n_kv_heads=None, n_latent_heads=None,
                                  latent_dim=None, q_latent_dim=None, rope_dim=None,
                                  hidden_dim=self.mha_hidden_dim, attention_bias=False)
        saved = get_variant("mha").param_count(mha) - get_variant(self.attention).param_count(self)
        # Each unit of SwiGLU width costs three weight columns of length `dim`.
        exact = self.mha_hidden_dim + saved / (3 * self.dim)
        m = self.hidden_multiple
        if m <= 0:
            raise ValueError(f"hidden_multiple must be positive, got {m}")
        return m * round(exact / m)

    @property
    def group_size(self) -> int:
        """g_q: query heads per KV head (gqa/gta/mqa/mha) or per latent head (mla/gla)."""
        return self.n_heads // self.cache_heads

    @property
    def cache_heads(self) -> int:
        """Heads of the cached state: KV heads, or latent heads for mla/gla."""
        return get_variant(self.attention).cache_heads(self)

    @property
    def label(self) -> str:
        """Variant label as the paper writes it: mha, mqa, gqa-4, gta-4, mla, gla-2."""
        return get_variant(self.attention).label(self)

    @classmethod
    def from_preset(cls, name: str, attention: str = "mha", **overrides) -> "ModelConfig":
        """A preset (tiny, mini, small, medium, large, xl) with the given attention variant.

        Any field may be overridden, e.g. `n_kv_heads=8` for GQA-8 or `n_latent_heads=4`.
        """
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        kwargs = dict(PRESETS[name])
        if not get_variant(attention).partial_rope:
            kwargs.pop("rope_dim", None)  # the variant rotates the whole head
        kwargs.update(overrides)
        return cls(attention=attention, preset=name, **kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


__all__ = ["ATTENTION_KINDS", "GPT2_VOCAB_PADDED", "LLAMA3_VOCAB", "PAPER_HIDDEN", "PAPER_PARAMS",
           "PRESETS", "ModelConfig", "parse_variant"]
