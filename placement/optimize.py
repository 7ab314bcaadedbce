"""Best placement for a speed budget: maximise predicted quality subject to cost <= budget.

The surrogate is a chain-structured objective when its pairs are nearest neighbours, so an exact
dynamic programme over layers applies: the state is (layer, mixer of that layer, cost so far), the
cost being discretised on a grid. One pass gives the best quality for *every* cost on the grid, so
the whole Pareto frontier and any number of budgets are read off the same tables.

Discretisation: each layer's extra cost over its cheapest allowed mixer is rounded *up* to the grid,
so every returned placement fits its budget under the true costs. The price is a bounded loss: the
answer is at least as good as the true optimum for a budget smaller by `error_bound` (the sum over
layers of the worst rounding error). When the costs are commensurate (e.g. integers), the grid is
chosen to make the rounding exact and the bound is zero.

Pairs beyond nearest neighbours make the problem NP-hard in general: the DP then optimises the
single-site + nearest-neighbour part, a local search (best 1- and 2-layer changes under the true
objective and budget) polishes the result, and conditional DPs (long-range terms frozen at the current
placement) iterate while they improve it; `solve_milp` gives the exact optimum for cross-checks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from supernet.layout import Placement, PlacementError

REL_TOL = 1e-9  # relative slack allowed when comparing a cost with its budget (float rounding)


# -- the problem ----------------------------------------------------------------------------------
@dataclass
class Problem:
    """Predicted quality (constant + single-site + pair tables) and costs over `mixers`."""

    mixers: tuple[str, ...]
    J0: float
    h: np.ndarray  # [L, M]
    pairs: np.ndarray  # [P, 2], i < j
    Jp: np.ndarray  # [P, M, M]
    cost: np.ndarray  # [L, M]
    fixed: float
    reference_cost: float  # cost(all-fa): speedup = reference_cost / cost
    allowed: np.ndarray | None = None  # [L, M] bool; None = everything allowed

    def __post_init__(self) -> None:
        self.h = np.asarray(self.h, dtype=float)
        self.cost = np.asarray(self.cost, dtype=float)
        self.pairs = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        self.Jp = np.asarray(self.Jp, dtype=float).reshape(len(self.pairs), self.M, self.M)
        if self.allowed is None:
            self.allowed = np.ones(self.h.shape, dtype=bool)
        self.allowed = np.asarray(self.allowed, dtype=bool) & np.isfinite(self.cost)
        if self.h.shape != self.cost.shape:
            raise PlacementError(f"quality tables cover {self.h.shape[0]} layers but costs cover {self.cost.shape[0]}")
        if not self.allowed.any(axis=1).all():
            bad = int(np.flatnonzero(~self.allowed.any(axis=1))[0])
            raise PlacementError(f"layer {bad} has no usable mixer (none measured with a cost)")
        if np.any(self.cost[self.allowed] <= 0):
            raise PlacementError("mixer costs must be positive")

    @property
    def L(self) -> int:
        return self.h.shape[0]

    @property
    def M(self) -> int:
        return len(self.mixers)

    @classmethod
    def from_surrogate(cls, surrogate, costs, allow_unmeasured: bool = False) -> "Problem":
        """Build from a fitted ClusterExpansion and a CostTable; unmeasured (layer, mixer) are excluded."""
        L = surrogate.num_layers
        cost = costs.matrix(surrogate.mixers, L)
        allowed = np.ones((L, len(surrogate.mixers)), dtype=bool) if allow_unmeasured else surrogate.support > 0
        return cls(surrogate.mixers, surrogate.J0, surrogate.h, surrogate.pairs, surrogate.Jp, cost,
                   costs.fixed, costs.reference_cost(L), allowed)

    # -- evaluation ---------------------------------------------------------------------------
    def quality(self, P: np.ndarray) -> np.ndarray:
        P = np.atleast_2d(np.asarray(P, dtype=np.int64))
        q = self.J0 + self.h[np.arange(self.L)[None, :], P].sum(axis=1)
        if len(self.pairs):
            k = np.arange(len(self.pairs))[None, :]
            q = q + self.Jp[k, P[:, self.pairs[:, 0]], P[:, self.pairs[:, 1]]].sum(axis=1)
        return q

    def cost_of(self, P: np.ndarray) -> np.ndarray:
        P = np.atleast_2d(np.asarray(P, dtype=np.int64))
        return self.fixed + self.cost[np.arange(self.L)[None, :], P].sum(axis=1)

    def is_allowed(self, P: np.ndarray) -> np.ndarray:
        P = np.atleast_2d(np.asarray(P, dtype=np.int64))
        return self.allowed[np.arange(self.L)[None, :], P].all(axis=1)

    def min_cost(self) -> float:
        return self.fixed + float(np.where(self.allowed, self.cost, np.inf).min(axis=1).sum())

    def max_speedup(self) -> float:
        return self.reference_cost / self.min_cost()

    def budget(self, speedup: float) -> float:
        """Cost budget of a target speedup; refuses non-positive and unreachable speedups."""
        if not math.isfinite(speedup) or speedup <= 0:
            raise PlacementError(f"speedup must be a positive number, got {speedup:g}")
        if speedup > self.max_speedup() * (1 + REL_TOL):
            raise PlacementError(
                f"speedup {speedup:g} is infeasible: the fastest allowed placement reaches "
                f"{self.max_speedup():.4g}x; ask for at most that"
            )
        return self.reference_cost / speedup

    def chain_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(Jnn [L-1, M, M] summed nearest-neighbour tables, boolean mask of the other pairs)."""
        Jnn = np.zeros((max(self.L - 1, 0), self.M, self.M))
        nn = (self.pairs[:, 1] - self.pairs[:, 0]) == 1
        np.add.at(Jnn, self.pairs[nn, 0], self.Jp[nn])
        return Jnn, ~nn

    def is_chain(self) -> bool:
        _, other = self.chain_pairs()
        return not np.any(self.Jp[other] != 0)

    def dense_pairs(self) -> np.ndarray:
        """Symmetric pair tensor D[i, j, a, b] (D[j, i] = D[i, j]^T), for local search."""
        D = np.zeros((self.L, self.L, self.M, self.M))
        np.add.at(D, (self.pairs[:, 0], self.pairs[:, 1]), self.Jp)
        np.add.at(D, (self.pairs[:, 1], self.pairs[:, 0]), self.Jp.transpose(0, 2, 1))
        return D

    def names(self, row: np.ndarray) -> Placement:
        return Placement(tuple(self.mixers[k] for k in row))


