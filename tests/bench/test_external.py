"""The external-kernel adapters of `hwattn bench decode`, on CPU, against stand-ins.

`fake_external` implements FlashMLA's and FA3's documented semantics in plain PyTorch; fed the
adapters' converted operands, they must give what hwattn's reference gives on our own layout, on
hostile paged data (shuffled pages, NaN in every slot no sequence owns, out-of-range table
entries past each sequence, uneven lengths, L_q = 2). The real libraries need an sm_90 GPU and
are not run here.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from hwattn.bench import decode, decode_cases, decode_table, external
from hwattn.cli import main
from hwattn.ops.reference import decode_reference, decode_tied_reference
from tests.bench.fake_external import fa3_module, flash_mla_module
from tests.ops.paged import attention_truth, fill_cache, gather_truth, paged_table, tied_case

LENGTHS = [70, 2, 129]  # uneven, one shorter than a page, one a page past two pages of 64


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _tied(variant):
    if variant == "mla":  # one latent of 512 + RoPE 64 on pages of 64: FlashMLA's shapes
        return tied_case(LENGTHS, 2, 4, 1, 512, 512, 64, 64, torch.bfloat16)
    return tied_case([37, 2, 50], 2, 8, 2, 64, 64, 32, 16, torch.bfloat16)  # GLA-2


def _separate_case(lengths=(37, 2, 50), l_q=2, h_q=8, h_kv=2, d=32, page=16):
    """GQA-4 on hostile paged K/V caches: operands, and the fp64 truth."""
    lengths = list(lengths)
    table, n_pool = paged_table(lengths, page)
    k_cache, k_real = fill_cache((h_kv, d), lengths, table, n_pool, page, torch.bfloat16)
    v_cache, v_real = fill_cache((h_kv, d), lengths, table, n_pool, page, torch.bfloat16)
    q = torch.randn(len(lengths), l_q, h_q, d).to(torch.bfloat16)
    scale = 1 / math.sqrt(d)
    keys = [gather_truth(k_real, table, b, n) for b, n in enumerate(lengths)]
    values = [gather_truth(v_real, table, b, n) for b, n in enumerate(lengths)]
    return dict(queries=(q,), caches=(k_cache, v_cache), table=table,
                seqlens=torch.tensor(lengths, dtype=torch.int32), scale=scale,
                truth=attention_truth(q, keys, values, scale)[0])


def _operands(variant):
    """(queries, caches, table, seqlens, scale, our reference's out, fp64 truth)."""
    if variant == "gqa-4":
        c = _separate_case()
        ref, _ = decode_reference(c["queries"][0], *c["caches"], c["table"], c["seqlens"], c["scale"])
        return c["queries"], c["caches"], c["table"], c["seqlens"], c["scale"], ref, c["truth"]
    c = _tied(variant)
    ref, _ = decode_tied_reference(c["q_nope"], c["q_rope"], c["kv_cache"], c["rope_cache"],
                                   c["table"], c["seqlens"], c["softmax_scale"])
    return ((c["q_nope"], c["q_rope"]), (c["kv_cache"], c["rope_cache"]), c["table"], c["seqlens"],
            c["softmax_scale"], ref, c["truth"][0])


MODULES = {"FlashMLA": flash_mla_module, "FA3": fa3_module}


@pytest.mark.parametrize("name, variant", [("FlashMLA", "mla"), ("FA3", "mla"), ("FA3", "gla-2"),
                                           ("FA3", "gqa-4")])
def test_adapter_matches_our_reference_on_hostile_pages(name, variant):
    queries, caches, table, seqlens, scale, ref, truth = _operands(variant)
    call = external.build(name, MODULES[name](), queries, caches, table, seqlens, scale)
    _check_against_reference(call.to_ours(call.run()), ref, truth)


def _check_against_reference(out, ref, truth):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "read a slot no sequence owns (NaN there)"
    # Both run bf16 operands in fp32 and round the output to bf16: the same error against the
    # fp64 truth, up to summation order.
    assert _rel(out, truth) <= 2 * _rel(ref, truth) + 1e-6, (_rel(out, truth), _rel(ref, truth))
    assert _rel(out, ref) < 1e-2


def test_fa3_without_a_schedule_function_still_runs():
    queries, caches, table, seqlens, scale, ref, _ = _operands("gla-2")
    call = external.fa3_call(fa3_module(with_schedule=False), queries, caches, table, seqlens, scale)
    assert _rel(call.to_ours(call.run()), ref) < 1e-2


def test_conversion_mistakes_are_caught():
    """The comparison sees a wrong page mapping and swapped score terms (it can fail)."""
    queries, caches, table, seqlens, scale, ref, _ = _operands("gla-2")
    swapped = table[[1, 0, 2]].contiguous()
    swapped_lens = seqlens[[1, 0, 2]].contiguous()
    call = external.fa3_call(fa3_module(), queries, caches, swapped, swapped_lens, scale)
    out = call.to_ours(call.run())
    assert not torch.isfinite(out).all() or _rel(out, ref) > 0.1
    wrong_rope = (queries[0], queries[1].flip(-1))
    call = external.fa3_call(fa3_module(), wrong_rope, caches, table, seqlens, scale)
    assert _rel(call.to_ours(call.run()), ref) > 0.05


def test_layout_views_and_copies():
    """MLA's caches reach FA3 as views of ours; GLA's RoPE cache is copied per KV head."""
    seen = {}

    def spy(q, k_cache, v_cache, **kw):
        seen.update(k=k_cache, v=v_cache)
        return q

    module = fa3_module(with_schedule=False)
    module.flash_attn_with_kvcache = spy
    for variant in ("mla", "gla-2"):
        queries, caches, table, seqlens, scale, _, _ = _operands(variant)
        call = external.fa3_call(module, queries, caches, table, seqlens, scale)
        call.run()
        assert seen["v"].data_ptr() == caches[0].data_ptr()
        shares = seen["k"].data_ptr() == caches[1].data_ptr()
        assert shares == (variant == "mla") and bool(call.converted) == (variant != "mla"), variant


@pytest.mark.parametrize("name, variant, why", [
    ("FlashMLA", "gla-2", "one latent of 512"), ("FlashMLA", "gqa-4", "MLA only"),
    ("FA3", "gta", "GTA"), ("FlashMLA", "gta", "GTA")])
def test_cases_without_an_external_call_say_why(name, variant, why):
    if variant == "gta":  # the state's first 48 dims are the key's un-rotated part
        c = tied_case([20, 9], 1, 4, 2, 48, 64, 16, 16, torch.bfloat16)
        args = ((c["q_nope"], c["q_rope"]), (c["kv_cache"], c["rope_cache"]), c["table"],
                c["seqlens"], c["softmax_scale"])
    else:
        args = _operands(variant)[:5]
    with pytest.raises(external.Unsupported, match=why):
        external.build(name, MODULES[name](), *args)


def test_fp8_cache_is_declined():
    queries, caches, table, seqlens, scale, _, _ = _operands("gqa-4")
    fp8 = tuple(c.to(torch.float8_e4m3fn) for c in caches)
    with pytest.raises(external.Unsupported, match="float8"):
        external.build("FA3", fa3_module(), queries, fp8, table, seqlens, scale, cache_scale=0.05)
    with pytest.raises(ValueError, match="name must be one of"):
        external.build("FlashInfer", None, queries, caches, table, seqlens, scale)


def _install(monkeypatch, flash_mla=None, fa3=None):
    """Put the stand-ins (or None: 'not importable') where `import` finds them."""
    monkeypatch.setitem(sys.modules, "flash_mla", flash_mla)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)


