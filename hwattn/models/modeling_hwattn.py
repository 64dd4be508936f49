"""hwattn models in Hugging Face `transformers` form, in one file that needs only torch and
transformers: `HwattnConfig` and `HwattnForCausalLM`.

Every checkpoint hwattn writes carries a copy of this file and an `auto_map` in config.json,
so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it on a machine
without hwattn; with hwattn imported, the same classes are registered with the Auto classes
directly. The file therefore restates the decoder of `hwattn.models.Transformer` (RMSNorm,
SwiGLU, rotate-half RoPE, the six attention families) instead of importing it; hwattn's tests
hold the two to identical logits and token-for-token identical greedy generations.

The weights keep hwattn's names (`model.<Transformer state-dict key>`). Generation keeps a
transformers `DynamicCache`; what each layer stores in its key / value slots:

    mha / mqa / gqa   K (B, H_kv, L, d_h) rotated, V (B, H_kv, L, d_h)
    gta               tied state (B, H_kv, L, d_h), shared RoPE key (B, 1, L, d_R)
    mla / gla         normalised latents (B, h_c, L, d_c), shared RoPE key (B, 1, L, d_R)

Latent layers attend with the up-projections expanded when a step has no cached past (prompt,
training) and absorbed into the query and output when it does (decode), as hwattn does.
`attention_mask` (B, L) of ones and zeros handles padding on either side; positions follow
the mask, so a left-padded row generates exactly what it would unpadded. Other caches
(`cache_implementation="static"`, quantized or offloaded ones) preallocate key / value tensors
of one shape per layer, which these states do not have; they are refused with a ValueError.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

_V5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers 5.24 renamed the output's `past_key_values` to `cache`.
_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                else "past_key_values")
# scaled_dot_product_attention takes `enable_gqa` from torch 2.5 on.
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)

# Every field of hwattn's ModelConfig with its default. The derived ones (None here) are
# filled in by hwattn when it is installed; checkpoints always store them resolved.
MODEL_FIELDS = {
    "attention": "mha", "vocab_size": 2048, "dim": 128, "n_layers": 4, "n_heads": 8,
    "head_dim": None, "n_kv_heads": None, "n_latent_heads": None, "latent_dim": None,
    "q_latent_dim": None, "rope_dim": None, "mha_hidden_dim": 384, "hidden_dim": None,
    "hidden_multiple": 8, "max_seq_len": 1024, "rope_theta": 500_000.0, "norm_eps": 1e-5,
    "tie_embeddings": True, "attention_bias": False, "preset": None,
}
_REQUIRED = {"gqa": ("head_dim", "n_kv_heads", "rope_dim", "hidden_dim"),
             "gta": ("head_dim", "n_kv_heads", "rope_dim", "hidden_dim"),
             "latent": ("head_dim", "n_latent_heads", "latent_dim", "q_latent_dim", "rope_dim",
                        "hidden_dim")}
_FAMILY = {"mha": "gqa", "mqa": "gqa", "gqa": "gqa", "gta": "gta", "mla": "latent", "gla": "latent"}


def _resolve(fields: dict) -> dict:
    """Derive missing fields (head counts, widths, the parameter-matched SwiGLU width) through
    hwattn's ModelConfig when hwattn is importable. Complete fields (every checkpoint's) are
    taken as they are, so an older or newer hwattn installed beside does not matter."""
    family = _FAMILY.get(fields["attention"])
    if family is not None and all(fields[k] is not None for k in _REQUIRED[family]):
        return fields
    try:
        from hwattn.config import ModelConfig
    except ImportError:
        return fields  # check_complete() names what is missing when a model is built
    return {**fields, **ModelConfig.from_dict(fields).to_dict()}


def _plain_rope_theta(name: str, params) -> float | None:
    """The rope_theta of transformers' `rope_parameters` / `rope_scaling` dict `params` (None
    if it names none); ValueError naming `name` for any RoPE other than the plain rotation
    hwattn models use."""
    if params is None:
        return None
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else None
    if kind != "default" or set(params) - {"rope_type", "type", "rope_theta"}:
        raise ValueError(f"{name} {params!r} asks for a RoPE hwattn models do not have (they "
                         f"rotate plainly by rope_theta): give rope_theta, or no {name}")
    return params.get("rope_theta")


class HwattnConfig(PretrainedConfig):
    """Every hwattn `ModelConfig` field as an attribute (see `MODEL_FIELDS`)."""

    model_type = "hwattn"
    # The names other Hugging Face tools look for.
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers",
                     "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len",
                     "intermediate_size": "hidden_dim", "rms_norm_eps": "norm_eps"}

    def __init__(self, **kwargs):
        # transformers' names for the fields (hidden_size, ...; tie_word_embeddings; the theta
        # of rope_parameters) are the fields, read before the derived fields are derived.
        aliases = {**self.attribute_map, "tie_word_embeddings": "tie_embeddings"}
        for alias, name in aliases.items():
            if alias in kwargs and name in kwargs and kwargs[alias] != kwargs[name]:
                raise ValueError(f"{alias}={kwargs[alias]!r} contradicts {name}={kwargs[name]!r}: "
                                 f"{alias} is transformers' name for {name}; give one")
            if alias in kwargs:
                kwargs.setdefault(name, kwargs[alias])
                if alias != "tie_word_embeddings":
                    del kwargs[alias]
        for key in ("rope_parameters", "rope_scaling"):
            theta = _plain_rope_theta(key, kwargs.pop(key, None))
            if theta is not None and kwargs.setdefault("rope_theta", theta) != theta:
                raise ValueError(f"{key} has rope_theta {theta!r}, rope_theta is "
                                 f"{kwargs['rope_theta']!r}; give one")
        fields = {k: kwargs.pop(k, v) for k, v in MODEL_FIELDS.items()}
        fields = _resolve(fields)
        kwargs.setdefault("tie_word_embeddings", fields["tie_embeddings"])
        kwargs.setdefault("architectures", ["HwattnForCausalLM"])
        for k, v in fields.items():
            setattr(self, k, v)
        super().__init__(**kwargs)

    def to_diff_dict(self) -> dict:
        # transformers drops values equal to a default-constructed config; the model fields
        # are always written, so the file reads the same with or without hwattn installed.
        out = super().to_diff_dict()
        out.update({k: getattr(self, k) for k in MODEL_FIELDS})
        return out

    def check_complete(self) -> None:
        """Raise ValueError if a field the model needs is missing (only possible without hwattn)
        or the fields describe no model that can run (complete fields are taken as they are,
        so hwattn's own checks do not see them)."""
        family = _FAMILY.get(self.attention)
        if family is None:
            raise ValueError(f"attention must be one of {tuple(_FAMILY)}, got {self.attention!r}")
        # (Either may have been set after __init__, as from_pretrained sets its keywords.)
        tie_word = getattr(self, "tie_word_embeddings", self.tie_embeddings)
        if tie_word != self.tie_embeddings:
            raise ValueError(f"tie_word_embeddings={tie_word!r} contradicts tie_embeddings="
                             f"{self.tie_embeddings!r}: the decoder ties by tie_embeddings; set "
                             "both alike")
        for key in ("rope_parameters", "rope_scaling"):
            theta = _plain_rope_theta(key, getattr(self, key, None))
            if theta is not None and theta != self.rope_theta:
                raise ValueError(f"{key} has rope_theta {theta!r}, rope_theta is "
                                 f"{self.rope_theta!r}: the model rotates by rope_theta")
        missing = [k for k in _REQUIRED[family] if getattr(self, k, None) is None]
        if missing:
            raise ValueError(f"HwattnConfig needs {missing} for attention={self.attention!r}; "
                             "give them, or install hwattn to derive them")
        for k in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len") + _REQUIRED[family]:
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
        heads = "n_latent_heads" if family == "latent" else "n_kv_heads"
        if self.n_heads % getattr(self, heads):
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by {heads} "
                             f"({getattr(self, heads)})")
        dh, dr = self.head_dim, self.rope_dim
        if family == "gqa" and dr != dh:
            raise ValueError(f"rope_dim must equal head_dim ({dh}) for {self.attention}: it "
                             f"rotates the whole head, got {dr}")
        if dr % 2 or dr > dh or (family == "gta" and dr == dh):
            bound = "smaller than" if family == "gta" else "at most"
            raise ValueError(f"rope_dim must be an even number {bound} head_dim ({dh}) for "
                             f"{self.attention}, got {dr}")


