"""Timings as profile observations: the committed H200 runs and `costs --measure` tables.

Readers of the result files the benchmarks write (benchmarks/results/*.json), turned into
`profile.Observation`s for `fit_profile`. Pure Python: the model shapes are plain namespaces.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from supernet.layout import MIXERS, PlacementError
from supernet.mixers.registry import spec
from supernet.placement.profile import FIXED, LAYER, STEP, Observation

# Fitting weights: whole steps are what a profile must predict; single-layer tables (a mixer timed
# alone) carry the context dependence but sit ~10% off in-stack for GDN/KDA, so they count less.
STEP_WEIGHT, TABLE_WEIGHT = 1.0, 0.5


def model_shape(**overrides: Any) -> SimpleNamespace:
    """SupernetConfig's attributes for SmolLM2-135M (the shape every committed H200 run timed)."""
    base = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, head_dim=64, attention_bias=False, mlp_bias=False,
                swa_window=4096, linear_conv_size=4)
    base.update(overrides)
    h, d = base["num_attention_heads"], base["head_dim"]
    for key, value in (("gdn_num_heads", h), ("gdn_head_dim", d), ("kda_num_heads", h), ("kda_head_dim", d)):
        base.setdefault(key, value)
    base.setdefault("gdn_num_v_heads", base["gdn_num_heads"])
    base.setdefault("gdn_v_head_dim", base["gdn_head_dim"])
    base.setdefault("kda_v_head_dim", base["kda_head_dim"])
    return SimpleNamespace(**base)


def config_shape(config: Any) -> SimpleNamespace:
    """The attributes the cost model reads, copied from a SupernetConfig (or a config.json dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "attention_bias", "mlp_bias", "swa_window", "linear_conv_size",
            "gdn_num_heads", "gdn_num_v_heads", "gdn_head_dim", "gdn_v_head_dim", "kda_num_heads", "kda_head_dim",
            "kda_v_head_dim")
    return model_shape(**{k: get(k) for k in keys if get(k) is not None})


def parse_counts(text: str) -> dict[str, int]:
    """'fa:19 swa:11' (the decode benchmarks' placement summary) -> counts."""
    counts = {m: 0 for m in MIXERS}
    for part in text.split():
        m, _, n = part.partition(":")
        if m not in counts:
            raise PlacementError(f"unknown mixer {m!r} in placement summary {text!r}")
        counts[m] += int(n)
    return counts


def table_observations(table: dict, config: Any, source: str, weight: float = TABLE_WEIGHT) -> list[Observation]:
    """A measured costs.json (ms/step, decode): one observation per mixer (layers averaged) and the fixed part."""
    if table.get("unit") != "ms/step":
        raise PlacementError(f"{source}: a profile is fitted from measured decode tables in ms/step, "
                             f"got unit {table.get('unit')!r}; run `supernet costs --measure`")
    B, N = int(table["batch_size"]), int(table["context_length"])
    out = []
    for m, v in table["per_layer"].items():
        values = v if isinstance(v, list) else [v]
        out.append(Observation(LAYER, config, B, N, sum(values) / len(values), {m: 1}, f"layer {m}", source, weight))
    out.append(Observation(FIXED, config, B, N, float(table["fixed"]), {}, "fixed part", source, weight))
    calib = table.get("calibration", {}).get("uniform_ms_per_step", {})
    L = config.num_hidden_layers
    for m, ms in calib.items():  # in-stack calibration timed whole all-<mixer> steps too
        out.append(Observation(STEP, config, B, N, float(ms), {m: L}, f"all-{m}", source, STEP_WEIGHT))
    return out


# -- the committed H200 runs -----------------------------------------------------------------------
SUPERSEDED = "gdn/kda rows of gpu_decode_presets.json: timed before the fused GDN/KDA paths (superseded kernels)"


def h200_observations(results: str | Path) -> tuple[list[Observation], list[Observation]]:
    """(fitted, not fitted) observations from the committed H200 decode runs in `results`.

    All runs time SmolLM2-135M shapes with SWA window 512 (benchmarks/gpu_decode_presets.py builds
    `smollm2_config(swa_window=512)`; e2e_measurements.json records it), bf16, CUDA graphs, batch 64,
    context 8192. Not fitted: gpu_decode_presets.json's GDN/KDA rows, timed with the torch paths
    that gpu_decode_fused.json's fused paths replaced.
    """
    results = Path(results)
    config = model_shape(swa_window=512)
    fitted: list[Observation] = []
    other: list[Observation] = []
    for name in ("gpu_decode_fused.json", "gpu_decode_presets.json"):
        data = json.loads((results / name).read_text())
        B, N = int(data["batch"]), int(data["context"])
        for row in data["rows"]:
            counts = parse_counts(row["placement"])
            obs = Observation(STEP, config, B, N, float(row["ms_per_step"]), counts, row["preset"], name, STEP_WEIGHT)
            superseded = name == "gpu_decode_presets.json" and (counts["gdn"] or counts["kda"])
            (other if superseded else fitted).append(obs)
        if name == "gpu_decode_fused.json":
            fitted += table_observations(data["costs"], config, f"{name} costs")
            for t in data.get("contexts", {}).get("table", []):
                Nc = int(t["context"])
                for m in MIXERS:
                    fitted.append(Observation(LAYER, config, B, Nc, float(t[f"{m}_ms_per_layer"]), {m: 1},
                                              f"layer {m} (context curve)", name, TABLE_WEIGHT))
                fitted.append(Observation(FIXED, config, B, Nc, float(t["fixed_ms"]), {}, "fixed (context curve)",
                                          name, TABLE_WEIGHT))
        else:
            table = {**data["costs"], "per_layer": {m: v for m, v in data["costs"]["per_layer"].items()
                                                    if spec(m).family == "attention"}}
            fitted += table_observations(table, config, f"{name} costs")
    e2e = json.loads((results / "e2e_measurements.json").read_text())
    st = e2e["settings"]
    e2e_config = model_shape(swa_window=int(st["swa_window"]))
    for row in e2e["presets"]:
        fitted.append(Observation(STEP, e2e_config, int(st["throughput_batch"]), int(st["throughput_context"]),
                                  float(row["ms_per_step"]), dict(row["counts"]), row["preset"],
                                  "e2e_measurements.json", STEP_WEIGHT))
    fitted += table_observations(json.loads((results / "e2e_costs.json").read_text()), e2e_config, "e2e_costs.json")
    return fitted, other


H200_PEAK_FLOPS = 790e12  # bf16 matmul rate seen on the lent H200s; no decode timing here reaches it, so not fitted
H200_DESCRIPTION = ("NVIDIA H200, bf16, CUDA graphs, torch 2.11 + fla 0.6 fused GDN/KDA paths; fitted from the "
                    "committed decode runs (benchmarks/results: gpu_decode_fused, gpu_decode_presets, e2e_measurements, "
                    "e2e_costs) by benchmarks/bench_cost_model.py")


def fit_h200_profile(results: str | Path, exclude: str | None = None):
    """The H200 profile from the committed runs; `exclude`: an observation key held out (leave-one-out)."""
    from supernet.placement.profile import fit_profile

    fitted, _ = h200_observations(results)
    if exclude is not None:
        fitted = [o for o in fitted if o.key != exclude]
    return fit_profile(fitted, "h200", H200_DESCRIPTION, peak_flops=H200_PEAK_FLOPS)
