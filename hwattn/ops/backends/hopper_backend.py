"""The Hopper backend: the Gluon kernels of `hwattn.ops.hopper_decode` for tied-state decode
(MLA, GLA, GTA) on sm_90 GPUs, the Triton backend for everything else.

"auto" chooses it on compute capability 9.0 (priority 20, above Triton's 10). It takes the
`decode_tied` calls the Hopper kernels take (bf16/fp16 queries over caches of their dtype, or
of fp8 e4m3 unless HWATTN_HOPPER_FP8=0; state widths 64-512;
RoPE width 16-64; page sizes that are multiples of 64; contiguous caches;
`hopper_decode.why_unsupported`) and hands the rest to the Triton kernels: separate-K/V decode
(MHA/GQA/MQA), fp32 caches, fp8 caches whose slots do not fit (MLA's latent), other page
sizes, `store_kv`. `backend="triton"` or HWATTN_ATTENTION_BACKEND=triton turns it off.

Its plan is a `HopperPlan`: the step's host lengths and one split-KV `DecodePlan` per launch
shape (head blocks, programs per SM, shortest piece), because the Hopper schedules plan their
pieces differently from the Triton kernel and per shape class (`hopper_decode.choose_config`),
and `plan(...)` is not told the layer's widths. A launch shape's `DecodePlan` is made on the
first layer that needs it and reused by every later layer; `plan(..., out=previous)` refreshes
every one of them in place, so a CUDA graph captured after one eager step (the runner's warm-up
call) replays with new lengths. Making one inside a capture is refused with an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hwattn.ops import triton_decode
from hwattn.ops.backends.triton_backend import TritonBackend
from hwattn.ops.plan import PROGRAMS_PER_SM, DecodePlan, check_positive, plan_decode

CAPABILITY = (9, 0)


def _check_lengths(lengths: Tensor, query_len: int) -> None:
    """ValueError unless every host length counts the step's `query_len` new tokens."""
    shortest = int(lengths.min())
    if shortest < query_len:
        raise ValueError(f"cache_seqlens must be >= the query length {query_len} (the new "
                         f"tokens are counted), got min {shortest}")


@dataclass
class HopperPlan:
    """One decode step's schedule for every layer of a model.

    lengths: (B,) int32 on the host, the step's `cache_seqlens` (read once, when planned).
    num_heads_kv, query_len, page_size, device, num_sms: what `plan(...)` was told.
    plans: launch shape (head_blocks, programs_per_sm, min_piece) -> its `DecodePlan` on
        `device`, made by `for_launch` and refreshed by `HopperBackend.plan(..., out=self)`.
    reserve_pieces: every launch shape's plan has room for split pieces (`plan_decode`).
    """

    lengths: Tensor
    num_heads_kv: int
    query_len: int
    page_size: int
    device: torch.device
    num_sms: int
    plans: dict[tuple[int, int, int], DecodePlan] = field(default_factory=dict)
    reserve_pieces: bool = False

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_seqlen(self) -> int:
        return int(self.lengths.max())

    def _make(self, key: tuple[int, int, int], out: DecodePlan | None = None) -> DecodePlan:
        head_blocks, programs_per_sm, min_piece = key
        plan = plan_decode(self.lengths, num_heads_kv=self.num_heads_kv,
                           query_len=self.query_len, page_size=self.page_size,
                           num_sms=self.num_sms, head_blocks=head_blocks, min_piece=min_piece,
                           programs_per_sm=programs_per_sm, reserve_pieces=self.reserve_pieces,
                           out=out)
        return plan if out is not None else plan.to(self.device)

    def for_launch(self, head_blocks: int, programs_per_sm: int, min_piece: int) -> DecodePlan:
        """The `DecodePlan` of one launch shape (made on first use, outside graph capture)."""
        key = (head_blocks, programs_per_sm, min_piece)
        if key not in self.plans:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"HopperPlan: launch shape {key} was first met inside a CUDA graph capture; "
                    "run the step once eagerly with the same plan before capturing it")
            self.plans[key] = self._make(key)
        return self.plans[key]

    def refresh(self, lengths: Tensor, query_len: int | None = None) -> None:
        """New host lengths of the same batch, counting `query_len` new tokens (default: the
        plan's); every launch shape's plan updated in place. Checked before anything changes,
        so a refused refresh leaves the plan as it was."""
        query_len = self.query_len if query_len is None else query_len
        if lengths.shape != self.lengths.shape:
            raise ValueError(f"out: a plan for B={self.batch} cannot hold B={lengths.shape[0]}")
        _check_lengths(lengths, query_len)
        self.lengths, self.query_len = lengths.clone(), query_len
        for key, plan in self.plans.items():
            self._make(key, out=plan)