class RMSNorm(nn.Module):
    """x / rms(x) * weight in fp32; `shape` (dim,) or (heads, dim) for per-head weights."""

    def __init__(self, *shape: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(*shape))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_cos_sin(positions: Tensor, dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin (B, T, dim / 2) fp32 for int positions (B, T); angles computed in fp64."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.double()[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of x (B, T, [H,] d) by cos, sin (B, T, d / 2); keeps x's dtype."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """q (B, T, H, E); k (B, L, H_kv, E); v (B, L, H_kv, E_v) -> (B, T, H, E_v).

    `mask` (B, 1, T, L) bool, True = may attend; None means causal with the queries being the
    last T of the L keys. Query head i reads KV head i // (H / H_kv). Widths that differ are
    zero-padded, which leaves scores and outputs unchanged."""
    n_q, n_k = q.shape[1], k.shape[1]
    e, e_v = q.shape[-1], v.shape[-1]
    if e_v < e:
        v = F.pad(v, (0, e - e_v))
    elif e_v > e:
        q, k = F.pad(q, (0, e_v - e)), F.pad(k, (0, e_v - e))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, E)
    extra = {}
    if kt.shape[1] != qt.shape[1]:
        if _SDPA_GQA:
            extra["enable_gqa"] = True
        else:
            group = qt.shape[1] // kt.shape[1]
            kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
    if mask is None and n_q == n_k:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, **extra)
    else:
        if mask is None:
            rows = torch.arange(n_q, device=q.device)[:, None]
            mask = torch.arange(n_k, device=q.device)[None, :] <= rows + (n_k - n_q)  # (T, L)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, **extra)
    return out.transpose(1, 2)[..., :e_v]  # (B, T, H, E_v)


