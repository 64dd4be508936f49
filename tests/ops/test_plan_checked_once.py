"""A plan is held to the call's host lengths once per step, not once per layer, and never
trusted for lengths it was not checked against.

Every layer of a step passes the same lengths tensor and plan: the first call checks them and
the plan remembers the tensors (`hwattn.ops.plan.CheckedLengths`), the later calls skip the
check. A different tensor, the same tensor written in place (under `torch.inference_mode`
too, where tensors keep no version counter), or a plan refreshed in place, is checked again:
a stale plan is refused as it was before the first call.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from hwattn import ops
from hwattn.ops.backends import base
from tests.ops.paged import DEVICE, fill_cache, paged_table

BACKENDS = ["torch", "triton"]
LAYERS = 4

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="plans are held to the call's "
                                "lengths only where these are in host memory")


def _decode_args(lengths=(70, 30)):
    """Separate K/V decode arguments (fp32, L_q 1, H_q 4, H_kv 2, D 16) on hostile pages:
    sequence 1's slots past 30 are NaN, so a plan read past its length shows."""
    lengths = list(lengths)
    table, n_pool = paged_table(lengths, 16)
    k_cache, _ = fill_cache((2, 16), lengths, table, n_pool, 16, torch.float32)
    v_cache, _ = fill_cache((2, 16), lengths, table, n_pool, 16, torch.float32)
    return dict(q=torch.randn(len(lengths), 1, 4, 16), k_cache=k_cache, v_cache=v_cache,
                block_table=table, cache_seqlens=torch.tensor(lengths, dtype=torch.int32))


def _prefill_args():
    """Prefill arguments: queries 3 and 9 over 40 and 9 cached tokens (N = 12)."""
    lengths, cu = [40, 9], [0, 3, 12]
    table, n_pool = paged_table(lengths, 16)
    k_cache, _ = fill_cache((2, 16), lengths, table, n_pool, 16, torch.float32)
    v_cache, _ = fill_cache((2, 16), lengths, table, n_pool, 16, torch.float32)
    return dict(q=torch.randn(12, 4, 16), k_cache=k_cache, v_cache=v_cache, block_table=table,
                cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                cache_seqlens=torch.tensor(lengths, dtype=torch.int32))


def _count_decode_checks(backend_name: str, monkeypatch) -> tuple:
    """The backend, and a list that grows by one each time it derives a plan's lengths."""
    backend = ops.get_backend(backend_name)
    calls = []
    derive = type(backend).plan_lengths

    def counted(self, plan):
        calls.append(plan)
        return derive(self, plan)

    monkeypatch.setattr(type(backend), "plan_lengths", counted)
    return backend, calls