class HopperBackend(TritonBackend):
    """Tied-state decode on Hopper's warpgroup MMAs and TMA; the Triton backend otherwise.

    `config`: a `hopper_decode.HopperConfig` forcing one schedule for every Hopper launch
    (benchmarks); default: chosen per call by `hopper_decode.call_config`.
    """

    name = "hopper"
    priority = 20
    kernel_names = {**TritonBackend.kernel_names,
                    "attention": TritonBackend.kernel_names["attention"]
                    + ("hopper_decode_kernel",)}

    def __init__(self, config=None):
        try:
            from triton.experimental import gluon  # noqa: F401
        except Exception as err:  # noqa: BLE001 - any broken Gluon means: use another backend
            raise ImportError(f"the Hopper backend needs Triton's Gluon: {err}") from err
        from hwattn.ops import hopper_decode

        super().__init__()
        self.hopper = hopper_decode
        self.hopper_config = config

    @classmethod
    def auto_select(cls, device) -> bool:
        device = torch.device(device)
        return device.type == "cuda" and torch.cuda.get_device_capability(device) == CAPABILITY

    def with_config(self, config) -> "HopperBackend":
        """A backend that launches every Hopper kernel with `config` (a HopperConfig)."""
        return HopperBackend(config)

    def plan(self, cache_seqlens, *, num_heads_kv, query_len=1, page_size, device=None, out=None,
             reserve_pieces=False):
        if cache_seqlens.dim() != 1 or cache_seqlens.dtype != torch.int32:
            raise ValueError(f"cache_seqlens must be (B,) int32, got {tuple(cache_seqlens.shape)} "
                             f"{cache_seqlens.dtype}")
        check_positive(num_heads_kv=num_heads_kv, query_len=query_len, page_size=page_size)
        lengths = cache_seqlens.cpu()
        if out is not None:  # every step's path: the refresh checks the lengths itself
            if not isinstance(out, HopperPlan):
                raise ValueError(f"out must be a HopperPlan from this backend, got {type(out).__name__}")
            out.refresh(lengths, query_len)
            return out
        if len(lengths) == 0:
            raise ValueError("cache_seqlens must hold at least one sequence")
        _check_lengths(lengths, query_len)
        device = torch.device(device) if device is not None else cache_seqlens.device
        return HopperPlan(lengths.clone(), num_heads_kv, query_len, page_size, device,
                          self.hopper.num_sms(device), reserve_pieces=reserve_pieces)

    def plan_parts(self, plan) -> list[DecodePlan]:
        if isinstance(plan, HopperPlan):  # one per launch shape met so far
            return [p for p in plan.plans.values() if p.packed is not None]
        return super().plan_parts(plan)

    def plan_lengths(self, plan):
        if isinstance(plan, HopperPlan):  # every launch shape's plan is made from these
            return plan.lengths
        return super().plan_lengths(plan)

    def check_plan(self, plan, batch: int, capacity: int) -> bool:
        if isinstance(plan, HopperPlan):
            if plan.batch != batch:
                raise ValueError(f"plan was made for B={plan.batch}, not B={batch}")
            if plan.max_seqlen > capacity:
                raise ValueError(f"block_table holds {capacity} slots, too short for the plan's "
                                 f"longest sequence {plan.max_seqlen}")
            return True
        return super().check_plan(plan, batch, capacity)

    @staticmethod
    def _triton_plan(plan, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                     rope_cache: Tensor | None, tied: bool):
        """The DecodePlan a Triton launch reads: the split rule of `triton_decode`."""
        if not isinstance(plan, HopperPlan):
            return plan
        batch, query_len, n_heads, _ = q.shape
        n_kv, d_v = k_cache.shape[2:]
        d_pad = triton_decode.pad_width(d_v)
        config = triton_decode.choose_config(d_pad, query_len, n_heads // n_kv, tied)
        _, head_blocks, _ = triton_decode.head_layout(n_heads // n_kv, query_len, config.max_rows)
        min_piece = triton_decode.min_piece(q, k_cache, v_cache, rope_cache, tied)
        return plan.for_launch(head_blocks, PROGRAMS_PER_SM, min_piece)

    def run_decode(self, q, k_cache, v_cache, block_table, cache_seqlens, *, softmax_scale,
                   plan, k_scale, v_scale):
        plan = self._triton_plan(plan, q, k_cache, v_cache, None, False)
        return super().run_decode(q, k_cache, v_cache, block_table, cache_seqlens,
                                  softmax_scale=softmax_scale, plan=plan, k_scale=k_scale,
                                  v_scale=v_scale)

    def run_decode_tied(self, q_nope, q_rope, kv_cache, rope_cache, block_table, cache_seqlens,
                        *, softmax_scale, plan, kv_scale):
        if not self.hopper.supported(q_nope, q_rope, kv_cache, rope_cache, kv_scale):
            plan = self._triton_plan(plan, q_nope, kv_cache, kv_cache, rope_cache, True)
            return super().run_decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                           cache_seqlens, softmax_scale=softmax_scale, plan=plan,
                                           kv_scale=kv_scale)
        config = self.hopper_config or self.hopper.call_config(q_nope, kv_cache, rope_cache)
        if isinstance(plan, HopperPlan):
            knobs = self.hopper.plan_knobs(q_nope, kv_cache, rope_cache, config)
            plan = plan.for_launch(knobs["head_blocks"], knobs["programs_per_sm"],
                                   knobs["min_piece"])
        return self.hopper.decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                       cache_seqlens, softmax_scale=softmax_scale, plan=plan,
                                       kv_scale=kv_scale, config=config)
