"""`hwattn bench ...` and `hwattn compare` as a demanding user runs them: every option is
named by its own flag when refused, before the engine starts or the GPU is asked for; what is
accepted is used; progress bars can be turned off; the help states the defaults."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from tests.cli.test_arguments import assert_error, run_cli

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")

ENGINE = ["tiny", "--num-prompts", "2", "--prompt-len", "8", "--output-len", "4", "--json"]


@pytest.mark.parametrize("argv, needle", [
    # Each was the engine's field name: "page_size must be an integer in [1, 2**63), got 0".
    (["--page-size", "0"], "--page-size must be"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be"),
    (["--tp", "0"], "--tp must be"),
    (["--dp", "0"], "--dp must be"),
    (["--max-model-len", "1"], "--max-model-len must be"),
    (["--speculative", "nonsense"], "--speculative must be"),
    (["--speculative-disable-batch-size", "2"], "--speculative-disable-batch-size=2 needs "
                                                "--speculative"),
    (["--speculative", "ngram", "--num-speculative-tokens", "0"],
     "--num-speculative-tokens must be >= 1 with --speculative="),
    (["--gpu-memory-utilization", "0.5"], "--gpu-memory-utilization needs a CUDA device; on "
                                          "the CPU give --memory-budget"),
    # Checked by the engine's pool as it starts: named as the options too.
    (["--memory-budget", "1000"], "raise --memory-budget or lower --max-model-len"),
    # Was "dtype must be one of [...]", once the engine was being built.
    (["--dtype", "BF16"], "--dtype must be auto or one of"),
    # Was "n_heads (8) must be divisible by n_kv_heads (5)", naming no option.
    (["--attention", "gqa-5"], "--attention gqa-5: n_heads (8) must be divisible"),
    (["--attention", "bogus"], "--attention bogus: variant must start with"),
])
def test_engine_options_are_named_as_flags(capsys, argv, needle):
    if "--gpu-memory-utilization" in argv and torch.cuda.is_available():
        pytest.skip("refused on the CPU only")
    assert_error(run_cli(capsys, "bench", "engine", *ENGINE, *argv), needle)


def test_flag_names_rewrites_whole_field_names_only():
    from hwattn.cli.serve import flag_names

    assert (flag_names("num_speculative_tokens=9 with speculative='ngram' in max_model_len 8; "
                       "the model's max_seq_len 1024, speculative_x, my_page_size")
            == "--num-speculative-tokens=9 with --speculative='ngram' in --max-model-len 8; "
               "the model's max_seq_len 1024, speculative_x, my_page_size")


@pytest.mark.parametrize("argv, flag", [
    (["--attention", "gqa-5"], "--attention gqa-5"),  # was unnamed, from the model's shape
    (["--dtype", "fp65"], "--dtype"),
])
def test_bench_serve_names_engine_options_before_the_engine(capsys, monkeypatch, argv, flag):
    import hwattn.engine

    monkeypatch.setattr(hwattn.engine, "create_engine",
                        lambda *a, **k: pytest.fail("engine built before the check"))
    assert_error(run_cli(capsys, "bench", "serve", "tiny", "--num-prompts", "2", "--prompt-len",
                         "8", "--output-len", "4", *argv), flag)


@pytest.mark.parametrize("argv, needle", [
    # Was refused by the sampler after the engine had started and warmed up.
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    # Was timed eagerly, beyond the CUDA graphs captured up to --max-num-seqs, while the
    # report said "CUDA graphs: on".
    (["--breakdown-batch", "5", "--max-num-seqs", "4"],
     "--breakdown-batch 5 is more than --max-num-seqs 4"),
])
def test_bench_engine_refuses_before_the_engine_starts(capsys, monkeypatch, argv, needle):
    import hwattn.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "engine_from_args",
                        lambda args: pytest.fail("engine built before the check"))
    assert_error(run_cli(capsys, "bench", "engine", *ENGINE, *argv), needle)


def test_a_breakdown_the_pool_cannot_hold_is_refused_before_the_offline_run(monkeypatch):
    """Observed: --breakdown-batch 64 --breakdown-context 1024 on a small pool ran the whole
    offline benchmark first, then failed with "64 sequences of 1024 tokens need 1024 pages"."""
    from hwattn.bench import engine as bench
    from hwattn.engine import create_engine

    engine = create_engine(model="tiny", device="cpu", memory_budget=2 * 10**7)
    try:
        monkeypatch.setattr(bench, "run_offline",
                            lambda *a, **k: pytest.fail("the offline run started"))
        with pytest.raises(ValueError, match=r"the decode-step breakdown of 64 sequences of 1024 "
                                             r"tokens needs 1024 pages of 64 tokens; the pool "
                                             r"has \d+: .*--breakdown-batch"):
            bench.bench_engine(engine, 2, 8, 4, breakdown_batch=64, breakdown_context=1024)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("command, argv, bar", [
    (["bench", "engine"], ["tiny", "--num-prompts", "2", "--prompt-len", "4", "--output-len",
                           "2"], "tokens:"),
    (["bench", "serve"], ["tiny", "--num-prompts", "2", "--prompt-len", "4", "--output-len",
                          "2", "--warmup-requests", "0"], "requests:"),
])
def test_bench_progress_bars_can_be_turned_off_and_the_report_stays(capsys, command, argv, bar):
    """Only --json turned the bar off, and with it the human report."""
    code, out, err = run_cli(capsys, *command, *argv)
    assert code == 0 and bar in err
    code, out, err = run_cli(capsys, *command, *argv, "--no-progress")
    assert code == 0 and bar not in err, err
    assert "ms" in out and json.loads(out.strip().splitlines()[-1])


def test_bench_serve_report_says_all_at_once_without_a_unit():
    from hwattn.bench.serve import format_report

    s = dict(mean=0.0, median=0.0, p99=0.0)
    doc = dict(completed=1, requests=1, wall_s=1.0, timed_out=False, max_concurrency=None,
               request_rate=None, output_tokens_per_s=1.0, requests_per_s=1.0, ttft_s=s,
               itl_s=s, tpot_s=s, e2e_s=s, errors=[])
    assert "concurrency unbounded, all at once\n" in format_report(doc)  # was "all at once req/s"
    assert "rate 2.5 req/s\n" in format_report(dict(doc, request_rate=2.5))


@no_cuda
@pytest.mark.parametrize("argv, needle", [
    # Was " absorbed" (with its blank) reported as a form mla does not have.
    (["--variants", "mla", "--forms", "absorbed, expanded"], "CUDA GPU"),
    (["--variants", "mla", "--forms", "absorbed,absorbed"],
     "--forms names absorbed more than once"),
    (["--variants", "mla", "--forms", ","], "--forms ',' names no form"),
    # Was accepted on any machine and refused only on a GPU.
    (["--backend", "bogus"], "--backend must be auto or one of"),
])
def test_bench_prefill_lists_and_backend(capsys, argv, needle):
    assert_error(run_cli(capsys, "bench", "prefill", *argv), needle)


@no_cuda
@pytest.mark.parametrize("configs, needle", [
    # Each ran on a GPU as an error inside the row's configs map, the row reporting the
    # default config's time: the config asked for was dropped from the table.
    ("128:4:2:64", "--configs '128:4:2:64': block_n must be 16, 32 or 64"),
    ("0:0:0:0", "--configs '0:0:0:0': block_n must be"),
    ("64:3:2:64", "warps must be 1, 2, 4, 8 or 16"),
    ("64:4:0:64", "stages must be >= 1"),
    ("64:4:2:0", "max_rows must be >= 1"),
    ("64:4:2:64;64:4:2:64", "--configs names '64:4:2:64' more than once"),
    (";", "--configs ';' names no config"),
    ("64:4:2:64; 32:4:2:64", "CUDA GPU"),  # blanks around entries are fine
])
def test_bench_decode_configs_are_checked_before_the_gpu(capsys, configs, needle):
    assert_error(run_cli(capsys, "bench", "decode", "--configs", configs), needle)


def _actions(parser, name):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _actions(subparser, f"{name} {sub}")
        else:
            yield name, action


def test_bench_and_compare_help_states_every_default():
    """`--prompt-len` (256), `--max-duration` (600 s), `--max-num-seqs` (64), compare's
    `--steps`, `--lr`, ... had defaults their help did not say."""
    from hwattn.cli import build_parser

    missing = []
    for name, action in _actions(build_parser(), "hwattn"):
        if not (name.startswith("hwattn bench") or name == "hwattn compare"):
            continue
        if action.help in (None, argparse.SUPPRESS) or action.default in (None, False, [], ""):
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if "default" not in action.help:
            missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    compare = next(p for n, p in _actions(build_parser(), "hwattn") if n == "hwattn compare"
                   and "--steps" in p.option_strings)
    assert "default 320 on CPU" in compare.help
    assert not missing, missing


@pytest.mark.parametrize("argv, needle", [
    # Each named no option: "preset must be one of ...", "variant must start with ...".
    (["--preset", "bogus"], "--preset must be one of tiny, mini"),
    (["--tokenizer", "bogus"], "--tokenizer bogus: tokenizer must be"),
    (["--tokenizer", "bpe:0"], "--tokenizer bpe:0: tokenizer spec bpe:N needs N >= 258"),
    (["--variants", "gqa-4,bogus"], "--variants bogus: variant must start with"),
    (["--variants", "gqa-3"], "--variants gqa-3 (preset tiny): n_heads (8) must be divisible"),
])
def test_compare_names_the_option_before_building_anything(capsys, tmp_path, argv, needle):
    out = tmp_path / "cmp"
    assert_error(run_cli(capsys, "compare", "--device", "cpu", "--out", out, *argv), needle)
    assert not out.exists()


def test_compare_refuses_a_batch_that_cannot_fit_in_memory(capsys, monkeypatch, tmp_path):
    """Observed: `hwattn compare --batch-size 100000` built the corpus, showed "train mha: 0/1"
    and grew for a minute to the machine's 24 GB, when the kernel killed it (status 137, no
    word); with more memory it swapped for hours. Refused now once the corpus is built (it
    decides the vocabulary) and before any training, naming the option, the memory the batch
    needs, the memory free and the largest batch; what the build made is removed."""
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.train import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 8 * memory.GIB)
    out = tmp_path / "cmp"
    result = run_cli(capsys, "compare", "--device", "cpu", "--variants", "mha,gla-2", "--out", out,
                     "--batch-size", "100000")
    assert_error(result, "--batch-size 100000", "8.0 GiB free on cpu", "it cannot fit")
    assert not out.exists()
    # The largest batch said to fit passes (the shipped corpus's own 2,048-id BPE).
    fits = int(re.search(r"above ([\d,]+) it cannot fit", result[2])[1].replace(",", ""))
    configs = [ModelConfig.from_preset("tiny", **parse_variant(v)) for v in ("mha", "gla-2")]
    per_seq, once = max(memory.saved_bytes(c, 128, torch.device("cpu")) for c in configs)
    assert fits == (8 * memory.GIB - once) // per_seq and 8 < fits < 100_000
    memory.check_batch_fits(configs, 128, fits, torch.device("cpu"))


def _kept_by_forward(config, batch: int, seq_len: int) -> int:
    """Bytes of the storages a training forward keeps for the backward, counted plainly."""
    from hwattn.models.transformer import Transformer
    from hwattn.train.loss import linear_cross_entropy

    model = Transformer(config)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, config.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(model(x, hidden_only=True), model.output.weight, x)
    return sum(kept.values())


@pytest.mark.parametrize("label", ["mha", "mla", "gla-2"])
def test_the_memory_bound_is_what_the_forward_keeps_or_less(label):
    """Measured on batches of one and two, the bound is exact at another batch (linear); from
    a probe shorter than the sequence it is scaled up, and stays at or below the truth."""
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.train.memory import saved_bytes

    config = ModelConfig.from_preset("tiny", **parse_variant(label))
    per_seq, once = saved_bytes(config, 48, torch.device("cpu"))
    assert _kept_by_forward(config, 5, 48) == once + 5 * per_seq > 0
    per_seq, once = saved_bytes(config, 96, torch.device("cpu"), probe_len=32)
    truth = _kept_by_forward(config, 3, 96)
    assert 0.9 * truth <= once + 3 * per_seq <= truth


def test_compare_json_is_the_only_thing_on_stdout(capsys, monkeypatch, tmp_path):
    """`--preset mini --json` printed its "note: training on the small shipped corpus ..."
    line on stdout, ahead of the JSON document; and a diverged run's inf was `Infinity`."""
    from hwattn.train import compare

    monkeypatch.setattr(compare, "run_compare", lambda cfg, progress, log: {
        "rows": [{"variant": "gqa-4", "val_ppl": float("inf")}], "files": {}, "table": "-"})
    code, out, err = run_cli(capsys, "compare", "--preset", "mini", "--device", "cpu", "--json",
                             "--variants", "gqa-4", "--out", tmp_path / "cmp")
    assert code == 0, err
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} on stdout"))
    assert doc["rows"][0]["val_ppl"] is None
    assert "note: training on the small shipped corpus" in err


@pytest.mark.parametrize("argv, needle", [
    # Prompts of up to 900 * 1.5 tokens were cut to the context minus the output, without a
    # word, while the document recorded --prompt-len 900 and --prompt-spread 0.5.
    (["--prompt-len", "900", "--output-len", "100"],
     "--prompt-len 900 with --prompt-spread 0.5 makes prompts of up to 1350 tokens"),
    # Two warm-up requests were sent and the document said 5.
    (["--num-prompts", "2", "--warmup-requests", "5"],
     "--warmup-requests 5 is more than --num-prompts 2"),
])
def test_bench_serve_does_not_cut_what_it_was_asked_for(capsys, monkeypatch, argv, needle):
    import hwattn.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "engine_from_args",
                        lambda args: pytest.fail("engine built before the check"))
    assert_error(run_cli(capsys, "bench", "serve", "tiny", "--num-prompts", "4", "--prompt-len",
                         "8", "--output-len", "4", *argv), needle)
