"""A constrained preset that is measured, not just predicted: solve, measure, refit, re-solve.

The per-metric surrogates are additive (plus pairs); a threshold-like metric such as long-context
retrieval (a placement retrieves only while few enough layers lose the long context) is not, so the
constrained optimum of the surrogate can be far outside the metric's true feasible region. This loop
treats the surrogate as a proposal and the measurement as the judge:

    repeat (at most `rounds` measurements):
        fit one surrogate per metric on evaluations.jsonl; solve the constrained problem with every
        requirement tightened by its margin; measure the candidate with the scorer the evaluations
        were made with and append the row (so the next fit knows it); judge it (optionally with a
        second, larger `confirm` measurement); stop when it meets every requirement, else widen the
        margin by how much the surrogate over-predicted it (at least a step) and go on.

The preset kept is the best *measured* placement (by the measured objective) that was judged to meet
every requirement at or above the speedup target: a loop candidate, or an evaluated placement that
already met them. None met: `RequirementNotVerified`, a one-line message, never an unverified preset.

Pure numpy: the measurement is a callback (the pipeline passes the model's scorer; tests pass a
planted ground truth).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from supernet.layout import Placement, PlacementError
from supernet.placement import multimetric as mm
from supernet.placement.cost import CostTable
from supernet.placement.evaluations import append_evaluation, read_evaluations

Measure = Callable[[Placement], dict]


class RequirementNotVerified(PlacementError):
    """No measured placement at the speedup target met the requirements."""


@dataclass
class Check:
    """One judged placement: what the surrogate predicted and what was measured."""

    placement: Placement
    speedup: float
    predicted: dict[str, float]
    measured: dict[str, float]  # the evaluation row's metrics (the eval-placements scorer)
    confirmed: dict[str, float] | None  # the requirement metrics by `confirm`, for those that passed `measured`
    meets: bool
    source: str  # "round N" or "evaluated"
    margins: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"placement": self.placement.to_list(), "speedup": self.speedup, "predicted": self.predicted,
                "measured": self.measured, "confirmed": self.confirmed, "meets": self.meets, "source": self.source, "margins": self.margins}


@dataclass
class Verified:
    chosen: Check
    checks: list[Check]
    teacher: dict[str, float]  # the all-fa row of the evaluations (relative bounds)
    bounds: dict[str, float]  # requirement text -> bound on the evaluation rows
    objective: float  # the chosen placement's measured objective
    confirm_teacher: dict[str, float] = field(default_factory=dict)  # confirm(all-fa), if confirmed
    confirm_bounds: dict[str, float] = field(default_factory=dict)  # requirement text -> bound on confirm


def _metric_values(row: dict, metrics: Sequence[str]) -> dict[str, float]:
    return {m: float(row[m]) for m in metrics if isinstance(row.get(m), (int, float))}


def meets(values: dict[str, float], req: mm.Requirement, bound: float) -> bool:
    """`values` satisfy `req` against the absolute `bound` (to float rounding)."""
    v = values.get(req.metric)
    if v is None:
        return False
    tol = 1e-9 * max(1.0, abs(bound))
    return v >= bound - tol if req.op == ">=" else v <= bound + tol


def _observed(rows: Sequence[dict], req: mm.Requirement) -> float:
    """The best value of the requirement's metric measured so far (a margin never asks beyond it)."""
    vals = [float(r[req.metric]) for r in rows if isinstance(r.get(req.metric), (int, float))]
    return max(vals) if req.op == ">=" else min(vals)


def _tightened(req: mm.Requirement, bound: float, margin: float, observed: float) -> mm.Requirement:
    """The requirement as an absolute bound, `margin` on the safe side but not past the best observed value."""
    value = max(bound, min(bound + margin, observed)) if req.op == ">=" else min(bound, max(bound - margin, observed))
    return mm.Requirement(req.metric, req.op, value, False, f"{req.metric}{req.op}{value:.4g}")


def _indices(mp: mm.MultiProblem, placement: Placement) -> np.ndarray:
    return np.array([mp.base.mixers.index(m) for m in placement], dtype=np.int64)