def _count_prefill_checks(monkeypatch) -> list:
    """A list that grows by one each time a prefill plan is compared with the call's lengths."""
    calls = []
    check = base._check_prefill_plan

    def counted(plan, actual):
        calls.append(plan)
        return check(plan, actual)

    monkeypatch.setattr(base, "_check_prefill_plan", counted)
    return calls


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_step_of_layers_checks_its_decode_plan_once(backend_name, monkeypatch):
    """Deriving a plan's lengths and comparing them cost ~15 µs a call on the CPU; every
    layer of every step paid it for the same tensors."""
    backend, calls = _count_decode_checks(backend_name, monkeypatch)
    args = _decode_args()
    plan = ops.plan_decode(args["cache_seqlens"], num_heads_kv=2)
    want = ops.decode(**args, backend="torch")
    with torch.inference_mode():
        for _ in range(LAYERS):
            torch.testing.assert_close(ops.decode(**args, plan=plan, backend=backend), want,
                                       rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    # Another tensor of the same values is not the one checked: checked afresh, and accepted.
    ops.decode(**{**args, "cache_seqlens": args["cache_seqlens"].clone()}, plan=plan,
               backend=backend)
    assert len(calls) == 2


@pytest.mark.parametrize("inference", [False, True], ids=["grad_mode", "inference_mode"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_decode_plan_checked_once_is_still_refused_once_stale(backend_name, inference,
                                                                monkeypatch):
    """After a checked call, each way the plan and the lengths can part is refused: another
    lengths tensor, the same tensor written in place (a tensor made under inference mode has
    no version counter that would show it), the same tensor pointed at other memory, and the
    plan refreshed in place for other lengths. Refreshed together they agree again."""
    backend, calls = _count_decode_checks(backend_name, monkeypatch)
    mode = torch.inference_mode() if inference else nullcontext()
    stale = "sequence 1 was planned with 30 tokens, but cache_seqlens gives it 29"
    with mode:
        args = _decode_args()
        lens = args["cache_seqlens"].clone()  # made in the mode under test
        args["cache_seqlens"] = lens
        plan = ops.plan_decode(lens, num_heads_kv=2)
        ops.decode(**args, plan=plan, backend=backend)

        with pytest.raises(ValueError, match=stale):
            ops.decode(**{**args, "cache_seqlens": torch.tensor([70, 29], dtype=torch.int32)},
                       plan=plan, backend=backend)
        lens[1] = 29
        with pytest.raises(ValueError, match=stale):
            ops.decode(**args, plan=plan, backend=backend)
        lens[1] = 30
        ops.decode(**args, plan=plan, backend=backend)  # the values it was checked with
        lens.set_(torch.tensor([70, 29], dtype=torch.int32))
        with pytest.raises(ValueError, match=stale):
            ops.decode(**args, plan=plan, backend=backend)
        lens.set_(torch.tensor([70, 30], dtype=torch.int32))
        ops.decode(**args, plan=plan, backend=backend)

        ops.plan_decode(torch.tensor([70, 29], dtype=torch.int32), num_heads_kv=2, out=plan)
        with pytest.raises(ValueError, match="sequence 1 was planned with 29 tokens, but "
                                             "cache_seqlens gives it 30"):
            ops.decode(**args, plan=plan, backend=backend)
        lens[1] = 29
        want = ops.decode(**args, backend="torch")
        torch.testing.assert_close(ops.decode(**args, plan=plan, backend=backend), want,
                                   rtol=1e-5, atol=1e-5)
        count = len(calls)
        ops.decode(**args, plan=plan, backend=backend)
        assert len(calls) == count  # agreed and unchanged: not checked again


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_step_of_layers_checks_its_prefill_plan_once(backend_name, monkeypatch):
    """Re-planning a prefill step from its host lengths to compare with the plan ran in every
    layer of every step."""
    calls = _count_prefill_checks(monkeypatch)
    args = _prefill_args()
    plan = ops.plan_prefill(args["cu_seqlens_q"], args["cache_seqlens"])
    want = ops.prefill(**args, backend="torch")
    for _ in range(LAYERS):
        torch.testing.assert_close(ops.prefill(**args, plan=plan, backend=backend_name), want,
                                   rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_prefill_plan_checked_once_is_still_refused_once_stale(backend_name):
    """After a checked call, offsets or lengths written in place, or other tensors, are
    checked again and refused where the plan is not theirs."""
    with torch.inference_mode():
        args = _prefill_args()
        cu, lens = args["cu_seqlens_q"], args["cache_seqlens"]
        plan = ops.plan_prefill(cu, lens)
        ops.prefill(**args, plan=plan, backend=backend_name)
        cu[1] = 6
        with pytest.raises(ValueError, match="sequence 0 was planned with 3 queries over 40 "
                                             "tokens, but cu_seqlens_q and cache_seqlens give "
                                             "it 6 over 40"):
            ops.prefill(**args, plan=plan, backend=backend_name)
        cu[1] = 3
        lens[1] = 33
        with pytest.raises(ValueError, match="planned with 9 queries over 9 tokens.* give it "
                                             "9 over 33"):
            ops.prefill(**args, plan=plan, backend=backend_name)
        with pytest.raises(ValueError, match="give it 9 over 33"):
            ops.prefill(**{**args, "cache_seqlens": lens.clone()}, plan=plan,
                        backend=backend_name)


def test_a_checked_call_leaves_the_callers_lengths_resizable():
    """Observed: remembering the lengths through `Tensor.numpy()` made their storage
    unresizable for good, so a caller that resized its lengths buffers between steps (a
    batch that grows) got "Trying to resize storage that is not resizable" after one call
    with a plan, where the call without the memory had left them alone."""
    args = _decode_args()
    plan = ops.plan_decode(args["cache_seqlens"], num_heads_kv=2)
    ops.decode(**args, plan=plan, backend="torch")
    args["cache_seqlens"].resize_(3)
    prefill = _prefill_args()
    plan = ops.plan_prefill(prefill["cu_seqlens_q"], prefill["cache_seqlens"])
    ops.prefill(**prefill, plan=plan, backend="torch")
    prefill["cu_seqlens_q"].resize_(4)
    prefill["cache_seqlens"].resize_(3)


def test_checked_lengths_vouch_only_for_the_same_elements():
    """The bytes alone are not the values: the same tensor pointed at the same memory as
    another dtype (shape and strides unchanged) is checked again. A non-contiguous tensor is
    never vouched for (its bytes are not one span), nor is a copy (its bytes are copies), and
    a freed-and-reused address is read only through a tensor that spans it."""
    from hwattn.ops.plan import CheckedLengths

    lens = torch.tensor([5, 7], dtype=torch.int32)
    checked = CheckedLengths()
    checked.remember((lens,))
    assert checked.holds((lens,))
    lens.data = lens.view(torch.uint8)[:2]  # (2,) stride (1,) at the same address: [5, 0]
    assert not checked.holds((lens,))

    rows = torch.tensor([[5, 0], [7, 0]], dtype=torch.int32)[:, 0]
    checked.remember((rows,))
    assert not checked.holds((rows,))

    lens = torch.tensor([5, 7], dtype=torch.int32)
    checked.remember((lens,))
    copied, copied_lens = copy.deepcopy((checked, lens))
    assert checked.holds((lens,)) and not copied.holds((copied_lens,))
    for _ in range(100):  # storages swapped and freed, some reusing the address
        lens.set_(torch.tensor([5, 7], dtype=torch.int32))
        assert checked.holds((lens,)) == (lens.data_ptr() == checked._seen[0][3])
        lens.set_(torch.tensor([5, 8], dtype=torch.int32))
        assert not checked.holds((lens,))
