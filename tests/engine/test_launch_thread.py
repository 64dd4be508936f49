"""`EngineConfig.launch_thread`: overlapped launches made from a thread of their own give the
same outputs, in the same order of launches, and a failing launch fails the step."""

import threading

import pytest

from hwattn.engine import LLM, SamplingParams

PROMPTS = [[5, 6, 7], list(range(40, 75)), [9] * 11, [100, 200]]


def make(checkpoints, thread):
    return LLM(checkpoints("gla-2"), page_size=4, num_pages=200, max_model_len=96,
               max_num_seqs=3, launch_thread=thread)


def test_launch_thread_gives_the_same_outputs_from_its_own_thread(checkpoints):
    params = [SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0.9, seed=4, ignore_eos=True)] * 2
    want = [o.token_ids for o in make(checkpoints, False).generate(PROMPTS, params)]
    llm = make(checkpoints, True)
    runner = llm.engine.runner
    threads = []
    launch = runner.launch_step

    def recorded(step, sampling):
        threads.append(threading.current_thread().name)
        return launch(step, sampling)

    runner.launch_step = recorded
    assert [o.token_ids for o in llm.generate(PROMPTS, params)] == want
    assert threads and all(name.startswith("hwattn-launch") for name in threads)
    # A request that reads its tokens back each step (log-probabilities) runs beside them:
    # its steps are sampled on the main thread, after the thread's launches are made.
    mixed = params[:2] + [SamplingParams(max_tokens=5, temperature=0, logprobs=2)] * 2
    outs = llm.generate(PROMPTS, mixed)
    assert [o.token_ids for o in outs[:2]] == want[:2] and outs[2].outputs[0].logprobs
    llm.engine.check_invariants()
    assert llm.engine.block_manager.num_used_pages == 0
    llm.shutdown()


def test_a_failing_launch_fails_the_step(checkpoints):
    llm = make(checkpoints, True)
    engine = llm.engine
    calls = 0
    launch = engine.runner.launch_step

    def failing(step, sampling):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("device lost")
        return launch(step, sampling)

    engine.runner.launch_step = failing
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    with pytest.raises(RuntimeError, match="device lost"):
        for _ in range(10):
            engine.step()
    llm.shutdown()
