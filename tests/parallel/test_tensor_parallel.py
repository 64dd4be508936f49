"""Tensor parallelism applied from outside the model: per-rank shards match the cost
accounting, and two gloo processes generate exactly what one does."""

import copy
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from hwattn.config import ModelConfig
from hwattn.engine import LLM, SamplingParams
from hwattn.engine.loader import model_config
from hwattn.models import Transformer, greedy_generate
from hwattn.parallel import local_kv_bytes_per_token, shard_model
from tests.parallel.procs import wait_gone

CASES = {  # label -> overrides of the tiny preset (8 query heads)
    "gqa-4": dict(attention="gqa", n_kv_heads=4),
    "gqa-1": dict(attention="gqa", n_kv_heads=1),  # one KV head: duplicated on both ranks
    "gta-4": dict(attention="gta", n_kv_heads=4),
    "mla": dict(attention="mla"),
    "gla-2": dict(attention="gla", n_latent_heads=2),
    "mha": dict(attention="mha"),
}


@pytest.mark.parametrize("label", list(CASES))
@pytest.mark.parametrize("tp", [2, 4])
def test_shards_match_the_per_rank_cost_accounting(label, tp):
    cfg = ModelConfig.from_preset("tiny", n_layers=1, **CASES[label])
    full = Transformer(cfg)
    expected = full.kv_bytes_per_token(tp, torch.bfloat16)
    for rank in range(tp):
        model = Transformer(cfg)
        shard_model(model, rank, tp, group=None)
        assert local_kv_bytes_per_token(model, torch.bfloat16) == expected
        cache = model.allocate_kv_cache(2, 4, dtype=torch.bfloat16)
        real = sum(t[0, 0].numel() * t.element_size() for t in cache[0])
        assert real == expected
    # MLA keeps its whole latent on every rank; GLA-2 halves it at TP 2.
    if label == "mla":
        assert expected == full.kv_bytes_per_token(1, torch.bfloat16)


@pytest.mark.parametrize("overrides", [dict(attention="gla", n_latent_heads=2),
                                       dict(attention="gla", n_latent_heads=2, attention_bias=True),
                                       dict(attention="mla", attention_bias=True),
                                       dict(attention="gta", attention_bias=True)],
                         ids=["gla-2", "gla-2-bias", "mla-bias", "gta-4-bias"])
def test_head_split_without_communication_sums_to_the_full_layer(overrides):
    """Row-parallel partial outputs of every rank add up to the unsharded layer's output."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layers=1, **overrides)
    full = Transformer(cfg).double()
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name.endswith(("bias", "b_uk", "b_uv")):
                p.normal_()  # biases start at zero; make a wrong slice visible
    x = torch.randn(2, 5, cfg.dim, dtype=torch.float64)
    cos, sin = full.rope(torch.arange(5)[None].expand(2, 5))
    want = full.layers[0].attn(x, cos, sin)
    total = 0
    for rank in range(2):
        model = Transformer(cfg).double()
        model.load_state_dict(full.state_dict())
        shard_model(model, rank, 2, group=None)
        total = total + model.layers[0].attn(x, cos, sin)
    torch.testing.assert_close(total, want)


def test_bad_degrees_are_refused():
    model = Transformer(ModelConfig.from_preset("tiny", n_layers=1, attention="gqa", n_kv_heads=4))
    with pytest.raises(ValueError, match="tp"):
        shard_model(model, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        shard_model(model, 2, 2)


def _on_gloo_threads(full, world: int, fn) -> list:
    """`fn(shard)` on each rank's shard of a copy of `full`, every rank a thread of this
    process with its own gloo process group (real all-reduces, no process to start)."""
    store, results, errors = dist.HashStore(), [None] * world, []

    def rank_main(rank):
        try:
            group = dist.ProcessGroupGloo(dist.PrefixStore("tp", store), rank, world,
                                          timedelta(seconds=60))
            results[rank] = fn(shard_model(copy.deepcopy(full), rank, world, group))
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def _random_model(label: str, **overrides) -> Transformer:
    """A 2-layer tiny model in fp64 with every parameter random (biases and zero-initialised
    output projections included, so that a wrong slice anywhere shows)."""
    cfg = model_config("tiny", label, dict(n_layers=2, max_seq_len=64, **overrides))
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


SPLITS = [(label, tp) for label in ("mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2")
          for tp in (2, 4)] + [("gqa-2", 4), ("gla-4", 2), ("gla-4", 4)]


@pytest.mark.parametrize("label, tp", SPLITS, ids=[f"{label}-tp{tp}" for label, tp in SPLITS])
def test_every_variant_sharded_over_real_all_reduces_computes_what_one_process_does(label, tp):
    """Every family at TP 2 and 4 (KV or latent heads split, or duplicated where fewer than
    the ranks), through gloo all-reduces: the dense forward's logits and those of a paged
    prefill and decode (`greedy_generate`) equal the unsharded model's on every rank."""
    full = _random_model(label)
    tokens = torch.randint(0, full.config.vocab_size, (2, 11))
    with torch.no_grad():
        want = full(tokens)
        _, _, want_steps = greedy_generate(full, tokens, 4, page_size=4, return_logits=True)

        def run(shard):
            _, _, steps = greedy_generate(shard, tokens, 4, page_size=4, return_logits=True)
            return shard(tokens), steps

        for rank, (dense, steps) in enumerate(_on_gloo_threads(full, tp, run)):
            torch.testing.assert_close(dense, want, msg=lambda m: f"rank {rank} dense: {m}")
            torch.testing.assert_close(steps, want_steps, msg=lambda m: f"rank {rank} paged: {m}")


