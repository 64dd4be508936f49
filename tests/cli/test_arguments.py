"""The `hwattn` command under hostile arguments: every bad argument is one clear error line
naming the option (argparse's `error: argument --x: ...` or `hwattn CMD: error: ...`), exit
status 2 for usage errors and non-zero for other failures, never a traceback; nothing given is
ignored silently; nothing is destroyed before an argument is refused. Each case fails fast,
before any training, evaluation, engine or server starts."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from hwattn.cli import main

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `hwattn ARGV`, argparse's SystemExit included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result, *needles, status=2, argparse_style=False):
    """One error line naming what was wrong (argparse adds its usage lines above its own)."""
    code, out, err = result
    assert code == status, (code, out, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if not argparse_style:
        assert len(lines) == 1, err
    assert ": error: " in lines[-1], err
    for needle in needles:
        assert needle in lines[-1], (needle, err)


@pytest.fixture
def dataset(dataset_dir, tmp_path):
    """A private copy of the session's small dataset, for commands that could damage it."""
    path = tmp_path / "data"
    shutil.copytree(dataset_dir, path)
    return path


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a folder\n")
    return path


def no_server(monkeypatch):
    """A serve command that gets past its checks fails the test instead of listening (and
    binds a free port, not --port, meanwhile)."""
    import hwattn.cli.serve as serve_cli

    def refuse(*a, **k):
        raise AssertionError("the server started: the argument was not refused")

    bind = serve_cli.bind
    monkeypatch.setattr(serve_cli, "bind", lambda host, port: bind(host, 0))
    monkeypatch.setattr(serve_cli, "listen", refuse)


# --- hwattn analyze -------------------------------------------------------------------------


def test_analyze_empty_variants_is_an_error_not_an_index_error(capsys):
    assert_error(run_cli(capsys, "analyze", "--preset", "tiny", "--variants", ","), "--variants")


@pytest.mark.parametrize("argv, flag", [
    (["--bandwidth", "0"], "--bandwidth"),          # was silently ignored (falsy)
    (["--peak-tflops", "0"], "--peak-tflops"),      # was silently ignored (falsy)
    (["--peak-tflops", "-5"], "--peak-tflops"),     # was a negative ridge point
    (["--peak-tflops", "nan"], "--peak-tflops"),    # was a table of nan
])
def test_analyze_gpu_overrides_must_be_positive(capsys, argv, flag):
    assert_error(run_cli(capsys, "analyze", "--preset", "tiny", *argv), flag)


@pytest.mark.parametrize("argv, needle", [
    # Observed: each repeat printed its rows again (--tp 1,1 twice as many rows).
    (["--variants", "mha,gqa-4,mha"], "--variants names mha more than once"),
    (["--variants", "gqa-4,mla,GQA-04"], "--variants names gqa-4 = GQA-04 more than once"),
])
def test_analyze_refuses_a_variant_given_twice(capsys, argv, needle):
    result = run_cli(capsys, "analyze", "--preset", "tiny", *argv)
    assert_error(result, needle)
    assert result[1] == ""


@pytest.mark.parametrize("command", [["analyze", "--preset", "tiny", "--tp"],
                                     ["bench", "decode", "--batch"]])
def test_integer_lists_refuse_a_value_given_twice(capsys, command):
    result = run_cli(capsys, *command, "1,2,1")
    assert_error(result, f"argument {command[-1]}: 1 given more than once in '1,2,1'",
                 argparse_style=True)


def test_analyze_prints_each_distinct_variant_and_tp_once(capsys):
    code, out, _ = run_cli(capsys, "analyze", "--preset", "tiny", "--variants", "mqa,gqa-1",
                           "--tp", "1,2", "--json")
    assert code == 0
    rows = [(r["variant"], r["tp"]) for r in json.loads(out)["rows"]]
    assert rows == [("mqa", 1), ("mqa", 2), ("gqa-1", 1), ("gqa-1", 2)]


def test_analyze_plot_into_a_missing_folder_is_refused_before_the_table(capsys, tmp_path):
    result = run_cli(capsys, "analyze", "--preset", "tiny", "--plot", tmp_path / "no" / "x.png")
    assert_error(result, "--plot", "does not exist")
    assert result[1] == ""  # said before the table, not after it in a traceback