def _cached(cache, layer_idx: int, *states: Tensor) -> tuple[Tensor, ...]:
    """Append this step's states (B, T, heads, d) to the cache; the whole history back."""
    if cache is None:
        return states
    full = cache.update(*(s.transpose(1, 2) for s in states), layer_idx)  # each (B, heads, L, d)
    return tuple(s.transpose(1, 2) for s in full)  # each (B, L, heads, d)


class GroupedQueryAttention(nn.Module):
    """MHA / GQA / MQA: the number of KV heads decides."""

    def __init__(self, config: HwattnConfig, layer_idx: int):
        super().__init__()
        d, self.h, self.hk, self.dh = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.layer_idx = layer_idx
        self.scale = 1.0 / math.sqrt(self.dh)
        self.wq = nn.Linear(d, self.h * self.dh, bias=False)
        self.wk = nn.Linear(d, self.hk * self.dh, bias=False)
        self.wv = nn.Linear(d, self.hk * self.dh, bias=False)
        self.wo = nn.Linear(self.h * self.dh, d, bias=False)

    def forward(self, x, cos, sin, mask, cache) -> Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.h, self.dh), cos, sin)  # (B, T, H, d_h)
        k = apply_rope(self.wk(x).view(b, t, self.hk, self.dh), cos, sin)  # (B, T, H_kv, d_h)
        v = self.wv(x).view(b, t, self.hk, self.dh)  # (B, T, H_kv, d_h)
        k, v = _cached(cache, self.layer_idx, k, v)  # (B, L, H_kv, d_h)
        return self.wo(attention(q, k, v, self.scale, mask).reshape(b, t, -1))


class GroupedTiedAttention(nn.Module):
    """GTA: one tied state per KV head is the value and the key's un-rotated part; one RoPE
    key of d_R dims is shared by every head."""

    def __init__(self, config: HwattnConfig, layer_idx: int):
        super().__init__()
        d, self.h, self.hk, self.dh = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_dim = config.rope_dim
        self.nope = self.dh - self.rope_dim
        self.layer_idx = layer_idx
        self.scale = 1.0 / math.sqrt(self.dh)
        self.wq = nn.Linear(d, self.h * self.dh, bias=False)
        self.wkv = nn.Linear(d, self.hk * self.dh, bias=False)
        self.wk_rope = nn.Linear(d, self.rope_dim, bias=config.attention_bias)
        self.wo = nn.Linear(self.h * self.dh, d, bias=False)

    def forward(self, x, cos, sin, mask, cache) -> Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.h, self.dh)  # (B, T, H, d_h)
        q = torch.cat((q[..., :self.nope], apply_rope(q[..., self.nope:], cos, sin)), -1)
        tied = self.wkv(x).view(b, t, self.hk, self.dh)  # (B, T, H_kv, d_h)
        k_rope = apply_rope(self.wk_rope(x), cos, sin)[:, :, None]  # (B, T, 1, d_R)
        tied, k_rope = _cached(cache, self.layer_idx, tied, k_rope)  # (B, L, H_kv, d_h), (B, L, 1, d_R)
        n = tied.shape[1]
        k = torch.cat((tied[..., :self.nope], k_rope.expand(b, n, self.hk, self.rope_dim)), -1)
        return self.wo(attention(q, k, tied, self.scale, mask).reshape(b, t, -1))


