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
Shared weights (MLP, norms, embeddings, lm_head) go into `fixed`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from supernet.layout import MIXERS, Placement, PlacementError

MODES = ("decode", "prefill")
CHUNK = 64  # chunk size assumed for the chunked delta-rule FLOP count


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
def mixer_params(config: Any, mixer: str) -> dict[str, int]:
    """Parameter counts of one layer's mixer, split into matmul weights and the rest (per the spec)."""
    D = config.hidden_size
    W = config.linear_conv_size
    if mixer in ("fa", "swa"):
        hq, hkv, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        matmul = D * hq * dh + 2 * D * hkv * dh + hq * dh * D
        other = (hq * dh + 2 * hkv * dh + D) if config.attention_bias else 0
        return {"matmul": matmul, "other": other}
    if mixer == "gdn":
        h, hv, k, v = config.gdn_num_heads, config.gdn_num_v_heads, config.gdn_head_dim, config.gdn_v_head_dim
        matmul = 2 * D * h * k + D * hv * v + 2 * D * hv + D * hv * v + hv * v * D  # q,k,v,a,b,g,o
        other = (2 * h * k + hv * v) * W + 2 * hv + v  # convs, A_log, dt_bias, o_norm
        return {"matmul": matmul, "other": other}
    if mixer == "kda":
        h, k, v = config.kda_num_heads, config.kda_head_dim, config.kda_v_head_dim
        matmul = (2 * D * h * k + D * h * v + D * k + k * h * k + D * h + D * v + v * h * v + h * v * D)
        other = (2 * h * k + h * v) * W + h + h * k + v  # convs, A_log, dt_bias, o_norm
        return {"matmul": matmul, "other": other}
    raise PlacementError(f"unknown mixer {mixer!r}; choose from {', '.join(MIXERS)}")


def shared_params(config: Any) -> dict[str, int]:
    """Placement-independent parameters: per-layer MLP + norms, and the embeddings / lm_head."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    mlp = 3 * D * F + (2 * F + D if getattr(config, "mlp_bias", False) else 0)
    return {"layer_matmul": mlp, "layer_other": 2 * D, "lm_head": V * D, "final_norm": D}


def mean_visible_keys(context: int, window: int | None) -> float:
    """Average number of keys a causal query sees over a prompt of `context` tokens."""
    n = context
    if window is None or window >= n:
        return (n + 1) / 2
    w = window
    return (w * (w + 1) / 2 + (n - w) * w) / n


def _cache_bytes(config: Any, mixer: str, context: int, dtype_bytes: int, state_bytes: int) -> float:
    """Bytes of one sequence's decode cache that a decode step reads (and, for state, writes)."""
    if mixer in ("fa", "swa"):
        tokens = context if mixer == "fa" else min(context, config.swa_window)
        per_token = 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
        return tokens * per_token + per_token  # read the cache, append this token
    W = config.linear_conv_size
    if mixer == "gdn":
        h, hv, k, v = config.gdn_num_heads, config.gdn_num_v_heads, config.gdn_head_dim, config.gdn_v_head_dim
        state, conv = hv * k * v, (2 * h * k + hv * v) * (W - 1)
    else:
        h, k, v = config.kda_num_heads, config.kda_head_dim, config.kda_v_head_dim
        state, conv = h * k * v, (2 * h * k + h * v) * (W - 1)
    return 2 * (state * state_bytes + conv * dtype_bytes)  # read + write


def _mixer_flops(config: Any, mixer: str, context: int) -> float:
    """FLOPs per prompt token of one mixer (projections + token mixing), averaged over the prompt."""
    proj = 2 * mixer_params(config, mixer)["matmul"]
    if mixer in ("fa", "swa"):
        keys = mean_visible_keys(context, None if mixer == "fa" else config.swa_window)
        return proj + 4 * config.num_attention_heads * config.head_dim * keys  # QK^T and PV
    W = config.linear_conv_size
    if mixer == "gdn":
        h, hv, k, v = config.gdn_num_heads, config.gdn_num_v_heads, config.gdn_head_dim, config.gdn_v_head_dim
        heads, channels, extra = hv, 2 * h * k + hv * v, 0
    else:
        h, k, v = config.kda_num_heads, config.kda_head_dim, config.kda_v_head_dim
        heads, channels, extra = h, 2 * h * k + h * v, CHUNK * k  # per-channel decay inside the chunk
    c = min(CHUNK, context)
    # chunked delta rule per head: state in/out (4KV) + intra-chunk scores and outputs (2C(K+V))
    mixing = heads * (4 * k * v + 2 * c * (k + v) + extra)
    return proj + mixing + 2 * W * channels


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
            p = mixer_params(config, m)
            weights = (p["matmul"] + p["other"]) * dtype_bytes / B
            value = weights + _cache_bytes(config, m, N, dtype_bytes, state_bytes)
        else:
            value = _mixer_flops(config, m, N)
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
    meta = {"mode": mode, "source": "measured", "num_layers": L, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "repeats": repeats, "layers_timed": len(layers), "cuda_graph": graphs and mode == "decode" and device.type == "cuda"}
    return CostTable({m: per_layer[m] for m in mixers}, float(fixed), unit, N, B, meta)


def calibrate_in_stack(table: CostTable, model: Any, *, new_tokens: int = 32, rounds: int = 3, windows: int = 2,
                       speeds: dict[str, dict] | None = None) -> CostTable:
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
                                new_tokens=new_tokens, rounds=rounds, windows=windows)
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
        "new_tokens": new_tokens, "rounds": rounds, "windows": windows}}
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
