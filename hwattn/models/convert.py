"""Checkpoints of the paper's released modeling code, converted to hwattn's layout.

The paper's authors released Llama-style `transformers` files (`modeling_llama_GTA.py`,
`modeling_llama_GLA.py`); their projections keep `nn.Linear`'s default bias on the RoPE key
(GTA), the query latent and the KV down / up projections (GLA), which hwattn models with
`ModelConfig.attention_bias`. Their names and shapes map onto hwattn's as follows
(h query heads, d_h head dim, d_R RoPE dim, h_c latent heads of d_c, g = h / h_c):

    model.embed_tokens / model.norm / lm_head        tok_embeddings / norm / output
    layers.i.input_layernorm, post_attention_layernorm    layers.i.attn_norm, ffn_norm
    layers.i.mlp.gate_proj, up_proj, down_proj       layers.i.ffn.w1, w3, w2
    self_attn.o_proj                                 attn.wo
    GTA  q_proj, kv_proj, W_rope_k (+ bias)          attn.wq, wkv, wk_rope
    GLA  W_dQ, q_norm, W_uQ_rope, W_dKV (+ biases)   attn.wq_a, q_norm, wq_b, wkv_a
         kv_norm_j (d_c,)                            attn.kv_norm.weight[j - 1]
         W_ukv_j (g·2·d_h, d_c) + bias (g·2·d_h)     per head of group j: rows [K | V] ->
                                                     attn.w_uk, w_uv (d_h, d_c), b_uk, b_uv

Both use rotate-half RoPE over d_R dims, so no permutation is needed. One latent head
(`W_ukv_1` only) converts to hwattn's MLA, more to GLA-h_c.

    model = load_paper_checkpoint("their_dir")      # config.json + *.safetensors or .bin
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from hwattn.config import ModelConfig
from hwattn.models.checkpoint import check_finite, read_json_object
from hwattn.models.transformer import Transformer

_COMMON = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn.w1.weight",
    "mlp.up_proj.weight": "ffn.w3.weight",
    "mlp.down_proj.weight": "ffn.w2.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
}
_GTA = {"q_proj": "wq", "kv_proj": "wkv", "W_rope_k": "wk_rope"}
_LATENT = {"W_dQ": "wq_a", "q_norm": "q_norm", "W_uQ_rope": "wq_b", "W_dKV": "wkv_a"}


def _latent_heads(state: dict[str, Tensor]) -> int:
    return len([k for k in state if re.fullmatch(r"model\.layers\.0\.self_attn\.kv_norm_\d+\.weight", k)])


def paper_config(config: dict, state: dict[str, Tensor]) -> ModelConfig:
    """The `ModelConfig` of a checkpoint of the paper's code: its config.json as a dict and
    its state dict. The variant is read from the parameter names, widths from the shapes."""
    for key, why in (("mlp_bias", "biased SwiGLU projections"),
                     ("attention_bias", "biased query / output projections")):
        if config.get(key):
            raise ValueError(f"config {key}=True ({why}) has no hwattn counterpart")
    if config.get("rope_scaling"):
        raise ValueError(f"rope_scaling {config['rope_scaling']} is not supported (plain RoPE only)")
    # transformers 5 writes RoPE as rope_parameters {rope_type, rope_theta}, without a
    # top-level rope_theta.
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default" \
            or set(rope) - {"rope_type", "type", "rope_theta"}:
        raise ValueError(f"rope_parameters {rope} is not supported (plain RoPE only)")
    if "rope_theta" in rope and config.get("rope_theta", rope["rope_theta"]) != rope["rope_theta"]:
        raise ValueError(f"config rope_theta {config['rope_theta']} contradicts rope_parameters "
                         f"{rope}: which one the weights were trained with is ambiguous")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "head_dim"):
        value = config[key] if key != "head_dim" else config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"config {key} must be a positive integer, got {value!r}")
    attn = "model.layers.0.self_attn."
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // n_heads
    common = dict(vocab_size=state["model.embed_tokens.weight"].shape[0], dim=dim,
                  n_layers=config["num_hidden_layers"], n_heads=n_heads, head_dim=head_dim,
                  hidden_dim=state["model.layers.0.mlp.gate_proj.weight"].shape[0],
                  max_seq_len=config.get("max_position_embeddings", 2048),
                  rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10_000.0))),
                  norm_eps=config.get("rms_norm_eps", 1e-6),
                  tie_embeddings="lm_head.weight" not in state
                                 or bool(config.get("tie_word_embeddings", False)))
    common["mha_hidden_dim"] = common["hidden_dim"]
    if attn + "W_rope_k.weight" in state:
        return ModelConfig(attention="gta", n_kv_heads=config["num_key_value_heads"],
                           rope_dim=state[attn + "W_rope_k.weight"].shape[0],
                           attention_bias=attn + "W_rope_k.bias" in state, **common)
    h_c = _latent_heads(state)
    if h_c and attn + "W_ukv_1.weight" in state:
        latent_dim = state[attn + "kv_norm_1.weight"].shape[0]
        return ModelConfig(attention="mla" if h_c == 1 else "gla", n_latent_heads=h_c,
                           latent_dim=latent_dim, q_latent_dim=state[attn + "W_dQ.weight"].shape[0],
                           rope_dim=state[attn + "W_dKV.weight"].shape[0] - h_c * latent_dim,
                           attention_bias=attn + "W_dKV.bias" in state, **common)
    raise ValueError("not a checkpoint of the paper's GTA or GLA code: layer 0 has neither "
                     "self_attn.W_rope_k nor self_attn.W_ukv_1")


def convert_paper_state_dict(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Their state dict -> hwattn `Transformer` state dict (no `model.` prefix). Raises
    ValueError naming their parameter when one has no counterpart (so no weight is dropped
    silently), is missing, or has a shape the config does not give it; biases must be where
    `config.attention_bias` (read from layer 0) puts them, in every layer."""
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}  # hwattn key -> their key(s) it was made from
    used: set[str] = set()

    def take(key: str) -> Tensor:
        used.add(key)
        return state[key]

    def put(ours: str, theirs: str) -> None:
        out[ours], source[ours] = take(theirs), theirs

    put("tok_embeddings.weight", "model.embed_tokens.weight")
    put("norm.weight", "model.norm.weight")
    if "lm_head.weight" in state:
        put("output.weight", "lm_head.weight")
    if config.tie_embeddings:
        emb, head = out["tok_embeddings.weight"], out.get("output.weight")
        if head is not None and not (head.shape == emb.shape and torch.equal(head, emb.to(head.dtype))):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight, but the config "
                             "says tie_word_embeddings: true; tying would drop lm_head.weight")
        out["output.weight"], source["output.weight"] = emb, "model.embed_tokens.weight"
    h, dh = config.n_heads, config.head_dim
    for i in range(config.n_layers):
        theirs, ours = f"model.layers.{i}.", f"layers.{i}."
        for a, b in _COMMON.items():
            put(ours + b, theirs + a)
        attn = theirs + "self_attn."
        names = _GTA if config.attention == "gta" else _LATENT
        for a, b in names.items():
            for kind in ("weight", "bias"):
                if attn + f"{a}.{kind}" in state:
                    put(ours + f"attn.{b}.{kind}", attn + f"{a}.{kind}")
        if config.attention in ("mla", "gla"):
            g = h // config.n_latent_heads
            norms, uk, uv, buk, buv = [], [], [], [], []
            for j in range(1, config.n_latent_heads + 1):
                norms.append(take(attn + f"kv_norm_{j}.weight"))
                w = _shaped(take, attn + f"W_ukv_{j}.weight", (g * 2 * dh, config.latent_dim))
                w = w.view(g, 2, dh, config.latent_dim)
                uk.append(w[:, 0])
                uv.append(w[:, 1])
                if config.attention_bias:
                    if attn + f"W_ukv_{j}.bias" not in state:
                        raise ValueError(f"{attn}W_ukv_{j}.bias is missing: the latent "
                                         "projections have biases (layer 0's W_dKV has one), "
                                         "so every W_ukv_j must")
                    bias = _shaped(take, attn + f"W_ukv_{j}.bias", (g * 2 * dh,)).view(g, 2, dh)
                    buk.append(bias[:, 0])
                    buv.append(bias[:, 1])
            out[ours + "attn.kv_norm.weight"] = torch.stack(norms)  # (h_c, d_c)
            out[ours + "attn.w_uk"] = torch.cat(uk)  # (h, d_h, d_c)
            out[ours + "attn.w_uv"] = torch.cat(uv)
            source[ours + "attn.kv_norm.weight"] = attn + "kv_norm_*.weight"
            source[ours + "attn.w_uk"] = source[ours + "attn.w_uv"] = attn + "W_ukv_*.weight"
            if buk:
                out[ours + "attn.b_uk"] = torch.cat(buk)  # (h, d_h)
                out[ours + "attn.b_uv"] = torch.cat(buv)
                source[ours + "attn.b_uk"] = source[ours + "attn.b_uv"] = attn + "W_ukv_*.bias"
    unknown = sorted(k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ValueError(f"{len(unknown)} parameters have no hwattn counterpart, e.g. {unknown[:4]}")
    _check_fit(out, source, config)
    return {k: v.contiguous() for k, v in out.items()}


def _shaped(take, key: str, shape: tuple[int, ...]) -> Tensor:
    """Their tensor `key`, which must have `shape` (ValueError naming it otherwise)."""
    t = take(key)
    if tuple(t.shape) != shape:
        raise ValueError(f"{key} has shape {tuple(t.shape)}; the config implies {shape}")
    return t


def _their_name(key: str) -> str:
    """Their parameter that hwattn's `key` is made from (for error messages)."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if key in top:
        return top[key]
    layer, _, rest = key.partition(".")[2].partition(".")
    prefix = f"model.layers.{layer}."
    common = {b: a for a, b in _COMMON.items()}
    if rest in common:
        return prefix + common[rest]
    module, _, kind = rest.removeprefix("attn.").rpartition(".")
    attn = {b: a for a, b in (*_GTA.items(), *_LATENT.items())}
    if module in attn:
        return f"{prefix}self_attn.{attn[module]}.{kind}"
    return f"{prefix}self_attn.W_ukv_*.bias" if rest in ("attn.b_uk", "attn.b_uv") else key


def _check_fit(out: dict[str, Tensor], source: dict[str, str], config: ModelConfig) -> None:
    """ValueError naming their parameter when the converted tensors are not exactly the
    state dict the config gives hwattn's model: one it has no place for (a bias where
    layer 0 has none), one missing (a bias layer 0 has), or one of another shape (a
    config.json that does not describe the weights beside it)."""
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    bias = f"attention_bias={config.attention_bias}, as layer 0's projections say"
    extra = sorted(set(out) - set(expected))
    if extra:
        raise ValueError(f"{source[extra[0]]} has no counterpart in hwattn's {config.label} model "
                         f"({bias}; hwattn's {extra[0]} does not exist)")
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"{_their_name(missing[0])} is missing: hwattn's {missing[0]} needs it "
                         f"({bias})")
    for key, t in out.items():
        if t.shape != expected[key].shape:
            raise ValueError(f"{source[key]} has shape {tuple(t.shape)}; the config implies "
                             f"{tuple(expected[key].shape)} (hwattn's {key})")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All `*.safetensors` files of a directory, or its `pytorch_model*.bin` files.
    ValueError naming the file and tensor for a weight that is NaN, infinite or past fp32's
    range (`check_finite`)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        def read(f: Path) -> dict[str, Tensor]:
            return {k: v.clone() for k, v in load_file(str(f)).items()}
    else:
        files = sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise ValueError(f"{path}: no *.safetensors or pytorch_model*.bin weights")

        def read(f: Path) -> dict[str, Tensor]:
            return torch.load(f, map_location="cpu", weights_only=True)
    state: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for f in files:
        try:
            part = read(f)
        except Exception as err:  # SafetensorError is a bare Exception; torch.load's vary
            raise ValueError(f"{f} is not a readable weights file (truncated or corrupt: "
                             f"{str(err).strip().splitlines()[0][:200]})") from None
        if not isinstance(part, dict):
            raise ValueError(f"{f} holds a {type(part).__name__}, not a state dict")
        check_finite(f, part, torch.float32)  # (the converted model is fp32)
        both = sorted(set(part) & set(state))
        if both:
            raise ValueError(f"{both[0]} is in both {origin[both[0]].name} and {f.name}"
                             + (f" ({len(both) - 1} more)" if len(both) > 1 else "")
                             + f" of {path}: which to use is ambiguous; remove the stray file")
        state.update(part)
        origin.update(dict.fromkeys(part, f))
    return state


def load_paper_checkpoint(path: str | Path) -> Transformer:
    """A directory written by the paper's code (config.json + weights) as an hwattn model, fp32."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json")
    doc = read_json_object(cfg_file)
    state = read_state_dict(path)
    try:
        config = paper_config(doc, state)
        weights = convert_paper_state_dict(state, config)
    except KeyError as err:  # a config.json or state dict without what the paper's code writes
        raise ValueError(f"{path} is not a checkpoint of the paper's GTA/GLA code: it has no "
                         f"{err.args[0]!r}") from None
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model