# --- hwattn demo ----------------------------------------------------------------------------


@no_cuda
def test_demo_cuda_without_cuda(capsys):
    assert_error(run_cli(capsys, "demo", "--device", "cuda"), "--device", "CUDA")


def test_demo_unknown_device(capsys):
    assert_error(run_cli(capsys, "demo", "--device", "bogus"), "--device")


def test_demo_context_overflow_names_the_options_before_decoding(capsys):
    result = run_cli(capsys, "demo", "--prompt-len", "1020", "--new-tokens", "10")
    assert_error(result, "--prompt-len", "--new-tokens")
    assert result[1] == ""


# --- hwattn data build / pack / unpack ------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["--sources", "gutenberg"], "--sources"),
    (["--hf-name", "sample-10BT"], "--hf-name"),
    (["--hf-split", "validation"], "--hf-split"),
    (["--hf-limit", "10"], "--hf-limit"),
    (["--gpt2-file", "gpt2.tiktoken"], "--gpt2-file"),
    (["--cache", "raw"], "--cache"),
])
def test_build_refuses_options_the_chosen_corpus_or_tokenizer_ignores(capsys, tmp_path, argv, flag):
    out = tmp_path / "built"
    assert_error(run_cli(capsys, "data", "build", "--out", out, "--tokenizer", "bpe:300", *argv),
                 flag)
    assert not out.exists()


def test_build_hf_limit_is_checked_before_the_network(capsys, tmp_path):
    assert_error(run_cli(capsys, "data", "build", "--corpus", "hf:nobody/nothing", "--hf-limit",
                         "-3", "--out", tmp_path / "b"), "--hf-limit")


@pytest.mark.parametrize("action", ["pack", "unpack"])
@pytest.mark.parametrize("workers", ["0", "-2"])
def test_pack_workers_must_be_positive(capsys, dataset, tmp_path, action, workers):
    assert_error(run_cli(capsys, "data", action, dataset, "--out", tmp_path / "o", "--workers",
                         workers), "--workers")


def test_pack_into_the_dataset_folder_is_refused_and_the_dataset_kept(capsys, dataset):
    before = sorted(p.name for p in dataset.iterdir())
    assert_error(run_cli(capsys, "data", "pack", dataset, "--out", dataset, "--workers", "1"),
                 "--out")
    assert sorted(p.name for p in dataset.iterdir()) == before


def test_pack_does_not_delete_unrelated_files_in_out(capsys, dataset, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    result = run_cli(capsys, "data", "pack", dataset, "--out", out, "--workers", "1")
    if result[0] != 0:  # refused (the command line's check) rather than packed beside it
        assert_error(result, "--out", "notes.txt")
    assert (out / "notes.txt").read_text() == "keep me\n"  # was deleted as a stale part


def test_unpack_into_the_pack_folder_is_refused_and_the_pack_kept(capsys, dataset, tmp_path):
    pack = tmp_path / "pack"
    assert main(["data", "pack", str(dataset), "--out", str(pack), "--workers", "1"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in pack.iterdir()}
    assert_error(run_cli(capsys, "data", "unpack", pack, "--out", pack, "--workers", "1"), "--out")
    assert {p.name: p.read_bytes() for p in pack.iterdir()} == before
    assert_error(run_cli(capsys, "data", "unpack", dataset, "--out", pack), "pack")  # another pack


@pytest.mark.parametrize("action", ["pack", "unpack"])
def test_pack_out_under_a_file_is_one_line(capsys, dataset, a_file, action):
    assert_error(run_cli(capsys, "data", action, dataset, "--out", a_file / "o", "--workers", "1"),
                 "--out")


def test_nested_commands_are_named_in_full(capsys, tmp_path):
    assert_error(run_cli(capsys, "data", "build", "--out", tmp_path / "b", "--corpus", "bogus"),
                 "hwattn data build: error:")


# --- hwattn train ---------------------------------------------------------------------------

TRAIN = ["--seq-len", "32", "--batch-size", "2", "--eval-tokens", "256", "--json"]


def test_short_run_without_warmup_flag_and_bad_seed_keeps_the_checkpoint(capsys, dataset_dir,
                                                                          tmp_path):
    out = tmp_path / "run"
    # --steps below the default warm-up used to fail on a `warmup_steps` the user never gave.
    code, _, err = run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "3",
                           *TRAIN)
    assert code == 0, err
    weights = (out / "checkpoint" / "model.safetensors").read_bytes()
    # A bad --seed used to be reported (as "expected non-negative integer") only after
    # --no-resume had deleted the checkpoint.
    assert_error(run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "3",
                         "--no-resume", "--seed", "-1", *TRAIN), "--seed")
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("argv, flag", [
    (["--log-every", "0"], "--log-every"),        # was ZeroDivisionError after training
    (["--eval-every", "-1"], "--eval-every"),     # was taken as 0
    (["--ckpt-every", "-1"], "--ckpt-every"),     # was taken as 0
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--clip", "0"], "--clip"),                  # zeroes every gradient
    (["--clip", "-1"], "--clip"),                 # flips every gradient
    (["--peak-tflops", "0"], "--peak-tflops"),    # was silently the H100 default
    (["--peak-tflops", "-3"], "--peak-tflops"),   # was a negative MFU
    (["--lr", "nan"], "--lr"),
    (["--eval-tokens", "10"], "--eval-tokens"),   # was an error after training
    (["--warmup", "5"], "--warmup"),
])
def test_train_values_out_of_range(capsys, dataset_dir, tmp_path, argv, flag):
    out = tmp_path / "run"
    assert_error(run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "2",
                         *TRAIN, *argv), flag)
    assert not out.exists()