def test_available_reports_versions_and_missing_packages(monkeypatch):
    _install(monkeypatch, fa3=fa3_module("3.0.0b1"))
    status = external.available()
    assert status["FA3"] == external.Availability("3.0.0b1", None)
    assert status["FlashMLA"].version is None and "flash_mla does not import" in status["FlashMLA"].why
    assert set(external.load()) == {"FA3"}
    modules, line = decode.external_kernels(decode.DecodeOptions())
    assert set(modules) == {"FA3"} and "FA3 3.0.0b1" in line and "FlashMLA not timed" in line
    assert decode.external_kernels(decode.DecodeOptions(external=False)) == (
        {}, "external kernels in this process: skipped (--no-external)")


def _wall_clock(fn, warmup=0, rep=0, return_mode="median"):
    fn()
    return 1.0  # ms; this checks the plumbing, not the speed


def test_bench_times_what_imports_and_skips_the_rest(monkeypatch):
    """A row on the CPU: FA3 (a stand-in) timed and checked against SDPA, FlashMLA absent (not
    importable) without a trace, and the table gets FA3's columns."""
    _install(monkeypatch, fa3=fa3_module())
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, warmup_ms=1, rep_ms=1)
    case = dict(variant="gla-2", heads=8, tp=1, batch=2, context=70, query_len=2, page=16)
    modules, _ = decode.external_kernels(options)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device="cpu", external=modules)
    assert row["ext_FA3_us"] == 1000.0 and row["ext_FA3_ratio"] == 1.0, row
    assert row["ext_FA3_rel_err"] < 1e-2 and row["check_rel_err"] < 1e-2, row
    assert not any(k.startswith("ext_FlashMLA") for k in row), row
    table = decode_table.format_table([row], (1000.0, 100.0))
    assert "FA3 µs" in table and "hw/FA3" in table and "FlashMLA" not in table


