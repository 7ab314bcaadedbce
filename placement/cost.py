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