def _closest(mp: mm.MultiProblem, reqs: Sequence[mm.Requirement], limit: Sequence[mm.Requirement],
             teacher: dict[str, float], speedup: float, solver: str) -> Placement | None:
    """Within the budget (and the changed-layer limit), the placement with the best predicted value of
    the first requirement that is predicted out of reach; None if none is."""
    for r in reqs:
        try:
            sol = mm.solve_constrained(mp, {r.metric: 1.0 if r.op == ">=" else -1.0}, list(limit), teacher, speedup,
                                       solver=solver)
        except PlacementError:
            return None
        if not meets(sol.values, r, r.value):
            return sol.placement
    return None


CHANGED = "changed_layers"  # a synthetic, exactly additive metric: layers not fa


def _with_synthetic(mp: mm.MultiProblem, excluded: Sequence[Placement]) -> tuple[mm.MultiProblem, list[mm.Requirement]]:
    """The problem plus exactly additive tables for the loop's own constraints: `changed_layers` (a cap
    on it is one linear requirement) and, per failed candidate x, the number of layers equal to x's,
    required <= L - 1 (a no-good cut: x itself is excluded, any placement differing in a layer is not)."""
    from supernet.placement.optimize import Problem

    b = mp.base

    def table(h: np.ndarray) -> Problem:
        return Problem(b.mixers, 0.0, h, b.pairs, np.zeros_like(b.Jp), b.cost, b.fixed, b.reference_cost, b.allowed)

    tables = {**mp.metrics, CHANGED: table(np.array([[0.0 if m == "fa" else 1.0 for m in b.mixers]] * b.L))}
    cuts = []
    for k, x in enumerate(excluded):
        h = np.zeros((b.L, len(b.mixers)))
        h[np.arange(b.L), [b.mixers.index(m) for m in x]] = 1.0
        tables[f"same_as_failed_{k}"] = table(h)
        cuts.append(mm.Requirement(f"same_as_failed_{k}", "<=", b.L - 1.0, False, f"not failed candidate {k + 1}"))
    return mm.MultiProblem(b, tables), cuts