def test_train_seq_len_beyond_the_validation_split_fails_before_training(capsys, dataset_dir,
                                                                         tmp_path):
    from hwattn.data.loader import TokenDataset

    shortest = min(len(v) for v in TokenDataset(dataset_dir).val.values())
    out = tmp_path / "run"
    assert_error(run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "1",
                         "--batch-size", "1", "--seq-len", shortest, "--eval-tokens", shortest,
                         "--json"), "--seq-len")
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "eval", "compare"])
def test_a_pack_given_as_data_says_so(capsys, dataset, tmp_path, checkpoints, command):
    pack = tmp_path / "pack"
    assert main(["data", "pack", str(dataset), "--out", str(pack), "--workers", "1"]) == 0
    capsys.readouterr()
    argv = {"train": ["train", "--data", pack, "--out", tmp_path / "r", "--steps", "1", *TRAIN],
            "eval": ["eval", checkpoints("mha"), "--data", pack, "--seq-len", "32"],
            "compare": ["compare", "--data", pack, "--out", tmp_path / "c", "--device", "cpu"]}
    # was "[Errno 2] No such file or directory: '.../train.bin'", exit 1
    assert_error(run_cli(capsys, *argv[command]), "--data", "unpack")


def test_train_out_under_a_file(capsys, dataset_dir, a_file):
    assert_error(run_cli(capsys, "train", "--data", dataset_dir, "--out", a_file / "run",
                         "--steps", "1", *TRAIN), "--out")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_train_cuda_without_cuda(capsys, dataset_dir, tmp_path, device):
    assert_error(run_cli(capsys, "train", "--data", dataset_dir, "--out", tmp_path / "r",
                         "--steps", "1", "--device", device, *TRAIN), "--device", "CUDA")


# --- hwattn compare -------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["--seed", "-1"], "--seed"),
    (["--variants", "mha,gqa-4,mha"], "--variants"),   # trained twice into one folder
    (["--data", "DATA", "--tokenizer", "gpt2"], "--tokenizer"),  # ignored with --data
    # Longer than the validation split: failed in evaluation, after training every variant.
    (["--data", "DATA", "--seq-len", "100000"], "--seq-len"),
])
def test_compare_bad_arguments_before_any_work(capsys, dataset_dir, tmp_path, argv, flag):
    argv = [str(dataset_dir) if a == "DATA" else a for a in argv]
    out = tmp_path / "cmp"
    assert_error(run_cli(capsys, "compare", "--out", out, "--steps", "1", "--device", "cpu",
                         *argv), flag)
    assert not out.exists()


def test_compare_seq_len_beyond_the_curves_tokens_names_the_flag_and_builds_nothing(capsys,
                                                                                    tmp_path):
    """Observed: the error named eval_tokens (no flag of compare) without its limit, and came
    after the shipped corpus was tokenized into <out>/data, which stayed behind."""
    out = tmp_path / "cmp"
    result = run_cli(capsys, "compare", "--out", out, "--steps", "1", "--device", "cpu",
                     "--seq-len", "10000")
    assert_error(result, "--seq-len 10000", "give --seq-len at most 8192")
    assert "eval_tokens" not in result[2] and result[1] == ""
    assert not out.exists()