@pytest.mark.parametrize("variant, head_dim, rope_dim, l_q, page", [
    ("gla-2", 32, 16, 2, 16),  # FA3's qv form, two latent heads
    ("mla", 128, 64, 1, 64),   # FlashMLA's shapes (and FA3's qv form)
])
def test_an_uneven_batch_reaches_the_external_kernels_with_its_lengths(monkeypatch, variant,
                                                                       head_dim, rope_dim,
                                                                       l_q, page):
    """A --mixed case: each external kernel is called with the per-sequence lengths and the
    padded block table, and its output agrees with SDPA at every sequence's own length."""
    fa3, flash_mla = fa3_module(), flash_mla_module()
    seen = []
    for module, name in ((fa3, "flash_attn_with_kvcache"), (flash_mla, "flash_mla_with_kvcache")):
        def spy(*args, _call=getattr(module, name), **kwargs):
            seen.append(kwargs.get("cache_seqlens", args[3] if len(args) > 3 else None).tolist())
            return _call(*args, **kwargs)

        setattr(module, name, spy)
    _install(monkeypatch, flash_mla=flash_mla, fa3=fa3)
    options = decode.DecodeOptions(head_dim=head_dim, rope_dim=rope_dim, warmup_ms=1, rep_ms=1,
                                   no_hopper=True)
    ((spec, lengths),) = decode_cases.parse_mixed("150x1+20x2+3x1")
    (case,) = decode_cases.product_suite([variant], 4 if variant == "mla" else 8, [1], [], [], [l_q],
                                   [page], [(spec, lengths)])
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device="cpu", external=external.load())
    timed = ("FlashMLA", "FA3") if variant == "mla" else ("FA3",)
    for name in timed:
        assert row[f"ext_{name}_us"] == 1000.0 and row[f"ext_{name}_rel_err"] < 1e-2, row
    assert row["check_rel_err"] < 1e-2, row
    assert seen and all(s == [150, 20, 20, 3] for s in seen), seen


def test_bench_row_says_why_an_importable_kernel_has_no_call(monkeypatch):
    _install(monkeypatch, flash_mla=flash_mla_module())
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, no_sdpa=True)
    case = dict(variant="gqa-2", heads=4, tp=1, batch=2, context=40, query_len=1, page=16)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device="cpu", external=external.load())
    assert "MLA only" in row["ext_FlashMLA_note"] and "ext_FlashMLA_us" not in row, row
    assert "FlashMLA" not in decode_table.format_table([row], (1000.0, 100.0))


def test_a_failing_external_call_is_recorded_not_raised(monkeypatch):
    broken = fa3_module()

    def fail(*args, **kwargs):
        raise RuntimeError("no kernel for this head dim")

    broken.flash_attn_with_kvcache = fail
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, no_sdpa=True)
    case = dict(variant="gqa-2", heads=4, tp=1, batch=2, context=40, query_len=1, page=16)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device="cpu", external={"FA3": broken})
    assert "no kernel for this head dim" in row["ext_FA3_error"] and "ext_FA3_us" not in row
    assert "error" in decode_table.format_table([row], (1000.0, 100.0))


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-external"], False),
                                            (["--external"], True)])
