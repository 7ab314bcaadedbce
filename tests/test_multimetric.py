"""Optimising under several metrics: weighted objectives, requirements, and their one-line errors."""
from __future__ import annotations

import numpy as np
import pytest

from supernet.layout import PlacementError
from supernet.placement.multimetric import (MultiProblem, Requirement, parse_objective, parse_requirement,
                                            solve_constrained)
from supernet.placement.optimize import Problem

MIXERS = ("fa", "swa", "gdn")


def planted(L: int = 8, seed: int = 0) -> MultiProblem:
    """Two metrics that disagree: 'quality' favours cheap mixers at some layers, 'retrieval' needs fa."""
    rng = np.random.default_rng(seed)
    pairs = np.stack([np.arange(L - 1), np.arange(1, L)], axis=1)
    cost = np.tile(np.array([4.0, 2.0, 1.0]), (L, 1))  # integer costs: the DP grid is exact

    def tables(shift):
        h = rng.normal(size=(L, 3)) * 0.05
        h[:, 0] += shift
        return Problem(MIXERS, 1.0, h, pairs, rng.normal(size=(L - 1, 3, 3)) * 0.02, cost, 0.0, 4.0 * L)

    q, r = tables(0.01), tables(0.08)
    return MultiProblem(q, {"quality": q, "retrieval": r})


def brute(mp: MultiProblem, weights, minimum: float, budget: float):
    L, M = mp.base.L, mp.base.M
    grid = np.indices((M,) * L).reshape(L, -1).T
    f = mp.combine(weights)
    ok = (f.cost_of(grid) <= budget) & (mp.metrics["retrieval"].quality(grid) >= minimum)
    vals = np.where(ok, f.quality(grid), -np.inf)
    k = int(np.argmax(vals))
    return grid[k], float(vals[k]), float(f.quality(grid[f.cost_of(grid) <= budget]).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weights", [{"quality": 1.0}, {"quality": 0.5, "retrieval": 0.5}])
def test_planted_two_metric_constrained_optimum_is_found(seed, weights):
    mp = planted(seed=seed)
    budget_speedup = 2.0
    budget = mp.base.reference_cost / budget_speedup
    # a requirement between the unconstrained optimum's retrieval and the best reachable retrieval
    unconstrained = solve_constrained(mp, weights, [], {}, budget_speedup)
    r_free = unconstrained.values["retrieval"]
    r_best = solve_constrained(mp, {"retrieval": 1.0}, [], {}, budget_speedup).values["retrieval"]
    assert r_best > r_free  # the requirement binds
    minimum = r_free + 0.6 * (r_best - r_free)
    req = [Requirement("retrieval", ">=", minimum, False, f"retrieval>={minimum}")]
    row, opt, free_opt = brute(mp, weights, minimum, budget)
    assert opt < free_opt  # the constraint costs objective: a real constrained instance
    for solver in ("auto", "milp"):
        sol = solve_constrained(mp, weights, req, {}, budget_speedup, solver=solver)
        assert sol.values["retrieval"] >= minimum - 1e-12
        assert sol.cost <= budget
        assert sol.objective == pytest.approx(opt, abs=1e-9), solver
    lag = solve_constrained(mp, weights, req, {}, budget_speedup, solver="dp")  # Lagrangian alone: a bound
    assert lag.values["retrieval"] >= minimum - 1e-12 and lag.objective <= opt + 1e-12
    assert lag.upper_bound >= opt - 1e-12


def test_relative_requirement_uses_the_teacher_value():
    mp = planted()
    req = parse_requirement("retrieval>=0.95*teacher")
    teacher = {"retrieval": float(mp.metrics["retrieval"].quality(np.zeros(8, dtype=int))[0])}
    sol = solve_constrained(mp, {"quality": 1.0}, [req], teacher, 1.5)
    assert sol.values["retrieval"] >= 0.95 * teacher["retrieval"] - 1e-12


def test_parsing_forms_and_errors():
    assert parse_requirement("retrieval>=0.9*teacher") == Requirement("retrieval", ">=", 0.9, True,
                                                                      "retrieval>=0.9*teacher")
    assert parse_requirement("retrieval >= 90%teacher").value == pytest.approx(0.9)
    assert parse_requirement("dev_tasks>=0.4").relative is False
    assert parse_requirement("kl<=0.1").op == "<="
    assert parse_objective("0.7*quality+0.3*dev_tasks") == {"quality": 0.7, "dev_tasks": 0.3}
    with pytest.raises(PlacementError, match="cannot read requirement"):
        parse_requirement("retrieval=0.9")
    with pytest.raises(PlacementError, match="cannot read the weight"):
        parse_objective("x*quality")


def test_infeasible_requirement_is_one_line_error():
    mp = planted()
    req = [Requirement("retrieval", ">=", 10.0, False, "retrieval>=10")]
    with pytest.raises(PlacementError, match=r"requirement retrieval>=10 is infeasible at speedup 2: the best") as e:
        solve_constrained(mp, {"quality": 1.0}, req, {}, 2.0)
    assert "\n" not in str(e.value)