def test_compare_out_under_a_file(capsys, a_file):
    assert_error(run_cli(capsys, "compare", "--out", a_file / "c", "--steps", "1", "--variants",
                         "mha", "--device", "cpu"), "--out")


@no_cuda
def test_compare_cuda_without_cuda(capsys, tmp_path):
    out = tmp_path / "cmp"
    assert_error(run_cli(capsys, "compare", "--out", out, "--device", "cuda"), "--device", "CUDA")
    assert not out.exists()


# --- hwattn eval ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needles", [
    (["--cloze", "-1"], ["--cloze", ">= 0"]),           # was "no cloze items could be built"
    (["--mc", "-5"], ["--mc", ">= 0"]),
    (["--ppl-tokens", "-100"], ["--ppl-tokens"]),       # was "-99 tokens are fewer than ..."
    (["--seq-len", "0"], ["--seq-len"]),                # was ZeroDivisionError
    (["--batch-size", "0"], ["--batch-size"]),          # was "range() arg 3 must not be zero"
    (["--seq-len", "1000"], ["--seq-len", "256"]),      # beyond the checkpoint's context
    (["--seq-len", "64", "--ppl-tokens", "10"], ["--ppl-tokens"]),
    # Was rounded down to whole windows without a word (100 -> 64 tokens scored).
    (["--seq-len", "64", "--ppl-tokens", "100"],
     ["--ppl-tokens 100 is not a multiple of the 64-token evaluation window (--seq-len)",
      "give 64 or 128"]),
    (["--ppl-tokens", "300"], ["--ppl-tokens 300", "(the default --seq-len)"]),
    (["--seed", "-100"], ["--seed", ">= 0"]),          # was "expected non-negative integer"
    # Pair counts given that the probe would have left out, silently (it keeps those that fit).
    (["--seq-len", "64", "--recall-pairs", "8,1000"], ["--recall-pairs 1000", "--seq-len 64"]),
    (["--seq-len", "256", "--recall-pairs", "100"], ["--recall-pairs 100", "word tokens"]),
])
def test_eval_values_out_of_range(capsys, checkpoints, dataset_dir, argv, needles):
    assert_error(run_cli(capsys, "eval", checkpoints("mha"), "--data", dataset_dir, *argv),
                 *needles)


def test_eval_refuses_a_dataset_of_another_tokenizer(capsys, trained, tmp_path, monkeypatch):
    """A checkpoint of `hwattn train` keeps its tokenizer; a dataset tokenized otherwise (here
    with fewer ids, which the vocabulary check let through) was evaluated as if its ids meant
    the same strings to the model, printing a perplexity of nothing in particular."""
    from hwattn.data.build import BuildOptions
    from hwattn.data.corpora import build_dataset
    import hwattn.eval.suite as suite

    other = tmp_path / "other"
    build_dataset(other, "embedded", "bpe:300", BuildOptions(val_fraction=0.1), progress=False,
                  log=lambda *a: None)

    def too_late(*a, **k):
        raise AssertionError("evaluated a dataset of another tokenizer")

    monkeypatch.setattr(suite, "evaluate_model", too_late)
    assert_error(run_cli(capsys, "eval", trained[0] / "checkpoint", "--data", other, "--cloze",
                         "0", "--mc", "0"), "--data", "tokenizer")


def test_eval_checks_lm_eval_specs_before_evaluating(capsys, checkpoints, dataset_dir,
                                                     monkeypatch):
    import hwattn.eval.suite as suite

    def too_late(*a, **k):
        raise AssertionError("evaluated before checking --lm-eval")

    monkeypatch.setattr(suite, "evaluate_model", too_late)
    assert_error(run_cli(capsys, "eval", checkpoints("mha"), "--data", dataset_dir, "--seq-len",
                         "64", "--lm-eval", "nofile"), "--lm-eval")


@pytest.mark.parametrize("argv", [["--lm-eval", "t=x.jsonl"], ["--seq-len", "64"],
                                  ["--device", "cpu"], ["--ppl-tokens", "100"],
                                  ["--batch-size", "4"], ["--recall-pairs", "4"]])