def test_cli_external_flag(monkeypatch, flag, expected):
    seen = {}
    monkeypatch.setattr(decode, "run", lambda cases, options, configs, out=None:
                        seen.setdefault("options", options) and 0)
    assert main(["bench", "decode", "--variants", "mla", *flag]) == 0
    assert seen["options"].external is expected


# --- the carried libraries (external_carried): shims, checks, and why a library is not used ---

from hwattn.bench import external_carried as carried  # noqa: E402
from tests.bench.fake_external import carried_namespace  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_carried(monkeypatch):
    """Each test loads carried libraries afresh (load caches per process) and starts without
    $HWATTN_EXTERNAL_DIR."""
    monkeypatch.setattr(carried, "_LOADED", {})
    monkeypatch.delenv(carried.ENV, raising=False)


def _shim(name, schemas=None):
    ops = carried.bind_ops(name, carried_namespace(name, schemas or carried.SCHEMAS[name]))
    return carried.SHIMS[name](ops, "fake carried")


def _carried_operands(variant):
    if variant != "gla-2":
        return _operands(variant)
    # FA3's qv form needs a value at least 256 wide (the library refuses less): GLA-2 at d_h 128
    c = tied_case([37, 2, 50], 2, 8, 2, 256, 256, 64, 16, torch.bfloat16)
    ref, _ = decode_tied_reference(c["q_nope"], c["q_rope"], c["kv_cache"], c["rope_cache"],
                                   c["table"], c["seqlens"], c["softmax_scale"])
    return ((c["q_nope"], c["q_rope"]), (c["kv_cache"], c["rope_cache"]), c["table"], c["seqlens"],
            c["softmax_scale"], ref, c["truth"][0])


@pytest.mark.parametrize("name, variant", [("FlashMLA", "mla"), ("FA3", "mla"), ("FA3", "gla-2"),
                                           ("FA3", "gqa-4")])
def test_carried_shims_match_our_reference_on_hostile_pages(name, variant):
    """The adapters on the shims, the shims on stand-in ops taking their arguments in the
    libraries' schema order: a misplaced argument changes the result or trips a check."""
    queries, caches, table, seqlens, scale, ref, truth = _carried_operands(variant)
    call = external.build(name, _shim(name), queries, caches, table, seqlens, scale)
    for _ in range(2):  # FlashMLA: the first call makes the schedule, the second reuses it
        _check_against_reference(call.to_ours(call.run()), ref, truth)


def test_carried_flash_mla_schedule_is_bound_to_its_call():
    queries, caches, table, seqlens, scale, _, _ = _carried_operands("mla")
    shim = _shim("FlashMLA")
    meta, splits = shim.get_mla_metadata(seqlens, 8, 1)
    assert splits is None and meta.tile_scheduler_metadata is None
    q = torch.cat(queries, -1)
    k_cache = torch.cat((caches[0], caches[1][:, :, None, :]), -1)
    shim.flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, meta, None, scale, causal=True)
    assert meta.tile_scheduler_metadata is not None and meta.num_splits is not None
    with pytest.raises(ValueError, match="schedule metadata made for call"):
        shim.flash_mla_with_kvcache(q[:, :1], k_cache, table, seqlens, 512, meta, None, scale)
    with pytest.raises(ValueError, match="num_splits must be None"):
        shim.flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, meta, torch.ones(4), scale)


def _renamed(schema, a, b):
    return schema.replace(f" {a},", " @,").replace(f" {b},", f" {a},").replace(" @,", f" {b},")


def test_bind_ops_refuses_a_missing_op_or_another_schema():
    with pytest.raises(carried.CarriedUnavailable, match="registers no op _vllm_fa3_C::fwd"):
        carried.bind_ops("FA3", carried_namespace("FA3", {
            "get_scheduler_metadata": carried.SCHEMAS["FA3"]["get_scheduler_metadata"]}))
    schema = carried.SCHEMAS["FlashMLA"]["dense_decode_fwd"]
    swapped = _renamed(schema, "seqlens_k", "block_table")  # another release's argument order
    assert swapped != schema
    with pytest.raises(carried.CarriedUnavailable, match="the shim was written for"):
        carried.bind_ops("FlashMLA", carried_namespace("FlashMLA", {"dense_decode_fwd": swapped}))


