"""Optimiser: exact against brute force (L <= 10) and the MILP (L = 48); budgets, frontier, ties."""
from __future__ import annotations

import numpy as np
import pytest

from supernet.placement.optimize import (REL_TOL, Problem, brute_force, chain_dp, local_search, optimize, pareto_frontier,
                                solve_milp)
from supernet.placement.planted import planted_problem
from supernet.layout import PlacementError


def speed_grid(problem, n=6):
    return np.linspace(1.0, problem.max_speedup(), n)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("integer_costs", [True, False])
def test_dp_matches_brute_force(seed, integer_costs):
    problem = planted_problem(8, seed=seed, integer_costs=integer_costs)
    result = optimize(problem, speed_grid(problem))
    for sol in result.presets:
        _, best = brute_force(problem, sol.budget)
        assert sol.cost <= sol.budget * (1 + REL_TOL)
        assert sol.speedup >= sol.target_speedup * (1 - REL_TOL)
        assert sol.quality == pytest.approx(best, abs=1e-9)
    if integer_costs:
        assert result.dp.exact_grid and result.dp.error_bound == 0.0


def test_dp_matches_brute_force_l10():
    problem = planted_problem(10, seed=7, integer_costs=False)
    for sol in optimize(problem, speed_grid(problem, 4)).presets:
        assert sol.quality == pytest.approx(brute_force(problem, sol.budget)[1], abs=1e-9)


def test_discretisation_bound_holds_on_a_coarse_grid():
    """Without polishing, the raw DP answer is feasible and >= the true optimum at budget - bound."""
    problem = planted_problem(7, seed=11, integer_costs=False)
    dp = chain_dp(problem, resolution=40)  # deliberately coarse
    assert not dp.exact_grid and dp.error_bound > 0
    budgets = [problem.budget(s) for s in speed_grid(problem, 8)]
    for b, row in zip(budgets, dp.solve(budgets)):
        assert problem.cost_of(row)[0] <= b * (1 + REL_TOL)
        lower = brute_force(problem, b - dp.error_bound)[1]
        assert problem.quality(row)[0] >= lower - 1e-9
        assert problem.quality(row)[0] <= brute_force(problem, b)[1] + 1e-9


def test_no_pairs_and_two_mixers():
    for problem in (planted_problem(9, pairs="none", seed=2), planted_problem(9, num_mixers=2, seed=3)):
        for sol in optimize(problem, speed_grid(problem, 5)).presets:
            assert sol.quality == pytest.approx(brute_force(problem, sol.budget)[1], abs=1e-9)


def test_long_range_pairs_local_search_and_milp_against_brute_force():
    problem = planted_problem(7, pairs="all", seed=5, pair_scale=0.5)
    assert not problem.is_chain()
    for s in speed_grid(problem, 5):
        b = problem.budget(s)
        _, best = brute_force(problem, b)
        milp = solve_milp(problem, b)
        assert milp.status == "optimal" and milp.quality == pytest.approx(best, abs=1e-7)
        approx = optimize(problem, [s]).presets[0]
        assert approx.method == "dp+local" and approx.cost <= b * (1 + REL_TOL)
        assert approx.quality <= best + 1e-9
        exact = optimize(problem, [s], solver="milp").presets[0]
        assert exact.quality == pytest.approx(best, abs=1e-7)


@pytest.mark.parametrize("integer_costs", [True, False])
def test_dp_matches_milp_at_l48(integer_costs):
    problem = planted_problem(48, seed=4, integer_costs=integer_costs)
    result = optimize(problem, [1.3, 1.7, 0.97 * problem.max_speedup()])
    for sol in result.presets:
        milp = solve_milp(problem, sol.budget)
        assert milp.status == "optimal"
        assert sol.cost <= sol.budget * (1 + REL_TOL)
        assert sol.quality == pytest.approx(milp.quality, abs=1e-7)


def test_frontier_is_monotone_and_within_budget():
    problem = planted_problem(12, seed=9)
    front = pareto_frontier(problem)
    costs = np.array([s.cost for s in front])
    quality = np.array([s.quality for s in front])
    assert len(front) > 5
    assert np.all(np.diff(costs) > 0) and np.all(np.diff(quality) > 0)
    assert front[0].cost == pytest.approx(problem.min_cost())
    # every preset lies on (or at) the frontier: quality = best frontier point that fits its budget
    for sol in optimize(problem, speed_grid(problem, 7)).presets:
        fits = [s.quality for s in front if s.cost <= sol.budget * (1 + REL_TOL)]
        assert sol.quality == pytest.approx(max(fits), abs=1e-9)


def test_ties_resolve_to_the_cheapest_placement():
    L, M = 6, 4
    cost = np.tile([4.0, 3.0, 2.0, 1.0], (L, 1))
    problem = Problem(("fa", "swa", "gdn", "kda"), 0.5, np.zeros((L, M)), np.zeros((0, 2)), np.zeros((0, M, M)),
                      cost, 1.0, 1.0 + 4.0 * L)
    for sol in optimize(problem, [1.0, 2.0, 3.0]).presets:
        assert sol.placement.counts()["kda"] == L  # every placement predicts 0.5: take the fastest
        assert sol.quality == 0.5


def test_infeasible_and_bad_speedups():
    problem = planted_problem(6, seed=1)
    with pytest.raises(PlacementError, match="infeasible.*at most"):
        problem.budget(problem.max_speedup() * 1.01)
    with pytest.raises(PlacementError, match="positive"):
        problem.budget(0.0)
    # exactly the maximum is feasible: the cheapest placement
    sol = optimize(problem, [problem.max_speedup()]).presets[0]
    assert sol.cost == pytest.approx(problem.min_cost())


def test_unmeasured_choices_are_never_used():
    problem = planted_problem(8, seed=6)
    problem.allowed[:, 3] = False  # e.g. kda never measured
    problem.h[:, 3] = 100.0  # would be irresistible if allowed
    for sol in optimize(problem, speed_grid(problem, 4), frontier=True).presets:
        assert sol.placement.counts()["kda"] == 0


def test_local_search_never_worsens_or_leaves_budget():
    problem = planted_problem(10, pairs="within:3", seed=8)
    rng = np.random.default_rng(0)
    for _ in range(5):
        row = np.full(10, 3)  # cheapest-ish start
        b = problem.budget(rng.uniform(1.0, problem.max_speedup() * 0.9))
        if problem.cost_of(row)[0] > b:
            continue
        better = local_search(problem, row, b)
        assert problem.quality(better)[0] >= problem.quality(row)[0]
        assert problem.cost_of(better)[0] <= b * (1 + REL_TOL)
