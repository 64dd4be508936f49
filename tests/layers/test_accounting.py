"""Cost accounting must equal the real cache tensors and the paper's per-device table."""

import math

import pytest
import torch

from hwattn import AttentionMetadata, ModelConfig, Transformer, build_attention
from hwattn.analysis.cost import analyze
from hwattn.config import ATTENTION_KINDS

# docs/design.md §2: per-device KV bytes per token per layer, bf16, XL config.
XL_TABLE = {
    "mha": {1: 8192, 2: 4096, 4: 2048},
    "gqa-4": {1: 2048, 2: 1024, 4: 512},
    "gta-4": {1: 1152, 2: 640, 4: 384},
    "gla-2": {1: 1152, 2: 640, 4: 640},
    "mla": {1: 1152, 2: 1152, 4: 1152},
}


def test_xl_table_matches_paper():
    rows = analyze("xl", list(XL_TABLE), (1, 2, 4))
    got = {(r["variant"], r["tp"]): r["kv_bytes_per_token_per_layer"] for r in rows}
    assert got == {(v, tp): b for v, d in XL_TABLE.items() for tp, b in d.items()}


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accounting_equals_allocated_and_written_cache(attention, dtype):
    """Bytes per token equal the bytes the layer's cache tensors hold per slot, and a decode
    step writes exactly those slots."""
    cfg = ModelConfig.from_preset("tiny", attention=attention, n_layers=1)
    model = Transformer(cfg, dtype=dtype).eval()
    pages, page = 5, 4
    caches = model.allocate_kv_cache(pages, page)
    allocated = sum(t.numel() * t.element_size() for t in caches[0])
    assert allocated == model.layers[0].attn.kv_bytes_per_token(1, dtype) * pages * page
    assert model.kv_bytes_per_token(1, dtype) * pages * page == allocated
    for t in caches[0]:
        t.fill_(float("nan"))
    table = torch.tensor([[3, 1]], dtype=torch.int32)
    meta = AttentionMetadata.for_step(table, torch.tensor([6], dtype=torch.int32), 6, page,
                                      is_prefill=True)
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, 6)), meta=meta, kv_caches=caches)
    written = sum(int(torch.isfinite(t.flatten(2).float()).all(-1).sum()) * t[0, 0].numel()
                  * t.element_size() for t in caches[0])
    assert written == 6 * model.layers[0].attn.kv_bytes_per_token(1, dtype)


def test_decode_flops_and_bytes_by_hand():
    cfg = ModelConfig.from_preset("xl", attention="gla")
    attn = build_attention(cfg, device="meta")
    # 16 heads, widths 256 + 64 (QK) and 256 (V): 2 * L * 16 * (320 + 256) per query token.
    assert attn.decode_flops(1000, 2) == 2 * 2 * 16 * 1000 * (320 + 256)
    assert attn.decode_bytes(1000, 1) == 1000 * 1152 + 16 * (320 + 256) * 2
    gqa = build_attention(ModelConfig.from_preset("xl", attention="gqa"), device="meta")
    assert gqa.decode_bytes(10, 1, tp=2) == 10 * 1024 + 8 * 256 * 2


@pytest.mark.parametrize("attention, expected", [
    ("mha", 1), ("gqa", 4), ("gta", 8), ("mqa", 16), ("mla", 32), ("gla", 16)])
def test_arithmetic_intensity_matches_design(attention, expected):
    """docs/design.md §2 at L_q = 1, L >> h_q, with h_q = 16: MHA 1, GQA g, GTA 2g, MQA h, MLA 2h,
    GLA-2 h (within the RoPE key's and the latent's small overheads)."""
    attn = build_attention(ModelConfig.from_preset("xl", attention=attention), device="meta")
    ai = attn.arithmetic_intensity(1 << 20, 1)
    assert ai == pytest.approx(expected, rel=0.12)
    assert attn.arithmetic_intensity(1 << 20, 2) == pytest.approx(2 * ai, rel=0.01)


@pytest.mark.parametrize("attention, tp", [("gqa", 3), ("gqa", 32), ("gla", 3)])
def test_bad_tp_raises(attention, tp):
    attn = build_attention(ModelConfig.from_preset("xl", attention=attention), device="meta")
    with pytest.raises(ValueError, match="tp"):
        attn.kv_bytes_per_token(tp)


def test_gqa8_splits_at_tp8_and_duplicates_beyond():
    cfg = ModelConfig.from_preset("xl", attention="gqa", n_kv_heads=4)
    attn = build_attention(cfg, device="meta")
    assert attn.local_heads(8) == (2, 1)  # duplication factor ceil(8 * 4 / 16) = 2
    assert attn.kv_bytes_per_token(8) == 2 * 128 * 2
    assert math.prod(attn.cache_layout(2)["k"]) == 2 * 128
