"""Optimising placements under several metrics: a weighted objective and requirements on other metrics.

Each metric column of evaluations.jsonl (KL quality, top-1 agreement, retrieval, development-task
accuracy, ...) gets its own surrogate; all are put on one pair list, so every metric is a linear function
of the same one-hot and pair indicators. A weighted objective is again such a function, which the chain
DP maximises exactly. A requirement `retrieval >= v` makes the problem constrained:

    maximise f(P)  subject to  cost(P) <= B,  g_r(P) >= v_r  for each requirement r.

We solve it by Lagrangian relaxation: for multipliers lam >= 0 the DP maximises f + sum lam_r (g_r - v_r)
within the budget exactly; any lam gives an upper bound on the constrained optimum (the dual bound), and
every DP answer that meets the requirements is a feasible candidate. One requirement: the dual is a
convex function of one variable, bisected on the switch from infeasible to feasible answers. Several:
projected subgradient steps. The result states its gap (dual bound - best feasible objective); when the
gap is not zero (integer problems can have a duality gap), `auto` closes it with the exact MILP
(HiGHS, the requirements as linear constraints), within a time limit, and reports the MILP's bound.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from supernet.layout import Placement, PlacementError
from supernet.placement.optimize import Problem, best_under_budget, solve_milp

# Numeric keys of an evaluation row that are bookkeeping, not metrics.
NOT_METRICS = {"kl", "kl_uniform", "tokens", "seconds"}


# -- parsing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Requirement:
    """metric >= value (or <=), the value absolute or relative to the teacher (all-fa)."""

    metric: str
    op: str  # ">=" or "<="
    value: float
    relative: bool  # value is a multiple of the teacher's metric
    text: str

    def bound(self, teacher: float) -> float:
        return self.value * teacher if self.relative else self.value


_REQ = re.compile(r"^\s*([A-Za-z_][\w.:-]*)\s*(>=|<=)\s*(.+?)\s*$")


def parse_requirement(text: str) -> Requirement:
    """`retrieval>=0.5`, `retrieval>=0.9*teacher`, `retrieval>=90%teacher` (also `<=`)."""
    m = _REQ.match(text)
    if not m:
        raise PlacementError(f"cannot read requirement {text!r}; write METRIC>=VALUE, e.g. 'retrieval>=0.9*teacher' "
                             "or 'retrieval>=0.75'")
    metric, op, rhs = m.groups()
    rhs = rhs.replace(" ", "")
    relative = False
    for suffix in ("*teacher", "*all-fa", "teacher", "all-fa"):
        if rhs.endswith(suffix) and rhs != suffix:
            rhs, relative = rhs[: -len(suffix)], True
            break
    else:
        if rhs in ("teacher", "all-fa"):
            rhs, relative = "1", True
    try:
        value = float(rhs[:-1]) / 100 if rhs.endswith("%") else float(rhs)
    except ValueError:
        raise PlacementError(f"cannot read the value of requirement {text!r}; use a number, N*teacher or N%teacher") from None
    if not math.isfinite(value):
        raise PlacementError(f"requirement {text!r} has a non-finite value")
    return Requirement(metric, op, value, relative, text.strip())


def parse_objective(text: str) -> dict[str, float]:
    """`quality`, `0.7*quality+0.3*dev_tasks` -> {metric: weight}."""
    weights: dict[str, float] = {}
    for term in [t for t in text.replace(" ", "").split("+") if t]:
        if "*" in term:
            w, name = term.split("*", 1)
            try:
                weight = float(w)
            except ValueError:
                raise PlacementError(f"cannot read the weight {w!r} in --objective {text!r}; write e.g. "
                                     "'0.7*quality+0.3*dev_tasks'") from None
        else:
            weight, name = 1.0, term
        if not re.match(r"^[A-Za-z_][\w.:-]*$", name):
            raise PlacementError(f"cannot read the metric {name!r} in --objective {text!r}")
        weights[name] = weights.get(name, 0.0) + weight
    if not weights:
        raise PlacementError("--objective is empty; e.g. --objective quality")
    return weights


def metric_columns(rows: Sequence[dict]) -> list[str]:
    """Metric keys (finite numbers) present in every row, `quality` first."""
    if not rows:
        return []
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in NOT_METRICS]
    keep = [k for k in keys if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for r in rows)]
    return sorted(keep, key=lambda k: (k != "quality", k))


def check_metrics(names: Sequence[str], available: Sequence[str], where: str) -> None:
    for n in names:
        if n not in available:
            raise PlacementError(f"unknown metric {n!r} in {where}; the evaluations have "
                                 f"{', '.join(available)} (record retrieval/dev_tasks with `eval-placements "
                                 "--retrieval ... --dev-tasks ...`)")


# -- the multi-metric problem ---------------------------------------------------------------------
@dataclass
class MultiProblem:
    """Costs plus one set of surrogate tables per metric, all on one pair list."""

    base: Problem  # costs, allowed and the pair list; its own tables are unused
    metrics: dict[str, Problem]

    @classmethod
    def from_surrogates(cls, surrogates: dict, costs, allow_unmeasured: bool = False) -> "MultiProblem":
        first = next(iter(surrogates.values()))
        mixers, L = first.mixers, first.num_layers
        for name, s in surrogates.items():
            if s.mixers != mixers or s.num_layers != L:
                raise PlacementError(f"the surrogate of {name!r} covers other mixers or layers than the others")
        pairs = sorted({tuple(map(int, p)) for s in surrogates.values() for p in s.pairs})
        pair_index = {p: k for k, p in enumerate(pairs)}
        P = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        cost = costs.matrix(mixers, L)
        allowed = np.ones((L, len(mixers)), dtype=bool)
        if not allow_unmeasured:
            for s in surrogates.values():
                allowed &= s.support > 0
        tables = {}
        for name, s in surrogates.items():
            Jp = np.zeros((len(pairs), len(mixers), len(mixers)))
            for k, p in enumerate(s.pairs):
                Jp[pair_index[tuple(map(int, p))]] += s.Jp[k]
            tables[name] = Problem(mixers, s.J0, s.h, P, Jp, cost, costs.fixed, costs.reference_cost(L), allowed)
        base = next(iter(tables.values()))
        return cls(base, tables)

    def combine(self, weights: dict[str, float]) -> Problem:
        """The weighted sum of metric tables (itself a cluster expansion)."""
        b = self.base
        J0 = sum(w * self.metrics[m].J0 for m, w in weights.items())
        h = sum(w * self.metrics[m].h for m, w in weights.items())
        Jp = sum(w * self.metrics[m].Jp for m, w in weights.items())
        return Problem(b.mixers, float(J0), h, b.pairs, Jp, b.cost, b.fixed, b.reference_cost, b.allowed)

    def values(self, row: np.ndarray) -> dict[str, float]:
        return {m: float(t.quality(row)[0]) for m, t in self.metrics.items()}


@dataclass
class Constraint:
    """g(P) >= minimum, with g the tables of one metric (negated for `<=`)."""

    requirement: Requirement
    tables: Problem
    minimum: float


@dataclass
class ConstrainedSolution:
    row: np.ndarray
    placement: Placement
    objective: float
    values: dict[str, float]
    cost: float
    speedup: float
    upper_bound: float  # no budget-feasible placement meeting the requirements beats this objective
    method: str
    multipliers: list[float]
    seconds: float
    notes: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return max(0.0, self.upper_bound - self.objective)


def constraints_for(mp: MultiProblem, requirements: Sequence[Requirement], teacher: dict[str, float]) -> list[Constraint]:
    out = []
    for r in requirements:
        t = mp.metrics[r.metric]
        bound = r.bound(teacher[r.metric]) if r.relative else r.value
        if r.op == ">=":
            out.append(Constraint(r, t, bound))
        else:
            neg = Problem(t.mixers, -t.J0, -t.h, t.pairs, -t.Jp, t.cost, t.fixed, t.reference_cost, t.allowed)
            out.append(Constraint(r, neg, -bound))
    return out


def _lagrangian_problem(f: Problem, cons: Sequence[Constraint], lam: np.ndarray) -> Problem:
    h, Jp, J0 = f.h.copy(), f.Jp.copy(), f.J0
    for c, l in zip(cons, lam):
        h += l * c.tables.h
        Jp += l * c.tables.Jp
        J0 += l * (c.tables.J0 - c.minimum)
    return Problem(f.mixers, J0, h, f.pairs, Jp, f.cost, f.fixed, f.reference_cost, f.allowed)


def solve_constrained(mp: MultiProblem, weights: dict[str, float], requirements: Sequence[Requirement],
                      teacher: dict[str, float], speedup: float, solver: str = "auto",
                      resolution: int | None = None, milp_time_limit: float = 60.0,
                      iterations: int = 16) -> ConstrainedSolution:
    """Best placement for the weighted objective at `speedup`, meeting every requirement.

    The multiplier search runs many DPs, each on a grid of `resolution` cells (default 2000: coarse,
    so fast; the rounding only loosens the stated bound, which `auto` then closes with the MILP).
    """
    if solver not in ("auto", "dp", "milp"):
        raise PlacementError(f"unknown solver {solver!r}; use auto, dp or milp")
    t0 = time.perf_counter()
    resolution = resolution or 2000
    f = mp.combine(weights)
    budget = f.budget(speedup)
    cons = constraints_for(mp, requirements, teacher)
    scale = max(1.0, abs(f.J0))

    def feasible(row: np.ndarray) -> bool:
        return all(float(c.tables.quality(row)[0]) >= c.minimum - 1e-9 * max(1.0, abs(c.minimum)) for c in cons)

    for c in cons:  # an unreachable requirement is reported with the best value there is
        best_row, best_up = best_under_budget(c.tables, budget, resolution)
        if best_up < c.minimum - 1e-9 * max(1.0, abs(c.minimum)):
            sign = 1 if c.requirement.op == ">=" else -1
            raise PlacementError(
                f"requirement {c.requirement.text} is infeasible at speedup {speedup:g}: the best predicted "
                f"{c.requirement.metric} there is {sign * best_up:.4g} (needed {sign * c.minimum:.4g}); "
                "relax it or ask for a lower speedup")

    best: np.ndarray | None = None
    best_f, upper = -np.inf, np.inf
    lam = np.zeros(len(cons))
    method = "dp"

    def probe(lam: np.ndarray) -> np.ndarray | None:
        nonlocal best, best_f, upper
        row, up = best_under_budget(_lagrangian_problem(f, cons, lam), budget, resolution)
        if row is None:
            return None
        upper = min(upper, up)
        if feasible(row):
            val = float(f.quality(row)[0])
            if val > best_f:
                best, best_f = row, val
        return row

    if solver != "milp":
        row = probe(lam)
        if cons and row is not None and not feasible(row):
            method = "lagrangian"
            if len(cons) == 1:
                lo, hi = 0.0, 1.0
                while hi < 1e12 and not feasible(probe(np.array([hi]))):
                    lo, hi = hi, hi * 4
                for _ in range(iterations):
                    if best is not None and upper - best_f <= 1e-12 * scale:
                        break
                    mid = 0.5 * (lo + hi)
                    if feasible(probe(np.array([mid]))):
                        hi = mid
                    else:
                        lo = mid
            else:
                for t in range(1, 4 * iterations + 1):
                    r = probe(lam)
                    viol = np.array([float(c.tables.quality(r)[0]) - c.minimum for c in cons])
                    if best is not None and upper - best_f <= 1e-12 * scale:
                        break
                    lam = np.maximum(0.0, lam - viol * (scale / (np.linalg.norm(viol) + 1e-12)) / math.sqrt(t))
    exact_enough = best is not None and upper - best_f <= 1e-9 * scale
    if solver == "milp" or (solver == "auto" and not exact_enough):
        res = solve_milp(f, budget, milp_time_limit, requirements=[(c.tables, c.minimum) for c in cons])
        if res.row is not None and feasible(res.row) and res.quality > best_f - 1e-12 * scale:
            best, best_f = res.row, res.quality
        if res.status == "optimal":
            upper = min(upper, best_f) if best is not None else upper
        elif np.isfinite(res.upper_bound):
            upper = min(upper, res.upper_bound)
        method = f"{method}+milp({res.status})" if solver != "milp" else f"milp({res.status})"
    if best is None:
        raise PlacementError(f"no placement at speedup {speedup:g} meets {', '.join(r.text for r in requirements)} "
                             "(the requirements together are infeasible); relax them or lower the speedup")
    cost = float(f.cost_of(best)[0])
    return ConstrainedSolution(best, f.names(best), best_f, mp.values(best), cost, f.reference_cost / cost,
                               max(upper, best_f) if np.isfinite(upper) else upper, method, list(map(float, lam)),
                               time.perf_counter() - t0, {"budget": budget})


def teacher_values(mp: MultiProblem, rows: Sequence[dict], metrics: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Each metric of the all-fa placement: measured (mean of its rows) where evaluated, else predicted."""
    L = mp.base.L
    fa = [r for r in rows if list(r.get("placement", [])) == ["fa"] * L]
    out, source = {}, {}
    for m in metrics:
        if fa:
            out[m], source[m] = float(np.mean([r[m] for r in fa])), "measured all-fa"
        else:
            k = mp.base.mixers.index("fa") if "fa" in mp.base.mixers else None
            if k is None:
                raise PlacementError("'teacher' in a requirement needs fa among the mixers")
            out[m] = float(mp.metrics[m].quality(np.full(L, k))[0])
            source[m] = "predicted all-fa"
    return out, source


def fit_metric_surrogates(placements, rows: Sequence[dict], metrics: Sequence[str], **fit_kwargs) -> dict:
    """One surrogate per metric column: placement/surrogate.py's fit, called once per column."""
    from supernet.placement.surrogate import fit_surrogate

    return {m: fit_surrogate(placements, np.array([float(r[m]) for r in rows]), **fit_kwargs) for m in metrics}

