"""Per-layer mixer costs (costs.json): analytic from the config, or measured on the current device.

A placement's cost is `fixed + sum_i per_layer[m_i][i]` and its speedup is cost(all-fa) / cost(p).
Only ratios matter, so the unit is free (bytes, FLOPs or milliseconds), but it must be the same
for every entry of a file.

Analytic model (`--mode`):
- decode: a decode step is memory-bound, so its cost is the bytes read per generated token:
  weights once per step (shared by the batch of B sequences, hence / B), plus each sequence's own
  cache: FA reads its whole KV cache (grows with the context N), SWA at most `swa_window` tokens,
  GDN/KDA a constant recurrent state (fp32, read and written) plus short-conv tails.
- prefill: compute-bound, so FLOPs per prompt token averaged over a prompt of N tokens: 2 per weight
  for the projections, plus attention scores over the visible keys (FA: (N+1)/2 on average, SWA:
  capped at the window) or the chunked delta-rule work for GDN/KDA (constant in N).
Shared weights (MLP, norms, embeddings, lm_head) go into `fixed`. Sizes per mixer come from
supernet/mixers/registry.py. Counting bytes misses what dominates small models (kernel latency);
`supernet.placement.profile.profile_costs` adds it with a device profile (ms, fitted from timings).
Every table says where it came from (`cost_source`), and presets.json keeps that record.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from supernet.layout import MIXERS, Placement, PlacementError
from supernet.mixers.registry import mean_visible_keys, shared_parameter_counts, spec

MODES = ("decode", "prefill")


# -- the table ------------------------------------------------------------------------------------
@dataclass
class CostTable:
    """Costs of each mixer at each layer plus the placement-independent part."""

    per_layer: dict[str, np.ndarray]  # mixer -> [L] (or [1] = same for every layer)
    fixed: float
    unit: str
    context_length: int | None = None
    batch_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mixers(self) -> tuple[str, ...]:
        return tuple(m for m in MIXERS if m in self.per_layer)

    @property
    def num_layers(self) -> int | None:
        lengths = {len(v) for v in self.per_layer.values() if len(v) > 1}
        return lengths.pop() if lengths else None

    def matrix(self, mixers: Sequence[str], num_layers: int) -> np.ndarray:
        """Costs as an [L, len(mixers)] array; errors name a missing mixer or a length mismatch."""
        cols = []
        for m in mixers:
            if m not in self.per_layer:
                raise PlacementError(f"costs have no entry for mixer {m!r}; add it to per_layer in costs.json")
            v = self.per_layer[m]
            if len(v) == 1:
                v = np.repeat(v, num_layers)
            elif len(v) != num_layers:
                raise PlacementError(
                    f"costs list {len(v)} layers for {m!r} but the model has {num_layers}; "
                    f"give one number or {num_layers}"
                )
            cols.append(v)
        return np.stack(cols, axis=1).astype(float)

    def cost(self, placement: Placement | Sequence[str]) -> float:
        p = Placement.parse(placement)
        mixers = p.used_mixers()
        mat = self.matrix(mixers, len(p))
        return self.fixed + float(sum(mat[i, mixers.index(m)] for i, m in enumerate(p)))

    def reference_cost(self, num_layers: int) -> float:
        """cost(all-fa): the denominator-free reference of every speedup."""
        return self.fixed + float(self.matrix(("fa",), num_layers).sum())

    def speedup(self, placement: Placement | Sequence[str]) -> float:
        p = Placement.parse(placement)
        return self.reference_cost(len(p)) / self.cost(p)

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        per_layer = {}
        for m in self.mixers:
            v = self.per_layer[m]
            per_layer[m] = float(v[0]) if len(v) == 1 or np.all(v == v[0]) else [float(x) for x in v]
        return {
            "mixers": list(self.mixers),
            "per_layer": per_layer,
            "fixed": float(self.fixed),
            "unit": self.unit,
            "context_length": self.context_length,
            "batch_size": self.batch_size,
            **self.meta,
        }

    def save(self, path: str | Path) -> None:
        from supernet.io_utils import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")


def costs_from_dict(data: Any, source: str = "costs") -> CostTable:
    """Validate a costs.json object (format in DESIGN.md) into a CostTable."""
    if not isinstance(data, dict) or not isinstance(data.get("per_layer"), dict):
        raise PlacementError(f"{source} must be an object with a 'per_layer' mapping (see DESIGN.md)")
    per_layer: dict[str, np.ndarray] = {}
    for m, v in data["per_layer"].items():
        if m not in MIXERS:
            raise PlacementError(f"{source}: unknown mixer {m!r}; choose from {', '.join(MIXERS)}")
        try:
            arr = np.atleast_1d(np.asarray(v, dtype=float))
        except (TypeError, ValueError):
            raise PlacementError(f"{source}: cost of {m!r} must be a number or a list of numbers") from None
        if arr.ndim != 1 or arr.size == 0:
            raise PlacementError(f"{source}: cost of {m!r} must be a number or a flat list of numbers")
        if not np.all(np.isfinite(arr)):
            raise PlacementError(f"{source}: cost of {m!r} is not a finite number")
        if np.any(arr <= 0):
            raise PlacementError(f"{source}: cost of {m!r} must be positive, got {arr.min():g}")
        per_layer[m] = arr
    if "fa" not in per_layer:
        raise PlacementError(f"{source}: needs a cost for 'fa' (speedups are relative to all-fa)")
    lengths = {len(v) for v in per_layer.values() if len(v) > 1}
    if len(lengths) > 1:
        raise PlacementError(f"{source}: per_layer lists have different lengths {sorted(lengths)}")
    try:
        fixed = float(data.get("fixed", 0.0))
    except (TypeError, ValueError):
        raise PlacementError(f"{source}: 'fixed' must be a number") from None
    if not math.isfinite(fixed) or fixed < 0:
        raise PlacementError(f"{source}: 'fixed' must be a finite number >= 0, got {data.get('fixed')!r}")
    known = {"mixers", "per_layer", "fixed", "unit", "context_length", "batch_size"}
    meta = {k: v for k, v in data.items() if k not in known}
    return CostTable(per_layer, fixed, str(data.get("unit", "")), data.get("context_length"),
                     data.get("batch_size"), meta)


def load_costs(path: str | Path) -> CostTable:
    from supernet.io_utils import read_json

    path = Path(path)
    data = read_json(path, "costs file", "write one with `supernet costs CKPT`", PlacementError)
    if isinstance(data, dict) and "per_layer" not in data and isinstance(data.get("costs"), dict):
        data = data["costs"]  # a benchmark result that carries its measured table (gpu_decode_presets.py)
    return costs_from_dict(data, f"costs file {path}")


# -- analytic model -------------------------------------------------------------------------------
# Per-mixer sizes come from supernet.mixers.registry (pure Python, no torch): one place per mixer.
def mixer_params(config: Any, mixer: str) -> dict[str, int]:
    """Parameter counts of one layer's mixer, split into matmul weights and the rest (the registry's)."""
    try:
        return spec(mixer).params(config)
    except ValueError as exc:
        raise PlacementError(str(exc)) from None


def shared_params(config: Any) -> dict[str, int]:
    """Placement-independent parameters: per-layer MLP + norms, and the embeddings / lm_head."""
    return shared_parameter_counts(config)


def analytic_costs(config: Any, context_length: int, batch_size: int = 1, mode: str = "decode",
                   dtype_bytes: int = 2, state_bytes: int = 4) -> CostTable:
    """Costs from the config alone (no weights needed); see the module docstring for the model."""
    if mode not in MODES:
        raise PlacementError(f"unknown cost mode {mode!r}; use decode or prefill")
    if context_length < 1 or batch_size < 1:
        raise PlacementError("context length and batch size must be >= 1")
    L, N, B = config.num_hidden_layers, context_length, batch_size
    shared = shared_params(config)
    per_layer: dict[str, np.ndarray] = {}
    for m in MIXERS:
        if mode == "decode":
            mixer = spec(m)
            weights = mixer.weight_bytes(config, dtype_bytes) / B
            value = weights + mixer.decode_bytes(config, N, dtype_bytes, state_bytes)
        else:
            value = spec(m).prefill_flops(config, N)
        per_layer[m] = np.array([float(value)])
    if mode == "decode":
        weights = L * (shared["layer_matmul"] + shared["layer_other"]) + shared["final_norm"] + shared["lm_head"]
        fixed = weights * dtype_bytes / B + config.hidden_size * dtype_bytes  # + this token's embedding row
        unit = "bytes/token"
    else:
        fixed = L * 2 * shared["layer_matmul"] + 2 * shared["lm_head"] / N  # logits only for the last token
        unit = "FLOP/token"
    meta = {"mode": mode, "source": "analytic", "num_layers": L, "dtype_bytes": dtype_bytes,
            "state_bytes": state_bytes}
    return CostTable(per_layer, float(fixed), unit, N, B, meta)


# -- measured on the device -----------------------------------------------------------------------
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


def load_config(path: str | Path) -> Any:
    """A SupernetConfig from a checkpoint folder or a config.json file."""
    from supernet.config import SupernetConfig

    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.exists():
        raise PlacementError(f"no config.json at {path}; give a supernet checkpoint folder or its config.json")
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise PlacementError(f"{cfg_file} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    data.pop("model_type", None)
    try:
        return SupernetConfig(**data)
    except (TypeError, ValueError) as exc:
        raise PlacementError(f"{cfg_file} is not a supernet config: {str(exc).splitlines()[0]}") from None


# -- where costs came from -------------------------------------------------------------------------
FAR_FACTOR = 4.0  # a batch or context this many times off the optimised one is "far" (speedups move a lot)


def cost_source(table: CostTable) -> dict:
    """The `cost_source` record of presets.json: measured on which device, or analytic with which
    profile, at which batch, context and mode."""
    m = table.meta
    src = {"kind": m.get("source", "unknown"), "mode": m.get("mode", "decode"), "unit": table.unit,
           "batch": table.batch_size, "context": table.context_length}
    if src["kind"] == "measured":
        src.update({"device": m.get("device"), "device_name": m.get("device_name"), "dtype": m.get("dtype"),
                    "cuda_graph": m.get("cuda_graph"), "calibrated_in_stack": "calibration" in m})
    else:
        src["profile"] = m.get("profile")  # None: the bytes / FLOPs count alone
        if m.get("profile"):
            src["profile_device"] = m.get("profile_device")
    return src


def describe_cost_source(src: dict) -> str:
    """One line for tables and warnings."""
    setting = f"{src.get('mode', 'decode')}, batch {src.get('batch')}, context {src.get('context')}"
    if src.get("kind") == "measured":
        where = src.get("device_name") or src.get("device") or "an unrecorded device"
        extra = ", calibrated in-stack" if src.get("calibrated_in_stack") else ""
        return f"measured on {where} ({src.get('dtype', '?')}{extra}), {setting}"
    if src.get("profile"):
        return f"analytic with the {src['profile']} device profile, {setting}"
    if src.get("kind") == "analytic":
        return f"analytic ({src.get('unit', 'bytes')} counted, no device profile), {setting}"
    return f"of unknown origin, {setting}"


def setting_warning(src: dict | None, batch: int, context: int, device: str | None = None) -> str | None:
    """A one-line warning when presets are used far from the setting they were optimised for."""
    if not src:
        return None
    far = []
    for name, used in (("batch", batch), ("context", context)):
        made = src.get(name)
        if made and used and max(made / used, used / made) >= FAR_FACTOR:
            far.append(f"{name} {used} (optimised for {made})")
    made_on = src.get("device") if src.get("kind") == "measured" else None
    if device and made_on and str(made_on).split(":")[0] != str(device).split(":")[0]:
        far.append(f"device {device} (measured on {made_on})")
    made_for = src.get("profile_device") if src.get("kind") == "analytic" else None
    if device and made_for and str(device).split(":")[0] != made_for:
        far.append(f"device {device} (the {src['profile']} profile describes {made_for})")
    if not far:
        return None
    return (f"warning: presets were optimised with costs {describe_cost_source(src)}; used here at "
            f"{', '.join(far)}, their speedups can differ a lot (re-run `supernet costs` and `placement optimize` "
            "for this setting)")
