"""Checkpoints of the paper's released GTA / GLA modeling code load into hwattn: a state dict
with their parameter names and shapes (biased projections included) is converted, loaded and
run, and the logits equal a plain re-statement of their forward pass."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hwattn import greedy_generate
from hwattn.cli import main
from hwattn.models.checkpoint import load_checkpoint
from hwattn.models.convert import convert_paper_state_dict, load_paper_checkpoint, paper_config

D, H, DH, DR, FFN, V, LAYERS = 64, 4, 16, 8, 96, 128, 2


def their_config(variant: str) -> dict:
    cfg = dict(hidden_size=D, num_attention_heads=H, num_hidden_layers=LAYERS, intermediate_size=FFN,
               vocab_size=V, max_position_embeddings=64, rope_theta=10_000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=False, attention_bias=False, mlp_bias=False, eos_token_id=3)
    if variant == "gta":
        cfg.update(num_key_value_heads=2, rope_dim=DR)
    else:
        cfg.update(num_key_value_heads=H, qk_rope_dim=DR)
    return cfg


def their_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes of modeling_llama_GTA.py / _GLA.py
    (nn.Linear default biases where they have them)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    sd = {"model.embed_tokens.weight": rnd(V, D), "model.norm.weight": 1 + rnd(D),
          "lm_head.weight": rnd(V, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + rnd(D),
                   p + "post_attention_layernorm.weight": 1 + rnd(D),
                   p + "mlp.gate_proj.weight": rnd(FFN, D), p + "mlp.up_proj.weight": rnd(FFN, D),
                   p + "mlp.down_proj.weight": rnd(D, FFN), p + "self_attn.o_proj.weight": rnd(D, H * DH)})
        a = p + "self_attn."
        if variant == "gta":
            sd.update({a + "q_proj.weight": rnd(H * DH, D), a + "kv_proj.weight": rnd(2 * DH, D),
                       a + "W_rope_k.weight": rnd(DR, D), a + "W_rope_k.bias": rnd(DR),
                       a + "rotary_emb.inv_freq": torch.ones(DR // 2)})
        else:
            kv = 4 * DH  # two latent heads of 2·d_h
            sd.update({a + "q_norm.weight": 1 + rnd(8 * DH), a + "kv_norm_1.weight": 1 + rnd(kv // 2),
                       a + "kv_norm_2.weight": 1 + rnd(kv // 2),
                       a + "W_dQ.weight": rnd(8 * DH, D), a + "W_dQ.bias": rnd(8 * DH),
                       a + "W_uQ_rope.weight": rnd(H * (DH + DR), 8 * DH),
                       a + "W_uQ_rope.bias": rnd(H * (DH + DR)),
                       a + "W_dKV.weight": rnd(kv + DR, D), a + "W_dKV.bias": rnd(kv + DR),
                       a + "W_ukv_1.weight": rnd(H * DH, kv // 2), a + "W_ukv_1.bias": rnd(H * DH),
                       a + "W_ukv_2.weight": rnd(H * DH, kv // 2), a + "W_ukv_2.bias": rnd(H * DH)})
    return sd


def their_logits(sd: dict, variant: str, ids: torch.Tensor) -> torch.Tensor:
    """Their forward, restated from the released files in fp64 (no cache, causal)."""
    b, t = ids.shape
    eps = 1e-6
    sd = {k: v.double() for k, v in sd.items()}

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    inv = 10_000.0 ** (-torch.arange(0, DR, 2, dtype=torch.float64) / DR)
    emb = torch.cat([torch.arange(t, dtype=torch.float64)[:, None] * inv] * 2, -1)  # (T, d_R)
    cos, sin = emb.cos()[None, :, None], emb.sin()[None, :, None]

    def rope(x):  # HF's rotate_half convention
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat((-x2, x1), -1) * sin

    def sdpa(q, k, v):  # (B, T, H, E) each, causal, scale 1/sqrt(E of q)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)
        return out.transpose(1, 2)

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        hs = rms(x, sd[p + "input_layernorm.weight"])
        if variant == "gta":
            q = lin(hs, a + "q_proj").view(b, t, H, DH)
            kv = lin(hs, a + "kv_proj").view(b, t, 2, DH).repeat_interleave(H // 2, dim=2)
            k_rope = rope(lin(hs, a + "W_rope_k").view(b, t, 1, DR)).expand(b, t, H, DR)
            q = torch.cat((q[..., :DH - DR], rope(q[..., DH - DR:])), -1)
            out = sdpa(q, torch.cat((kv[..., :DH - DR], k_rope), -1), kv)
        else:
            q = lin(rms(lin(hs, a + "W_dQ"), sd[a + "q_norm.weight"]), a + "W_uQ_rope").view(b, t, H, DH + DR)
            ckv, k_rope = lin(hs, a + "W_dKV").split([4 * DH, DR], -1)
            k = torch.zeros(b, t, H, DH + DR, dtype=x.dtype)
            v = torch.zeros(b, t, H, DH + DR, dtype=x.dtype)
            for j, heads in ((1, slice(0, H // 2)), (2, slice(H // 2, H))):
                c = rms(ckv[..., (j - 1) * 2 * DH:j * 2 * DH], sd[a + f"kv_norm_{j}.weight"])
                u = lin(c, a + f"W_ukv_{j}").view(b, t, H // 2, 2 * DH)
                k[:, :, heads, :DH], v[:, :, heads, :DH] = u[..., :DH], u[..., DH:]
            k[..., DH:] = rope(k_rope.view(b, t, 1, DR))
            q = torch.cat((q[..., :DH], rope(q[..., DH:])), -1)
            out = sdpa(q, k, v)[..., :DH]
        x = x + lin(out.reshape(b, t, -1), a + "o_proj")
        hs = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + lin(F.silu(lin(hs, p + "mlp.gate_proj")) * lin(hs, p + "mlp.up_proj"), p + "mlp.down_proj")
    return lin(rms(x, sd["model.norm.weight"]), "lm_head")


@pytest.mark.parametrize("variant", ["gta", "gla"])
def test_converted_state_dict_runs_like_their_model(variant):
    from hwattn.models.transformer import Transformer

    sd = their_state_dict(variant)
    cfg = paper_config(their_config(variant), sd)
    assert cfg.attention == variant and cfg.attention_bias and cfg.rope_dim == DR
    assert cfg.cache_heads == 2 and not cfg.tie_embeddings
    model = Transformer(cfg).double()
    model.load_state_dict(convert_paper_state_dict(sd, cfg), strict=True)
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # hwattn rotates in fp32 even in an fp64 model; a wrong mapping is off by ~0.1.
        torch.testing.assert_close(model(ids), their_logits(sd, variant, ids), rtol=1e-5, atol=1e-5)
        # The paged decode path (absorbed for GLA, biases included) agrees with the forward.
        tokens, _, logits = greedy_generate(model, ids[:, :5], 6, page_size=4, return_logits=True)
        torch.testing.assert_close(logits, model(tokens[:, :-1])[:, 4:], rtol=1e-9, atol=1e-9)


def test_unknown_parameters_are_refused():
    sd = their_state_dict("gla")
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(H * DH, D)
    with pytest.raises(ValueError, match="no hwattn counterpart"):
        convert_paper_state_dict(sd, paper_config(their_config("gla"), sd))
    with pytest.raises(ValueError, match="rope_scaling"):
        paper_config({**their_config("gla"), "rope_scaling": {"type": "yarn"}}, sd)


def test_convert_command_writes_a_loadable_checkpoint(tmp_path, capsys):
    from safetensors.torch import save_file

    src = tmp_path / "theirs"
    src.mkdir()
    sd = {k: v.float() for k, v in their_state_dict("gla").items()}
    save_file(sd, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(their_config("gla")))
    assert main(["convert", str(src), str(tmp_path / "ours")]) == 0
    assert "gla-2" in capsys.readouterr().out
    ours = load_checkpoint(tmp_path / "ours")
    direct = load_paper_checkpoint(src)
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).double(), their_logits(sd, "gla", ids), rtol=1e-4, atol=1e-4)
        assert torch.equal(ours(ids), direct(ids))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["eos_token_id"] == 3


def test_rope_parameters_of_transformers_5_configs_are_read():
    # transformers 5 writes a Llama config's RoPE as rope_parameters, with no top-level
    # rope_theta; it was read as the default 10000 and the converted model rotated wrongly.
    sd = their_state_dict("gta")
    config = {k: v for k, v in their_config("gta").items() if k != "rope_theta"}
    rope = {"rope_type": "default", "rope_theta": 500_000.0}
    assert paper_config({**config, "rope_parameters": rope}, sd).rope_theta == 500_000.0
    with pytest.raises(ValueError, match="rope_parameters.*yarn"):
        paper_config({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                    "rope_theta": 500_000.0}}, sd)
    with pytest.raises(ValueError, match="rope_theta"):
        paper_config({**config, "rope_theta": 10_000.0, "rope_parameters": rope}, sd)
