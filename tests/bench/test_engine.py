"""`hwattn bench engine` end to end on a tiny model."""

import json
import time

import pytest

from hwattn.cli import main


def test_bench_engine_reports_throughput_and_breakdown(capsys, tmp_path):
    out = tmp_path / "engine.json"
    rc = main(["bench", "engine", "tiny", "--attention", "gla-2", "--num-prompts", "4",
               "--prompt-len", "20", "--output-len", "6", "--page-size", "8", "--cpu-threads", "1",
               "--memory-budget", "2e6", "--max-seq-len", "128", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "output throughput" in text and "host beyond the forward" in text
    doc = json.loads(text.strip().splitlines()[-1])
    assert doc == json.loads(out.read_text())
    assert doc["offline"]["output_tokens"] == 4 * 6
    assert doc["offline"]["itl_s"]["n"] == 5  # one prefill step, then five decode steps
    phases = doc["offline"]["host_phases_us"]
    assert phases["n"] == 5 and "host per decode step" in text
    # On the CPU the forward runs inside `launch`, so the host's share is the whole step.
    assert phases["launch"]["median"] > 0 and phases["host"]["median"] >= phases["launch"]["median"]
    # The runner times the parts of each decode launch; they lie inside it.
    parts = ("inputs", "forward", "sampling", "copy_out")
    assert all(phases[p]["median"] > 0 for p in parts[:3]) and phases["copy_out"]["max"] == 0
    assert sum(phases[p]["median"] for p in parts) <= phases["launch"]["median"] * 1.05
    assert "launch = inputs" in text
    itl_us = doc["offline"]["itl_s"]["median"] * 1e6
    assert phases["host"]["median"] + phases["wait"]["median"] <= itl_us * 1.05
    step = doc["decode_step"]
    assert step["batch"] == 4 and step["context_len"] == 26
    assert 0 < step["attention_s"] < step["step_wall_s"] * 1.5
    assert step["step_wall_s"] == pytest.approx(step["forward_device_s"] + step["host_s"])
    # The forward queued back to back (its device time per call in a loop that launches
    # ahead) and the launch latency it leaves of the single call's time.
    assert step["forward_queued_s"] > 0
    assert step["launch_latency_s"] == pytest.approx(step["forward_device_s"] - step["forward_queued_s"])
    assert step["replay_call_s"] is None  # no captured graph on the CPU
    assert step["floor"]["weight_bytes"] > 0 and "floor_s" not in step["floor"]  # no peaks on CPU
    assert doc["kv_bytes_per_token_per_rank"] == 4 * (2 * 2 * 16 + 8) * 4  # fp32, 4 layers


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_engine_breakdown_under_tensor_parallelism(capsys):
    """The decode-step breakdown drives its steps through the parallel runner: driving rank
    0 alone left rank 1 outside the all-reduce and hung."""
    rc = main(["bench", "engine", "tiny", "--attention", "gla-2", "--tp", "2", "--num-prompts",
               "2", "--prompt-len", "12", "--output-len", "3", "--page-size", "8",
               "--cpu-threads", "1", "--memory-budget", "2e6", "--max-seq-len", "64", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["tp"] == 2 and doc["decode_step"]["step_wall_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_engine_with_two_replicas_reports_before_it_stops(capsys):
    """--dp 2: two replica processes; the decode-step breakdown runs inside replica 0."""
    rc = main(["bench", "engine", "tiny", "--attention", "gqa-4", "--dp", "2", "--num-prompts",
               "4", "--prompt-len", "12", "--output-len", "3", "--page-size", "8",
               "--cpu-threads", "1", "--memory-budget", "2e6", "--max-seq-len", "64", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["dp"] == 2 and doc["offline"]["output_tokens"] == 4 * 3
    assert doc["offline"]["itl_s"]["n"] >= 2  # the replicas' own decode steps
    assert doc["decode_step"]["step_wall_s"] > 0


def test_kernel_breakdown_sorts_kernels_into_the_parts_of_a_step():
    """A step's profile is split by kernel name: the backend's paged-op kernels, cuBLAS /
    CUTLASS products, and the rest; per-step times divide by the steps profiled."""
    from hwattn.bench.engine import classify_kernel, kernel_breakdown
    from hwattn.ops import get_backend

    hopper = type("B", (), {"kernel_names": {"attention": ("attend_kernel", "hopper_decode_kernel"),
                                             "cache_write": ("store_kernel",)}})()
    kernels = [("hopper_decode_kernel", 4e-6), ("attend_kernel_0d1d", 2e-6),
               ("store_kernel", 1e-6), ("sm90_xmma_gemm_bf16bf16_bf16f32", 8e-6),
               ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", 6e-6),
               ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", 3e-6),
               ("void at::native::elementwise_kernel<128, 4>", 1e-6)] * 2
    b = kernel_breakdown(kernels, iters=2, backend=hopper, top=3)
    assert b["attention_s"] == pytest.approx(6e-6) and b["cache_write_s"] == pytest.approx(1e-6)
    assert b["gemm_s"] == pytest.approx(14e-6) and b["other_s"] == pytest.approx(4e-6)
    assert b["kernels_s"] == pytest.approx(25e-6) and b["kernels_per_step"] == 7
    assert [t["name"] for t in b["top"]] == ["sm90_xmma_gemm_bf16bf16_bf16f32",
                                             "nvjet_tst_64x8_64x16_4x1_v_bz_TNT",
                                             "hopper_decode_kernel"]
    # The CPU backend launches no GPU kernels: nothing is attention by name.
    assert classify_kernel("attend_kernel", get_backend("torch", "cpu")) == "other"
    # Both shapes of the combine step belong to the attention, on either GPU backend.
    from hwattn.ops.backends.hopper_backend import HopperBackend
    from hwattn.ops.backends.triton_backend import TritonBackend
    for backend in (TritonBackend, HopperBackend):
        for name in ("combine_kernel", "combine_rows_kernel"):
            assert classify_kernel(name, backend) == "attention"


def test_decode_floor_counts_weights_once_and_the_whole_cache():
    import torch

    from hwattn import ModelConfig, Transformer
    from hwattn.bench.engine import decode_floor

    model = Transformer(ModelConfig.from_preset("tiny", attention="gta", n_kv_heads=4))
    f = decode_floor(model, batch=3, context_len=100, cache_dtype=torch.bfloat16,
                     peaks=(1000.0, 100.0))
    params = sum(p.numel() for p in model.parameters())  # the tied embedding once
    assert f["weight_bytes"] == params * 4
    assert f["kv_bytes"] == 3 * 101 * model.kv_bytes_per_token(1, torch.bfloat16)
    attn = sum(blk.attn.decode_flops(100, 1) for blk in model.layers)
    assert f["flops"] == 2 * 3 * params + 3 * attn
    assert f["bytes_s"] == pytest.approx((f["weight_bytes"] + f["kv_bytes"]) / 1e12)
    assert f["floor_s"] == max(f["bytes_s"], f["flops_s"])


def test_decode_floor_of_a_verify_step_counts_every_query_token():
    import torch

    from hwattn import ModelConfig, Transformer
    from hwattn.bench.engine import decode_floor

    model = Transformer(ModelConfig.from_preset("tiny", attention="gta", n_kv_heads=4))
    f = decode_floor(model, batch=3, context_len=100, cache_dtype=torch.bfloat16, peaks=None,
                     query_len=4)
    params = sum(p.numel() for p in model.parameters())
    assert f["kv_bytes"] == 3 * 104 * model.kv_bytes_per_token(1, torch.bfloat16)
    attn = sum(blk.attn.decode_flops(100, 4) for blk in model.layers)
    assert attn == 4 * sum(blk.attn.decode_flops(100, 1) for blk in model.layers)
    assert f["flops"] == 2 * 3 * 4 * params + 3 * attn


def test_time_decode_step_times_one_graph_launch_call(monkeypatch):
    """With captured graphs (here a stand-in whose replay sleeps 2 ms, recorded through the
    runner's own capture path), `replay_call_s` is the host's time inside one replay."""
    import time

    import torch

    from hwattn.bench.engine import time_decode_step
    from hwattn.engine.loader import build_model
    from hwattn.engine.model_runner import ModelRunner, StepInput

    net = build_model("tiny", attention="gqa-4", dtype=torch.float32, device="cpu", seed=0,
                      overrides=dict(max_seq_len=64))
    runner = ModelRunner(net, num_pages=20, page_size=8, max_model_len=64, max_num_seqs=2,
                         cuda_graphs=False)

    def record(forward):
        with torch.inference_mode():
            out = forward()
        return (lambda: time.sleep(0.002)), out

    runner._record = record
    runner._capture((1,))
    assert runner.cuda_graphs
    step = StepInput("decode", [[3], [4]], [5, 9], [[1, 2], [3, 4]])
    res = time_decode_step(runner, step, context_len=10, iters=3)
    assert 0.002 <= res["replay_call_s"] < 0.05


def test_queued_timer_times_calls_back_to_back():
    """`DeviceTimer.queued` on the CPU: wall-clock per call, each span of `calls` calls after
    the warm-up."""
    from hwattn.bench.timing import DeviceTimer

    count = []

    def call():
        count.append(1)
        time.sleep(0.002)
    per_call = DeviceTimer("cpu").queued(call, calls=5, repeats=3, warmup=2)
    assert len(count) == 2 + 3 * 5
    assert 0.002 <= per_call < 0.02


def test_engine_report_names_attention_once_whatever_the_graphs():
    """With a kernel breakdown the attention is one of the forward's parts; without one (the
    CPU) it gets its own line; a graph's launch time is reported beside either."""
    from hwattn.bench.engine import format_engine_report

    stats = dict(mean=1e-3, median=1e-3, p99=2e-3)
    kernels = dict(attention_s=4e-4, cache_write_s=1e-5, gemm_s=3e-4, other_s=1e-4,
                   launch_gaps_s=5e-5, kernels_per_step=300)
    step = dict(batch=4, context_len=64, cuda_graphs=False, compiled=False, step_wall_s=1e-3,
                forward_device_s=9e-4, host_s=1e-4, host_overhead_share=0.1,
                launch_latency_s=4e-5, attention_s=4e-4, attention_share=0.4,
                attention_method="decode-op calls timed alone", allreduce_s=0.0,
                allreduce_share=0.0, replay_call_s=None, kernels=None)
    doc = dict(variant="gqa-4", device="cuda", dtype="bf16", tp=1, dp=1, prompt_len=8,
               output_len=4, speculative=False,
               offline=dict(requests=4, output_tokens_per_s=1.0, decode_tokens_per_s=1.0,
                            ttft_s=stats, itl_s=stats, tpot_s=stats, e2e_s=stats))
    for kern, call in ((None, None), (kernels, None), (kernels, 2e-4), (None, 2e-4)):
        text = format_engine_report(dict(doc, decode_step=dict(step, kernels=kern,
                                                               replay_call_s=call)))
        assert ("    attention 0.400 ms" in text) == (kern is None)
        assert ("forward = attention" in text) == (kern is not None)
        assert ("one graph launch holds the host 0.200 ms" in text) == (call is not None)
        assert "launch loop" not in text
    text = format_engine_report(dict(doc, decode_step=dict(
        step, forward_queued_s=8e-4, launch_queued_s=1e-3, step_io_s=2e-4)))
    assert "launch loop 1.000 ms a step" in text and "adds 0.200 ms" in text


def test_launch_loop_feeds_each_step_the_tokens_of_the_last():
    """`launch_loop` launches greedy decode steps fed by the previous launch's tokens, one
    step in flight: its tokens are the chain of argmaxes that plain `execute` calls give, and
    `time_decode_step` reports the launch loop beside the queued forward."""
    import torch

    from hwattn.bench.engine import launch_loop, time_decode_step
    from hwattn.engine.loader import build_model
    from hwattn.engine.model_runner import ModelRunner, StepInput

    # (untied: a random tied model's argmax is its input token, a chain that never moves)
    net = build_model("tiny", attention="gqa-4", dtype=torch.float32, device="cpu", seed=0,
                      overrides=dict(max_seq_len=64, tie_embeddings=False))
    runner = ModelRunner(net, num_pages=20, page_size=8, max_model_len=64, max_num_seqs=2,
                         cuda_graphs=False)
    tables = [[1, 2], [3, 4]]
    runner.execute(StepInput("prefill", [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9]],
                             [0, 0], tables, need_logits=[False, False]))
    step = StepInput("decode", [[3], [4]], [5, 9], tables)
    # Every launch rewrites the same slot, so each step sees the same cache and the argmax
    # of its fed token: first of `step`'s own tokens, then of the token sampled before.
    expected, tokens = [], [[3], [4]]
    for _ in range(4):
        nxt = runner.execute(StepInput("decode", tokens, [5, 9], tables))[:, -1].argmax(-1)
        expected.append(nxt.tolist())
        tokens = [[t] for t in nxt.tolist()]
    launch, drain = launch_loop(runner, step)
    seen = []
    real = runner.launch_step

    def spy(s, sampling):
        pending = real(s, sampling)
        seen.append(pending)
        return pending
    runner.launch_step = spy
    for _ in range(3):
        launch()
    drain()
    runner.launch_step = real
    assert len({tuple(e) for e in expected}) > 1  # the feed changes the tokens
    assert [p.result() for p in seen] == expected[1:]

    res = time_decode_step(runner, step, context_len=10, iters=2)
    assert res["launch_queued_s"] > 0
    assert res["step_io_s"] == pytest.approx(res["launch_queued_s"] - res["forward_queued_s"])
    verify = StepInput("decode", [[3, 4], [4, 5]], [5, 9], tables)
    assert time_decode_step(runner, verify, context_len=10, iters=2)["launch_queued_s"] is None


def test_cpu_report_prints_no_launch_loop_of_negative_noise():
    """Observed on the CPU: "the step's I/O adds -3.043 ms to the queued forward 15.101 ms on
    the device". Off CUDA nothing is queued and every time is the wall clock, so the line
    reads noise; the JSON keeps the numbers."""
    from hwattn.bench.engine import format_engine_report

    stats = dict(mean=1e-3, median=1e-3, p99=2e-3)
    step = dict(batch=2, context_len=12, cuda_graphs=False, compiled=False, step_wall_s=1.2e-2,
                forward_device_s=1.2e-2, host_s=1e-4, host_overhead_share=0.01,
                launch_latency_s=-3e-3, attention_s=5e-3, attention_share=0.4,
                attention_method="decode-op calls timed alone", allreduce_s=0.0,
                allreduce_share=0.0, replay_call_s=None, kernels=None,
                forward_queued_s=1.5e-2, launch_queued_s=1.2e-2, step_io_s=-3e-3)
    doc = dict(variant="gqa-4", device="cpu", dtype="float32", tp=1, dp=1, prompt_len=8,
               output_len=4, speculative=None, decode_step=step,
               offline=dict(requests=2, output_tokens_per_s=1.0, decode_tokens_per_s=1.0,
                            ttft_s=stats, itl_s=stats, tpot_s=stats, e2e_s=stats))
    text = format_engine_report(doc)
    assert "launch loop" not in text and "-3.000" not in text
    assert "launch loop 12.000 ms" in format_engine_report(dict(doc, device="cuda:0"))
