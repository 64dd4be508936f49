"""The Hopper (sm_90) tied decode kernel (`hopper_decode.py`, Gluon).

On any machine: every launch layout the launcher ships, in every schedule (VARIANTS), compiles
for sm_90 (ptxas included) to warpgroup MMAs fed by TMA copies on mbarriers, without spills,
within the shared memory and registers of one SM; calls it does not take fall back to the
Triton kernel.
On an H100/H200 (HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0): the hostile paged cases of
`test_decode.py` against the fp64 truth, with the same derived tolerances, for every schedule
that takes the shape, unsplit and split into 64-token pieces.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from hwattn import ops
from hwattn.ops import hopper_decode, triton_decode
from hwattn.ops.hopper_decode import HopperConfig, TiedShape
from tests.conftest import assert_close_derived
from tests.ops.paged import DEVICE, fill_cache, on_device, paged_table, tied_case

SMEM_LIMIT = 232448  # dynamic shared memory one sm_90 program may use (227 KiB)

# Schedules under test: HopperConfig fields on top of the shape's default programs per SM.
VARIANTS = {
    "specialised": dict(specialize=True),
    "pipelined": dict(specialize=False),
    "overlapped": dict(overlap=True),
    "duo": dict(schedule="duo", ctas_per_sm=1),
    "pingpong": dict(schedule="pingpong"),
    # fp8 caches only, one program per SM: five widened slots, where narrow states leave room
    # for them; three (the launch that was the default before two per SM), where the default
    # is two per SM.
    "overlapped-w5": dict(overlap=True, widened_stages=5, ctas_per_sm=1),
    "overlapped-fp8-1": dict(overlap=True, ctas_per_sm=1),
}
FP8_ONLY = {"overlapped-w5", "overlapped-fp8-1"}


def _config(shape: TiedShape, variant: str) -> HopperConfig | None:
    """The variant's config for a shape ("default": `choose_config`'s, whose plan knobs leave
    the kernel as it is), or None where the schedule does not take it."""
    fp8 = shape.cache == "fp8"
    base = hopper_decode.choose_config(shape.d_nope, shape.d_v, shape.d_rope, shape.group,
                                       shape.query_len, fp8_cache=fp8)
    if variant == "default":
        return base
    if variant in FP8_ONLY and not fp8:
        return None
    if variant == "overlapped-fp8-1" and base.ctas_per_sm == 1:
        return None  # the default (or "overlapped") already is this launch
    config = HopperConfig(**dict(dict(ctas_per_sm=base.ctas_per_sm), **VARIANTS[variant]))
    try:
        hopper_decode.plan_launch(shape.d_nope, shape.d_v, shape.d_rope, shape.group,
                                  shape.query_len, config, fp8_cache=fp8)
    except ValueError:
        return None
    return config


def _nvidia_backend() -> bool:
    import triton

    if importlib.util.find_spec("triton.experimental.gluon") is None:
        return False
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.exists(os.path.join(tools, "ptxas")) and os.path.exists(os.path.join(tools, "cuobjdump"))


def _on_hopper() -> bool:
    return (DEVICE.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] == 9)


# One shape per launch layout the launcher picks (BLOCK_M, warps, WARPS_N, programs per SM).
COMPILE_SHAPES = [
    pytest.param(TiedShape(512, 512, 64, 128, 1), id="mla-2wg-split-columns"),
    pytest.param(TiedShape(512, 512, 64, 128, 4), id="mla-lq4"),
    pytest.param(TiedShape(256, 256, 64, 64, 1), id="gla2-lq1-1wg"),
    pytest.param(TiedShape(256, 256, 64, 64, 2), id="gla2-lq2-2wg-split-rows"),
    pytest.param(TiedShape(64, 128, 64, 8, 1), id="gta4-2-per-sm"),
    pytest.param(TiedShape(64, 128, 16, 3, 3, page=128, dtype="fp16"), id="dr16-fp16-page128"),
    pytest.param(TiedShape(128, 128, 32, 3, 3, page=128, dtype="fp16"), id="d128-dr32-fp16"),
    # fp8 (e4m3) caches: copied as they are, widened to fp16 by warps of their own.
    pytest.param(TiedShape(256, 256, 64, 64, 1, cache="fp8"), id="gla2-fp8"),
    pytest.param(TiedShape(64, 128, 64, 8, 2, cache="fp8"), id="gta4-fp8-lq2"),
    pytest.param(TiedShape(64, 128, 16, 3, 3, page=128, dtype="fp16", cache="fp8"),
                 id="dr16-fp16-fp8"),
    pytest.param(TiedShape(64, 512, 16, 16, 1, cache="fp8"), id="d512-dr16-fp8-2wg"),
]
# Every shape class `choose_config` has a measured default for, and the engine's model shapes:
# the default config must compile (the schedules above already cover some of them).
DEFAULT_SHAPES = [
    pytest.param(TiedShape(512, 512, 64, 128, 2), id="default-mla-lq2"),
    pytest.param(TiedShape(512, 512, 64, 16, 1), id="default-mla-tp8-lq1"),
    pytest.param(TiedShape(512, 512, 64, 16, 2), id="default-mla-tp8-lq2"),
    pytest.param(TiedShape(512, 512, 64, 8, 1), id="default-mla-8-heads"),
    pytest.param(TiedShape(256, 256, 64, 64, 3), id="default-gla2-lq3"),
    pytest.param(TiedShape(256, 256, 64, 64, 4), id="default-gla2-lq4"),
    pytest.param(TiedShape(256, 256, 64, 16, 2), id="default-gla-tp8-lq2"),
    pytest.param(TiedShape(256, 256, 64, 4, 1), id="default-gla2-4-heads"),
    pytest.param(TiedShape(64, 128, 64, 8, 4), id="default-gta4-lq4"),
    pytest.param(TiedShape(64, 128, 64, 2, 1), id="default-gta4-2-heads"),
    pytest.param(TiedShape(128, 128, 32, 4, 1), id="default-d128-dr32"),
    pytest.param(TiedShape(256, 256, 64, 64, 4, cache="fp8"), id="default-gla2-fp8-lq4"),
    pytest.param(TiedShape(128, 128, 64, 8, 1, cache="fp8"), id="default-gta4-xl-fp8"),
]
CASES = [(p.id, v) for p in COMPILE_SHAPES for v in [*VARIANTS, "default"]
         if _config(p.values[0], v) is not None] + [(p.id, "default") for p in DEFAULT_SHAPES]


# Compiled in a child process: the ops tests run Triton's interpreter, which replaces the
# language's library functions the Gluon compiler needs.
COMPILE_SCRIPT = """
import hashlib, json, sys
from hwattn.ops import hopper_decode, kernel_code, triton_decode
from hwattn.ops.hopper_decode import HopperConfig, TiedShape
results = []
for fields, config in json.loads(sys.argv[1]):
    shape, config = TiedShape(**fields), HopperConfig(**config)
    kernel, launch = hopper_decode.compile_sm90(shape, config)
    ptx = kernel.asm["ptx"]
    results.append(dict(kernel_code.resources(kernel), ctas_per_sm=config.ctas_per_sm,
                        threads=launch.threads, wgmma="wgmma.mma_async" in ptx,
                        widens_e4m3="cvt.rn.f16x2.e4m3x2" in ptx,
                        tma="cp.async.bulk.tensor" in ptx, mbarrier="mbarrier.try_wait" in ptx,
                        setmaxnreg="setmaxnreg" in ptx,
                        ptx_code=hashlib.sha256(kernel_code.ptx_code(ptx).encode()).hexdigest()))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled():
    """{(shape id, variant): report} for every case in CASES, each distinct (shape, config)
    compiled once."""
    shapes = {p.id: p.values[0] for p in COMPILE_SHAPES + DEFAULT_SHAPES}
    pairs = {case: (dataclasses.asdict(shapes[case[0]]), dataclasses.asdict(_config(shapes[case[0]], case[1])))
             for case in CASES}
    unique = list({json.dumps(pair, sort_keys=True): pair for pair in pairs.values()}.values())
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(unique)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    by_pair = {json.dumps(pair, sort_keys=True): report for pair, report in zip(unique, reports)}
    return {case: by_pair[json.dumps(pair, sort_keys=True)] for case, pair in pairs.items()}


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without Gluon or the NVIDIA backend")
@pytest.mark.parametrize("shape_id, variant", CASES, ids=[f"{s}-{v}" for s, v in CASES])
def test_compiles_for_sm90(compiled, shape_id, variant):
    res = compiled[(shape_id, variant)]
    assert res["wgmma"] and res["tma"] and res["mbarrier"], res
    assert res["setmaxnreg"] == (variant != "pipelined"), res  # warp-specialised partitions
    assert res["spill_bytes"] == 0, res
    assert res["shared_bytes"] <= min(SMEM_LIMIT, 233472 // res["ctas_per_sm"] - 1024), res
    assert 0 < res["registers"] <= 255, res
    assert res["registers"] * res["threads"] * res["ctas_per_sm"] <= 65536, res
    assert res["widens_e4m3"] == ("fp8" in shape_id), res  # the fp8 cases convert e4m3 to fp16


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without Gluon or the NVIDIA backend")
def test_fingerprints_tell_the_schedules_apart(compiled):
    """The PTX digest `hopper_fingerprint.py` compares across refactors covers the code: every
    schedule of one shape gets its own."""
    shape = "gla2-lq2-2wg-split-rows"
    digests = {v: compiled[(s, v)]["ptx_code"] for s, v in CASES if s == shape and v != "default"}
    assert len(digests) == 5 and len(set(digests.values())) == 5, digests


def test_schedules_take_the_shapes_they_are_for():
    """duo: MLA's and GLA's latents (key = value, at least 128 wide); overlapped: one
    warpgroup holds all columns (at most 256); pingpong: that, and more than 64 rows."""
    taken = {sid: [v for s, v in CASES if s == sid] for sid in (p.id for p in COMPILE_SHAPES)}
    assert "duo" in taken["mla-2wg-split-columns"] and "overlapped" not in taken["mla-lq4"]
    assert {"duo", "overlapped"} <= set(taken["gla2-lq2-2wg-split-rows"])
    assert "duo" not in taken["gta4-2-per-sm"] and "overlapped" in taken["gta4-2-per-sm"]
    assert "pingpong" in taken["gla2-lq2-2wg-split-rows"] and "pingpong" not in taken["gla2-lq1-1wg"]
    with pytest.raises(ValueError, match="even"):
        hopper_decode.plan_launch(256, 256, 64, 64, 1, HopperConfig(schedule="duo", num_stages=3))
    with pytest.raises(ValueError, match="schedule"):
        HopperConfig(schedule="fast")
    with pytest.raises(ValueError, match="overlap"):
        HopperConfig(overlap=True, specialize=False)


def test_fp8_path_is_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv(hopper_decode.FP8_ENV, raising=False)
    assert hopper_decode.fp8_enabled()
    monkeypatch.setenv(hopper_decode.FP8_ENV, "1")
    assert hopper_decode.fp8_enabled()
    monkeypatch.setenv(hopper_decode.FP8_ENV, "0")
    assert not hopper_decode.fp8_enabled()


def test_fp8_caches_take_the_specialised_ring():
    """An fp8 cache: the specialised ring (overlapped where three widened slots fit), two
    programs per SM where GTA's narrow state fits them, else one, the copied ring as deep as
    fits beside the fewest widened slots, a producer warpgroup that copies and widens; states
    wider than 256 go to Triton."""
    fp8 = {s for s, v in CASES if "fp8" in s}
    assert {v for s, v in CASES if s in fp8} == {"specialised", "overlapped", "overlapped-w5",
                                                 "overlapped-fp8-1", "default"}
    assert {s for s, v in CASES if v == "overlapped-w5"} == {"gta4-fp8-lq2", "dr16-fp16-fp8"}
    assert {s for s, v in CASES if v == "overlapped-fp8-1"} == {"gta4-fp8-lq2", "dr16-fp16-fp8"}
    config = hopper_decode.choose_config(256, 256, 64, 64, 1, batch=128, num_heads_kv=2,
                                         fp8_cache=True)
    assert (config.schedule, config.specialize, config.overlap, config.ctas_per_sm) == \
        ("ring", True, True, 1)
    launch = hopper_decode.plan_launch(256, 256, 64, 64, 1, config, fp8_cache=True)
    assert (launch.block_m, launch.num_warps, launch.head_blocks) == (64, 4, 1)
    assert (launch.num_stages, launch.cache_stages) == (3, 3)
    assert launch.threads == 32 * 8 and launch.maxnreg is None  # the producer warps widen too
    # 128 rows (L_q 2): two consumer warpgroups; three widened slots no longer fit beside the
    # copied ones, so the plain specialised consumers.
    config = hopper_decode.choose_config(256, 256, 64, 64, 2, batch=128, num_heads_kv=2,
                                         fp8_cache=True)
    assert (config.schedule, config.overlap) == ("ring", False)
    launch = hopper_decode.plan_launch(256, 256, 64, 64, 2, config, fp8_cache=True)
    assert (launch.block_m, launch.num_warps, launch.head_blocks) == (128, 8, 1)
    assert (launch.num_stages, launch.cache_stages, launch.maxnreg) == (2, 3, 168)
    # Copied slots of one byte per element fill what the widened ones leave.
    plain = hopper_decode.plan_launch(64, 128, 64, 8, 1, HopperConfig(), fp8_cache=True)
    assert (plain.num_stages, plain.cache_stages) == (2, 6)
    assert plain.smem_bytes == 64 * (64 + 64) * 2 + 2 * 64 * 192 * 2 + 6 * 64 * 192
    # Two programs per SM: GTA-4's state leaves each half of the shared memory three widened
    # slots beside two copied ones, and half of the registers; GLA-2's does not fit.
    two = hopper_decode.plan_launch(64, 128, 64, 8, 1, HopperConfig(overlap=True, ctas_per_sm=2),
                                    fp8_cache=True)
    assert (two.num_stages, two.cache_stages, two.maxnreg, two.threads) == (3, 2, 128, 256)
    assert two.smem_bytes == 64 * (64 + 64) * 2 + 3 * 64 * 192 * 2 + 2 * 64 * 192
    with pytest.raises(ValueError, match="do not fit"):
        hopper_decode.plan_launch(256, 256, 64, 64, 1, HopperConfig(ctas_per_sm=2), fp8_cache=True)
    # fp8 takes two programs per SM wherever the overlapped launch fits them (measured 1.17-1.30x
    # the one-per-SM launch on GTA-4 at L_q 1, H100, docs/hopper.md), else one.
    for query_len in (1, 2, 4):
        config = hopper_decode.choose_config(64, 128, 64, 8, query_len, fp8_cache=True)
        assert (config.ctas_per_sm, config.overlap) == (2, True), query_len
        assert config.programs_per_sm is None  # the plan's own two programs per SM
    assert hopper_decode.choose_config(64, 128, 64, 8, 1, batch=1, num_heads_kv=4,
                                       fp8_cache=True).ctas_per_sm == 2
    for shape in ((128, 128, 64, 8, 1), (256, 256, 64, 64, 1)):  # no room for two overlapped
        assert hopper_decode.choose_config(*shape, fp8_cache=True).ctas_per_sm == 1, shape
    assert hopper_decode.choose_config(64, 128, 64, 8, 1).ctas_per_sm == 2  # bf16 unchanged
    for schedule in (dict(schedule="duo"), dict(schedule="pingpong"), dict(specialize=False)):
        with pytest.raises(ValueError, match="fp8 cache runs on the specialised ring"):
            hopper_decode.plan_launch(256, 256, 64, 64, 2, HopperConfig(**schedule), fp8_cache=True)
    # MLA's latent: two copied slots do not fit beside its widened ones (the Triton kernel);
    # a 512-wide state with a narrow RoPE key does (column-split consumers, compiled below).
    with pytest.raises(ValueError, match="fp8 cache slots"):
        hopper_decode.plan_launch(512, 512, 64, 16, 1, HopperConfig(), fp8_cache=True)
    wide = hopper_decode.plan_launch(64, 512, 16, 16, 1, HopperConfig(), fp8_cache=True)
    assert (wide.warps_n, wide.num_stages, wide.cache_stages) == (2, 2, 2)
    with pytest.raises(ValueError, match="fp8 cache slots"):
        hopper_decode.plan_launch(256, 256, 64, 64, 1, HopperConfig(num_stages=9), fp8_cache=True)
    # More widened slots (GTA's narrow state has room): the copied ring takes what is left.
    deep = hopper_decode.plan_launch(64, 128, 64, 8, 1, HopperConfig(overlap=True, widened_stages=6),
                                     fp8_cache=True)
    assert (deep.num_stages, deep.cache_stages) == (6, 5)
    assert deep.smem_bytes == 64 * (64 + 64) * 2 + 6 * 64 * 192 * 2 + 5 * 64 * 192
    with pytest.raises(ValueError, match="at least 3"):
        hopper_decode.plan_launch(64, 128, 64, 8, 1, HopperConfig(overlap=True, widened_stages=2),
                                  fp8_cache=True)
    with pytest.raises(ValueError, match="fp8 cache slots"):  # GLA-2: no room for a fourth
        hopper_decode.plan_launch(256, 256, 64, 64, 1, HopperConfig(overlap=True, widened_stages=4),
                                  fp8_cache=True)
    with pytest.raises(ValueError, match="fp8 caches only"):
        hopper_decode.plan_launch(64, 128, 64, 8, 1, HopperConfig(widened_stages=4))
    with pytest.raises(ValueError, match="widened_stages must be positive"):
        HopperConfig(widened_stages=0)
    # bf16 caches keep their measured defaults.
    assert hopper_decode.choose_config(512, 512, 64, 128, 1).schedule == "duo"


def test_defaults_follow_the_measured_table():
    """choose_config: duo for MLA's 512-wide latent, pingpong for GLA's 256-wide latent with more
    than 64 rows, overlapped otherwise (GTA two per SM); one-wave plans of >= 256-token pieces
    only where a one-program-per-SM kernel's batch leaves SMs idle."""
    def pick(*shape, **kw):
        c = hopper_decode.choose_config(*shape, **kw)
        return c.schedule, c.overlap, c.ctas_per_sm, c.programs_per_sm, c.min_piece

    assert pick(512, 512, 64, 128, 1, batch=128) == ("duo", False, 1, None, None)
    assert pick(512, 512, 64, 128, 1, batch=4) == ("duo", False, 1, 1, 256)
    assert pick(512, 512, 64, 16, 2, batch=128) == ("duo", False, 1, 1, 256)
    assert pick(256, 256, 64, 64, 1, batch=128, num_heads_kv=2) == ("ring", True, 1, None, None)
    assert pick(256, 256, 64, 64, 2, batch=128, num_heads_kv=2) == ("pingpong", False, 1, None, None)
    assert pick(256, 256, 64, 64, 1, batch=1, num_heads_kv=2) == ("ring", True, 1, 1, 256)
    assert pick(256, 256, 64, 16, 1, batch=128) == ("ring", True, 1, 1, 256)
    assert pick(64, 128, 64, 8, 1, batch=1, num_heads_kv=4) == ("ring", True, 2, None, None)
    # A width no schedule but the ring takes (a GTA state wider than 256): the plain ring.
    assert pick(256, 512, 64, 8, 1)[:2] == ("ring", False)
    # The split decision counts this device's SMs.
    assert pick(512, 512, 64, 128, 1, batch=40, num_sms=78)[3] is None


def test_plan_launch_layouts_and_budget():
    mla = hopper_decode.plan_launch(512, 512, 64, 128, 1, HopperConfig())
    assert (mla.block_m, mla.num_warps, mla.warps_n, mla.head_blocks) == (64, 8, 2, 2)
    assert mla.maxnreg == 168  # 8 consumer warps + the producer's warpgroup share 64K registers
    gla = hopper_decode.plan_launch(256, 256, 64, 64, 4, HopperConfig())
    assert (gla.block_m, gla.warps_n, gla.heads_per_prog, gla.head_blocks) == (128, 1, 32, 2)
    assert hopper_decode.choose_config(64, 128, 64, 8, 1).ctas_per_sm == 2
    with pytest.raises(ValueError, match="do not fit"):
        hopper_decode.plan_launch(512, 512, 64, 128, 1, HopperConfig(num_stages=3))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1)")