def test_write_tasks_alone_refuses_evaluation_options(capsys, dataset_dir, tmp_path, argv):
    assert_error(run_cli(capsys, "eval", "--data", dataset_dir, "--write-tasks", tmp_path / "t",
                         "--cloze", "2", "--mc", "2", *argv), argv[0])


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_write_tasks_without_items_is_refused(capsys, checkpoints, dataset_dir, tmp_path,
                                              with_checkpoint):
    # Was exit 0 with no task written and a printed `lm_eval --tasks  --include_path ...`
    # naming no task (or, with a checkpoint, --write-tasks ignored), and an empty folder made.
    ckpt = [checkpoints("mha")] if with_checkpoint else []
    assert_error(run_cli(capsys, "eval", *ckpt, "--data", dataset_dir, "--write-tasks",
                         tmp_path / "t", "--cloze", "0", "--mc", "0"), "--write-tasks")
    assert not (tmp_path / "t").exists()


def test_eval_write_tasks_under_a_file(capsys, dataset_dir, a_file):
    assert_error(run_cli(capsys, "eval", "--data", dataset_dir, "--write-tasks", a_file / "t",
                         "--cloze", "2", "--mc", "2"), "--write-tasks")


@no_cuda
def test_eval_cuda_without_cuda(capsys, checkpoints, dataset_dir):
    assert_error(run_cli(capsys, "eval", checkpoints("mha"), "--data", dataset_dir, "--device",
                         "cuda"), "--device", "CUDA")


# --- hwattn serve ---------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["-1", "70000", "http"])
def test_serve_port_out_of_range(capsys, monkeypatch, port):
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", "--port", port), "argument --port",
                 argparse_style=True)


def test_serve_unknown_log_level(capsys, monkeypatch):
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", "--log-level", "loud"), "argument --log-level",
                 argparse_style=True)


def test_serve_memory_budget_not_a_number(capsys, monkeypatch):
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", "--memory-budget", "lots"), "--memory-budget")


def test_serve_max_seq_len_with_a_checkpoint_is_refused(capsys, monkeypatch, checkpoints):
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", checkpoints("mha"), "--device", "cpu", "--max-seq-len",
                         "4096"), "--max-seq-len")


def test_serve_speculative_tokens_without_speculation(capsys, monkeypatch):
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", "--num-speculative-tokens", "5"),
                 "--num-speculative-tokens")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_serve_max_model_len_must_be_positive(capsys, monkeypatch, value):
    no_server(monkeypatch)  # was ignored (the model's context) and the server started
    assert_error(run_cli(capsys, "serve", "tiny", "--device", "cpu", "--max-model-len", value),
                 "--max-model-len")


@pytest.mark.parametrize("argv, flag", [
    (["--served-model-name", ""], "--served-model-name"),  # was the default name, silently
    (["--served-model-name", "  "], "--served-model-name"),
    (["--max-request-sequences", "0"], "--max-request-sequences"),  # was "max_sequences ..."
    (["--max-body-bytes", "-1"], "--max-body-bytes"),
])
def test_serve_server_options_are_named(capsys, monkeypatch, argv, flag):
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", "--device", "cpu", *argv), flag)


@pytest.mark.parametrize("command", [["serve", "tiny"], ["bench", "engine", "tiny"]])
def test_tp_that_does_not_split_the_heads_fails_before_the_ranks_start(capsys, monkeypatch,
                                                                        command):
    from hwattn.engine import tp_executor

    def too_late(*a, **k):
        raise AssertionError("rank processes started before --tp was checked")

    monkeypatch.setattr(tp_executor.TensorParallelExecutor, "__init__", too_late)
    no_server(monkeypatch)  # was a traceback from every rank (--tp 3), or a hang (--tp 16)
    assert_error(run_cli(capsys, *command, "--device", "cpu", "--tp", "3"), "--tp 3")


@no_cuda
def test_serve_cuda_without_cuda(capsys, monkeypatch):
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", "--device", "cuda"), "--device", "CUDA")