def verify_constrained(evaluations: str | Path, costs: CostTable, objective: dict[str, float],
                       requirements: Sequence[mm.Requirement], speedup: float, measure: Measure,
                       confirm: Measure | None = None, rounds: int = 4, pairs: str = "nn", method: str = "ridge",
                       seed: int = 0, solver: str = "auto", step: float = 0.05, probe: dict | None = None,
                       log: Callable[[str], None] = print) -> Verified:
    """The best measured placement at >= `speedup` meeting every requirement, found by at most `rounds`
    new measurements (see the module docstring).

    `rounds=0` measures nothing new and only judges the evaluated placements. `measure(placement)`
    returns an evaluations.jsonl row (the metrics of the existing rows); it is
    appended to `evaluations`. `confirm(placement)`, if given, returns the requirement metrics measured
    more thoroughly (e.g. more documents): a placement that meets the requirements on its evaluation row
    must meet them on its confirmation too (relative bounds against confirm(all-fa)); only those are
    confirmed, so the costly measurement runs on few placements. `step` is the smallest margin increase
    after a failure, as a fraction of the bound. `probe` (how `measure` measures: metric, reference,
    data_id, tasks_spec) is checked against the file's rows first, as eval-placements checks it.
    """
    if rounds < 0:
        raise PlacementError("verification rounds must be >= 0 (0: judge only the evaluated placements)")
    if not requirements:
        raise PlacementError("verification needs at least one requirement")
    evaluations = Path(evaluations)
    data = read_evaluations(evaluations)
    if probe is not None:
        from supernet.placement.evaluate import check_compatible

        check_compatible(data.rows, probe, evaluations)
    L = data.num_layers
    columns = mm.metric_columns(data.rows)
    mm.check_metrics(list(objective), columns, "the objective")
    mm.check_metrics([r.metric for r in requirements], columns, "the requirements")
    needed = list(dict.fromkeys(["quality", *objective, *(r.metric for r in requirements)]))
    all_fa = Placement.uniform("fa", L)
    fa_rows = [r for r in data.rows if list(r["placement"]) == list(all_fa)]
    if not fa_rows:
        raise PlacementError(f"{evaluations} has no all-fa row; relative requirements need the teacher measured "
                             "(eval-placements always measures it first)")
    teacher = _metric_values(fa_rows[0], needed)  # the scale of the evaluations (and the surrogates)
    bounds = {r.text: r.bound(teacher[r.metric]) for r in requirements}
    confirmed: dict[tuple[str, ...], dict[str, float]] = {}
    confirm_bounds: dict[str, float] = {}

    def confirmation(p: Placement) -> dict[str, float]:
        if p.mixers not in confirmed:
            confirmed[p.mixers] = _metric_values(confirm(p), [r.metric for r in requirements])
        return confirmed[p.mixers]

    def judge(p: Placement, row: dict) -> tuple[dict[str, float], dict[str, float] | None, bool]:
        """(evaluation values, confirmation or None, meets every requirement)."""
        values = _metric_values(row, needed)
        if not all(meets(values, r, bounds[r.text]) for r in requirements):
            return values, None, False
        if confirm is None:
            return values, None, True
        if not confirm_bounds:
            fa = confirmation(all_fa)
            confirm_bounds.update({r.text: r.bound(fa[r.metric]) for r in requirements})
        checked = confirmation(p)
        return values, checked, all(meets(checked, r, confirm_bounds[r.text]) for r in requirements)

    def shown(values: dict, checked: dict | None, r: mm.Requirement) -> str:
        out = f"measured {values[r.metric]:.3f} (bound {bounds[r.text]:.3f})"
        if checked is not None:
            out += f", confirmed {checked[r.metric]:.3f} (bound {confirm_bounds[r.text]:.3f})"
        return out

    def objective_of(values: dict[str, float]) -> float:
        return float(sum(w * values[m] for m, w in objective.items()))

    margins = {r.text: 0.0 for r in requirements}
    checks: list[Check] = []
    measured_now = 0
    cap = L  # at most this many layers changed from all-fa; lowered below each failed candidate's count
    capping = True  # until the cap makes the speedup unreachable (then positions, not counts, must do it)
    mp = None
    for _ in range(3 * rounds):
        if measured_now >= rounds:
            break
        data = read_evaluations(evaluations, L)
        surrogates = mm.fit_metric_surrogates(data.placements, data.rows, needed, pairs=pairs, method=method, seed=seed)
        mp, cuts = _with_synthetic(mm.MultiProblem.from_surrogates(surrogates, costs),
                                   [c.placement for c in checks if not c.meets])
        reqs = [_tightened(r, bounds[r.text], margins[r.text], _observed(data.rows, r)) for r in requirements]
        limit = cuts + ([mm.Requirement(CHANGED, "<=", float(cap), False, f"{CHANGED}<={cap}")] if cap < L else [])
        try:
            placement = mm.solve_constrained(mp, objective, reqs + limit, teacher, speedup, solver=solver).placement
        except PlacementError as exc:
            # predicted infeasible: measure the placement predicted to come closest (a threshold metric
            # is often under-predicted near its feasible region); stop once that one was measured
            placement = _closest(mp, reqs, limit, teacher, speedup, solver)
            if placement is None and cap < L:  # the speedup needs more changed layers: positions must do it
                log(f"  no placement with <= {cap} changed layers reaches {speedup:g}x; the cap is dropped")
                cap, capping = L, False
                continue
            if placement is None or any(c.placement == placement for c in checks):
                log(f"  round {len(checks) + 1}: the surrogate admits no placement at {speedup:g}x "
                    f"({', '.join(r.text for r in reqs + limit)}): {exc}")
                break
            log(f"  round {len(checks) + 1}: predicted infeasible ({exc}); measuring the closest placement")
        predicted = {k: v for k, v in mp.values(_indices(mp, placement)).items() if k in needed}
        index = {p.mixers: k for k, p in enumerate(data.placements)}
        if placement.mixers in index:
            row = data.rows[index[placement.mixers]]
        else:
            row = {"placement": placement.to_list(),
                   **{k: v for k, v in measure(placement).items() if k != "placement"}, "design": "verify"}
            append_evaluation(evaluations, row)
            measured_now += 1
        values, checked, ok = judge(placement, row)
        if not any(c.placement == placement for c in checks):
            checks.append(Check(placement, float(costs.speedup(placement)), predicted, values, checked, ok,
                                f"round {len(checks) + 1}", {**margins, CHANGED: cap}))
        log(f"  round {len(checks)}: {placement.summary()} at {costs.speedup(placement):.3f}x: "
            + ", ".join(f"{r.metric} predicted {predicted[r.metric]:.3f}, {shown(values, checked, r)}"
                        for r in requirements) + (" -> meets" if ok else " -> fails"))
        if ok:
            break
        # a failed candidate is cut off (a no-good cut). Failed on its evaluation row, the surrogate over-
        # rated it: ask for a margin (one step more) and for fewer changed layers than it has (a threshold
        # metric fails beyond some count; a single changed layer is only cut off), as long as fewer
        # changed layers can reach the speedup at all
        evaluation_failed = False
        for r in requirements:
            if not meets(values, r, bounds[r.text]):
                evaluation_failed = True
                margins[r.text] += step * max(abs(bounds[r.text]), 1e-6)
        changed = sum(m != "fa" for m in placement)
        if evaluation_failed and changed > 1 and capping:
            cap = min(cap, changed - 1)

    # evaluated placements that already met the requirements may beat the loop's pick (by measured objective)
    data = read_evaluations(evaluations, L)
    if mp is None:  # no round ran (rounds=0): fit once, so every kept placement records its predictions
        surrogates = mm.fit_metric_surrogates(data.placements, data.rows, needed, pairs=pairs, method=method, seed=seed)
        mp = mm.MultiProblem.from_surrogates(surrogates, costs)
    pool = []
    for p, row in zip(data.placements, data.rows):
        if p == all_fa or any(m not in costs.per_layer for m in p) or costs.speedup(p) < speedup - 1e-9:
            continue
        values = _metric_values(row, needed)
        if len(values) == len(needed) and all(meets(values, r, bounds[r.text]) for r in requirements):
            pool.append((objective_of(values), p, row))
    best_loop = max((objective_of(c.measured) for c in checks if c.meets), default=-np.inf)
    for value, p, row in sorted(pool, key=lambda t: -t[0])[:2]:
        if value <= best_loop or any(c.placement == p for c in checks):
            continue
        values, checked, ok = judge(p, row)
        predicted = {k: v for k, v in mp.values(_indices(mp, p)).items() if k in needed}
        checks.append(Check(p, float(costs.speedup(p)), predicted, values, checked, ok, "evaluated"))
        log(f"  evaluated {p.summary()} at {checks[-1].speedup:.3f}x: "
            + ", ".join(shown(values, checked, r) for r in requirements) + (" -> meets" if ok else " -> fails"))
        if ok:
            break
    good = [c for c in checks if c.meets and c.speedup >= speedup - 1e-9]
    if not good:
        tried = "; ".join(f"{c.placement.summary()}: " + ", ".join(
            f"{r.metric} {(c.confirmed or c.measured).get(r.metric, float('nan')):.3f}" for r in requirements)
            for c in checks) or "none"
        raise RequirementNotVerified(
            f"no measured placement at >= {speedup:g}x meets {', '.join(r.text for r in requirements)} "
            f"after {measured_now} new measurements (measured candidates: {tried}); lower the speedup or relax "
            "the requirement")
    chosen = max(good, key=lambda c: objective_of(c.measured))
    return Verified(chosen, checks, teacher, bounds, objective_of(chosen.measured),
                    {m: v for m, v in confirmed.get(all_fa.mixers, {}).items()}, confirm_bounds)
