"""Timed cost tables: per-layer mixer costs measured on the current device (`costs --measure`), and
their calibration inside the whole model (`costs --calibrate`).

The table itself, its JSON format and the analytic model stay in `supernet.placement.cost`, which
imports no torch; timing needs the model, so it lives here, beside the one timer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from supernet.layout import MIXERS, Placement, PlacementError
from supernet.placement.cost import MODES, CostTable


def _median_time(fn, repeats: int, warmup: int, device: Any) -> float:
    """Median wall time of fn() in milliseconds (after warm-up), synchronising the device."""
    from supernet.measure.timer import median_seconds

    return median_seconds(fn, warmup=warmup, repeat=repeats, device=device, clock="wall") * 1e3


GRAPH_REPLAYS = 10  # graphed steps per timed sample: one replay is too short to time alone


def _median_replay_time(step, cache: Any, keys: list, repeats: int, warmup: int, device: Any) -> float:
    """Median milliseconds of one static step, replayed as a CUDA graph on CUDA (eagerly elsewhere)."""
    from supernet.static_decode import GraphedStep

    graphed = GraphedStep(step, cache, keys, cuda_graph=device.type == "cuda")
    return _median_time(lambda: [graphed() for _ in range(GRAPH_REPLAYS)], repeats, warmup, device) / GRAPH_REPLAYS


def measure_costs(model: Any, context_length: int, batch_size: int = 1, mode: str = "decode",
                  repeats: int = 10, warmup: int = 2, layers: Sequence[int] | None = None,
                  mixers: Sequence[str] = MIXERS, progress: bool = True, seed: int = 0,
                  cuda_graph: bool | None = None) -> CostTable:
    """Time each mixer of each layer of a loaded SupernetForCausalLM on its current device.

    decode: prefill N tokens through that mixer alone (its own SupernetCache), then time single-token
    steps (median over repeats; each step appends to the cache, so the context grows by `repeats`).
    prefill: time the N-token prefill itself, divided by N. `fixed` times the shared per-layer parts
    (norms + MLP), rotary, the final norm and lm_head. Unmeasured layers (`layers` given) get the
    median of the measured ones. Unit: milliseconds per step (decode) or per token (prefill).
    On CUDA (`cuda_graph`, default on there) decode steps and the fixed part are replayed as CUDA graphs,
    10 steps per timed sample, as the whole-model decode is measured (supernet/measure/throughput.py): the
    table then adds up to what a whole step costs instead of to Python's kernel-launch time.
    """
    import torch
    from tqdm.auto import tqdm

    from supernet.cache import SupernetCache
    from supernet.static_decode import static_position

    if mode not in MODES:
        raise PlacementError(f"unknown cost mode {mode!r}; use decode or prefill")
    config = model.config
    L, D, N, B = config.num_hidden_layers, config.hidden_size, context_length, batch_size
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    graphs = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    layers = list(range(L)) if layers is None else sorted(set(layers))
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> "torch.Tensor":
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    rotary = model.model.rotary_emb

    def time_mixer(module: Any, reps: int, warm: int) -> float:
        x = randn(B, N, D)
        pos = torch.arange(N, device=device).unsqueeze(0).expand(B, -1)
        pe = rotary(x, pos)
        if mode == "prefill":
            return _median_time(lambda: module(x, pe, SupernetCache(L)), reps, warm, device) / N
        cache = SupernetCache(L)
        module(x, pe, cache)
        cache.advance(N)
        x1 = randn(B, 1, D)
        pe1 = rotary(x1, torch.full((B, 1), N, device=device))
        if not graphs:
            def step() -> None:
                module(x1, pe1, cache)
                cache.advance(1)

            return _median_time(step, reps, warm, device)
        keys = [(i, m) for i, states in enumerate(cache.states) for m in states]
        for i, m in keys:
            module.prepare_static(cache.states[i][m], N + (reps + warm) * GRAPH_REPLAYS + 1)
        position = torch.tensor([N], device=device)

        def static_step() -> None:
            with static_position(cache, position):
                module(x1, pe1, cache)
                position.add_(1)

        return _median_replay_time(static_step, cache, keys, reps, warm, device)

    per_layer = {m: np.full(L, np.nan) for m in mixers}
    jobs = [(i, m) for i in layers for m in mixers]
    with torch.inference_mode():
        for m in mixers:  # first calls pay for lazy initialisation (kernel choice, allocator): untimed
            time_mixer(model.model.layers[layers[0]].mixers[m], 1, 1)
        for i, m in tqdm(jobs, desc=f"timing mixers ({mode}, N={N}, B={B})", disable=not progress):
            per_layer[m][i] = time_mixer(model.model.layers[i].mixers[m], repeats, warmup)
    for m in mixers:  # layers not timed get the median of the timed ones
        v = per_layer[m]
        v[np.isnan(v)] = np.nanmedian(v)
    fixed = _measure_fixed(model, N if mode == "prefill" else 1, B, repeats, warmup, randn, device,
                           graphs and mode == "decode") / (N if mode == "prefill" else 1)
    unit = "ms/step" if mode == "decode" else "ms/token"
    meta = {"mode": mode, "source": "measured", "num_layers": L, "device": str(device),
            "device_name": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "repeats": repeats, "layers_timed": len(layers), "cuda_graph": graphs and mode == "decode" and device.type == "cuda"}
    return CostTable({m: per_layer[m] for m in mixers}, float(fixed), unit, N, B, meta)


def device_name(device: Any) -> str:
    """'NVIDIA H200' or 'cpu (x86_64, AMD EPYC ..., 2 threads)': what a measured table was timed on."""
    import platform

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def calibrate_in_stack(table: CostTable, model: Any, *, new_tokens: int = 32, rounds: int = 3, windows: int = 2,
                       speeds: dict[str, dict] | None = None, clock: str = "wall") -> CostTable:
    """Scale each mixer's per-layer decode costs to what it costs inside the whole model.

    A mixer timed alone is not a mixer among 29 others: in the e2e run (H200, batch 64, 8k) the
    single-layer table over-predicted FA-heavy steps and under-predicted all-GDN by 10% (2.29 ms
    predicted, 2.51 measured), so the preset chosen for 4x decoded at 3.94x. Here the whole model
    decodes once per uniform placement all-<m> (graphed on CUDA, `rounds` x `windows` medians as in
    supernet.measure.throughput.compare_decode), and mixer m's per-layer costs are scaled by one factor so
    that fixed + sum of its layers equals that measured step. Uniform placements are then predicted
    exactly; a hybrid's prediction mixes in-stack costs. `speeds` (compare_decode's result, keyed by
    mixer) skips the timing, for tests and for re-using a run.
    """
    from supernet.measure.throughput import compare_decode

    if table.meta.get("mode", "decode") != "decode" or table.unit != "ms/step":
        raise PlacementError("in-stack calibration needs a measured decode table in ms/step; "
                             "run `costs --measure` in decode mode first")
    if table.context_length is None or table.batch_size is None:
        raise PlacementError("in-stack calibration needs the table's context_length and batch_size")
    L = model.config.num_hidden_layers
    if speeds is None:
        uniform = {m: Placement.uniform(m, L) for m in table.mixers}
        speeds = compare_decode(model, uniform, batch=table.batch_size, context=table.context_length,
                                new_tokens=new_tokens, rounds=rounds, windows=windows, clock=clock)
    per_layer, factors, steps = {}, {}, {}
    for m in table.mixers:
        layers = table.matrix((m,), L)[:, 0]
        step = float(speeds[m]["ms_per_step"])
        if step <= table.fixed:
            raise PlacementError(f"all-{m} measured {step:.4g} ms/step, not more than the fixed part "
                                 f"{table.fixed:.4g}: the timings disagree; measure again on an idle device")
        factors[m] = (step - table.fixed) / float(layers.sum())
        per_layer[m] = layers * factors[m]
        steps[m] = step
    meta = {**table.meta, "calibration": {
        "method": "in-stack: per-layer costs scaled so that fixed + L layers = the measured all-<mixer> step",
        "uniform_ms_per_step": steps, "factors": factors,
        "uniform_ms_range": {m: [speeds[m].get("ms_per_step_min"), speeds[m].get("ms_per_step_max")] for m in steps},
        "new_tokens": new_tokens, "rounds": rounds, "windows": windows, "clock": clock}}
    return CostTable(per_layer, table.fixed, table.unit, table.context_length, table.batch_size, meta)


def _measure_fixed(model: Any, tokens: int, batch: int, repeats: int, warmup: int, randn, device: Any,
                   cuda_graph: bool = False) -> float:
    """Time of everything a step does besides the mixers (norms, MLPs, rotary, final norm, lm_head)."""
    import torch

    inner = model.model
    x = randn(batch, tokens, model.config.hidden_size)
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    pos = torch.arange(tokens, device=device).unsqueeze(0).expand(batch, -1)

    def step() -> None:
        h = inner.embed_tokens(ids)
        inner.rotary_emb(h, pos)
        for layer in inner.layers:  # the layer's own code around its mixer (the norm's output stands in)
            h = layer.finish(x, layer.input_layernorm(x))
        model.lm_head(inner.norm(h)[:, -1:])

    with torch.inference_mode():
        if not cuda_graph:
            return _median_time(step, repeats, warmup, device)
        return _median_replay_time(step, None, [], repeats, max(warmup, 1), device)
