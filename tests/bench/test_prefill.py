"""`hwattn bench prefill` on CPU: its argument handling, and its plumbing (inputs per prefill
form, the check against the reference, FLOP accounting) with the Triton kernel under the
interpreter and a wall clock in place of CUDA events."""

from __future__ import annotations

import time

import pytest
import torch

from hwattn import ops
from hwattn.bench import prefill
from hwattn.bench.decode import layer_for
from hwattn.cli import build_parser, main
from hwattn.cli.bench_prefill import cases_from, tile_config


def _wall_clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def _args(argv):
    return build_parser().parse_args(["bench", "prefill", *argv])


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "prefill", "--help"])
    assert exit_.value.code == 0 and "TFLOP/s" in capsys.readouterr().out
    for argv, name in ((["--batch", "two"], "--batch"), (["--batch", "0"], "--batch")):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "prefill", *argv])
        assert exit_.value.code == 2 and name in capsys.readouterr().err
    for argv, name in ((["--block-m", "24"], "block_m"), (["--variants", ","], "variants"),
                       (["--stages", "0"], "num_stages"), (["--heads", "0"], "heads")):
        assert main(["bench", "prefill", *argv]) == 2
        assert name in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "prefill", "--variants", "gqa-4"]) == 2
        assert "CUDA GPU" in capsys.readouterr().err


def test_cases_are_the_product_of_the_lists():
    args = _args(["--variants", "gqa-4,mla", "--query-len", "512,1024", "--prefix", "0,4096"])
    cases = cases_from(args)
    assert len(cases) == 8 and {c.context for c in cases} == {512, 1024, 4608, 5120}
    assert tile_config(args) is None
    forced = tile_config(_args(["--block-m", "64"]))
    assert (forced.block_m, forced.block_n) == (64, 64)


@pytest.mark.parametrize("variant, forms", [("gla-2", ("absorbed", "expanded")), ("gqa-2", ("paged",))])
def test_every_form_is_checked_and_counted(variant, forms):
    case = prefill.PrefillCase(variant, heads=4, head_dim=32, rope_dim=16, batch=2, query_len=20,
                               prefix=5, page=16)
    rows = prefill.bench_case(case, backend=ops.get_backend("triton"), timer=_wall_clock,
                              peak_tflops=1.0, device="cpu", dtype=torch.float32)
    assert tuple(r["form"] for r in rows) == forms
    layer = layer_for(variant, 4, 32, 16)
    for row, form in zip(rows, layer.prefill_forms()):
        assert row["check_rel_err"] < 1e-4, row
        assert row["attention_flops"] == form.attention_flops([20, 20], [25, 25])
        assert row["tflops"] == pytest.approx(row["attention_flops"] / row["ms"] / 1e9)
    with pytest.raises(ValueError, match="forms"):
        prefill.bench_case(case, backend=ops.get_backend("torch"), timer=_wall_clock,
                           forms=("nope",), device="cpu")
