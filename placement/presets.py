"""From files to presets: evaluations.jsonl + costs.json -> fitted surrogate -> presets.json.

This is what `placement optimize` runs; the CLI only parses options and prints.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from supernet.placement.cost import CostTable, cost_source, load_costs
from supernet.placement.evaluations import Evaluations, read_evaluations
from supernet.placement.optimize import OptimizeResult, Problem, Solution, optimize
from supernet.placement.surrogate import ClusterExpansion, fit_surrogate
from supernet.layout import PlacementError, save_presets


@dataclass
class PresetRun:
    surrogate: ClusterExpansion
    costs: CostTable
    evaluations: Evaluations | None
    problem: Problem
    result: OptimizeResult
    fit_seconds: float
    excluded: int  # (layer, mixer) choices left out because they were never measured


def preset_name(speedup: float) -> str:
    return f"speedup-{speedup:g}x"


def run_optimize(evaluations: str | Path | None, costs: str | Path, speedups: Sequence[float],
                 pairs: str = "nn", frontier: bool = False, method: str = "ridge", solver: str = "auto",
                 resolution: int | None = None, surrogate_path: str | Path | None = None,
                 allow_unmeasured: bool = False, seed: int = 0) -> PresetRun:
    """Fit (or load) the surrogate, then solve every requested speedup (and the frontier)."""
    speedups = list(dict.fromkeys(float(s) for s in speedups))  # de-duplicate, keep order
    if not speedups and not frontier:
        raise PlacementError("give at least one --speedup (or --frontier)")
    for s in speedups:
        if not s > 0:
            raise PlacementError(f"speedup must be a positive number, got {s:g}")
    table = load_costs(costs)
    evals = read_evaluations(evaluations) if evaluations is not None else None
    t0 = time.perf_counter()
    if surrogate_path is not None:
        surrogate = ClusterExpansion.load(surrogate_path)
        if evals is not None and evals.num_layers != surrogate.num_layers:
            raise PlacementError(f"the surrogate has {surrogate.num_layers} layers but the evaluations have "
                                 f"{evals.num_layers}")
    elif evals is None:
        raise PlacementError("give --evaluations (or a fitted --surrogate)")
    else:
        surrogate = fit_surrogate(evals.placements, evals.quality, pairs=pairs, method=method, seed=seed)
    fit_seconds = time.perf_counter() - t0
    L = surrogate.num_layers
    if table.num_layers is not None and table.num_layers != L:
        raise PlacementError(f"costs list {table.num_layers} layers but the evaluations have {L}; "
                             "use costs of the same model")
    problem = Problem.from_surrogate(surrogate, table, allow_unmeasured=allow_unmeasured)
    excluded = int((~problem.allowed).sum())
    result = optimize(problem, speedups, frontier=frontier, solver=solver, resolution=resolution)
    return PresetRun(surrogate, table, evals, problem, result, fit_seconds, excluded)


def _row(sol: Solution) -> dict:
    row = {
        "speedup": round(sol.speedup, 6),
        "predicted_quality": sol.quality,
        "cost": sol.cost,
        "counts": sol.counts(),
        "method": sol.method,
    }
    if sol.target_speedup is not None:
        row["target_speedup"] = sol.target_speedup
    return row


def write_presets(path: str | Path, run: PresetRun, include_frontier: bool = True) -> None:
    """presets.json in the DESIGN.md format, plus the frontier and how the presets were made."""
    from supernet.io_utils import atomic_write_text

    sols = run.result.presets
    presets = {preset_name(s.target_speedup): s.placement for s in sols}
    extra = {preset_name(s.target_speedup): _row(s) for s in sols}
    if not presets:  # frontier only: still a valid presets file, named by achieved speedup
        sols = run.result.frontier
        presets = {preset_name(round(s.speedup, 3)): s.placement for s in sols}
        extra = {preset_name(round(s.speedup, 3)): _row(s) for s in sols}
    path = Path(path)
    save_presets(path, presets, extra)
    data = json.loads(path.read_text())
    if include_frontier and run.result.frontier:
        data["frontier"] = [{"placement": s.placement.to_list(), **_row(s)} for s in run.result.frontier]
    dp = run.result.dp
    data["optimizer"] = {
        "method": run.result.method,
        "grid_step": dp.step,
        "exact_grid": dp.exact_grid,
        "discretisation_bound": dp.error_bound,
        "seconds": run.result.seconds,
    }
    data["surrogate"] = {"method": run.surrogate.method, "pairs": run.surrogate.pair_spec(),
                         **run.surrogate.diagnostics}
    data["costs"] = {k: v for k, v in run.costs.to_dict().items() if k not in ("per_layer", "mixers")}
    data["cost_source"] = cost_source(run.costs)  # read by `serve` / `generate` to warn far from this setting
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def measured_points(run: PresetRun) -> tuple[list[float], list[float]]:
    """(speedup, measured quality) of every evaluated placement, from the costs table."""
    if run.evaluations is None:
        return [], []
    xs, ys = [], []
    for p, q in zip(run.evaluations.placements, run.evaluations.quality):
        if all(m in run.costs.per_layer for m in p):
            xs.append(run.costs.speedup(p))
            ys.append(float(q))
    return xs, ys
