"""Launcher of the Hopper (sm_90) tied-state decode kernel (Gluon): one entry kernel,
`kernels/hopper.py`, whose constexpr SCHEDULE picks the body: `kernels/hopper_tied.py` (a ring
of slots, every consumer warpgroup on every block; plain or overlapped schedule),
`kernels/hopper_duo.py` (two warpgroups taking turns on blocks, each owning half the columns)
or `kernels/hopper_pingpong.py` (two 64-row warpgroups taking turns on the tensor cores).

    decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table, cache_seqlens, ...)
    supported(q_nope, q_rope, kv_cache, rope_cache)      # which calls it takes
    choose_config(...), HopperConfig                      # how it is launched (measured defaults)
    make_plan(q_nope, kv_cache, rope_cache, cache_seqlens, config)   # its split-KV plan
    plan_knobs(q_nope, kv_cache, rope_cache)              # the plan_decode keywords of a call
    compile_sm90(shape, config)                           # compile without a GPU (tests, reports;
                                                          # hwattn.ops.kernel_code reads the result)

Same contract as `triton_decode.decode_tied`: the same split-KV plan (`plan.py`), the same
partial outputs merged by the same combine kernel, (out, lse) returned, and with a plan given
no host read of device memory (CUDA-graph safe; the TMA descriptors only hold the caches'
addresses and shapes). An fp8 (e4m3) cache runs on the specialised ring schedule, widened to
fp16 in shared memory by its producer warps (`kernels/hopper_tied.py`), its scale folded into
the softmax scale and into the output before rounding (verified on an H200 on 2026-12-05:
docs/hopper.md); HWATTN_HOPPER_FP8=0 sends fp8 caches to the Triton kernel instead
(`fp8_enabled`).
Calls it does not support (another GPU, fp32, widths that are not multiples of 64, page sizes
that are not multiples of 64, non-contiguous caches, an fp8 cache whose slots do not fit, such
as MLA's 512-wide latent) go to the portable Triton kernel.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
from torch import Tensor

from hwattn.ops import triton_decode
from hwattn.ops.kernels.combine import combine
from hwattn.ops.kernels.pdl import launch_options
from hwattn.ops.plan import PROGRAMS_PER_SM, DecodePlan, plan_decode

__all__ = ["HopperConfig", "call_config", "choose_config", "compile_sm90", "decode_tied",
           "fp8_enabled", "make_plan", "plan_knobs", "supported", "why_unsupported"]

LOG2E = 1.4426950408889634
BLOCK_N = 64  # tokens per block: one TMA row box; pages are multiples of it
COL_BOX = 64  # state columns per TMA copy (128 bytes, the widest swizzle)
DTYPES = (torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn  # the cache dtype the kernel widens (the Triton kernel's fp8 too)
WIDEN_WARPS = 4  # an fp8 cache's producer partition, which copies and widens (hopper_tied.py)
FP8_ENV = "HWATTN_HOPPER_FP8"
WIDTHS = (64, 128, 256, 512)  # state widths: whole TMA boxes, power-of-two tiles
ROPE_WIDTHS = (16, 32, 64)  # one TMA box wide, a multiple of the MMA's K step
SMEM_PER_SM = 233472  # bytes on sm_90 (228 KiB), 1 KiB of it reserved per resident program
SMEM_RESERVED = 1024
SMEM_SLACK = 1024  # barriers and the compiler's reduction scratch
REGISTERS_PER_SM = 65536
SCHEDULES = ("ring", "duo", "pingpong")


def fp8_enabled() -> bool:
    """Whether fp8 caches may take the Hopper kernel: yes unless HWATTN_HOPPER_FP8=0 (the
    widening path passed its GPU tests on an H200 on 2026-12-05); read at each call."""
    return os.environ.get(FP8_ENV, "1") != "0"


@dataclass(frozen=True)
class HopperConfig:
    """How one launch runs.

    schedule: "ring" (`kernels/hopper_tied.py`: consumer warpgroups attend every block side by
        side from a ring of slots), "duo" (`kernels/hopper_duo.py`: two warpgroups take turns
        on blocks, each owning half the value columns; states of 128 columns or more) or
        "pingpong" (`kernels/hopper_pingpong.py`: 128 rows, two warpgroups of 64 take turns on
        the tensor cores; states of at most 256 columns).
    specialize: ring only: a producer warp issues the copies (`gl.warp_specialize`); False: the
        consumer warps issue them NUM_STAGES - 1 blocks ahead themselves (the fallback variant).
    overlap: ring, specialised, states of at most 256 columns: each block's softmax runs while
        the previous block's P·S and the next block's scores are on the tensor cores (three
        blocks in flight: needs three slots).
    num_stages: slots in the shared-memory ring (duo: an even number); None: as many as fit
        (at most `max_stages`).
    ctas_per_sm: resident programs per SM the shared memory and registers are divided for.
    max_stages: cap on the automatic ring depth.
    programs_per_sm: split-KV planning (`make_plan`): programs per SM its pieces aim for; None:
        the planner's default (2).
    min_piece: split-KV planning: shortest piece in tokens; None: the Triton kernel's rule
        (the fp32 partial costs at most half the bytes the piece reads).
    widened_stages: fp8 caches only: slots of the consumers' ring that the producer widens the
        copied blocks into; None: the fewest the schedule needs (2; overlapped 3), leaving the
        most room to the copied ring (`num_stages` then sets that ring's depth).
    """

    schedule: str = "ring"
    specialize: bool = True
    overlap: bool = False
    num_stages: int | None = None
    ctas_per_sm: int = 1
    max_stages: int = 6
    programs_per_sm: int | None = None
    min_piece: int | None = None
    widened_stages: int | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.ctas_per_sm not in (1, 2):
            raise ValueError(f"ctas_per_sm must be 1 or 2, got {self.ctas_per_sm}")
        if self.overlap and (self.schedule != "ring" or not self.specialize):
            raise ValueError("overlap is a schedule of the specialised ring kernel")
        for name in ("programs_per_sm", "min_piece", "widened_stages"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")


@dataclass(frozen=True)
class Launch:
    """Derived launch parameters of one (shape, config)."""

    block_m: int
    num_warps: int
    warps_n: int
    num_stages: int
    heads_per_prog: int
    head_blocks: int
    smem_bytes: int
    maxnreg: int | None
    cache_stages: int = 0  # fp8 cache: slots of the copied cache (the consumers' ring: num_stages)
    threads: int = 0  # every warp of the program, a lone producer warp counted as a warpgroup


def warp_layout(d_v: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, consumer warps, WARPS_N) for a state width and g_q × L_q rows.

    Above 256 columns two warpgroups split the value columns of 64 rows (a 64 × 512 fp32
    accumulator needs 256 registers per thread in one warpgroup); otherwise one warpgroup per
    64 rows, two when there are more than 64 rows (both read each state tile once).
    """
    if d_v > 256:
        return 64, 8, 2
    if rows > 64:
        return 128, 8, 1
    return 64, 4, 1


def plan_launch(d_nope: int, d_v: int, d_rope: int, group: int, query_len: int,
                config: HopperConfig, elem_bytes: int = 2, fp8_cache: bool = False) -> Launch:
    """Tile shape, ring depth and head blocks; raises ValueError for widths the kernel does not
    take or when two slots do not fit.

    fp8_cache: the cache is e4m3, copied into a ring of its own (`cache_stages` slots of one
    byte per element, as deep as fits up to `max_stages`, or `num_stages`) and widened into
    the consumers' ring, which then holds `widened_stages` slots, by default the fewest its
    schedule needs (2; overlapped 3). Specialised ring schedule only. Two programs per SM fit
    GTA-4's narrow state (115 KB, 128 registers, no spills when compiled for sm_90); the
    defaults keep one until the two are timed on a GPU (docs/hopper.md)."""
    if d_v not in WIDTHS or d_nope not in WIDTHS or d_nope > d_v or d_rope not in ROPE_WIDTHS:
        raise ValueError(f"widths D_nope={d_nope}, D_v={d_v}, D_R={d_rope}: need D_nope <= D_v, "
                         f"both in {WIDTHS}, D_R in {ROPE_WIDTHS}")
    if fp8_cache and (config.schedule != "ring" or not config.specialize):
        raise ValueError("an fp8 cache runs on the specialised ring schedule (its producer warps "
                         "widen the copies)")
    if config.widened_stages is not None and not fp8_cache:
        raise ValueError(f"widened_stages={config.widened_stages} applies to fp8 caches only "
                         "(num_stages sets the ring of any other cache)")
    duo = config.schedule == "duo"
    if duo:
        if config.ctas_per_sm != 1:
            raise ValueError("the duo schedule's two warpgroups need all of an SM's registers: "
                             "ctas_per_sm must be 1")
        if d_v < 128 or d_nope != d_v:
            raise ValueError(f"the duo schedule splits D_v={d_v} in halves of whole 64-column "
                             f"boxes that are all key boxes: needs D_v >= 128 and D_nope = D_v "
                             f"(got D_nope={d_nope})")
        # One warpgroup of the parent region plus one worker: 64 rows, each half the columns.
        block_m, num_warps, warps_n = 64, 4, 2
    elif config.schedule == "pingpong":
        if d_v > 256 or group * query_len <= 64:
            raise ValueError(f"the pingpong schedule gives each of two warpgroups 64 rows and "
                             f"every column: needs D_v <= 256 (got {d_v}) and more than 64 rows "
                             f"(got {group * query_len})")
        block_m, num_warps, warps_n = 128, 4, 1  # the parent region is the first warpgroup
    else:
        block_m, num_warps, warps_n = warp_layout(d_v, group * query_len)
    heads = min(group, max(1, block_m // query_len))
    head_blocks = -(-group // heads)
    if duo:
        # Non-RoPE queries; the RoPE queries wait in one of the two probability tiles.
        fixed = block_m * d_nope * elem_bytes + 2 * block_m * BLOCK_N * elem_bytes
    else:
        fixed = block_m * (d_nope + d_rope) * elem_bytes  # queries
        if warps_n == 2:
            fixed += block_m * BLOCK_N * elem_bytes  # shared probabilities
    stage = BLOCK_N * (d_v + d_rope) * elem_bytes
    budget = SMEM_PER_SM // config.ctas_per_sm - SMEM_RESERVED - SMEM_SLACK
    if config.overlap and warps_n != 1:
        raise ValueError(f"the overlapped schedule keeps all D_v={d_v} columns in one warpgroup: "
                         f"needs D_v <= 256")
    least = 3 if config.overlap or config.schedule == "pingpong" else 2
    cache_stages = 0
    if fp8_cache:
        stages = config.widened_stages or least
        if stages < least:
            raise ValueError(f"widened_stages={stages}: this schedule needs at least {least}")
        cache_stage = BLOCK_N * (d_v + d_rope)  # one byte per element
        fit = (budget - fixed - stages * stage) // cache_stage
        cache_stages = config.num_stages or min(config.max_stages, fit)
        if cache_stages < 2 or cache_stages > fit:
            raise ValueError(f"{cache_stages} fp8 cache slots of {cache_stage} B do not fit "
                             f"{budget} B of shared memory beside {stages} widened slots of "
                             f"{stage} B and {fixed} B of queries (d_v={d_v})")
        fixed += cache_stages * cache_stage
        fit = stages
    else:
        fit = (budget - fixed) // stage
        if duo:
            fit -= fit % 2
        stages = config.num_stages or min(config.max_stages, fit)
    if stages < least or stages > fit or (duo and stages % 2):
        raise ValueError(f"{stages} ring slots of {stage} B do not fit {budget} B of shared memory "
                         f"beside {fixed} B of queries (d_v={d_v}, ctas_per_sm={config.ctas_per_sm}"
                         + (", duo needs an even count)" if duo else ")"))
    maxnreg = None
    if duo:
        threads = 32 * 2 * num_warps
    elif config.schedule == "pingpong":
        threads = 32 * 3 * num_warps  # two consumer warpgroups and the producer's
    else:
        # The producer counts as a warpgroup (an fp8 cache's, which widens, is one).
        producer = (WIDEN_WARPS if fp8_cache else 4) if config.specialize else 0
        threads = 32 * (num_warps + producer)
    if threads * 255 * config.ctas_per_sm > REGISTERS_PER_SM:
        maxnreg = REGISTERS_PER_SM // (threads * config.ctas_per_sm) // 8 * 8
    return Launch(block_m, num_warps, warps_n, stages, heads, head_blocks,
                  fixed + stages * stage, maxnreg, cache_stages, threads)


# Defaults measured on an NVIDIA H200 (copy 4246 GB/s, bf16 matmul 693 TFLOP/s in the same run;
# benchmarks/results/hopper_decode_h200_2026-11-29_v2.log, its pivot table; d_h 128, d_R 64,
# page 64, bf16, CUDA-graph replays). µs of the default, the next best and Triton's kernel:
#
#   shape class (heads per state head × L_q)  B × L         default       µs     next best
#   MLA 512 wide, 128 × 1                     128 × 16K     duo           1034   ws 1264, tri 2358
#   MLA, 128 × 2 / 128 × 4                    128 × 16K     duo      2021/3622   ws 2541/4939
#   MLA, 16 × 1 / 16 × 2 (a TP-8 rank)        128 × 32K     duo-p1-m256 1160/1202  duo 1170/1245
#   MLA, 128 × 1, split-KV                    1 × 128K      duo-p1-m256   94     duo 114, tri 190
#                                             4 × 32K       duo-p1-m256   97     duo 111, tri 187
#                                             1×128K+63×1K  duo-p1-m256  167     duo 185, tri 313
#   GLA-2 256 wide, 64 × 1                    128 × 16K     ovl            641   ws 663, tri 840
#   GLA-2, 64 × 2 / 64 × 4                    128 × 16K     pp       1029/1996   ovl 1074/2087
#   GLA, 16 × 1 / 16 × 2 (a TP-8 rank)        128 × 32K     ovl-p1-m256 631/635  ovl 640/657
#   GLA-2, 64 × 1, split-KV                   1 × 128K      ovl-p1-m256   62     ovl 77, tri 71
#                                             4 × 32K       ovl-p1-m256   62     ovl 70, tri 67
#                                             1×128K+63×1K  ovl-p1-m256  105     ovl 118, tri 121
#   GTA-4 (128 tied + 64 RoPE), 8 × 1         128 × 8-32K   ovl, 2/SM  296-1138  ws 306-1149
#                                             4 × 128K      ovl, 2/SM    159     ws 166, tri 224
#                                             1 × 128K      ovl, 2/SM     59     ws 61, tri 69
#
# duo: two warpgroups take turns on blocks, each owning half the columns (latents >= 128 wide,
# key = value); pp: two 64-row warpgroups take turns on the tensor cores (latents <= 256 wide,
# more than 64 rows); ovl: one warpgroup per 64 rows, softmax overlapped with the products
# (states <= 256 wide); ws: the plain ring with a producer warp, the fallback. "-p1-m256": the
# split-KV plan aims at one program per SM with pieces of at least 256 tokens; it wins wherever
# the batch leaves fewer head programs than SMs (so sequences must be split) and the kernel holds
# one program per SM, and it loses for GTA's two-per-SM kernel (B=4 128K: 184 vs 159 µs), so
# that keeps the planner's two programs per SM. pp's split-KV plans and L_q = 3 were checked for
# correctness, not timed: they follow the same rule.
SPLIT_PROGRAMS_PER_SM = 1
SPLIT_MIN_PIECE = 256
NUM_SMS = 132  # H100 / H200 SXM; the backend passes the device's count


def _preferred_schedule(d_nope: int, d_v: int, group: int, query_len: int) -> dict:
    """HopperConfig fields of the measured best schedule for a shape class (table above)."""
    latent = d_nope == d_v  # MLA / GLA: the whole state is the key
    if latent and d_v > 256:
        return dict(schedule="duo")
    if latent and d_v >= 128 and group * query_len > 64:
        return dict(schedule="pingpong")
    if d_v <= 256:
        return dict(overlap=True)
    return {}


@functools.lru_cache(maxsize=512)  # called per layer and step: a pure function of its integers
def choose_config(d_nope: int, d_v: int, d_rope: int, group: int, query_len: int, *,
                  batch: int | None = None, num_heads_kv: int = 1,
                  num_sms: int = NUM_SMS, fp8_cache: bool = False) -> HopperConfig:
    """The default config of a shape: the schedule measured fastest for its class (see the table
    above), two programs per SM when each still gets four ring slots (narrow states such as
    GTA's), else one; a schedule the shape cannot take falls back to the plain ring.

    With `batch` (and the KV heads on this rank, `num_heads_kv`) it also sets the split-KV plan
    knobs: a one-program-per-SM kernel whose batch × head programs leave SMs idle plans one
    wave of pieces of at least 256 tokens.

    fp8_cache: an e4m3 cache, which only the specialised ring takes (overlapped where the state
    is at most 256 wide; the fastest on an H200 wherever it fits, 2026-12-05; GLA-2 at L_q 2
    has 128 rows and no room for it), two programs per SM where the overlapped launch fits
    them (GTA-4's narrow state: three widened and two copied slots), else one. At one per SM
    the widening warps were latency-bound; two ran GTA-4 at L_q 1 1.30x (B 128, 16K) and
    1.17x (B 1, 128K) faster on an H100 (2026-12-06, docs/hopper.md).
    """
    ctas = 1
    try:
        if fp8_cache:
            if d_v <= 256:
                plan_launch(d_nope, d_v, d_rope, group, query_len,
                            HopperConfig(overlap=True, ctas_per_sm=2), fp8_cache=True)
                ctas = 2
        elif plan_launch(d_nope, d_v, d_rope, group, query_len,
                         HopperConfig(ctas_per_sm=2)).num_stages >= 4:
            ctas = 2
    except ValueError:
        pass
    preferred = (dict(overlap=True) if d_v <= 256 else {}) if fp8_cache else \
        _preferred_schedule(d_nope, d_v, group, query_len)
    config, launch = None, None
    for fields in (preferred, {}):
        for per_sm in dict.fromkeys((ctas, 1)):
            try:
                candidate = HopperConfig(ctas_per_sm=per_sm, **fields)
                launch = plan_launch(d_nope, d_v, d_rope, group, query_len, candidate,
                                     fp8_cache=fp8_cache)
            except ValueError:
                continue
            config = candidate
            break
        if config is not None:
            break
    if config is None:  # nothing fits: the caller's plan_launch reports why
        return HopperConfig()
    if (batch is not None and config.ctas_per_sm == 1
            and batch * num_heads_kv * launch.head_blocks < num_sms):
        config = replace(config, programs_per_sm=SPLIT_PROGRAMS_PER_SM, min_piece=SPLIT_MIN_PIECE)
    return config


def why_unsupported(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                    kv_scale: float | None = None) -> str | None:
    """None if the Hopper kernel takes this call, else the reason it does not."""
    if q_nope.device.type != "cuda":
        return "not a CUDA tensor"
    try:
        from triton.experimental import gluon  # noqa: F401
    except ImportError:
        return "this Triton has no Gluon"
    if torch.cuda.get_device_capability(q_nope.device)[0] != 9:
        return "not an sm_90 (Hopper) GPU"
    if q_nope.dtype not in DTYPES:
        return f"dtype {q_nope.dtype} (needs bf16 or fp16)"
    if rope_cache.dtype != kv_cache.dtype:
        return f"the two caches differ in dtype ({kv_cache.dtype}, {rope_cache.dtype})"
    fp8 = kv_cache.dtype == FP8
    if kv_cache.dtype != q_nope.dtype and not fp8:
        return f"cache dtype {kv_cache.dtype} (needs the query dtype or fp8 e4m3)"
    if fp8 and not fp8_enabled():
        return f"fp8 cache: the Hopper fp8 path is turned off ({FP8_ENV}=0)"
    if kv_scale is not None and not fp8:
        return "kv_scale given for a cache that is not fp8"
    d_nope, d_v, d_rope = q_nope.shape[-1], kv_cache.shape[-1], q_rope.shape[-1]
    if d_v not in WIDTHS or d_nope not in WIDTHS or d_nope > d_v:
        return f"widths D_nope={d_nope}, D_v={d_v} (need D_nope <= D_v, both in {WIDTHS})"
    if d_rope not in ROPE_WIDTHS:
        return f"RoPE width {d_rope} (needs one of {ROPE_WIDTHS})"
    if kv_cache.shape[1] % BLOCK_N:
        return f"page size {kv_cache.shape[1]} (needs a multiple of 64)"
    if not (kv_cache.is_contiguous() and rope_cache.is_contiguous()):
        return "caches must be contiguous (TMA views them as 2-D)"
    if any(t.data_ptr() % 16 for t in (kv_cache, rope_cache)):
        return "caches must be 16-byte aligned"
    if q_nope.stride(-1) != 1 or q_rope.stride(-1) != 1:
        return "queries must be contiguous in their last dimension"
    query_len, n_heads, n_kv = q_nope.shape[1], q_nope.shape[2], kv_cache.shape[2]
    if query_len > 64:
        return f"L_q={query_len} (at most 64)"
    try:
        config = (choose_config(d_nope, d_v, d_rope, n_heads // n_kv, query_len, fp8_cache=True)
                  if fp8 else HopperConfig())
        plan_launch(d_nope, d_v, d_rope, n_heads // n_kv, query_len, config, fp8_cache=fp8)
    except ValueError as err:
        return str(err)
    return None


def supported(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
              kv_scale: float | None = None) -> bool:
    """Whether `decode_tied` runs this call on the Hopper kernel (else it uses Triton's)."""
    return why_unsupported(q_nope, q_rope, kv_cache, rope_cache, kv_scale) is None


def _descriptors(kv_cache: Tensor, rope_cache: Tensor):
    """TMA descriptors over the caches viewed 2-D: (pages × page_size, H_kv × D_v) and
    (pages × page_size, D_R); one box is 64 tokens × 64 state columns / the RoPE key."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    n_pages, page, n_kv, d_v = kv_cache.shape
    d_rope = rope_cache.shape[-1]
    ty = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, FP8: gl.float8e4nv}[kv_cache.dtype]
    kv_2d = kv_cache.view(n_pages * page, n_kv * d_v)
    rope_2d = rope_cache.view(n_pages * page, d_rope)
    kv_desc = TensorDescriptor.from_tensor(
        kv_2d, [BLOCK_N, COL_BOX], gl.NVMMASharedLayout.get_default_for([BLOCK_N, COL_BOX], ty))
    rope_desc = TensorDescriptor.from_tensor(
        rope_2d, [BLOCK_N, d_rope], gl.NVMMASharedLayout.get_default_for([BLOCK_N, d_rope], ty))
    return kv_desc, rope_desc


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (the H100's / H200's 132 elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS


def call_config(q_nope: Tensor, kv_cache: Tensor, rope_cache: Tensor) -> HopperConfig:
    """`choose_config` for one call: its widths, heads, L_q, batch and device."""
    batch, query_len, n_heads, d_nope = q_nope.shape
    n_kv, d_v = kv_cache.shape[2:]
    return choose_config(d_nope, d_v, rope_cache.shape[-1], n_heads // n_kv, query_len,
                         batch=batch, num_heads_kv=n_kv, num_sms=num_sms(q_nope.device),
                         fp8_cache=kv_cache.dtype == FP8)


def plan_knobs(q_nope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
               config: HopperConfig | None = None) -> dict[str, int]:
    """The `plan_decode` keywords of a call's launch (head_blocks, min_piece, programs_per_sm);
    default config: `call_config`."""
    _, query_len, n_heads, d_nope = q_nope.shape
    n_kv, d_v = kv_cache.shape[2:]
    config = config or call_config(q_nope, kv_cache, rope_cache)
    launch = plan_launch(d_nope, d_v, rope_cache.shape[-1], n_heads // n_kv, query_len, config,
                         fp8_cache=kv_cache.dtype == FP8)
    min_piece = config.min_piece or triton_decode.min_piece(q_nope, kv_cache, kv_cache,
                                                            rope_cache, True)
    return dict(head_blocks=launch.head_blocks, min_piece=min_piece,
                programs_per_sm=config.programs_per_sm or PROGRAMS_PER_SM)


def make_plan(q_nope: Tensor, kv_cache: Tensor, rope_cache: Tensor, cache_seqlens: Tensor,
              config: HopperConfig | None = None, out: DecodePlan | None = None) -> DecodePlan:
    """The split-KV plan `decode_tied` makes when given none (reads `cache_seqlens` on the
    host): pieces for this config's head blocks and planning knobs (default: `call_config`)."""
    return plan_decode(cache_seqlens, num_heads_kv=kv_cache.shape[2], query_len=q_nope.shape[1],
                       page_size=kv_cache.shape[1], out=out,
                       **plan_knobs(q_nope, kv_cache, rope_cache, config))


def _kernel(d_nope: int, d_v: int, d_rope: int, query_len: int, page: int, config: HopperConfig,
            launch: Launch):
    """(Gluon kernel, its constexpr and launch keywords) for a config's schedule."""
    common = dict(L_Q=query_len, HEADS_PER_PROG=launch.heads_per_prog,
                  HEAD_BLOCKS=launch.head_blocks, BLOCK_M=launch.block_m, BLOCK_N=BLOCK_N,
                  D_NOPE=d_nope, D_V=d_v, D_R=d_rope, PAGE=page, num_warps=launch.num_warps)
    if launch.maxnreg is not None:
        common["maxnreg"] = launch.maxnreg
    from hwattn.ops.kernels.hopper import hopper_decode_kernel

    return hopper_decode_kernel, dict(common, SCHEDULE=config.schedule, NUM_STAGES=launch.num_stages,
                                      WARPS_N=launch.warps_n, SPECIALIZE=config.specialize,
                                      OVERLAP=config.overlap, CACHE_STAGES=launch.cache_stages,
                                      PDL=False)


def decode_tied(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                block_table: Tensor, cache_seqlens: Tensor, *, softmax_scale: float,
                plan: DecodePlan | None = None, kv_scale: float | None = None,
                config: HopperConfig | None = None):
    """Tied-state paged decode on Hopper; shapes as `hwattn.ops.decode_tied` (arguments already
    validated there). Returns (out (B, L_q, H_q, D_v), lse (B, H_q, L_q) fp32). Unsupported
    calls run `triton_decode.decode_tied`. An fp8 cache holds value / kv_scale (both caches):
    the scale multiplies the scores (folded into the softmax scale) and the output."""
    if not supported(q_nope, q_rope, kv_cache, rope_cache, kv_scale):
        return triton_decode.decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                         cache_seqlens, softmax_scale=softmax_scale, plan=plan,
                                         kv_scale=kv_scale)
    batch, query_len, n_heads, d_nope = q_nope.shape
    _, page_size, n_kv, d_v = kv_cache.shape
    d_rope = q_rope.shape[-1]
    group = n_heads // n_kv
    fp8 = kv_cache.dtype == FP8
    scale = kv_scale or 1.0  # an fp8 cache's: the scores and (in the kernel) the output
    config = config or call_config(q_nope, kv_cache, rope_cache)
    launch = plan_launch(d_nope, d_v, d_rope, group, query_len, config, fp8_cache=fp8)
    if plan is None:
        plan = make_plan(q_nope, kv_cache, rope_cache, cache_seqlens, config)
    else:
        plan.check(batch, q_nope.device, query_len)
    out, lse, part_out, part_lse = plan.buffers(query_len, n_heads, d_v, q_nope.dtype,
                                                q_nope.device)
    kv_desc, rope_desc = _descriptors(kv_cache, rope_cache)
    kernel, constexprs = _kernel(d_nope, d_v, d_rope, query_len, page_size, config, launch)
    constexprs.update(launch_options(q_nope.device))
    kernel[(n_kv * launch.head_blocks, plan.capacity)](
        q_nope, q_rope, kv_desc, rope_desc, block_table, cache_seqlens,
        plan.items, plan.splits, out, lse, part_out, part_lse,
        softmax_scale * scale * LOG2E, scale, n_heads, group,
        *q_nope.stride()[:3], *q_rope.stride()[:3], block_table.stride(0),
        *out.stride()[:3], *lse.stride()[:2], **constexprs,
    )
    if plan.may_split:
        combine(part_out, part_lse, plan.splits, out, lse, max_pieces=plan.max_pieces)
    return out, lse


@dataclass(frozen=True)
class TiedShape:
    """What the kernel is compiled for: widths, heads per state head, L_q, page size, dtype."""

    d_nope: int
    d_v: int
    d_rope: int
    group: int
    query_len: int
    page: int = 64
    dtype: str = "bf16"
    cache: str | None = None  # "fp8": an e4m3 cache (else the query dtype)


def compile_sm90(shape: TiedShape, config: HopperConfig, pdl: bool = False):
    """Compile the kernel for sm_90 on any machine (ptxas included, no GPU needed); pdl: as
    launched with programmatic dependent launch (HWATTN_PDL, `hwattn.ops.kernels.pdl`).

    Returns (compiled kernel, Launch). The kernel's `asm` holds 'ttgir', 'ptx' and 'cubin';
    `metadata.shared` its shared memory. Pointer strides stay runtime values here, so registers
    can differ slightly from a launch that specialises them.
    """
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    fp8 = shape.cache == "fp8"
    launch = plan_launch(shape.d_nope, shape.d_v, shape.d_rope, shape.group, shape.query_len, config,
                         fp8_cache=fp8)
    ty = gl.float8e4nv if fp8 else {"bf16": gl.bfloat16, "fp16": gl.float16}[shape.dtype]
    cache = "fp8e4nv" if fp8 else shape.dtype
    box = gl.NVMMASharedLayout.get_default_for([BLOCK_N, COL_BOX], ty)
    rope_box = gl.NVMMASharedLayout.get_default_for([BLOCK_N, shape.d_rope], ty)
    fn, constexprs = _kernel(shape.d_nope, shape.d_v, shape.d_rope, shape.query_len, shape.page,
                             config, launch)
    options = {k: constexprs.pop(k) for k in ("num_warps", "maxnreg") if k in constexprs}
    constexprs["num_warps"] = options["num_warps"]
    if pdl:
        constexprs["PDL"] = options["launch_pdl"] = True
    pointers = dict(q_ptr=shape.dtype, q_rope_ptr=shape.dtype, block_table_ptr="i32",
                    seqlens_ptr="i32", items_ptr="i32", splits_ptr="i32", out_ptr=shape.dtype,
                    lse_ptr="fp32", part_out_ptr="fp32", part_lse_ptr="fp32")
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name == "kv_desc":
            signature[name] = f"tensordesc<{cache}[{BLOCK_N}, {COL_BOX}],{box!r}>"
        elif name == "rope_desc":
            signature[name] = f"tensordesc<{cache}[{BLOCK_N}, {shape.d_rope}],{rope_box!r}>"
        elif name in ("qk_scale", "out_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return kernel, launch


def describe(shape: TiedShape, config: HopperConfig) -> str:
    """One line: the launch a shape gets under a config."""
    launch = plan_launch(shape.d_nope, shape.d_v, shape.d_rope, shape.group, shape.query_len, config,
                         fp8_cache=shape.cache == "fp8")
    if config.schedule == "pingpong":
        return (f"pingpong, M=128 (2 warpgroups of 64 rows taking turns), {launch.num_stages} "
                f"slots, {launch.head_blocks} head block(s), {launch.smem_bytes / 1024:.0f} KiB, "
                f"{config.ctas_per_sm}/SM" + (f", maxnreg {launch.maxnreg}" if launch.maxnreg else ""))
    if config.schedule == "duo":
        return (f"duo, M={launch.block_m} (2 warpgroups taking turns), {launch.num_stages} slots, "
                f"{launch.head_blocks} head block(s), {launch.smem_bytes / 1024:.0f} KiB, "
                f"{config.ctas_per_sm}/SM")
    kind = ("overlapped" if config.overlap else "specialised") if config.specialize else "pipelined"
    widened = (f" (fp8 cache: {launch.cache_stages} copied slots, widened by {WIDEN_WARPS} "
               "producer warps)"
               if launch.cache_stages else "")
    return (f"{kind}, M={launch.block_m} ({launch.num_warps} warps, WARPS_N={launch.warps_n}), "
            f"{launch.num_stages} slots{widened}, {launch.head_blocks} head block(s), "
            f"{launch.smem_bytes / 1024:.0f} KiB, {config.ctas_per_sm}/SM"
            + (f", maxnreg {launch.maxnreg}" if launch.maxnreg else ""))