@pytest.mark.parametrize("label, tp", [("mla", 2), ("gla-2", 2), ("gla-4", 4)])
def test_composed_absorptions_on_shards_decode_what_one_process_does(label, tp):
    """Each rank composes W_UK and W_UV into its own shards' projections (the output one
    keeps its all-reduce): paged decode logits equal the unsharded, uncomposed model's."""
    full = _random_model(label)
    tokens = torch.randint(0, full.config.vocab_size, (2, 11))
    with torch.no_grad():
        _, _, want = greedy_generate(full, tokens, 4, page_size=4, return_logits=True)

        def run(shard):
            assert shard.compose_absorptions() == len(shard.layers)
            return greedy_generate(shard, tokens, 4, page_size=4, return_logits=True)[2]

        for rank, got in enumerate(_on_gloo_threads(full, tp, run)):
            torch.testing.assert_close(got, want, msg=lambda m: f"rank {rank}: {m}")
        # A model composed before it is sharded is composed again from its shards.
        full.compose_absorptions()
        for rank, got in enumerate(_on_gloo_threads(full, tp, lambda shard: greedy_generate(
                shard, tokens, 4, page_size=4, return_logits=True)[2])):
            torch.testing.assert_close(got, want, msg=lambda m: f"rank {rank}, composed first: {m}")