def _write_carried(folder, payloads: dict, torch_version="2.11.0", cuda="13.0", xz=True):
    """A carried folder as fetch_external_kernels.sh writes it: {name: library bytes}."""
    import hashlib
    import json
    import lzma

    folder.mkdir(parents=True, exist_ok=True)
    kernels = {}
    for name, data in payloads.items():
        file = f"{name}.abi3.so" + (".xz" if xz else "")
        (folder / file).write_bytes(lzma.compress(data) if xz else data)
        kernels[name] = dict(file=file, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / carried.MANIFEST).write_text(json.dumps(dict(
        source="vllm==0.26.0", torch=torch_version, cuda=cuda, kernels=kernels)))
    return folder


def test_load_says_why_the_folder_cannot_be_used(tmp_path, monkeypatch):
    with pytest.raises(carried.CarriedUnavailable, match="HWATTN_EXTERNAL_DIR is not set"):
        carried.load("FA3")
    with pytest.raises(carried.CarriedUnavailable, match="is not a folder"):
        carried.load("FA3", tmp_path / "nowhere")
    with pytest.raises(carried.CarriedUnavailable, match="MANIFEST.json is missing"):
        carried.load("FA3", tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / carried.MANIFEST).write_text("{not json")
    with pytest.raises(carried.CarriedUnavailable, match="does not read as JSON"):
        carried.load("FA3", tmp_path / "bad")
    folder = _write_carried(tmp_path / "ext", {"FlashMLA": b"\x7fELF"}, torch_version="0.0.1")
    with pytest.raises(carried.CarriedUnavailable, match="lists no FA3"):
        carried.load("FA3", folder)
    with pytest.raises(carried.CarriedUnavailable, match=r"built against torch 0\.0\.1"):
        carried.load("FlashMLA", folder)
    manifest = carried.read_manifest(folder)
    with pytest.raises(carried.CarriedUnavailable, match="CPU build"):
        carried.check_build(manifest, ("0.0.1", None))
    with pytest.raises(carried.CarriedUnavailable, match="this torch uses CUDA 12.8"):
        carried.check_build(manifest, ("0.0.1", "12.8"))
    carried.check_build(manifest, ("0.0.1", "13.2"))  # a minor CUDA release apart is fine


def test_unpack_decompresses_once_and_checks_the_bytes(tmp_path):
    data = bytes(range(256)) * 1000
    folder = _write_carried(tmp_path / "ext", {"FA3": data})
    entry = carried.read_manifest(folder)["kernels"]["FA3"]
    path = carried.unpack(folder, entry, cache=tmp_path / "cache")
    assert path.read_bytes() == data and path.name == "FA3.abi3.so"
    stamp = path.stat().st_mtime_ns
    assert carried.unpack(folder, entry, cache=tmp_path / "cache").stat().st_mtime_ns == stamp
    plain = _write_carried(tmp_path / "plain", {"FA3": data}, xz=False)
    plain_entry = carried.read_manifest(plain)["kernels"]["FA3"]
    assert carried.unpack(plain, plain_entry) == plain / "FA3.abi3.so"  # used where it lies
    with pytest.raises(carried.CarriedUnavailable, match="not the file that was fetched"):
        carried.unpack(plain, dict(plain_entry, sha256="0" * 64))
    (folder / entry["file"]).write_bytes(b"not xz at all")
    with pytest.raises(carried.CarriedUnavailable, match="does not decompress"):
        carried.unpack(folder, entry, cache=tmp_path / "other")
    with pytest.raises(carried.CarriedUnavailable, match="is missing"):
        carried.unpack(folder, dict(entry, file="gone.so.xz"))


