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
    multi: dict | None = None  # objective, requirements, teacher values (multi-metric runs)


def preset_name(speedup: float) -> str:
    return f"speedup-{speedup:g}x"


def run_optimize(evaluations: str | Path | None, costs: str | Path, speedups: Sequence[float],
                 pairs: str = "nn", frontier: bool = False, method: str = "ridge", solver: str = "auto",
                 resolution: int | None = None, surrogate_path: str | Path | None = None,
                 allow_unmeasured: bool = False, seed: int = 0, objective: str | None = None,
                 requires: Sequence[str] = ()) -> PresetRun:
    """Fit (or load) the surrogate, then solve every requested speedup (and the frontier).

    With more metric columns in the evaluations (retrieval, dev_tasks, ...), each gets its own surrogate
    and every preset records all predicted metrics; `objective` (e.g. `0.5*quality+0.5*dev_tasks`) and
    `requires` (e.g. `retrieval>=0.9*teacher`) switch to the constrained solver (multimetric.py).
    """
    speedups = list(dict.fromkeys(float(s) for s in speedups))  # de-duplicate, keep order
    if not speedups and not frontier:
        raise PlacementError("give at least one --speedup (or --frontier)")
    for s in speedups:
        if not s > 0:
            raise PlacementError(f"speedup must be a positive number, got {s:g}")
    table = load_costs(costs)
    evals = read_evaluations(evaluations) if evaluations is not None else None
    _check_multi(evals, objective, requires)
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
    run = PresetRun(surrogate, table, evals, problem, result, fit_seconds, excluded)
    from supernet.placement.multimetric import metric_columns

    columns = metric_columns(evals.rows) if evals is not None else ["quality"]
    if objective not in (None, "quality") or requires or len(columns) > 1:
        _multi_metric(run, columns, objective or "quality", requires, speedups, pairs, method, seed, solver,
                      resolution, allow_unmeasured)
    return run


def _check_multi(evals: Evaluations | None, objective: str | None, requires: Sequence[str]) -> None:
    """Refuse a bad --objective / --require before any fitting (one-line errors)."""
    from supernet.placement import multimetric as mm

    if objective in (None, "quality") and not requires:
        return
    if evals is None:
        raise PlacementError("--objective/--require need --evaluations (one surrogate is fitted per metric)")
    columns = mm.metric_columns(evals.rows)
    mm.check_metrics(list(mm.parse_objective(objective or "quality")), columns, "--objective")
    mm.check_metrics([mm.parse_requirement(r).metric for r in requires], columns, "--require")


def _multi_metric(run: PresetRun, columns: list[str], objective: str, requires: Sequence[str],
                  speedups: Sequence[float], pairs: str, method: str, seed: int, solver: str,
                  resolution: int | None, allow_unmeasured: bool) -> None:
    """Fit a surrogate per metric column; re-solve the presets under the objective and requirements."""
    from supernet.placement import multimetric as mm
    from supernet.placement.optimize import _solution

    weights = mm.parse_objective(objective)
    reqs = [mm.parse_requirement(r) for r in requires]
    if run.evaluations is None:
        raise PlacementError("--objective/--require need --evaluations (one surrogate is fitted per metric)")
    mm.check_metrics(list(weights), columns, "--objective")
    mm.check_metrics([r.metric for r in reqs], columns, "--require")
    t0 = time.perf_counter()
    surrogates = {"quality": run.surrogate}
    surrogates.update(mm.fit_metric_surrogates(run.evaluations.placements, run.evaluations.rows,
                                               [c for c in columns if c != "quality"], pairs=pairs, method=method,
                                               seed=seed))
    run.fit_seconds += time.perf_counter() - t0
    mp = mm.MultiProblem.from_surrogates(surrogates, run.costs, allow_unmeasured)
    teacher, source = mm.teacher_values(mp, run.evaluations.rows, columns)
    run.multi = {"objective": weights, "requirements": [r.text for r in reqs], "teacher": teacher,
                 "teacher_source": source, "metrics": columns,
                 "surrogates": {m: {k: s.diagnostics.get(k) for k in ("cv_spearman", "cv_r2", "cv_rmse")}
                                for m, s in surrogates.items()}}
    constrained = weights != {"quality": 1.0} or bool(reqs)
    sols = []
    for s in (speedups if constrained else []):
        c = mm.solve_constrained(mp, weights, reqs, teacher, s, solver=solver, resolution=resolution)
        sol = _solution(run.problem, c.row, c.method, s, c.notes["budget"], objective_value=c.objective,
                        upper_bound=c.upper_bound, gap=c.gap)
        sols.append(sol)
    if constrained:
        run.result.presets = sols
    for sol in run.result.presets + run.result.frontier:
        sol.notes["predicted"] = mp.values(sol.indices)


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
    if "predicted" in sol.notes:
        row["predicted"] = sol.notes["predicted"]
    for key in ("objective_value", "upper_bound", "gap"):
        if key in sol.notes:
            row[key] = sol.notes[key]
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
    if run.multi is not None:
        data["multi_metric"] = run.multi
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