@pytest.mark.parametrize("label", ["gta-4", "mla", "gla-2"])
def test_biased_variants_sharded_over_real_all_reduces_compute_what_one_process_does(label):
    full = _random_model(label, attention_bias=True)
    tokens = torch.randint(0, full.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = full(tokens)
        for rank, got in enumerate(_on_gloo_threads(full, 2, lambda shard: shard(tokens))):
            torch.testing.assert_close(got, want, msg=lambda m: f"rank {rank}: {m}")


@pytest.mark.parametrize("tp, owners", [(2, [0, 1]), (4, [0, 0, 1, 1])])
@pytest.mark.parametrize("label", ["gla-2", "mla"])
def test_latent_heads_are_placed_one_per_rank_or_shared_by_neighbours(label, tp, owners):
    """GLA-2 at TP 2: rank r keeps latent head r alone (its projection rows and its norm), so
    each rank caches half the latent; at TP 4 ranks 0, 1 share latent 0 and ranks 2, 3 latent
    1 (the latent their query heads read). MLA's single latent is on every rank whole."""
    full = _random_model(label)
    attn = full.layers[0].attn
    dc, n_latent = attn.latent_dim, attn.n_latent_heads
    for rank in range(tp):
        shard = shard_model(copy.deepcopy(full), rank, tp).layers[0].attn
        latent = owners[rank] if n_latent > 1 else 0
        assert shard.n_latent_heads == shard.config.n_latent_heads == 1
        assert shard.cache_layout(1)["kv"] == (1, dc)
        rows = slice(latent * dc, (latent + 1) * dc)
        torch.testing.assert_close(shard.wkv_a.weight[:dc], attn.wkv_a.weight[rows])
        torch.testing.assert_close(shard.wkv_a.weight[dc:], attn.wkv_a.weight[n_latent * dc:])
        torch.testing.assert_close(shard.kv_norm.weight, attn.kv_norm.weight[latent:latent + 1])
        heads = slice(rank * 8 // tp, (rank + 1) * 8 // tp)  # its query heads read `latent`
        assert all(h // (8 // n_latent) == latent for h in range(8)[heads])
        torch.testing.assert_close(shard.w_uk, attn.w_uk[heads])


@pytest.mark.parametrize("label", ["mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2"])
def test_a_head_count_the_ranks_do_not_divide_is_refused_by_name(label):
    """A split that cannot be made is refused before any weight changes, naming the argument
    (`world` here; `tensor_parallel_size` from the engine, tested in test_engine_config)."""
    model = _random_model(label)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^world 3 \(ranks to shard over\) does not split the "
                                         r"model's heads: tp \(3\) must divide n_heads \(8\)"):
        shard_model(model, 0, 3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 does not split"):
        LLM("tiny", attention=label, device="cpu", tensor_parallel_size=3)


@pytest.mark.parametrize("label", ["gqa-4", "gta-4", "mla", "gla-2"])
def test_a_fused_model_is_sharded_into_fused_shards(label):
    """Observed: sharding a model whose projections were fused (`fuse_projections`, as
    `ModelRunner` does) kept the fused matrix of the whole layer: the forward then failed on
    a shape ("shape '[2, 11, 4, 16]' is invalid for input of size 2816"). The shards are now
    fused anew from this rank's rows."""
    full = _random_model(label)
    tokens = torch.randint(0, full.config.vocab_size, (2, 11))
    with torch.no_grad():
        want = full(tokens)
        full.fuse_projections()
        for rank, got in enumerate(_on_gloo_threads(full, 2, lambda shard: shard(tokens))):
            torch.testing.assert_close(got, want, msg=lambda m: f"rank {rank}: {m}")


def test_a_model_sharded_twice_is_refused():
    """Observed: a second `shard_model` split the shard again without a word (a quarter of
    the heads kept at TP 2, every output wrong)."""
    model = shard_model(_random_model("gqa-4"), 0, 2)
    with pytest.raises(ValueError, match="sharded already"):
        shard_model(model, 1, 2)


@pytest.mark.slow
@pytest.mark.parametrize("label", ["gqa-4", "gta-4", "mla", "gla-2", "mha", "mqa"])
def test_two_processes_generate_what_one_does(label, checkpoints):
    """TP = 2 over gloo (rank 1 a spawned process) against TP = 1, greedy, fp64, on a model
    whose greedy continuations vary from token to token."""
    path = checkpoints(label)
    kw = dict(model=path, dtype="fp64", device="cpu", page_size=8, num_pages=64,
              max_model_len=96)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], list(range(40, 75)), [9] * 3]
    single = LLM(**kw)
    want = [o.token_ids for o in single.generate(prompts, params)]
    with LLM(tensor_parallel_size=2, **kw) as llm:
        engine = llm.engine
        assert engine.kv_bytes_per_token == single.engine.model.kv_bytes_per_token(2, torch.float64)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        engine.check_invariants()
        pids = engine.runner.pids
    assert got == want
    assert len(set(sum(want, []))) > 10, want  # not one repeated token
    assert not wait_gone(pids, 1.0)  # shutdown waited for the ranks to exit


@pytest.mark.slow
def test_decode_breakdown_times_the_all_reduces_on_every_rank(checkpoints):
    """Under TP the step profile has its all-reduce share: every rank makes the collectives
    of a decode step together (one per row-parallel projection), and rank 0 reports them."""
    from hwattn.bench.engine import decode_breakdown

    with LLM(checkpoints("gqa-4"), tensor_parallel_size=2, device="cpu", page_size=4,
             num_pages=120, max_model_len=96, max_num_seqs=6) as llm:
        step = decode_breakdown(llm.engine, 3, 40, iters=2)
        free = llm.engine.block_manager.num_free_pages
        # Timed alone, so each collective also waits for the slower rank to arrive: on two
        # busy CPU cores that can exceed the step itself; only its presence is checked here.
        assert step["allreduce_s"] > 0 and step["allreduce_share"] > 0, step
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids) == 2
        assert llm.engine.block_manager.num_free_pages == free
