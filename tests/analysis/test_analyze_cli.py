import json

import pytest

from hwattn.cli import main


def test_analyze_json_rows(capsys):
    assert main(["analyze", "--preset", "xl", "--tp", "1,2,4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    labels = {r["variant"] for r in doc["rows"]}
    assert labels == {"mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2"}
    row = next(r for r in doc["rows"] if r["variant"] == "gta-4" and r["tp"] == 2)
    assert row["kv_bytes_per_token_per_layer"] == 640
    assert row["kv_cache_bytes"] == 640 * 24 * 128 * 8192
    assert row["bound_lq1"] == "memory"


def test_analyze_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "roof.png"
    assert main(["analyze", "--preset", "small", "--variants", "gqa-2,gla-4",
                 "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert "gqa-2" in out and "gla-4" in out
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_plot_shows_every_variant_and_tp_degree_apart(tmp_path):
    """KV bytes per GPU against TP and the roofline: one marker per (variant, TP degree), and
    markers of different variants never drawn on top of each other, even where their values
    coincide (MQA and GLA-2 at TP 1, GTA-4 / MLA / GLA-2 at 1152 bytes)."""
    pytest.importorskip("matplotlib")
    import itertools
    import math

    from hwattn.analysis.cost import GPUS, analyze
    from hwattn.analysis.plot import plot_analysis

    rows = analyze("xl", tps=(1, 2, 4))
    placed = plot_analysis(rows, GPUS["h100"], str(tmp_path / "a.png"))
    want = {(r["variant"], r["tp"]) for r in rows}
    assert set(placed["kv"]) == want
    assert set(placed["roofline"]) == {(v, tp, q) for v, tp in want for q in (1, 2)}
    kv = {r["variant"]: r["kv_bytes_per_token_per_layer"] for r in rows if r["tp"] == 1}
    assert kv["mqa"] != kv["gla-2"] and kv["gta-4"] == kv["mla"] == kv["gla-2"] == 1152
    panels = [placed["kv"]] + [{k: p for k, p in placed["roofline"].items() if k[2] == q}
                               for q in (1, 2)]
    for points in panels:
        for (a, pa), (b, pb) in itertools.combinations(points.items(), 2):
            if a[0] != b[0]:
                assert math.dist(pa, pb) >= 5, (a, b, pa, pb)


@pytest.mark.parametrize("argv, needle", [
    (["analyze", "--variants", "bogus"], "variant"),
    (["analyze", "--tp", "3"], "tp"),
])
def test_analyze_errors_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_help_on_every_subcommand(capsys):
    from hwattn.cli import build_parser

    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    names = list(actions[0].choices)
    assert "analyze" in names
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
    capsys.readouterr()
