"""The registry of attention variants: what a family means at the level of a config.

A `VariantSpec` says how a variant's config fields are derived and checked, how its label is
written and parsed ("gqa-8", "gla-4"), which config field counts its cached heads, and how to
build its layer. Each layer module defines its specs beside its class and registers them with
`register_variant`; `ModelConfig` consults this registry and never imports the layers.

Variants from other packages register the same way, or through the `hwattn.variants`
entry-point group, whose entries name a `VariantSpec` (or a module that registers on import);
entry points are also what makes a variant known in the worker processes of tensor
parallelism, which import nothing of the parent's:

    [project.entry-points."hwattn.variants"]
    mqa2 = "mypkg.attention:MQA2_SPEC"
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import torch

ENTRY_POINT_GROUP = "hwattn.variants"


@dataclass(frozen=True)
class VariantSpec:
    """One attention variant (docs/design.md §2).

    name: lower-case name, the first part of its label ("gqa" in "gqa-8").
    layer: the layer factory `layer(config, device=None, dtype=None)`, usually the class.
    summary: one line describing the variant.
    groups: default number of cached heads (KV heads, or latent heads for latent variants);
        None means one per query head (MHA).
    fixed_groups: the count is part of the definition (MHA, MQA, MLA): it may not be
        overridden, and the label carries no count.
    latent_width: latent width per latent head in head dims (d_c = latent_width · d_h; MLA 4,
        GLA 2). Set for latent variants, whose cached heads are `n_latent_heads` and which
        also have `latent_dim` and `q_latent_dim`; None for KV-head variants (`n_kv_heads`).
    q_latent_width: default query-latent width in head dims (8) for latent variants.
    partial_rope: RoPE rotates `rope_dim` dims (default d_h / 2) instead of the whole head.
    rope_below_head: `rope_dim` must be smaller than `head_dim` (GTA: the tied state keeps
        d_h - d_R un-rotated key dims).
    takes_bias: the layer honours `attention_bias` (the paper's checkpoints keep biases on
        GTA's RoPE-key projection and on GLA's / MLA's latent projections).
    bench_heads: query heads of the decode benchmark's default shape (128 where the paper
        benchmarks DeepSeek-like latent attention, 32 otherwise).
    """

    name: str
    layer: Callable[..., Any]
    summary: str = ""
    groups: int | None = 4
    fixed_groups: bool = False
    latent_width: int | None = None
    q_latent_width: int = 8
    partial_rope: bool = False
    rope_below_head: bool = False
    bench_heads: int = 32
    takes_bias: bool = False

    @property
    def latent(self) -> bool:
        return self.latent_width is not None

    @property
    def cache_field(self) -> str:
        """The config field counting cached heads: "n_latent_heads" or "n_kv_heads"."""
        return "n_latent_heads" if self.latent else "n_kv_heads"

    def cache_heads(self, config) -> int:
        """Cached heads of a config of this variant (KV heads, or latent heads)."""
        return getattr(config, self.cache_field)

    def label(self, config) -> str:
        """The label as the paper writes it: "mla", "gqa-4", "gla-2"."""
        return self.name if self.fixed_groups else f"{self.name}-{self.cache_heads(config)}"

    def derive(self, config) -> None:
        """Fill the variant's fields of `config` left as None and check them (in place)."""
        h, dh = config.n_heads, config.head_dim
        field, other = self.cache_field, ("n_kv_heads" if self.latent else "n_latent_heads")
        if getattr(config, other) is not None:
            owners = ", ".join(n for n in variant_names() if get_variant(n).latent != self.latent)
            raise ValueError(f"{other} applies to {owners} only, not {self.name}; use {field}")
        default = h if self.groups is None else self.groups
        count = getattr(config, field)
        if count is None:
            count = default
            setattr(config, field, count)
        if self.fixed_groups and count != default:
            what = f"n_heads ({h})" if self.groups is None else str(default)
            raise ValueError(f"{field} must be {what} for {self.name}, got {count}")
        if count <= 0 or h % count:
            raise ValueError(f"n_heads ({h}) must be divisible by {field} ({count})")
        if config.attention_bias and not self.takes_bias:
            owners = ", ".join(n for n in variant_names() if get_variant(n).takes_bias)
            raise ValueError(f"attention_bias applies to {owners} only, not {self.name}")

        if self.latent:
            if config.latent_dim is None:
                config.latent_dim = self.latent_width * dh
            if config.q_latent_dim is None:
                config.q_latent_dim = self.q_latent_width * dh
            if config.latent_dim <= 0 or config.q_latent_dim <= 0:
                raise ValueError("latent_dim and q_latent_dim must be positive")
        elif config.latent_dim is not None or config.q_latent_dim is not None:
            owners = ", ".join(n for n in variant_names() if get_variant(n).latent)
            raise ValueError(f"latent_dim / q_latent_dim apply to {owners} only, not {self.name}")

        if not self.partial_rope:
            if config.rope_dim is not None and config.rope_dim != dh:
                raise ValueError(f"rope_dim must equal head_dim ({dh}) for {self.name}: "
                                 "it rotates the whole head")
            config.rope_dim = dh
            return
        if config.rope_dim is None:
            config.rope_dim = dh // 2
        if config.rope_dim <= 0 or config.rope_dim % 2:
            raise ValueError(f"rope_dim must be a positive even number, got {config.rope_dim}")
        if self.rope_below_head and config.rope_dim >= dh:
            raise ValueError(f"rope_dim ({config.rope_dim}) must be smaller than head_dim ({dh}) "
                             f"for {self.name}: the tied state keeps d_h - d_R un-rotated key dims")
        if config.rope_dim > dh:
            raise ValueError(f"rope_dim ({config.rope_dim}) must not exceed head_dim ({dh})")

    def param_count(self, config) -> int:
        """Parameters of one attention layer of `config`, counted on a meta-device instance."""
        layer = self.layer(config, device=torch.device("meta"))
        return sum(p.numel() for p in layer.parameters())