def test_cpu_calls_fall_back_to_triton():
    """Off Hopper the launcher is the Triton kernel: same numbers as calling it directly."""
    lengths, page = [70, 5], 64
    table, n_pool = paged_table(lengths, page)
    kv_cache, _ = fill_cache((1, 64), lengths, table, n_pool, page, torch.float32)
    rope_cache, _ = fill_cache((16,), lengths, table, n_pool, page, torch.float32)
    q_nope, q_rope = torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    args = [t.to("cpu") for t in (q_nope, q_rope, kv_cache, rope_cache, table, seqlens)]
    assert hopper_decode.why_unsupported(*args[:4]) == "not a CUDA tensor"
    got = hopper_decode.decode_tied(*args, softmax_scale=0.1)
    ref = ops.decode_tied(*args, softmax_scale=0.1, return_lse=True, backend="torch")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (HWATTN_TEST_DEVICE=cuda)")
def test_unsupported_cuda_calls_fall_back_to_triton():
    """A page size the Hopper kernels do not take: the launcher runs the Triton kernel."""
    lengths, page = [70, 5], 16
    table, n_pool = paged_table(lengths, page)
    kv_cache, _ = fill_cache((1, 128), lengths, table, n_pool, page, torch.bfloat16)
    rope_cache, _ = fill_cache((64,), lengths, table, n_pool, page, torch.bfloat16)
    q_nope = torch.randn(2, 1, 8, 128).to(torch.bfloat16)
    q_rope = torch.randn(2, 1, 8, 64).to(torch.bfloat16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    args = [t.to(DEVICE) for t in (q_nope, q_rope, kv_cache, rope_cache, table, seqlens)]
    assert "page size" in hopper_decode.why_unsupported(*args[:4])
    got = hopper_decode.decode_tied(*args, softmax_scale=0.1)
    ref = triton_decode.decode_tied(*args, softmax_scale=0.1)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


def _plans(args, h_kv: int, l_q: int, page: int, config: HopperConfig) -> dict:
    """The plans a GPU case runs under: the kernel's own, 64-token pieces, one wave, and a
    full batch's (one SM per sequence and KV head) that cuts only a sequence 1.5x the mean."""
    one_wave = dataclasses.replace(config, programs_per_sm=1, min_piece=64)
    return {"auto": None,
            "split": ops.plan_decode(args[5], num_heads_kv=h_kv, query_len=l_q, page_size=page,
                                     split_tokens=64),
            "one-wave": hopper_decode.make_plan(args[0], args[2], args[3], args[5], one_wave),
            "full": ops.plan_decode(args[5], num_heads_kv=h_kv, query_len=l_q, page_size=page,
                                    num_sms=len(args[5]) * h_kv, programs_per_sm=1,
                                    min_piece=64)}


# (lengths, L_q, H_q, H_kv, D_nope, D_v, D_R, page, dtype)
GPU_CASES = [
    pytest.param(([1, 63, 64, 65], 1, 16, 4, 64, 128, 64, 64, torch.bfloat16), id="gta-len1-63-64-65"),
    pytest.param(([339, 127, 129], 2, 128, 2, 256, 256, 64, 64, torch.bfloat16), id="gla2-prime-lq2"),
    pytest.param(([257, 3], 1, 128, 1, 512, 512, 64, 128, torch.bfloat16), id="mla-prime-page128"),
    pytest.param(([128, 130, 192], 2, 128, 1, 512, 512, 64, 64, torch.bfloat16), id="mla-2-3-3-blocks"),
    pytest.param(([64, 200], 4, 16, 1, 512, 512, 64, 64, torch.bfloat16), id="mla-tp8-lq4"),
    pytest.param(([97, 5], 3, 6, 2, 64, 128, 16, 256, torch.float16), id="dr16-ratio3-lq3-fp16"),
    pytest.param(([2049, 700], 1, 64, 1, 256, 256, 32, 64, torch.bfloat16), id="gla-long-dr32"),
    pytest.param(([4100], 2, 32, 4, 64, 128, 64, 64, torch.bfloat16), id="gta4-long-lq2"),
    pytest.param(([40, 90], 1, 2, 1, 128, 128, 64, 64, torch.float16), id="ratio2-padded-rows"),
]


@pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (HWATTN_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("variant", [*VARIANTS, "default"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_matches_fp64_on_hopper(case, variant):
    lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype = case
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    config = _config(TiedShape(d_nope, d_v, d_rope, h_q // h_kv, l_q, page, dtype_name), variant)
    if config is None:
        pytest.skip(f"the {variant} schedule does not take this shape")
    c = tied_case(lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype)
    q_nope, q_rope, kv_cache, rope_cache = c["q_nope"], c["q_rope"], c["kv_cache"], c["rope_cache"]
    table, seqlens, softmax_scale, truth = c["table"], c["seqlens"], c["softmax_scale"], c["truth"]
    baseline = ops.decode_tied(q_nope, q_rope, kv_cache, rope_cache, table, seqlens,
                               softmax_scale=softmax_scale, return_lse=True, backend="torch")
    args = [t.to(DEVICE) for t in (q_nope, q_rope, kv_cache, rope_cache, table, seqlens)]
    assert hopper_decode.why_unsupported(*args[:4]) is None
    for name, plan in _plans(args, h_kv, l_q, page, config).items():
        out, lse = hopper_decode.decode_tied(*args, softmax_scale=softmax_scale, plan=plan,
                                             config=config)
        assert_close_derived(out.cpu(), truth[0], baseline[0], what=f"{variant} {name} out")
        assert_close_derived(lse.cpu(), truth[1], baseline[1], what=f"{variant} {name} lse")


FP8 = torch.float8_e4m3fn
FP8_SCALE = 0.06  # stored = value / scale, both caches
FP8_CASES = [p for p in GPU_CASES if p.id in (
    "gta-len1-63-64-65", "gla2-prime-lq2", "dr16-ratio3-lq3-fp16", "gla-long-dr32", "gta4-long-lq2")]


@pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (HWATTN_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("variant", ["specialised", "overlapped", "overlapped-w5",
                                     "overlapped-fp8-1", "default"])
@pytest.mark.parametrize("case", FP8_CASES)
def test_fp8_cache_matches_fp64_on_hopper(case, variant, monkeypatch):
    """An e4m3 cache (NaN in the unused slots, as e4m3fn keeps it), widened in shared memory:
    the fp64 truth of the stored values times the scale, with the tolerance the reference
    earns in the query dtype; unsplit, split into 64-token pieces and in one wave; through
    `decode_tied` and through the backend (the engine's path, its plan refreshed)."""
    lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype = case
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    config = _config(TiedShape(d_nope, d_v, d_rope, h_q // h_kv, l_q, page, dtype_name, "fp8"),
                     variant)
    if config is None:
        pytest.skip(f"the {variant} schedule does not take this shape")
    c = tied_case(lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype, FP8, FP8_SCALE)
    q_nope, q_rope, kv_cache, rope_cache = c["q_nope"], c["q_rope"], c["kv_cache"], c["rope_cache"]
    table, seqlens, softmax_scale, truth = c["table"], c["seqlens"], c["softmax_scale"], c["truth"]
    kw = dict(softmax_scale=softmax_scale, kv_scale=FP8_SCALE)
    gpu = [t.to(DEVICE) for t in (q_nope, q_rope, kv_cache, rope_cache)]
    monkeypatch.setenv(hopper_decode.FP8_ENV, "0")
    assert "turned off" in hopper_decode.why_unsupported(*gpu, kv_scale=FP8_SCALE)
    monkeypatch.delenv(hopper_decode.FP8_ENV, raising=False)
    baseline = ops.decode_tied(q_nope, q_rope, kv_cache, rope_cache, table, seqlens,
                               return_lse=True, backend="torch", **kw)
    args = [t.to(DEVICE) for t in (q_nope, q_rope, kv_cache, rope_cache, table, seqlens)]
    assert hopper_decode.why_unsupported(*args[:4], kv_scale=FP8_SCALE) is None
    for name, plan in _plans(args, h_kv, l_q, page, config).items():
        out, lse = hopper_decode.decode_tied(*args, plan=plan, config=config, **kw)
        assert out.dtype == dtype
        assert_close_derived(out.cpu(), truth[0], baseline[0], what=f"{variant} {name} out")
        assert_close_derived(lse.cpu(), truth[1], baseline[1], what=f"{variant} {name} lse")
    if variant == "default":
        backend = ops.get_backend("hopper")
        plan = backend.plan(args[5], num_heads_kv=h_kv, query_len=l_q, page_size=page, device=DEVICE)
        for step in ("made", "refreshed"):
            out, lse = backend.decode_tied(*args, plan=plan, return_lse=True, **kw)
            assert_close_derived(out.cpu(), truth[0], baseline[0], what=f"backend {step} out")
            assert_close_derived(lse.cpu(), truth[1], baseline[1], what=f"backend {step} lse")
            backend.plan(args[5], num_heads_kv=h_kv, query_len=l_q, page_size=page, out=plan)


@pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (HWATTN_TEST_DEVICE=cuda)")
def test_fp8_mla_latent_falls_back_to_triton(monkeypatch):
    """MLA's 512-wide fp8 latent does not fit beside its widened slots: the Triton kernel."""
    monkeypatch.delenv(hopper_decode.FP8_ENV, raising=False)
    lengths, page = [257, 3], 64
    c = tied_case(lengths, 1, 16, 1, 512, 512, 64, page, torch.bfloat16, FP8, FP8_SCALE)
    args = [c[k].to(DEVICE) for k in ("q_nope", "q_rope", "kv_cache", "rope_cache", "table",
                                      "seqlens")]
    assert "fp8 cache slots" in hopper_decode.why_unsupported(*args[:4], kv_scale=FP8_SCALE)
    got = hopper_decode.decode_tied(*args, softmax_scale=0.1, kv_scale=FP8_SCALE)
    ref = triton_decode.decode_tied(*args, softmax_scale=0.1, kv_scale=FP8_SCALE)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)


@pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (HWATTN_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("case", GPU_CASES)
def test_backend_matches_fp64_on_hopper(case):
    """The "hopper" backend as the engine calls it: its step plan (made once, refreshed in place
    for a second step), the default config per call, the fp64 truth."""
    lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype = case
    backend = ops.get_backend("hopper")
    assert ops.get_backend("auto", DEVICE) is backend
    c = tied_case(lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype)
    q_nope, q_rope, kv_cache, rope_cache = c["q_nope"], c["q_rope"], c["kv_cache"], c["rope_cache"]
    table, seqlens, softmax_scale, truth = c["table"], c["seqlens"], c["softmax_scale"], c["truth"]
    baseline = ops.decode_tied(q_nope, q_rope, kv_cache, rope_cache, table, seqlens,
                               softmax_scale=softmax_scale, return_lse=True, backend="torch")
    args = [t.to(DEVICE) for t in (q_nope, q_rope, kv_cache, rope_cache, table, seqlens)]
    plan = backend.plan(seqlens, num_heads_kv=h_kv, query_len=l_q, page_size=page, device=DEVICE)
    for step in ("made", "refreshed"):
        out, lse = backend.decode_tied(*args, softmax_scale=softmax_scale, plan=plan,
                                       return_lse=True)
        assert_close_derived(out.cpu(), truth[0], baseline[0], what=f"{step} plan out")
        assert_close_derived(lse.cpu(), truth[1], baseline[1], what=f"{step} plan lse")
        backend.plan(seqlens, num_heads_kv=h_kv, query_len=l_q, page_size=page, out=plan)


# (lengths, L_q, H_q, H_kv, D_nope, D_v, D_R, page, dtype): every row reads one shared page
# first, the 3-page rows read it again third (`paged.shared_table`).
SHARED_CASES = [
    pytest.param(([129, 64, 1, 200], 1, 16, 4, 64, 128, 64, 64, torch.bfloat16), id="gta-len129-64-1-200"),
    pytest.param(([65, 192], 2, 128, 2, 256, 256, 64, 64, torch.bfloat16), id="gla2-len65-192-lq2"),
    pytest.param(([257, 3], 1, 128, 1, 512, 512, 64, 128, torch.bfloat16), id="mla-len257-3-page128"),
]


@pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (HWATTN_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("variant", [*VARIANTS, "default"])
@pytest.mark.parametrize("garbage", [float("inf"), float("-inf")], ids=["inf", "-inf"])
@pytest.mark.parametrize("case", SHARED_CASES)
def test_shared_pages_inf_garbage_strided_queries_on_hopper(case, garbage, variant):
    """Pages shared by every sequence and read twice by one, inf / -inf (not NaN) in the slots
    the 64-token TMA boxes copy past a sequence's end, and queries that are the two halves of
    one transposed buffer: the fp64 truth, unsplit, split into 64-token pieces, in one wave."""
    from tests.ops.paged import shared_table
    from tests.ops.test_hostile_layouts import _strided_queries, _tied_truth

    lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype = case
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    config = _config(TiedShape(d_nope, d_v, d_rope, h_q // h_kv, l_q, page, dtype_name), variant)
    if config is None:
        pytest.skip(f"the {variant} schedule does not take this shape")
    table, n_pool = shared_table(lengths, page)
    kv_cache, kv_real = fill_cache((h_kv, d_v), lengths, table, n_pool, page, dtype, garbage=garbage)
    rope_cache, rope_real = fill_cache((d_rope,), lengths, table, n_pool, page, dtype,
                                       garbage=garbage)
    q = _strided_queries((len(lengths), l_q, h_q, d_nope + d_rope), dtype, heads_dim=2)
    q_nope, q_rope = q[..., :d_nope], q[..., d_nope:]
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    truth, scale = _tied_truth(q_nope, q_rope, kv_real, rope_real, table, lengths, h_kv)
    baseline = ops.decode_tied(q_nope, q_rope, kv_cache, rope_cache, table, seqlens,
                               softmax_scale=scale, return_lse=True, backend="torch")
    args = on_device(q_nope, q_rope, kv_cache, rope_cache, table, seqlens)  # still the two halves
    assert args[0].stride() == q_nope.stride() and hopper_decode.why_unsupported(*args[:4]) is None
    for name, plan in _plans(args, h_kv, l_q, page, config).items():
        out, lse = hopper_decode.decode_tied(*args, softmax_scale=scale, plan=plan, config=config)
        assert_close_derived(out.cpu(), truth[0], baseline[0], what=f"{variant} {name} out")
        assert_close_derived(lse.cpu(), truth[1], baseline[1], what=f"{variant} {name} lse")


@pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (HWATTN_TEST_DEVICE=cuda)")
def test_non_contiguous_caches_fall_back_to_triton_on_hopper():
    """A state and RoPE cache that are views of one per-token row (TMA cannot take them): the
    launcher and the backend run the Triton kernel, which matches the fp64 truth."""
    from tests.ops.paged import shared_table
    from tests.ops.test_hostile_layouts import _one_row, _tied_truth

    lengths, h_q, h_kv, d_nope, d_v, d_rope, page = [129, 64, 1], 16, 4, 64, 128, 64, 64
    table, n_pool = shared_table(lengths, page)
    kv_cache, kv_real = fill_cache((h_kv, d_v), lengths, table, n_pool, page, torch.bfloat16)
    rope_cache, rope_real = fill_cache((d_rope,), lengths, table, n_pool, page, torch.bfloat16)
    kv_cache, rope_cache = _one_row(kv_cache, rope_cache)
    q_nope = torch.randn(3, 1, h_q, d_nope).to(torch.bfloat16)
    q_rope = torch.randn(3, 1, h_q, d_rope).to(torch.bfloat16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    truth, scale = _tied_truth(q_nope, q_rope, kv_real, rope_real, table, lengths, h_kv)
    baseline = ops.decode_tied(q_nope, q_rope, kv_cache, rope_cache, table, seqlens,
                               softmax_scale=scale, return_lse=True, backend="torch")
    args = on_device(q_nope, q_rope, kv_cache, rope_cache, table, seqlens)
    assert "contiguous" in (hopper_decode.why_unsupported(*args[:4]) or "")
    got = hopper_decode.decode_tied(*args, softmax_scale=scale)
    backend = ops.get_backend("hopper")
    plan = backend.plan(args[5], num_heads_kv=h_kv, page_size=page, device=DEVICE)
    for what, (out, lse) in (("launcher", got), ("backend", backend.decode_tied(
            *args, softmax_scale=scale, plan=plan, return_lse=True))):
        assert_close_derived(out.cpu(), truth[0], baseline[0], what=f"{what} out")
        assert_close_derived(lse.cpu(), truth[1], baseline[1], what=f"{what} lse")