class LatentAttention(nn.Module):
    """MLA (one latent head) and GLA (h_c latent heads): a low-rank query, h_c RMSNorm'd latents
    of d_c dims and one shared RoPE key are computed per token; query head i up-projects latent
    i // (H / h_c) with its own (d_h, d_c) matrices W_UK and W_UV."""

    def __init__(self, config: HwattnConfig, layer_idx: int):
        super().__init__()
        d, self.h, self.dh = config.dim, config.n_heads, config.head_dim
        self.hc, self.dc, self.rope_dim = config.n_latent_heads, config.latent_dim, config.rope_dim
        self.group = self.h // self.hc
        self.layer_idx = layer_idx
        self.scale = 1.0 / math.sqrt(self.dh + self.rope_dim)
        bias = config.attention_bias
        self.wq_a = nn.Linear(d, config.q_latent_dim, bias=bias)
        self.q_norm = RMSNorm(config.q_latent_dim, eps=config.norm_eps)
        self.wq_b = nn.Linear(config.q_latent_dim, self.h * (self.dh + self.rope_dim), bias=bias)
        self.wkv_a = nn.Linear(d, self.hc * self.dc + self.rope_dim, bias=bias)
        self.kv_norm = RMSNorm(self.hc, self.dc, eps=config.norm_eps)
        self.w_uk = nn.Parameter(torch.zeros(self.h, self.dh, self.dc))
        self.w_uv = nn.Parameter(torch.zeros(self.h, self.dh, self.dc))
        self.b_uk = nn.Parameter(torch.zeros(self.h, self.dh)) if bias else None
        self.b_uv = nn.Parameter(torch.zeros(self.h, self.dh)) if bias else None
        self.wo = nn.Linear(self.h * self.dh, d, bias=False)

    def _up(self, latent: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """latent (B, L, h_c, d_c) -> per query head (B, L, H, d_h)."""
        b, n = latent.shape[:2]
        w = weight.view(self.hc, self.group, self.dh, self.dc)
        out = torch.einsum("bljc,jgdc->bljgd", latent, w).reshape(b, n, self.h, self.dh)
        return out if bias is None else out + bias

    def forward(self, x, cos, sin, mask, cache) -> Tensor:
        b, t, _ = x.shape
        past = 0 if cache is None else cache.get_seq_length(self.layer_idx)
        q = self.wq_b(self.q_norm(self.wq_a(x))).view(b, t, self.h, -1)  # (B, T, H, d_h + d_R)
        q_nope, q_rope = q.split([self.dh, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        latent, k_rope = self.wkv_a(x).split([self.hc * self.dc, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent.view(b, t, self.hc, self.dc))  # (B, T, h_c, d_c)
        k_rope = apply_rope(k_rope, cos, sin)[:, :, None]  # (B, T, 1, d_R)
        latent, k_rope = _cached(cache, self.layer_idx, latent, k_rope)  # (B, L, h_c, d_c), (B, L, 1, d_R)
        n = latent.shape[1]
        if past == 0:  # expanded: per-head keys and values from the latents
            k = torch.cat((self._up(latent, self.w_uk, self.b_uk),
                           k_rope.expand(b, n, self.h, self.rope_dim)), -1)  # (B, L, H, d_h + d_R)
            v = self._up(latent, self.w_uv, self.b_uv)  # (B, L, H, d_h)
            out = attention(torch.cat((q_nope, q_rope), -1), k, v, self.scale, mask)
        else:  # absorbed: W_UK folded into the query, W_UV applied after attention
            # The key bias adds q_nope · b_uk to every score of a query alike: softmax drops it.
            q_abs = torch.einsum("bthd,hdc->bthc", q_nope, self.w_uk)  # (B, T, H, d_c)
            k = torch.cat((latent, k_rope.expand(b, n, self.hc, self.rope_dim)), -1)
            out_latent = attention(torch.cat((q_abs, q_rope), -1), k, latent, self.scale, mask)
            out = torch.einsum("bthc,hdc->bthd", out_latent, self.w_uv)  # (B, T, H, d_h)
            if self.b_uv is not None:
                out = out + self.b_uv  # attention weights sum to one
        return self.wo(out.reshape(b, t, -1))


ATTENTION = {"mha": GroupedQueryAttention, "mqa": GroupedQueryAttention,
             "gqa": GroupedQueryAttention, "gta": GroupedTiedAttention,
             "mla": LatentAttention, "gla": LatentAttention}


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HwattnBlock(nn.Module):
    def __init__(self, config: HwattnConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = ATTENTION[config.attention](config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = FeedForward(config.dim, config.hidden_dim)

    def forward(self, x, cos, sin, mask, cache) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class HwattnDecoder(nn.Module):
    """Embedding, blocks, final norm and output projection, named as in hwattn's Transformer."""

    def __init__(self, config: HwattnConfig):
        super().__init__()
        config.check_complete()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(HwattnBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, input_ids: Tensor, positions: Tensor, mask: Tensor | None, cache,
                logits_to_keep: int | Tensor = 0) -> Tensor:
        """input_ids, positions (B, T); mask (B, 1, T, L) bool or None -> logits (B, T', V)."""
        cos, sin = rope_cos_sin(positions, self.config.rope_dim, self.config.rope_theta)
        x = self.tok_embeddings(input_ids)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:] if logits_to_keep > 0 else x
        else:
            x = x[:, logits_to_keep]
        return self.output(self.norm(x))


# What forward takes beside its named arguments: what generate() and Trainer send
# (cache_position, checked; num_items_in_batch, used), and what it refuses by name
# (inputs_embeds, output_attentions, output_hidden_states). Anything else (a misspelt
# attention_mask, token_type_ids, head_mask) is refused, not ignored.
_OTHER_FORWARD_ARGS = frozenset({"cache_position", "num_items_in_batch", "inputs_embeds",
                                 "output_attentions", "output_hidden_states"})


def padding_mask(attention_mask: Tensor, query_len: int) -> Tensor | None:
    """(B, L) ones / zeros -> (B, 1, T, L) bool: causal (queries are the last T positions) and
    never a padded key. A query row with nothing to attend to (a padded query) may attend to
    everything; its output is never read. None when nothing is padded."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, length), got shape "
                         f"{tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None
    n_k = keep.shape[1]
    rows = torch.arange(query_len, device=keep.device)[:, None]
    causal = torch.arange(n_k, device=keep.device)[None, :] <= rows + (n_k - query_len)  # (T, L)
    allowed = causal[None, None] & keep[:, None, None, :]  # (B, 1, T, L)
    return allowed | ~allowed.any(-1, keepdim=True)


@torch.no_grad()
def _init_parameter_(p: Tensor, name: str, in_norm: bool, n_layers: int,
                     generator: torch.Generator | None = None) -> None:
    """hwattn's initialisation of one parameter, in place (restated from
    `hwattn.models.transformer.init_parameter_`): unit norm weights, zero biases, N(0, 0.02)
    elsewhere, output projections (`wo`, `w2`) at 0.02 / sqrt(2 · n_layers)."""
    if in_norm:
        p.fill_(1.0)
    elif name.endswith(("bias", "b_uk", "b_uv")):
        p.zero_()
    else:
        std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
        p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)


class HwattnForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM over an hwattn decoder: input_ids (B, T) -> logits (B, T, V)."""

    config_class = HwattnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["HwattnBlock"]
    _tied_weights_keys = ({"model.output.weight": "model.tok_embeddings.weight"} if _V5
                          else ["model.output.weight"])
    _supports_cache_class = True
    _supports_static_cache = False

    def __init__(self, config: HwattnConfig):
        super().__init__(config)
        self.model = HwattnDecoder(config)
        self._constructing = True  # post_init's per-module hook is left to the line below
        self.post_init()
        self._constructing = False
        self.init_hwattn_weights()

    def init_hwattn_weights(self, seed: int | None = None) -> None:
        """hwattn's initialisation of every parameter (`_init_parameter_`; loading a checkpoint
        overwrites it)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.model.named_parameters():
            if not p.is_meta:
                _init_parameter_(p, name, isinstance(self.model.get_submodule(
                    name.rsplit(".", 1)[0]), RMSNorm), self.config.n_layers, gen)

    def _init_weights(self, module):
        """hwattn's initialisation (`_init_parameter_`, unseeded) of `module`'s own parameters.
        transformers 5 builds the model on the meta device and calls this only for the modules
        whose weights the checkpoint lacks (or mis-shapes, with `ignore_mismatched_sizes`):
        they must not be left as uninitialised memory. Parameters already loaded
        (`_is_hf_initialized`) are kept; while the model is being constructed it does nothing
        (`init_hwattn_weights` initialises everything, as it did before this hook existed)."""
        if getattr(self, "_constructing", False):
            return
        prefix = next((f"{n}." for n, m in self.model.named_modules() if m is module), "")
        for name, p in module.named_parameters(recurse=False):
            if not p.is_meta and not getattr(p, "_is_hf_initialized", False):
                _init_parameter_(p, prefix + name, isinstance(module, RMSNorm),
                                self.config.n_layers)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.model.output

    def set_output_embeddings(self, value):
        self.model.output = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int | Tensor = 0, num_logits_to_keep: int | None = None,
                return_dict: bool | None = None, cache=None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, V), or the last `logits_to_keep` positions.

        attention_mask (B, past + T): 1 for tokens, 0 for padding (either side).
        position_ids (B, T): default from the mask (cumulative count of tokens), else
            past + 0..T-1.
        past_key_values / cache: a transformers `DynamicCache` holding the earlier tokens (any
            other cache raises ValueError); with `use_cache=True` one is made when none is
            given, and returned. `cache` (transformers 5.24's name) is a named argument:
            generate() passes on only the arguments forward's signature names.
        labels (B, T): mean next-token cross-entropy, -100 ignored (needs every position's
            logits: no `logits_to_keep`); with `num_items_in_batch` (as transformers' Trainer
            passes it) the summed cross-entropy divided by it.
        return_dict=False: the output as a tuple (loss if labels were given, logits, cache).

        Raises ValueError for input_ids that are not a non-empty (B, T) integer tensor of ids
        in [0, vocab_size), a mask or positions of another shape, a negative position, a
        `cache_position` other than the slots after the cache, any argument not named here, and
        what this model cannot do: `inputs_embeds`, `output_attentions` or
        `output_hidden_states` (refused rather than answered with None).
        """
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"{flag}=True is not supported: HwattnForCausalLM returns "
                                 f"logits (and the cache) only")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds is not supported: pass input_ids")
        unknown = sorted(set(kwargs) - _OTHER_FORWARD_ARGS)
        if unknown:
            raise ValueError(f"HwattnForCausalLM.forward got arguments it does not take: "
                             f"{', '.join(unknown)} (it takes input_ids, attention_mask, "
                             f"position_ids, past_key_values, cache, use_cache, labels, "
                             f"logits_to_keep, return_dict and "
                             f"{', '.join(sorted(_OTHER_FORWARD_ARGS))})")
        # (The checks of hwattn.models.transformer.check_tokens, restated: this file is copied
        # beside exported checkpoints and imports only torch and transformers.)
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else repr(input_ids)
            raise ValueError(f"input_ids must be a (batch, length) tensor of token ids, got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids must hold at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        cache = past_key_values if cache is None else cache
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(
                f"past_key_values: a {type(cache).__name__} cannot hold hwattn's cached states "
                f"(a tied state, latents or a shared RoPE key beside K/V, each of its own "
                f"shape); only transformers' DynamicCache can, so leave cache_implementation "
                f"unset (not 'static') and pass no cache or a DynamicCache")
        if cache is None and use_cache:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        b, t = input_ids.shape
        if attention_mask is not None and (attention_mask.dim() != 2
                                           or attention_mask.shape[0] != b):
            raise ValueError(f"attention_mask must be (batch = {b}, length), got shape "
                             f"{tuple(attention_mask.shape)}")
        cache_position = kwargs.get("cache_position")
        if cache_position is not None and (
                tuple(cache_position.shape) != (t,) or not torch.equal(
                    cache_position.cpu(), torch.arange(past, past + t, dtype=cache_position.dtype))):
            raise ValueError(f"cache_position must be {past}..{past + t - 1}, the slots after the "
                             f"{past} cached tokens (positions come from attention_mask or "
                             f"position_ids), got {cache_position.tolist()}")
        if attention_mask is not None and attention_mask.shape[-1] != past + t:
            raise ValueError(f"attention_mask must cover the {past} cached and {t} new tokens, "
                             f"got length {attention_mask.shape[-1]}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + t, device=input_ids.device)[None].expand(b, t)
        elif position_ids.dim() != 2 or position_ids.shape[1] != t or position_ids.shape[0] not in (1, b):
            raise ValueError(f"position_ids must be (batch = {b} or 1, length = {t}), got shape "
                             f"{tuple(position_ids.shape)}")
        keep = num_logits_to_keep if num_logits_to_keep is not None else logits_to_keep
        if labels is not None:
            if tuple(labels.shape) != (b, t):
                raise ValueError(f"labels must be shaped as input_ids {(b, t)}, got "
                                 f"{tuple(labels.shape)}")
            if not isinstance(keep, int) or 0 < keep < t:
                raise ValueError("labels need every position's logits: leave logits_to_keep at 0")
        # One read-back for the positions' and the ids' bounds.
        first, top, lo, hi = torch.stack((position_ids.min().long(), position_ids.max().long(),
                                          input_ids.min().long(), input_ids.max().long())).tolist()
        if top >= self.config.max_seq_len:
            raise ValueError(f"position {top} exceeds max_seq_len {self.config.max_seq_len}")
        if first < 0:
            raise ValueError(f"position {first} is negative (position_ids)")
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids holds id {lo if lo < 0 else hi}, outside "
                             f"[0, vocab_size = {self.config.vocab_size})")
        mask = padding_mask(attention_mask, t) if attention_mask is not None else None
        logits = self.model(input_ids, position_ids, mask, cache, keep)
        loss = None
        if labels is not None:
            # num_items_in_batch (transformers' Trainer, over all accumulated micro-batches):
            # the summed loss over it, which the Trainer then leaves unscaled.
            items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100, reduction="mean" if items is None else "sum")
            if items is not None:
                loss = loss / (items.to(loss.device) if isinstance(items, Tensor) else items)
        out = {_CACHE_FIELD: cache} if cache is not None else {}
        res = CausalLMOutputWithPast(loss=loss, logits=logits, **out)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return res if return_dict else res.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, position_ids=None,
                                      next_sequence_length=None, **kwargs):
        """Only the tokens the cache has not seen, with positions from the padding mask (or the
        last of `position_ids`, when generate() was given them); `output_attentions` /
        `output_hidden_states` pass through, for forward to refuse.

        `input_ids` is the whole sequence so far, except in a chunked prefill
        (`prefill_chunk_size`), where it is the chunk: the new tokens are the last
        `next_sequence_length` (transformers 5), else those the mask covers past the cache,
        else those past the cache's length."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        width = input_ids.shape[1]
        if next_sequence_length is not None:
            new = next_sequence_length
        elif attention_mask is not None:
            new = attention_mask.shape[-1] - past
        else:
            new = width - past if width > past else width
        input_ids = input_ids[:, max(width - new, 0):]  # forward names a mask that does not fit
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "use_cache": kwargs.get("use_cache")}
        if position_ids is not None:
            inputs["position_ids"] = position_ids[..., -input_ids.shape[1]:]
        if cache is not None:
            inputs["cache" if "cache" in kwargs else "past_key_values"] = cache
        keep = kwargs.get("logits_to_keep", kwargs.get("num_logits_to_keep"))
        if keep is not None:
            inputs["logits_to_keep"] = keep
        for flag in ("output_attentions", "output_hidden_states"):  # forward refuses them
            if kwargs.get(flag):
                inputs[flag] = kwargs[flag]
        return inputs


# `save_pretrained` then copies this file next to the weights and writes the `auto_map`.
HwattnConfig.register_for_auto_class()
HwattnForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["HwattnBlock", "HwattnConfig", "HwattnForCausalLM"]
