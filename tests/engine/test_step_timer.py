"""The engine's per-phase host timer (`hwattn.engine.step_timer`)."""

import gc
import time

import pytest

from hwattn.engine.step_timer import PHASES, StepTimer, summarize


def test_phases_add_up_per_step_and_summarize():
    timer = StepTimer()
    for wait in (0.002, 0.004, 0.006):
        timer.begin_step()
        with timer.phase("launch"):
            time.sleep(0.001)
        with timer.phase("wait"):
            time.sleep(wait)
        with timer.phase("resolve"):  # a phase met twice in a step adds up
            pass
        with timer.phase("resolve"):
            time.sleep(0.001)
        timer.end_step()
    doc = timer.summary()
    assert doc["n"] == 3
    # (A sleep never ends early, but a loaded machine may end it late: lower bounds only.)
    assert doc["wait"]["max"] >= doc["wait"]["median"] >= 3900
    assert doc["resolve"]["median"] >= 1000 and doc["schedule"]["max"] == 0
    exact = summarize([dict(schedule=1e-6, launch=2e-6, wait=100e-6, resolve=3e-6, output=4e-6,
                            gc=5e-6)] * 3)
    assert exact["host"]["median"] == pytest.approx(10)  # every phase but wait; gc within them
    assert exact["gc"]["p90"] == pytest.approx(5) and exact["n"] == 3
    assert timer.summary(last=1)["n"] == 1 and timer.summary(last=1)["wait"]["median"] >= 5000


def test_an_interrupted_step_is_dropped_and_bad_names_raise():
    timer = StepTimer(window=2)
    with timer.phase("launch"):
        time.sleep(0.002)  # a step that raised before end_step
    timer.begin_step()
    timer.end_step()
    assert timer.steps[-1]["launch"] == 0
    for _ in range(3):
        timer.end_step()
    assert len(timer.steps) == 2  # the window
    with pytest.raises(ValueError, match="phase must be one of"):
        with timer.phase("sample"):
            pass
    with pytest.raises(ValueError, match="window"):
        StepTimer(window=0)
    assert set(PHASES) == {"schedule", "launch", "wait", "resolve", "output"}


def test_launch_parts_are_reported_but_not_counted_twice():
    exact = summarize([dict(schedule=1e-6, launch=8e-6, inputs=2e-6, forward=3e-6,
                            sampling=1e-6, copy_out=1e-6, wait=100e-6, resolve=0, output=0,
                            gc=0)] * 2)
    assert exact["host"]["median"] == pytest.approx(9)
    assert exact["forward"]["median"] == pytest.approx(3)
    older = summarize([dict(schedule=1e-6, launch=8e-6, wait=0, resolve=0, output=0, gc=0)])
    assert older["inputs"]["max"] == 0  # records from before the parts existed


def test_garbage_collection_is_timed_only_while_attached():
    timer = StepTimer()
    timer.begin_step()
    gc.collect()
    timer.end_step()
    assert timer.steps[-1]["gc"] == 0
    timer.attach()
    try:
        timer.begin_step()
        garbage = [[] for _ in range(50_000)]
        for a, b in zip(garbage, garbage[1:]):
            a.append(b)
            b.append(a)  # cycles only the collector frees
        del garbage, a, b
        gc.collect()
        timer.end_step()
    finally:
        timer.detach()
    assert timer.steps[-1]["gc"] > 0
    assert timer._on_gc not in gc.callbacks


def test_collecting_starts_empty_and_times_collections_inside_only():
    timer = StepTimer()
    timer.end_step()
    with timer.collecting() as t:
        assert t is timer and not timer.steps and timer.attached
        timer.begin_step()
        gc.collect()
        timer.end_step()
    assert not timer.attached and timer._on_gc not in gc.callbacks
    assert len(timer.steps) == 1 and timer.steps[0]["gc"] > 0


def test_p90_is_the_nearest_rank():
    # Ten steps of 1..10 us: the 90th percentile is the 9th value (nearest rank), not the max.
    def steps(n):
        return [dict(StepTimer._empty(), launch=i * 1e-6) for i in range(1, n + 1)]

    doc = summarize(steps(10))
    assert doc["launch"]["p90"] == pytest.approx(9) and doc["launch"]["max"] == pytest.approx(10)
    doc = summarize(steps(20))
    assert doc["launch"]["p90"] == pytest.approx(18)
