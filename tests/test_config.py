import pytest

from hwattn.config import ATTENTION_KINDS, PAPER_HIDDEN, PAPER_PARAMS, ModelConfig, parse_variant
from hwattn.models import Transformer

PAPER_PRESETS = ("small", "medium", "large", "xl")


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_mha_presets_match_paper_sizes(preset):
    model = Transformer(ModelConfig.from_preset(preset), device="meta")
    assert model.num_params() == pytest.approx(PAPER_PARAMS[preset], rel=0.005)


@pytest.mark.parametrize("preset", PAPER_PRESETS + ("tiny", "mini"))
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_variants_are_parameter_matched(preset, attention):
    mha = Transformer(ModelConfig.from_preset(preset), device="meta").num_params()
    cfg = ModelConfig.from_preset(preset, attention=attention)
    assert Transformer(cfg, device="meta").num_params() == pytest.approx(mha, rel=0.005)
    published = PAPER_HIDDEN[attention].get(preset)
    if published is not None:
        assert cfg.hidden_dim == pytest.approx(published, rel=0.03)


def test_mini_preset_is_30_to_60m():
    for a in ATTENTION_KINDS:
        n = Transformer(ModelConfig.from_preset("mini", attention=a), device="meta").num_params()
        assert 30e6 <= n <= 60e6


def test_defaults_per_variant():
    cfg = ModelConfig.from_preset("xl", attention="gla")
    assert (cfg.n_latent_heads, cfg.latent_dim, cfg.q_latent_dim, cfg.rope_dim) == (2, 256, 1024, 64)
    cfg = ModelConfig.from_preset("xl", attention="mla")
    assert (cfg.n_latent_heads, cfg.latent_dim) == (1, 512)
    cfg = ModelConfig.from_preset("xl", attention="gta")
    assert (cfg.n_kv_heads, cfg.rope_dim, cfg.label) == (4, 64, "gta-4")
    assert ModelConfig.from_preset("xl", attention="mqa").n_kv_heads == 1
    assert ModelConfig.from_preset("xl", attention="gqa", n_kv_heads=8).label == "gqa-8"
    assert ModelConfig.from_preset("large", attention="gla").rope_dim == 32  # paper's d_R


@pytest.mark.parametrize("kwargs, field", [
    (dict(attention="gqa", n_heads=8, n_kv_heads=3), "n_kv_heads"),
    (dict(attention="gla", n_heads=8, n_latent_heads=3), "n_latent_heads"),
    (dict(attention="gta", head_dim=16, rope_dim=7), "rope_dim"),
    (dict(attention="gta", head_dim=16, rope_dim=16), "rope_dim"),
    (dict(attention="mla", head_dim=16, rope_dim=32), "rope_dim"),
    (dict(attention="bogus"), "attention"),
    (dict(attention="mha", n_kv_heads=2), "n_kv_heads"),
    (dict(attention="mqa", n_kv_heads=2), "n_kv_heads"),
    (dict(attention="mla", n_latent_heads=2), "n_latent_heads"),
    (dict(attention="gqa", n_latent_heads=2), "n_latent_heads"),
    (dict(attention="gqa", latent_dim=64), "latent_dim"),
    (dict(dim=100, n_heads=8), "n_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_impossible_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.from_preset("huge")


def test_parse_variant():
    assert parse_variant("gqa-8") == {"attention": "gqa", "n_kv_heads": 8}
    assert parse_variant("GLA-4") == {"attention": "gla", "n_latent_heads": 4}
    assert parse_variant("mla") == {"attention": "mla"}
    for bad in ("mla-2", "foo", "gqa-x", "gqa-0"):
        with pytest.raises(ValueError, match="variant"):
            parse_variant(bad)


@pytest.mark.parametrize("bad", ["gta-", "gqa-", "gla-", "gqa-\u0663", "gqa-\u00b2", "gqa- 8"])
def test_parse_variant_refuses_a_dangling_or_non_ascii_count(bad):
    """'gta-' is not 'gta' with its default count, and only ASCII digits count
    ('gqa-\u0663' is an Arabic-Indic three, '\u00b2' a superscript two)."""
    with pytest.raises(ValueError, match="group count"):
        parse_variant(bad)


def test_config_roundtrip():
    cfg = ModelConfig.from_preset("tiny", attention="gla")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