@dataclass
class Solution:
    """One placement with its predicted quality, true cost and speedup."""

    placement: Placement
    indices: np.ndarray
    quality: float
    cost: float
    speedup: float
    method: str
    target_speedup: float | None = None
    budget: float | None = None
    notes: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return self.placement.counts()


def _solution(problem: Problem, row: np.ndarray, method: str, target: float | None = None,
              budget: float | None = None, **notes) -> Solution:
    row = np.asarray(row, dtype=np.int64)
    cost = float(problem.cost_of(row)[0])
    return Solution(problem.names(row), row, float(problem.quality(row)[0]), cost,
                    problem.reference_cost / cost, method, target, budget, dict(notes))


# -- the dynamic programme ------------------------------------------------------------------------
def _exact_step(extra: np.ndarray, max_cells: int) -> float | None:
    """A grid step on which every extra cost lies exactly (decimal scaling + gcd), if small enough."""
    vals = extra[np.isfinite(extra) & (extra > 0)]
    if vals.size == 0:
        return 1.0
    total = float(np.sum(np.max(np.where(np.isfinite(extra), extra, 0.0), axis=1)))
    for k in range(0, 10):
        scaled = vals * 10.0**k
        if scaled.max() > 2**52:
            return None
        ints = np.round(scaled)
        if np.all(np.abs(scaled - ints) <= 1e-9 * np.maximum(1.0, scaled)):
            step = float(np.gcd.reduce(ints.astype(np.int64))) / 10.0**k
            return step if total / step <= max_cells else None
    return None