_SPECS: dict[str, VariantSpec] = {}
_LOADED_ENTRY_POINTS: set[str] = set()


def register_variant(spec: VariantSpec, *, replace: bool = False) -> VariantSpec:
    """Make `spec` known under `spec.name` (registering the same spec again does nothing).
    Returns the spec, so a module can write `GQA = register_variant(VariantSpec(...))`."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", spec.name):
        raise ValueError(f"variant name must be lower-case letters, digits or '_' (no '-', "
                         f"which starts the group count), got {spec.name!r}")
    known = _SPECS.get(spec.name)
    if known is not None and known != spec and not replace:
        raise ValueError(f"variant {spec.name!r} is already registered (pass replace=True)")
    _SPECS[spec.name] = spec
    return spec


def _load_entry_points() -> None:
    """Register the `hwattn.variants` entry points not seen yet (a broken one warns)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _LOADED_ENTRY_POINTS or ep.name in _SPECS:
            continue
        _LOADED_ENTRY_POINTS.add(ep.name)
        try:
            obj = ep.load()  # importing a module may register its specs itself
            if isinstance(obj, VariantSpec):
                register_variant(obj)
        except Exception as err:  # noqa: BLE001 - a third-party plugin may fail in any way
            warnings.warn(f"attention variant entry point {ep.name!r} ({ep.value}) failed to "
                          f"load: {type(err).__name__}: {err}", stacklevel=2)


def variant_names() -> tuple[str, ...]:
    """Names of the registered variants, in registration order."""
    return tuple(_SPECS)


def get_variant(name: str) -> VariantSpec:
    """The spec registered as `name`; raises ValueError naming the known variants."""
    if name not in _SPECS:
        _load_entry_points()
    if name not in _SPECS:
        raise ValueError(f"attention must be one of {variant_names()}, got {name!r}")
    return _SPECS[name]


def parse_variant(label: str) -> dict:
    """A label as config fields: 'gqa-8' -> {'attention': 'gqa', 'n_kv_heads': 8};
    'gla-4' -> n_latent_heads 4; 'mla' -> {'attention': 'mla'}."""
    text = label.strip().lower()
    name, dash, count = text, "", ""
    if text not in _SPECS and "-" in text:
        name, dash, count = text.rpartition("-")
    try:
        spec = get_variant(name)
    except ValueError:
        raise ValueError(f"variant must start with one of {variant_names()}, got {label!r}") from None
    out: dict = {"attention": spec.name}
    if dash:  # 'gqa-' is a count left out, not the default; only ASCII digits are a count
        if not re.fullmatch(r"[0-9]+", count) or int(count) <= 0:
            raise ValueError(f"variant group count must be a positive integer, got {label!r}")
        if spec.fixed_groups:
            raise ValueError(f"variant {spec.name} takes no group count, got {label!r}")
        out[spec.cache_field] = int(count)
    return out


__all__ = ["ENTRY_POINT_GROUP", "VariantSpec", "get_variant", "parse_variant",
           "register_variant", "variant_names"]