def test_attention_of_another_group_count_than_the_checkpoint_is_refused(capsys, monkeypatch,
                                                                          checkpoints):
    from hwattn.engine.loader import model_config

    ckpt = checkpoints("gqa-2")
    assert model_config(ckpt, "gqa-2").label == "gqa-2"
    with pytest.raises(ValueError, match="gqa-4"):
        model_config(ckpt, "gqa-4")  # was served as gqa-2 without a word
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", ckpt, "--device", "cpu", "--attention", "gqa-4"),
                 "gqa-4")


# --- hwattn bench ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag", [
    (["--heads", "0"], "--heads"),                            # was the default heads
    (["--suite", "standard", "--variants", "mla"], "--variants"),  # ignored by the suite
    (["--out", "/nonexistent-folder/x.json"], "--out"),       # was checked after the run
    (["--variants", "mla,gla-2,MLA"], "--variants names mla = MLA more than once"),
])
def test_bench_decode_arguments_are_checked_before_the_gpu(capsys, argv, flag):
    assert_error(run_cli(capsys, "bench", "decode", *argv), flag, "hwattn bench decode: error:")


@pytest.mark.parametrize("argv, needles", [
    # was an empty table and exit status 0 on a GPU: nothing timed
    (["--variants", ","], ["--variants"]),
    # was an error in every row on the GPU (exit status 1 after the whole sweep)
    (["--variants", "gqa-4", "--tp", "1,3"], ["--tp 3", "gqa-4"]),
    (["--variants", "gqa-4", "--heads", "6"], ["--heads 6", "gqa-4"]),
    # read only by the partial-RoPE variants (gta, mla, gla): ignored silently
    (["--variants", "gqa-4,mqa", "--rope-dim", "32"], ["--rope-dim", "gqa-4"]),
    # the standard suite's shapes with --head-dim / --rope-dim: checked only on the GPU
    (["--suite", "standard", "--rope-dim", "130"], ["--suite standard", "--rope-dim 130"]),
    (["--suite", "standard", "--head-dim", "7"], ["--suite standard", "--head-dim 7"]),
])
def test_bench_decode_shapes_are_checked_before_the_gpu(capsys, argv, needles):
    assert_error(run_cli(capsys, "bench", "decode", *argv), *needles)


@pytest.mark.parametrize("argv, needle", [(["--variants", "bogus"], "bogus"),
                                          (["--out", "/nonexistent-folder/x.json"], "--out")])
def test_bench_prefill_arguments_are_checked_before_the_gpu(capsys, argv, needle):
    assert_error(run_cli(capsys, "bench", "prefill", *argv), needle)


@pytest.mark.parametrize("argv, needles", [
    # each was a skipped row per case on the GPU, and exit status 0 with nothing timed
    (["--variants", "gqa-4", "--forms", "bogus"], ["--forms", "bogus", "gqa-4"]),
    (["--variants", "gqa-4,mla", "--forms", "absorbed"], ["--forms", "absorbed", "gqa-4"]),
    (["--variants", "gqa-4", "--heads", "6"], ["--heads 6", "gqa-4"]),
    # read only by the partial-RoPE variants (gta, mla, gla): ignored silently
    (["--variants", "gqa-4", "--rope-dim", "32"], ["--rope-dim", "gqa-4"]),
])
def test_bench_prefill_forms_and_shapes_are_checked_before_the_gpu(capsys, argv, needles):
    assert_error(run_cli(capsys, "bench", "prefill", *argv), *needles)


@no_cuda
@pytest.mark.parametrize("command, argv", [
    ("decode", ["--variants", "gqa-4,mla", "--rope-dim", "32", "--tp", "1,2"]),
    ("decode", ["--suite", "standard", "--rope-dim", "32"]),
    ("prefill", ["--variants", "gla-2,mla", "--forms", "absorbed", "--rope-dim", "32"]),
    ("prefill", ["--variants", "gqa-4,mla", "--rope-dim", "32"]),
])
def test_bench_options_that_apply_reach_the_gpu_check(capsys, command, argv):
    assert_error(run_cli(capsys, "bench", command, *argv), "CUDA GPU")


ENGINE = ["tiny", "--num-prompts", "2", "--prompt-len", "8", "--output-len", "4", "--json"]


