"""A variant added from this one file, with nothing else in hwattn edited: "kvs", whose key and
value are one cached state per KV head (K = V, rotated). Its layer and spec are defined and
registered here, then run through the model, the engine (`LLM.generate` on CPU), tensor
parallelism (two gloo ranks, which find the variant through an entry point) and
`hwattn bench decode`'s input builder and SDPA check."""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the bench check runs Triton on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from hwattn import ModelConfig, Transformer, greedy_generate  # noqa: E402
from hwattn.engine import LLM, SamplingParams  # noqa: E402
from hwattn.layers import Attention, apply_rope, causal_attention, select_heads, set_weight  # noqa: E402
from hwattn.parallel import shard_model  # noqa: E402
from hwattn.variants import VariantSpec, parse_variant, register_variant, variant_names  # noqa: E402
from tests.conftest import assert_close_derived  # noqa: E402
from tests.conftest import make_checkpoint  # noqa: E402


class SharedKVAttention(Attention):
    """h_kv states S = RoPE(x W_kv) per token, each both key and value: h_kv · d_h cached."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__(config)
        d, h, hk = config.dim, config.n_heads, config.n_kv_heads
        self.n_kv_heads = hk
        self.scale = 1.0 / math.sqrt(self.head_dim)
        kw = dict(bias=False, device=device, dtype=dtype)
        self.wq = nn.Linear(d, h * self.head_dim, **kw)
        self.wkv = nn.Linear(d, hk * self.head_dim, **kw)
        self.wo = nn.Linear(h * self.head_dim, d, **kw)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)  # (B, T, H, d_h)
        s = self.wkv(x).view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, d_h)
        return (apply_rope(q, cos, sin),), (apply_rope(s, cos, sin),)

    def attend(self, q, states) -> Tensor:
        return causal_attention(q[0], states[0], states[0], self.scale)

    def decode(self, q, cache, meta) -> Tensor:
        return self.kernel_call(meta.backend, q, cache, meta.block_table, meta.cache_seqlens,
                                plan=meta.plan)

    def cache_layout(self, tp: int = 1):
        return {"kv": (self.local_heads(tp)[1], self.head_dim)}

    def decode_widths(self):
        return self.head_dim, self.head_dim

    def decode_query_shapes(self, batch, query_len, tp=1):
        return ((batch, query_len, self.local_heads(tp)[0], self.head_dim),)

    def kernel_call(self, backend, queries, cache, block_table, cache_seqlens, *, plan=None,
                    cache_scale=None, return_lse=False):
        return backend.decode(queries[0], cache[0], cache[0], block_table, cache_seqlens,
                              softmax_scale=self.scale, plan=plan, k_scale=cache_scale,
                              v_scale=cache_scale, return_lse=return_lse)

    def kernel_operands(self, queries, caches):
        return queries[0], caches[0], caches[0]

    def shard_heads(self, q_heads, c_heads):
        set_weight(self.wq, select_heads(self.wq.weight, q_heads, self.head_dim))
        set_weight(self.wkv, select_heads(self.wkv.weight, c_heads, self.head_dim))
        self.n_kv_heads = len(c_heads)
        return dict(n_kv_heads=len(c_heads))


TOY = register_variant(VariantSpec("kvs", SharedKVAttention, "toy: one state per KV head is K and V",
                                   groups=2))


def _tiny(**kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny", attention="kvs", n_layers=2, **kw)


def test_the_config_knows_the_variant_through_its_spec():
    cfg = _tiny()
    assert "kvs" in variant_names()
    assert (cfg.label, cfg.cache_heads, cfg.rope_dim) == ("kvs-2", 2, cfg.head_dim)
    assert parse_variant("kvs-4") == {"attention": "kvs", "n_kv_heads": 4}
    assert ModelConfig.from_preset("tiny", **parse_variant("kvs-4")).label == "kvs-4"
    mha = Transformer(ModelConfig.from_preset("tiny"), device="meta").num_params()
    assert Transformer(ModelConfig.from_preset("tiny", attention="kvs"),
                       device="meta").num_params() == pytest.approx(mha, rel=0.005)
    with pytest.raises(ValueError, match="n_latent_heads"):
        ModelConfig(attention="kvs", n_latent_heads=2)


def test_model_decodes_what_the_forward_computes():
    model = Transformer(_tiny()).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 7))
    tokens, _, logits = greedy_generate(model, prompt, 6, page_size=4, return_logits=True)
    seq = tokens[:, :-1]
    with torch.no_grad():
        fwd32 = model(seq)[:, 6:]
        truth = model.double()(seq)[:, 6:]
    assert_close_derived(logits, truth, fwd32, what="kvs decode logits")
    assert model.kv_bytes_per_token(1, torch.bfloat16) == 2 * 2 * 2 * model.config.head_dim


def test_engine_generates_greedy_decoding():
    llm = LLM("tiny", attention="kvs-2", device="cpu", dtype="fp64", page_size=4, num_pages=64,
              max_model_len=64, seed=0, model_overrides=dict(n_layers=2))
    prompts = [[1, 2, 3, 4, 5], list(range(30, 45))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        want, _ = greedy_generate(llm.engine.model, torch.tensor([prompt]), 8, page_size=4)
        assert out.token_ids == want[0, len(prompt):].tolist()


def test_shards_sum_to_the_full_layer():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attention="kvs", n_layers=1, n_kv_heads=4)
    full = Transformer(cfg).double()
    x = torch.randn(2, 5, cfg.dim, dtype=torch.float64)
    cos, sin = full.rope(torch.arange(5)[None].expand(2, 5))
    want = full.layers[0].attn(x, cos, sin)
    total = 0
    for rank in range(2):
        model = Transformer(cfg).double()
        model.load_state_dict(full.state_dict())
        shard_model(model, rank, 2, group=None)
        assert model.cache_heads == 2
        assert model.kv_bytes_per_token(1, torch.float64) == full.kv_bytes_per_token(2, torch.float64)
        total = total + model.layers[0].attn(x, cos, sin)
    torch.testing.assert_close(total, want)


@pytest.mark.slow
def test_two_gloo_ranks_generate_what_one_does(tmp_path, monkeypatch):
    # The spawned rank imports nothing of this process: an entry point (a dist-info folder
    # on sys.path, which spawned children inherit) tells it where the variant lives.
    dist = tmp_path / "site" / "hwattn_toy_variant-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hwattn-toy-variant\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[hwattn.variants]\nkvs = {__name__}:TOY\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = make_checkpoint(tmp_path / "kvs", "kvs-2", scale=5.0)
    kw = dict(model=path, dtype="fp64", device="cpu", page_size=8, num_pages=64, max_model_len=96)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], list(range(40, 75))]
    want = [o.token_ids for o in LLM(**kw).generate(prompts, params)]
    with LLM(tensor_parallel_size=2, **kw) as llm:
        got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert len(set(sum(want, []))) > 4, want


def test_bench_decode_builds_and_checks_its_kernel_inputs():
    from hwattn.bench import decode
    from hwattn.cli import bench_decode

    args = argparse.Namespace(suite="custom", variants="kvs-2", heads=None, tp=[1, 2], batch=[2],
                              context=[70], mixed=None, query_len=[2], page_size=[16])
    cases = bench_decode.cases(args)
    assert [c["heads"] for c in cases] == [TOY.bench_heads] * 2
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, warmup_ms=1, rep_ms=1)
    case = dict(variant="kvs-2", heads=4, tp=2, batch=2, context=70, query_len=2, page=16)
    row = decode.bench_case(torch, lambda fn, **_: (fn(), 1.0)[1], case, options,
                                  (1000.0, 100.0), [], device="cpu")
    assert row["check_rel_err"] < 1e-2, row
    assert (row["heads_local"], row["kv_heads_local"]) == (2, 1)
    layer = decode.layer_for("kvs-2", 4, 32, 16)
    assert row["bytes"] == 2 * layer.decode_bytes(70, 2, tp=2)
