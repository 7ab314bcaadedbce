"""The one timer (supernet.measure.timer), on a fake clock: what it counts, not how fast anything is."""
from __future__ import annotations

import itertools

import pytest

from supernet.measure import timer


@pytest.fixture
def clock(monkeypatch):
    """perf_counter advances 1.0 s per reading."""
    ticks = itertools.count()
    monkeypatch.setattr(timer.time, "perf_counter", lambda: float(next(ticks)))
    return ticks


def test_stopwatch_reads_the_clock_once_on_entry_and_once_on_exit(clock):
    with timer.Stopwatch("cpu") as watch:
        pass
    assert watch.seconds == 1.0 and watch.ms == 1000.0


def test_time_calls_warms_up_then_times_each_call(clock):
    calls = []
    times = timer.time_calls(lambda: calls.append(1), warmup=2, repeat=5, device="cpu")
    assert len(calls) == 7 and times == [1.0] * 5
    assert timer.median_seconds(lambda: None, warmup=0, repeat=3, device="cpu") == 1.0
    assert timer.kernel_ms(lambda: None, "cpu") == 1000.0  # off CUDA: median_seconds in ms


def test_min_seconds_keeps_timing_past_repeat(clock):
    calls = []
    # the deadline is read once (t=0, +10 s); each timed call then takes 2 readings (1 s apart)
    timer.time_calls(lambda: calls.append(1), warmup=0, repeat=1, min_seconds=10.0, device="cpu")
    assert len(calls) == 4  # timed calls while the clock (read between them) is below the deadline


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="repeat >= 1"):
        timer.time_calls(lambda: None, repeat=0, device="cpu")
    with pytest.raises(ValueError, match="warmup >= 0"):
        timer.time_calls(lambda: None, warmup=-1, device="cpu")