@pytest.mark.parametrize("argv, flag", [
    (["--breakdown-batch", "0"], "--breakdown-batch"),        # was the default batch
    (["--breakdown-context", "-1"], "--breakdown-context"),   # was "query_len must be ..."
    (["--breakdown-context", "5000"], "--breakdown-context"), # was "position 4999 exceeds"
    (["--out", "/nonexistent-folder/x.json"], "--out"),       # was a traceback at the end
])
def test_bench_engine_arguments_are_checked_before_the_engine(capsys, monkeypatch, argv, flag):
    import hwattn.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "engine_from_args",
                        lambda args: pytest.fail("engine built before the check"))
    assert_error(run_cli(capsys, "bench", "engine", *ENGINE, *argv), flag)


def test_bench_engine_prompt_plus_output_beyond_context(capsys):
    assert_error(run_cli(capsys, "bench", "engine", "tiny", "--num-prompts", "1", "--prompt-len",
                         "1000", "--output-len", "100"), "--prompt-len", "--output-len")


SERVE = ["--num-prompts", "2", "--prompt-len", "8", "--output-len", "4", "--warmup-requests", "0"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, flag", [
    (["--tp", "2"], "--tp"), (["--attention", "gqa-4"], "--attention"), (["--http"], "--http"),
])
def test_bench_serve_url_refuses_in_process_options(capsys, argv, flag):
    url = f"http://127.0.0.1:{_closed_port()}"
    assert_error(run_cli(capsys, "bench", "serve", "--url", url, *SERVE, *argv), flag)


@pytest.mark.parametrize("argv, flag", [
    (["--prompt-len", "0"], "--prompt-len"),      # was prompts of one token
    (["--output-len", "0"], "--output-len"),      # was every request failing, exit 0
    (["--max-duration", "0"], "--max-duration"),  # was nothing measured, exit 0
    (["--prompt-len", "2000"], "--prompt-len"),   # was clipped to the context silently
    (["--served-model-name", "x"], "--served-model-name"),
    (["--num-prompts", "10001"], "--num-prompts"),  # was refused unnamed, after the build
])
def test_bench_serve_in_process_values(capsys, monkeypatch, argv, flag):
    import hwattn.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "engine_from_args",
                        lambda args: pytest.fail("engine built before the check"))
    assert_error(run_cli(capsys, "bench", "serve", "tiny", *SERVE, *argv), flag)


def test_bench_serve_unreachable_url_is_one_line(capsys):
    pytest.importorskip("httpx")
    url = f"http://127.0.0.1:{_closed_port()}"
    assert_error(run_cli(capsys, "bench", "serve", "--url", url, *SERVE, "--max-duration", "10"),
                 url, status=1)


# --- hwattn convert -------------------------------------------------------------------------


@pytest.fixture
def paper_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from tests.models.test_convert import their_config, their_state_dict

    src = tmp_path / "theirs"
    src.mkdir()
    save_file({k: v.float() for k, v in their_state_dict("gla").items()},
              str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(their_config("gla")))
    (src / "tokenizer.json").write_text("{}")
    return src


def test_convert_into_the_source_folder_is_refused_and_the_source_kept(capsys, paper_checkpoint):
    before = {p.name: p.read_bytes() for p in paper_checkpoint.iterdir()}
    assert_error(run_cli(capsys, "convert", paper_checkpoint, paper_checkpoint), "source")
    assert {p.name: p.read_bytes() for p in paper_checkpoint.iterdir()} == before


def test_convert_of_an_hwattn_checkpoint_is_one_line(capsys, checkpoints, tmp_path):
    assert_error(run_cli(capsys, "convert", checkpoints("mha"), tmp_path / "out"), "hwattn")


def test_convert_out_under_a_file(capsys, paper_checkpoint, a_file):
    assert_error(run_cli(capsys, "convert", paper_checkpoint, a_file / "out"), "afile")


def test_convert_over_a_checkpoint_with_another_tokenizer_is_refused_and_it_kept(
        capsys, paper_checkpoint, checkpoints, tmp_path):
    # Was converted into the folder with the old checkpoint's tokenizer.json left beside the
    # new weights (the source has none): eval and serve then read the wrong tokenizer.
    out = tmp_path / "out"
    shutil.copytree(checkpoints("mha"), out)
    (out / "tokenizer.json").write_text('{"old": true}')
    (paper_checkpoint / "tokenizer.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_error(run_cli(capsys, "convert", paper_checkpoint, out), "tokenizer.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