def test_a_library_that_does_not_dlopen_is_a_reason(tmp_path, monkeypatch):
    """The real torch.ops.load_library on a file that is no shared library: a reason, once."""
    folder = _write_carried(tmp_path / "ext", {"FA3": b"this is no ELF file" * 10})
    monkeypatch.setattr(carried, "torch_build", lambda: ("2.11.0", "13.0"))
    monkeypatch.setattr(carried.tempfile, "gettempdir", lambda: str(tmp_path))
    with pytest.raises(carried.CarriedUnavailable,
                       match=r"FA3.abi3.so does not load \(.*(ELF header|too short)"):
        carried.load("FA3", folder)  # dlopen's own words, not only torch's wrapper
    monkeypatch.setattr(carried, "_load_library", lambda path: pytest.fail("loaded twice"))
    with pytest.raises(carried.CarriedUnavailable, match="does not load"):
        carried.load("FA3", folder)  # the first reason, remembered


def _loadable(monkeypatch, tmp_path, names=("FlashMLA", "FA3")):
    """A carried folder whose libraries 'load' (load_library records the path) and register
    the stand-in ops; returns (folder, loaded paths)."""
    folder = _write_carried(tmp_path / "ext", {n: n.encode() * 100 for n in names})
    loaded = []
    monkeypatch.setattr(carried, "torch_build", lambda: ("2.11.0", "13.0"))
    monkeypatch.setattr(carried.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(carried, "_load_library", loaded.append)
    by_namespace = {carried.NAMESPACES[n]: carried_namespace(n, carried.SCHEMAS[n]) for n in names}
    monkeypatch.setattr(carried, "_namespace", by_namespace.__getitem__)
    return folder, loaded


def test_load_gives_one_shim_per_library(tmp_path, monkeypatch):
    folder, loaded = _loadable(monkeypatch, tmp_path)
    shim = carried.load("FlashMLA", folder)
    assert isinstance(shim, carried.FlashMLA) and carried.load("FlashMLA", folder) is shim
    assert shim.__version__ == "FlashMLA.abi3.so.xz of vllm==0.26.0 (carried)"
    assert [p.name for p in loaded] == ["FlashMLA.abi3.so"]
    assert isinstance(carried.load("FA3", folder), carried.FA3) and len(loaded) == 2


def test_available_uses_the_carried_folder_and_says_why_not(tmp_path, monkeypatch):
    """$HWATTN_EXTERNAL_DIR: what its manifest lists comes from there (a reason if it cannot),
    the rest from the packages; the bench header names both."""
    _install(monkeypatch, flash_mla=flash_mla_module("9.9"), fa3=fa3_module("3.0.0b1"))
    folder = _write_carried(tmp_path / "ext", {"FlashMLA": b"x"}, torch_version="0.0.1")
    monkeypatch.setenv(carried.ENV, str(folder))
    status = external.available()
    assert status["FlashMLA"].version is None, "an installed flash_mla must not stand in"
    assert status["FlashMLA"].why.startswith(f"carried build in {folder} not loaded: built "
                                             "against torch 0.0.1"), status
    assert status["FA3"] == external.Availability("3.0.0b1", None)  # not in the manifest
    monkeypatch.setenv(carried.ENV, str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    assert all("MANIFEST.json is missing" in s.why for s in external.available().values())

    folder, _ = _loadable(monkeypatch, tmp_path / "ok")
    monkeypatch.setenv(carried.ENV, str(folder))
    modules, line = decode.external_kernels(decode.DecodeOptions())
    assert isinstance(modules["FlashMLA"], carried.FlashMLA)
    assert isinstance(modules["FA3"], carried.FA3)
    assert "FlashMLA FlashMLA.abi3.so.xz of vllm==0.26.0 (carried)" in line, line


def test_bench_row_times_a_carried_kernel(tmp_path, monkeypatch):
    """A CPU row through the whole path: folder -> shim -> adapter -> check against SDPA."""
    folder, _ = _loadable(monkeypatch, tmp_path, names=("FA3",))
    monkeypatch.setenv(carried.ENV, str(folder))
    _install(monkeypatch)
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, warmup_ms=1, rep_ms=1)
    case = dict(variant="gqa-4", heads=8, tp=1, batch=2, context=70, query_len=2, page=16)
    modules, _ = decode.external_kernels(options)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device="cpu", external=modules)
    assert row["ext_FA3_us"] == 1000.0 and row["ext_FA3_rel_err"] < 1e-2, row
