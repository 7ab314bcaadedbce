"""The project's one timer: every measured duration (benchmarks, measured costs, decode throughput,
speculative decoding) goes through here, so that all of them synchronise the device the same way.

- `Stopwatch(device)`: a block of work, wall clock, the device synchronised on entry and exit (a
  CUDA kernel launch returns before the kernel ran; timing without the sync times the launch).
- `median_seconds(fn, ...)`: one call timed many times after warm-up; the median, so that one
  disturbed call does not decide the number. On CUDA, by default with CUDA events (GPU time between
  two marks); `clock="wall"` times host wall clock around a synchronised call instead.
- `kernel_ms(fn, device)`: short GPU kernels, through triton's `do_bench` (it flushes the L2 cache
  between calls and repeats for a fixed time); `median_seconds` off CUDA.

torch is imported lazily: importing this module costs nothing on the placement CLI's path.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Literal

Clock = Literal["events", "wall"]
DO_BENCH_WARMUP_MS, DO_BENCH_REP_MS = 5, 20  # do_bench budgets; the median of >= a few calls either way


def _is_cuda(device: Any) -> bool:
    return getattr(device, "type", str(device).split(":")[0]) == "cuda"


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu" (what to synchronise when the caller does not say)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


BLOCK_CLOCKS = ("wall", "cpu")


def check_block_clock(clock: str, device: Any) -> None:
    """Refuse, before any work is timed, a clock Stopwatch cannot use on `device`."""
    if clock not in BLOCK_CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; use wall or cpu")
    if clock == "cpu" and _is_cuda(device):
        raise ValueError("the cpu clock times CPU runs only (GPU kernels run asynchronously); use wall")


class Stopwatch:
    """`with Stopwatch(device) as sw: work()` then `sw.seconds`: time of the block, synchronised.

    `clock="wall"` (default) is wall time; `clock="cpu"` is this process's CPU time, for CPU runs on a
    shared machine: other processes steal time slices, which wall time counts and CPU time does not
    (single-threaded runs measure best). GPU kernels run asynchronously, so CUDA needs the wall clock.
    """

    def __init__(self, device: Any = "cpu", clock: str = "wall") -> None:
        check_block_clock(clock, device)
        self.device = device
        self._now = time.perf_counter if clock == "wall" else time.process_time
        self.seconds = float("nan")
        self._start = 0.0

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._start = self._now()
        return self

    def __exit__(self, *exc: Any) -> None:
        synchronize(self.device)
        self.seconds = self._now() - self._start

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


def time_calls(fn: Callable[[], Any], *, warmup: int = 3, repeat: int = 20, min_seconds: float = 0.0,
               device: Any = None, clock: Clock = "events") -> list[float]:
    """Seconds of each timed call of `fn` (after `warmup` untimed calls): at least `repeat` calls and,
    off CUDA events, calls until `min_seconds` have passed. `device` None: the GPU when one is visible."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f"time_calls needs repeat >= 1 and warmup >= 0, got {repeat} and {warmup}")
    device = default_device() if device is None else device
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if _is_cuda(device) and clock == "events":
        import torch

        synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times
    deadline = time.perf_counter() + min_seconds
    while len(times) < repeat or time.perf_counter() < deadline:
        with Stopwatch(device) as sw:
            fn()
        times.append(sw.seconds)
    return times


def median_seconds(fn: Callable[[], Any], **kwargs: Any) -> float:
    """Median seconds per call of `fn`; the arguments of `time_calls`."""
    return statistics.median(time_calls(fn, **kwargs))


def kernel_ms(fn: Callable[[], Any], device: Any, *, cpu_warmup: int = 1, cpu_repeat: int = 3) -> float:
    """Median milliseconds per call of a short kernel: triton's `do_bench` on CUDA (one untimed call
    first, so compilation and autotuning stay outside), `median_seconds` elsewhere."""
    if _is_cuda(device):
        import triton.testing

        fn()
        synchronize(device)
        return float(triton.testing.do_bench(fn, warmup=DO_BENCH_WARMUP_MS, rep=DO_BENCH_REP_MS,
                                             return_mode="median"))
    return median_seconds(fn, warmup=cpu_warmup, repeat=cpu_repeat, device=device) * 1e3
