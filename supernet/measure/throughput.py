"""Decode throughput of a placement with our own engine: prefill a context, then time greedy steps.

Used for the speed column of the results table (ratios against all-fa measured in the same run).
Only the last position's logits are computed, so a long prefill never materialises vocab x context.
On CUDA the decode steps run as a replayed CUDA graph (supernet/static_decode.py), as a serving
engine runs them: launched one kernel at a time from Python, a small model's step is bound by launch
overhead, and every placement would look equally fast.
"""
from __future__ import annotations

import statistics

import torch

from supernet.cache import SupernetCache
from supernet.model import SupernetForCausalLM
from supernet.layout import PlacementLike
from supernet.measure.timer import Stopwatch, check_block_clock
from supernet.static_decode import StaticDecoder


@torch.no_grad()
def measure_decode(
    model: SupernetForCausalLM,
    placement: PlacementLike,
    *,
    batch: int | None = None,
    context: int | None = None,
    new_tokens: int,
    warmup: int = 3,
    prefill_chunk: int = 2048,
    seed: int = 0,
    cuda_graph: bool | None = None,
    input_ids: torch.Tensor | None = None,
    windows: int = 1,
    clock: str = "wall",
) -> dict:
    """Tokens/s of greedy decoding after a `context`-token prefill, batch `batch`.

    The prefill is random tokens, or `input_ids` [batch, context] when given (real prompts).
    `cuda_graph` (default: on CUDA) times static decoding replayed as a CUDA graph; False times
    ordinary eager decoding with the growing cache. `windows` > 1 times that many consecutive runs of
    `new_tokens` steps after the one prefill and reports their median, so one disturbed window does
    not decide the number (`ms_per_step_windows` keeps them all).
    """
    if windows < 1 or new_tokens < 1:
        raise ValueError(f"measure_decode needs windows >= 1 and new_tokens >= 1, got {windows} and {new_tokens}")
    device = next(model.parameters()).device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    check_block_clock(clock, device)
    if input_ids is not None:
        ids = input_ids.to(device)
        batch, context = ids.shape
    elif batch is None or context is None:
        raise ValueError("measure_decode needs batch and context, or input_ids")
    else:
        g = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)
    cache = SupernetCache(model.config.num_hidden_layers)
    with Stopwatch(device) as prefill:
        for start in range(0, context, prefill_chunk):  # chunked prefill bounds activation memory
            out = model(ids[:, start : start + prefill_chunk], past_key_values=cache, use_cache=True,
                        placement=placement, logits_to_keep=1)
    prefill_s = prefill.seconds
    token = out.logits[:, -1:].argmax(-1)
    if cuda_graph:
        decoder = StaticDecoder(model, placement, cache, max_new_tokens=warmup + 1 + windows * new_tokens,
                                cuda_graph=True)
        decoder.start(token)
        step = decoder.step
        warmup += 1  # the first graphed step after the eager warm-ups captures the graph
    else:
        def step() -> torch.Tensor:
            nonlocal token
            token = model(token, past_key_values=cache, use_cache=True, placement=placement).logits.argmax(-1)
            return token
    for _ in range(warmup):
        step()
    window_ms = []
    for _ in range(windows):
        with Stopwatch(device, clock=clock) as window:
            for _ in range(new_tokens):
                step()
        window_ms.append(window.ms / new_tokens)
    ms = statistics.median(window_ms)
    return {
        "cuda_graph": cuda_graph,
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "prefill_s": prefill_s,
        "ms_per_step": ms,
        "ms_per_step_windows": window_ms,
        "tokens_per_s": batch * 1e3 / ms,
    }


def compare_decode(
    model: SupernetForCausalLM,
    placements: dict[str, PlacementLike],
    *,
    batch: int,
    context: int,
    new_tokens: int,
    cuda_graph: bool | None = None,
    rounds: int = 1,
    windows: int = 1,
    clock: str = "wall",
) -> dict[str, dict]:
    """Decode speed of several placements side by side: a warm-up pass over all, then timed passes.

    The first pass pays for allocator growth and kernel compilation, which once made the first
    placement measured look three times slower than the same placement measured later. `rounds`
    timed passes go over all placements in turn (a slow drift of the machine then touches every
    placement alike), each timing `windows` windows after its prefill; a placement's `ms_per_step` is
    the median of all its windows, and `ms_per_step_min` / `_max` show the spread.
    """
    if rounds < 1:
        raise ValueError(f"compare_decode needs rounds >= 1, got {rounds}")
    device = next(model.parameters()).device
    runs: dict[str, list[dict]] = {name: [] for name in placements}
    for timed in [False] + [True] * rounds:
        for name, placement in placements.items():
            row = measure_decode(model, placement, batch=batch, context=context,
                                 new_tokens=new_tokens if timed else 2, cuda_graph=cuda_graph,
                                 windows=windows if timed else 1, clock=clock)
            if timed:
                runs[name].append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results: dict[str, dict] = {}
    for name, rows in runs.items():
        window_ms = [ms for row in rows for ms in row["ms_per_step_windows"]]
        ms = statistics.median(window_ms)
        results[name] = {**rows[-1], "rounds": rounds, "ms_per_step": ms, "ms_per_step_windows": window_ms,
                         "ms_per_step_min": min(window_ms), "ms_per_step_max": max(window_ms),
                         "tokens_per_s": batch * 1e3 / ms}
    return results
