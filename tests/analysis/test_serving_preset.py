"""The `serving` preset carries the paper's serving attention shape: KV bytes per GPU per
token per layer (bf16) at TP 1/2/4/8 follow from h_q = 128, d_h = 128, d_R = 64, MLA's latent
of 512 and GLA's latent heads of 256 (a rank keeps at least one latent/KV head)."""

import json

import pytest

from hwattn.cli import main
from hwattn.config import ModelConfig


def expected(label: str, tp: int) -> int:
    kind, _, count = label.partition("-")
    heads = max(int(count or 1) // tp, 1)
    per_head = {"mla": 512, "gla": 256, "gqa": 2 * 128, "gta": 128}[kind]
    rope = 0 if kind == "gqa" else 64
    return 2 * (heads * per_head + rope)


def test_serving_preset_kv_bytes_per_gpu(capsys):
    variants = ["mla", "gla-2", "gla-4", "gla-8", "gqa-8", "gta-8"]
    assert main(["analyze", "--preset", "serving", "--variants", ",".join(variants),
                 "--tp", "1,2,4,8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    got = {(r["variant"], r["tp"]): r["kv_bytes_per_token_per_layer"] for r in rows}
    assert got == {(v, tp): expected(v, tp) for v in variants for tp in (1, 2, 4, 8)}
    assert got[("mla", 4)] == 1152 and got[("gla-4", 4)] == 640


@pytest.mark.parametrize("label", ["mla", "gla-4", "gqa-8"])
def test_serving_preset_shape(label):
    from hwattn.config import parse_variant

    cfg = ModelConfig.from_preset("serving", **parse_variant(label))
    assert (cfg.n_heads, cfg.head_dim) == (128, 128)
    assert cfg.hidden_dim == 8192  # one FFN width for every variant: only attention differs
    assert cfg.max_seq_len >= 65536 + 1024  # the long workload's 64K prompts plus output
    if label != "gqa-8":
        assert cfg.rope_dim == 64
        assert cfg.latent_dim == (512 if label == "mla" else 256)