def _aligned_step(extra: np.ndarray, span: float, resolution: int, candidates: int = 512) -> float:
    """Among grid steps giving 50-100% of `resolution` cells, the one with the smallest rounding bound.

    Rounding errors of layers with identical costs add up instead of averaging out, so a step on
    which the common costs fall (nearly) on grid points shrinks the bound a lot for free.
    """
    if span <= 0:
        return 1.0
    steps = span / np.linspace(resolution, resolution / 2, candidates)
    best, best_bound = steps[0], np.inf
    for chunk in np.array_split(steps, max(1, candidates // 64)):
        ratio = extra[None] / chunk[:, None, None]
        err = (np.ceil(ratio - 1e-9) - ratio) * chunk[:, None, None]
        bounds = err.max(axis=2).sum(axis=1)
        k = int(np.argmin(bounds))
        if bounds[k] < best_bound:
            best, best_bound = chunk[k], bounds[k]
    return float(best)


@dataclass
class ChainDP:
    """Tables of one DP pass: best chain objective for every rounded extra cost, and back-pointers."""

    problem: Problem
    step: float  # grid step (cost units)
    units: np.ndarray  # [L, M] rounded-up extra cost of each choice, in steps (-1 = not allowed)
    base: float  # fixed + sum of each layer's cheapest allowed cost
    best: np.ndarray  # [G] best chain objective with rounded extra cost exactly g (-inf = unreachable)
    last: np.ndarray  # [G] mixer of the last layer at that optimum
    ptr: np.ndarray  # [L, M, G] previous layer's mixer (int8)
    error_bound: float  # answers are >= the true optimum at budget - error_bound
    exact_grid: bool
    seconds: float

    def budget_units(self, budget: float) -> int:
        """Largest grid index whose placements all fit the budget (-1 if none)."""
        extra = budget - self.base
        if extra < -REL_TOL * max(abs(budget), 1.0):
            return -1
        return min(int(math.floor(max(extra, 0.0) / self.step + 1e-9)), len(self.best) - 1)

    def improving(self) -> np.ndarray:
        """Grid indices where the best objective strictly improves on every cheaper one (ties -> cheaper)."""
        F = self.best
        finite = np.isfinite(F)
        if not finite.any():
            return np.zeros(0, dtype=np.int64)
        prev = np.concatenate(([-np.inf], np.maximum.accumulate(F)[:-1]))
        cand = np.flatnonzero(finite & (F > prev))
        scale = max(1.0, float(np.abs(F[finite]).max()))
        keep, last = [], -np.inf
        for g in cand:  # drop improvements within float noise so exact ties resolve to the cheaper cost
            if F[g] > last + 1e-12 * scale:
                keep.append(g)
                last = F[g]
        return np.asarray(keep, dtype=np.int64)

    def backtrack(self, ends: np.ndarray) -> np.ndarray:
        """Placements [K, L] ending at grid indices `ends` (vectorised over K)."""
        L = self.problem.L
        g = np.asarray(ends, dtype=np.int64).copy()
        m = self.last[g].astype(np.int64)
        out = np.zeros((len(g), L), dtype=np.int64)
        for i in range(L - 1, -1, -1):
            out[:, i] = m
            if i > 0:
                prev = self.ptr[i, m, g].astype(np.int64)
                g = g - self.units[i, m]
                m = prev
        return out

    def solve(self, budgets: Sequence[float]) -> list[np.ndarray | None]:
        """Best chain placement for each budget (None where even the cheapest does not fit)."""
        imp = self.improving()
        out: list[np.ndarray | None] = []
        idx = [self.budget_units(b) for b in budgets]
        pos = np.searchsorted(imp, np.asarray(idx), side="right") - 1
        ok = [(k, imp[p]) for k, p in enumerate(pos) if idx[k] >= 0 and p >= 0]
        rows = self.backtrack(np.array([g for _, g in ok], dtype=np.int64)) if ok else []
        found = {k: r for (k, _), r in zip(ok, rows)}
        for k in range(len(budgets)):
            out.append(found.get(k))
        return out


def auto_resolution(num_layers: int, num_mixers: int, work: float = 4e7) -> int:
    """Grid size that keeps one DP pass near `work` cell updates (~0.1-0.2 s of numpy)."""
    return int(min(200_000, max(5_000, work / (max(num_layers, 1) * max(num_mixers, 1) ** 2))))


def chain_dp(problem: Problem, resolution: int | None = None) -> ChainDP:
    """One exact DP pass over the single-site + nearest-neighbour objective on a cost grid.

    `resolution` is the number of grid steps spanning the range of achievable extra costs (default:
    as fine as ~0.1 s of work allows); the work is O(L * M^2 * resolution), vectorised over the grid.
    """
    t0 = time.perf_counter()
    L, M = problem.L, problem.M
    resolution = resolution or auto_resolution(L, M)
    allowed = problem.allowed
    cheapest = np.where(allowed, problem.cost, np.inf).min(axis=1)
    extra = np.where(allowed, problem.cost - cheapest[:, None], np.inf)
    span = float(np.where(allowed, extra, 0.0).max(axis=1).sum())
    step = _exact_step(extra, max(4 * resolution, 1 << 16))
    exact = step is not None
    if not exact:
        step = _aligned_step(np.where(allowed, extra, 0.0), span, resolution)
    units = np.where(allowed, np.ceil(np.where(allowed, extra, 0.0) / step - 1e-9), -1).astype(np.int64)
    units[allowed] = np.maximum(units[allowed], 0)
    err = np.where(allowed, units * step - np.where(allowed, extra, 0.0), 0.0)
    error_bound = 0.0 if exact else float(np.maximum(err, 0.0).max(axis=1).sum())
    widths = np.cumsum(np.where(allowed, units, 0).max(axis=1)) + 1  # reachable grid size after layer i
    G = int(widths[-1])

    Jnn, _ = problem.chain_pairs()
    ptr = np.zeros((L, M, G), dtype=np.int8)
    V = np.full((M, G), -np.inf)
    for m in np.flatnonzero(allowed[0]):
        V[m, units[0, m]] = problem.h[0, m]
    for i in range(1, L):
        w_prev, w = int(widths[i - 1]), int(widths[i])
        T = V[:, None, :w_prev] + Jnn[i - 1][:, :, None]  # [prev mixer, mixer, grid]
        arg = T.argmax(axis=0)
        best = np.take_along_axis(T, arg[None], axis=0)[0]
        V = np.full((M, G), -np.inf)
        for m in np.flatnonzero(allowed[i]):
            s = units[i, m]
            n = min(w_prev, w - s)
            V[m, s:s + n] = best[m, :n] + problem.h[i, m]
            ptr[i, m, s:s + n] = arg[m, :n]
    best = V.max(axis=0) + problem.J0
    last = V.argmax(axis=0).astype(np.int8)
    return ChainDP(problem, step, units, float(problem.fixed + cheapest.sum()), best, last, ptr,
                   error_bound, exact, time.perf_counter() - t0)


# -- local search ---------------------------------------------------------------------------------
def local_search(problem: Problem, row: np.ndarray, budget: float, max_iters: int = 1000,
                 dense: np.ndarray | None = None) -> np.ndarray:
    """Best-improvement hill climbing over 1- and 2-layer changes, under the true budget.

    Uses the full objective (all pairs), so it repairs what the chain DP cannot see; it never makes
    the quality worse and never leaves the budget.
    """
    p = np.asarray(row, dtype=np.int64).copy()
    L, M = problem.L, problem.M
    D = problem.dense_pairs() if dense is None else dense
    ar = np.arange(L)
    limit = budget * (1 + REL_TOL)
    scale = max(1.0, abs(float(problem.quality(p)[0])))
    for _ in range(max_iters):
        field_ = problem.h + D[:, ar, :, p].sum(axis=0)  # [L, M]: energy of site i taking a, given the rest
        d1 = field_ - field_[ar, p][:, None]
        c1 = problem.cost - problem.cost[ar, p][:, None]
        ok1 = problem.allowed.copy()
        ok1[ar, p] = False
        current = float(problem.cost_of(p)[0])
        # two changes (i -> a, j -> b): singles plus the correction of their shared pair term
        A = D[:, ar, :, p].transpose(1, 2, 0)  # [i, a, j] = D[i, j, a, p_j]
        B = D[ar, :, p, :]  # [i, j, b] = D[i, j, p_i, b]
        C = D[ar[:, None], ar[None, :], p[:, None], p[None, :]]  # [i, j]
        d2 = (d1[:, :, None, None] + d1[None, None, :, :] + D.transpose(0, 2, 1, 3)
              - A[:, :, :, None] - B[:, None, :, :] + C[:, None, :, None])
        c2 = c1[:, :, None, None] + c1[None, None, :, :]
        ok2 = ok1[:, :, None, None] & ok1[None, None, :, :] & (ar[:, None] < ar[None, :])[:, None, :, None]
        g1 = np.where(ok1 & (current + c1 <= limit), d1, -np.inf)
        g2 = np.where(ok2 & (current + c2 <= limit), d2, -np.inf)
        b1, b2 = g1.max(), g2.max()
        if max(b1, b2) <= 1e-12 * scale:
            break
        if b1 >= b2:
            i, a = np.unravel_index(int(g1.argmax()), g1.shape)
            p[i] = a
        else:
            i, a, j, b = np.unravel_index(int(g2.argmax()), g2.shape)
            p[i], p[j] = a, b
    return p


def conditional_dp(problem: Problem, row: np.ndarray, budget: float, dense: np.ndarray | None = None,
                   iters: int = 8, resolution: int = 4000) -> np.ndarray:
    """Improve a placement for a model with long-range pairs by alternating exact chain DPs.

    Each round freezes the current placement in the long-range pair terms, which turns them into
    per-site fields; the resulting chain problem is solved exactly by the DP, polished by local search
    under the full objective, and kept only if the true predicted quality improves.
    """
    D = problem.dense_pairs() if dense is None else dense
    far = D.copy()
    idx = np.arange(problem.L - 1)
    far[idx, idx + 1] = 0.0
    far[idx + 1, idx] = 0.0
    Jnn, _ = problem.chain_pairs()
    chain = np.stack([idx, idx + 1], axis=1)
    ar = np.arange(problem.L)
    best = np.asarray(row, dtype=np.int64).copy()
    best_q = float(problem.quality(best)[0])
    for _ in range(iters):
        fields = problem.h + far[:, ar, :, best].sum(axis=0)
        sub = Problem(problem.mixers, problem.J0, fields, chain, Jnn, problem.cost, problem.fixed,
                      problem.reference_cost, problem.allowed)
        cand = chain_dp(sub, resolution).solve([budget])[0]
        if cand is None:
            break
        cand = local_search(problem, cand, budget, dense=D)
        q = float(problem.quality(cand)[0])
        if q <= best_q + 1e-12 * max(1.0, abs(best_q)):
            break
        best, best_q = cand, q
    return best


# -- mixed-integer programme ----------------------------------------------------------------------
@dataclass
class MilpResult:
    row: np.ndarray | None
    quality: float
    status: str
    seconds: float
    mip_gap: float | None
    upper_bound: float = np.inf  # proven upper bound on the optimal predicted quality (dual bound)


def solve_milp(problem: Problem, budget: float, time_limit: float = 60.0, mip_rel_gap: float = 1e-9,
               requirements: Sequence[tuple[Problem, float]] = ()) -> MilpResult:
    """Exact optimum under any pair set (HiGHS via scipy.optimize.milp).

    Pair products are linearised with the local-marginal formulation: y[k,a,b] >= 0 with
    sum_b y[k,a,b] = x[i,a] and sum_a y[k,a,b] = x[j,b], which is tight for trees and keeps the LP
    relaxation strong for general pair sets. For one-hot x the marginals force y[k,a,b] = x[i,a] x[j,b],
    so `requirements` ((tables of another metric on the same pair list, minimum value)) are exact
    linear constraints too.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    t0 = time.perf_counter()
    L, M = problem.L, problem.M
    for req, _ in requirements:
        if req.pairs.shape != problem.pairs.shape or np.any(req.pairs != problem.pairs):
            raise PlacementError("a requirement's tables must use the objective's pair list")
    used = np.abs(problem.Jp).reshape(len(problem.pairs), -1).max(axis=1) > 0
    for req, _ in requirements:
        used |= np.abs(req.Jp).reshape(len(req.pairs), -1).max(axis=1) > 0
    keep = np.flatnonzero(used)
    pairs, Jp = problem.pairs[keep], problem.Jp[keep]
    P = len(pairs)
    nx, ny = L * M, P * M * M
    xi = lambda i, a: i * M + a  # noqa: E731 - index helpers keep the constraint code readable
    yi = lambda k, a, b: nx + (k * M + a) * M + b  # noqa: E731
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0
    for i in range(L):  # one mixer per layer
        rows += [r] * M
        cols += [xi(i, a) for a in range(M)]
        vals += [1.0] * M
        lo.append(1.0)
        hi.append(1.0)
        r += 1
    if P:
        k = np.repeat(np.arange(P), M)
        a = np.tile(np.arange(M), P)
        for side in (0, 1):  # marginals: sum_b y[k,a,b] = x[i,a]; sum_a y[k,a,b] = x[j,b]
            site = pairs[k, side]
            base = r + np.arange(P * M)
            other = np.arange(M)
            yk = (nx + (k[:, None] * M + (a[:, None] if side == 0 else other[None, :])) * M
                  + (other[None, :] if side == 0 else a[:, None]))
            rows += list(np.repeat(base, M)) + list(base)
            cols += list(yk.ravel()) + list(site * M + a)
            vals += [1.0] * (P * M * M) + [-1.0] * (P * M)
            lo += [0.0] * (P * M)
            hi += [0.0] * (P * M)
            r += P * M
    rows += [r] * nx  # the budget
    cols += list(range(nx))
    vals += list(problem.cost.ravel())
    lo.append(-np.inf)
    hi.append(budget - problem.fixed)
    r += 1
    for req, minimum in requirements:  # J0 + h.x + Jp.y >= minimum
        rows += [r] * (nx + ny)
        cols += list(range(nx + ny))
        vals += list(req.h.ravel()) + list(req.Jp[keep].ravel())
        lo.append(minimum - req.J0)
        hi.append(np.inf)
        r += 1
    A = coo_matrix((vals, (rows, cols)), shape=(r, nx + ny)).tocsr()
    c = -np.concatenate([problem.h.ravel(), Jp.ravel()])
    ub = np.concatenate([problem.allowed.ravel().astype(float), np.ones(ny)])
    integrality = np.concatenate([np.ones(nx), np.zeros(ny)])
    res = milp(c, integrality=integrality, bounds=Bounds(np.zeros(nx + ny), ub),
               constraints=[LinearConstraint(A, lo, hi)],
               options={"time_limit": time_limit, "mip_rel_gap": mip_rel_gap})
    seconds = time.perf_counter() - t0
    status = {0: "optimal", 1: "limit", 2: "infeasible", 3: "unbounded"}.get(res.status, "error")
    dual = getattr(res, "mip_dual_bound", None)
    upper = problem.J0 - float(dual) if dual is not None and np.isfinite(dual) else np.inf
    if res.x is None:
        return MilpResult(None, -np.inf, status, seconds, None, upper)
    row = res.x[:nx].reshape(L, M).argmax(axis=1)
    quality = float(problem.quality(row)[0])
    if status == "optimal":
        upper = min(upper, quality) if np.isfinite(upper) else quality
    return MilpResult(row, quality, status, seconds, getattr(res, "mip_gap", None), upper)


# -- high level -----------------------------------------------------------------------------------
@dataclass
class OptimizeResult:
    presets: list[Solution]
    frontier: list[Solution]
    dp: ChainDP
    method: str
    seconds: float


def optimize(problem: Problem, speedups: Iterable[float], frontier: bool = False, solver: str = "auto",
             resolution: int | None = None, milp_time_limit: float = 60.0) -> OptimizeResult:
    """Best placement per target speedup (and optionally the Pareto frontier).

    solver: "dp" (chain DP; + local search when the grid rounds; + local search and conditional DPs
    when the model has pairs beyond neighbours), "milp" (exact for any pair set; can be slow for
    strong all-pairs models), "auto" (= dp).
    """
    if solver not in ("auto", "dp", "milp"):
        raise PlacementError(f"unknown solver {solver!r}; use auto, dp or milp")
    t0 = time.perf_counter()
    speedups = [float(s) for s in speedups]
    budgets = [problem.budget(s) for s in speedups]
    dp = chain_dp(problem, resolution)
    chain = problem.is_chain()
    polish = not chain or not dp.exact_grid
    dense = problem.dense_pairs() if polish else None
    method = "dp" if chain else "dp+local"
    presets: list[Solution] = []
    rows = dp.solve(budgets)
    for s, b, row in zip(speedups, budgets, rows):
        if row is None:  # cannot happen for budgets >= min cost (the cheapest placement is on the grid)
            raise PlacementError(f"speedup {s:g} is infeasible under these costs")
        if polish:
            row = local_search(problem, row, b, dense=dense)
        if not chain:
            row = conditional_dp(problem, row, b, dense=dense)
        sol = _solution(problem, row, method, s, b, error_bound=dp.error_bound,
                        bound_relative=dp.error_bound / b)
        if solver == "milp":
            mr = solve_milp(problem, b, milp_time_limit)
            sol.notes["milp_status"] = mr.status
            if mr.row is not None and mr.quality >= sol.quality - 1e-12 * max(1.0, abs(sol.quality)):
                alt = _solution(problem, mr.row, "milp", s, b, milp_status=mr.status, milp_gap=mr.mip_gap)
                if alt.quality > sol.quality + 1e-12 * max(1.0, abs(sol.quality)) or alt.cost < sol.cost:
                    sol = alt
        presets.append(sol)
    # chain models: frontier points are DP optima of their rounded costs already; polishing hundreds of
    # them would double the time for a marginal gain, so only long-range pair models get it
    front = pareto_frontier(problem, dp, polish=not chain, dense=dense) if frontier else []
    return OptimizeResult(presets, front, dp, method if solver != "milp" else "milp", time.perf_counter() - t0)


def pareto_frontier(problem: Problem, dp: ChainDP | None = None, resolution: int | None = None,
                    polish: bool = False, dense: np.ndarray | None = None) -> list[Solution]:
    """Every placement on the (predicted) speed-quality Pareto frontier, cheapest first.

    Monotone by construction: sorted by true cost, each point has strictly higher quality than all
    cheaper ones (dominated and tied-but-costlier points are dropped).
    """
    dp = dp or chain_dp(problem, resolution)
    ends = dp.improving()
    if len(ends) == 0:
        return []
    rows = dp.backtrack(ends)
    if polish:
        D = problem.dense_pairs() if dense is None else dense
        costs = problem.cost_of(rows)
        rows = np.stack([local_search(problem, r, c, dense=D) for r, c in zip(rows, costs)])
    rows = np.unique(rows, axis=0)
    q, c = problem.quality(rows), problem.cost_of(rows)
    order = np.lexsort((-q, c))  # by cost, then best quality first
    out: list[Solution] = []
    best = -np.inf
    scale = max(1.0, float(np.abs(q).max()))
    for k in order:
        if q[k] > best + 1e-12 * scale:
            out.append(_solution(problem, rows[k], "dp" if not polish else "dp+local"))
            best = q[k]
    return out


def brute_force(problem: Problem, budget: float) -> tuple[np.ndarray | None, float]:
    """Exhaustive optimum (tests only; M^L placements)."""
    L, M = problem.L, problem.M
    if M**L > 5_000_000:
        raise ValueError("too many placements for brute force")
    grids = np.indices((M,) * L).reshape(L, -1).T
    ok = problem.is_allowed(grids) & (problem.cost_of(grids) <= budget * (1 + REL_TOL))
    grids = grids[ok]
    if len(grids) == 0:
        return None, -np.inf
    q = problem.quality(grids)
    k = int(np.argmax(q))
    return grids[k], float(q[k])


def best_under_budget(problem: Problem, budget: float, resolution: int | None = None) -> tuple[np.ndarray | None, float]:
    """Best placement within `budget` the way `optimize` finds it, and an upper bound on the true optimum.

    The bound is the chain DP's optimum at `budget + error_bound`: every placement that truly fits
    the budget also fits that rounded budget, so nothing better can exist. It is a proven bound for
    chain models (nearest-neighbour pairs) and +inf otherwise.
    """
    dp = chain_dp(problem, resolution)
    chain = problem.is_chain()
    row = dp.solve([budget])[0]
    if row is None:
        return None, -np.inf
    if not chain or not dp.exact_grid:
        dense = problem.dense_pairs()
        row = local_search(problem, row, budget, dense=dense)
        if not chain:
            row = conditional_dp(problem, row, budget, dense=dense)
    if not chain:
        return row, np.inf
    g = dp.budget_units(budget + dp.error_bound) if not dp.exact_grid else dp.budget_units(budget)
    upper = float(np.max(dp.best[:g + 1])) if g >= 0 else -np.inf
    return row, max(upper, float(problem.quality(row)[0]))
