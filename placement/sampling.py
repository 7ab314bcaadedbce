"""Which placements to measure, so that a few hundred evaluations identify the surrogate.

- single-mixer placements (all-fa, all-swa, ...): the corners, and the reference points of speedups;
- one-layer-changed placements relative to all-fa: each measures one single-site term J_i(m) directly;
- stratified by mixer counts: uniform sampling concentrates on ~L/M of each mixer, so draw the count
  vector uniformly from the simplex first, then a random arrangement with those counts; this covers
  the very fast (mostly linear) and very accurate (mostly attention) ends the optimiser cares about;
- uniform random: unbiased pair statistics;
- sparse (few changed layers): 1..L/4 non-reference layers, scattered or in one contiguous block. A
  threshold-like metric such as long-context retrieval is ~0 on almost every random placement (they
  change about half the layers) and only nonzero when few layers lose the long context, so without
  these rows its surrogate never sees the feasible region a requirement like `retrieval >= 0.9 x
  teacher` lives in (off by default; eval-placements turns it on when it records retrieval);
- active learning: fit the surrogate on what was measured so far and measure its predicted Pareto
  frontier (and small perturbations of it), where a wrong prediction would change the presets.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

DESIGN_KINDS = ("single", "one-changed", "sparse", "stratified", "uniform", "active")


def uniform(n: int, num_layers: int, num_mixers: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, num_mixers, size=(n, num_layers))


def with_counts(counts: Sequence[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """n random arrangements of a multiset with counts[m] copies of mixer m."""
    base = np.repeat(np.arange(len(counts)), counts)
    return np.stack([rng.permutation(base) for _ in range(n)]) if n else np.zeros((0, len(base)), np.int64)


def random_counts(num_layers: int, num_mixers: int, rng: np.random.Generator) -> np.ndarray:
    """A count vector drawn uniformly from all compositions of L into M non-negative parts."""
    cuts = np.sort(rng.choice(num_layers + num_mixers - 1, size=num_mixers - 1, replace=False))
    edges = np.concatenate(([-1], cuts, [num_layers + num_mixers - 1]))
    return np.diff(edges) - 1


def stratified(n: int, num_layers: int, num_mixers: int, rng: np.random.Generator) -> np.ndarray:
    if n == 0:
        return np.zeros((0, num_layers), dtype=np.int64)
    return np.concatenate([with_counts(random_counts(num_layers, num_mixers, rng), 1, rng) for _ in range(n)])


def singles(num_layers: int, num_mixers: int) -> np.ndarray:
    return np.repeat(np.arange(num_mixers)[:, None], num_layers, axis=1)


def one_changed(num_layers: int, num_mixers: int, base: int = 0) -> np.ndarray:
    """Every placement that differs from all-`base` in exactly one layer."""
    rows = []
    for i in range(num_layers):
        for m in range(num_mixers):
            if m != base:
                row = np.full(num_layers, base)
                row[i] = m
                rows.append(row)
    return np.asarray(rows, dtype=np.int64).reshape(-1, num_layers)


def sparse(n: int, num_layers: int, num_mixers: int, rng: np.random.Generator, reference: int = 0,
           max_changed: int | None = None, grouped_share: float = 0.5) -> np.ndarray:
    """n placements of all-`reference` with k ~ U{1..max_changed} layers changed to other mixers.

    max_changed defaults to L/4. A `grouped_share` of them change one contiguous block of k layers
    (a run of layers without long context), the rest k layers at random positions. Half of the rows
    give all k layers one mixer (so the data show how many layers of each mixer a threshold metric
    tolerates), the others a random mixer per layer.
    """
    if n <= 0 or num_mixers < 2:
        return np.zeros((0, num_layers), dtype=np.int64)
    top = max(1, min(num_layers, max_changed if max_changed is not None else num_layers // 4))
    others = np.array([m for m in range(num_mixers) if m != reference])
    rows = np.full((n, num_layers), reference, dtype=np.int64)
    for r in rows:
        k = int(rng.integers(1, top + 1))
        if rng.random() < grouped_share:
            start = int(rng.integers(0, num_layers - k + 1))
            where = np.arange(start, start + k)
        else:
            where = rng.choice(num_layers, size=k, replace=False)
        r[where] = rng.choice(others) if rng.random() < 0.5 else rng.choice(others, size=k)
    return rows


class Design:
    """An ordered, de-duplicated list of placements to measure, each tagged with how it was chosen."""

    def __init__(self, measured: Iterable[tuple[int, ...]] = ()) -> None:
        self.rows: list[np.ndarray] = []
        self.kinds: list[str] = []
        self._seen: set[tuple[int, ...]] = {tuple(int(v) for v in r) for r in measured}

    def add(self, rows: np.ndarray, kind: str, limit: int | None = None) -> int:
        """Add unseen rows (up to `limit`); returns how many were added."""
        added = 0
        for r in np.atleast_2d(rows):
            if limit is not None and added >= limit:
                break
            key = tuple(int(v) for v in r)
            if key in self._seen:
                continue
            self._seen.add(key)
            self.rows.append(np.asarray(r, dtype=np.int64))
            self.kinds.append(kind)
            added += 1
        return added

    def __len__(self) -> int:
        return len(self.rows)


def initial_design(n: int, num_layers: int, num_mixers: int, rng: np.random.Generator,
                   measured: Iterable[tuple[int, ...]] = (), reference: int = 0,
                   one_changed_share: float = 0.3, stratified_share: float = 0.5,
                   sparse_share: float = 0.0) -> Design:
    """Up to n new placements: corners, one-layer changes (<= 30%), few-changed-layer placements
    (`sparse_share` of n, see `sparse`), then stratified and uniform halves of the rest."""
    design = Design(measured)
    design.add(singles(num_layers, num_mixers), "single", limit=n)
    if num_mixers > 1:
        changes = one_changed(num_layers, num_mixers, reference)
        design.add(changes[rng.permutation(len(changes))], "one-changed",
                   limit=min(n - len(design), int(round(one_changed_share * n))))
    n_sparse = min(n - len(design), int(round(sparse_share * n)))
    for _ in range(20 if num_mixers > 1 else 0):
        need = n_sparse - sum(k == "sparse" for k in design.kinds)
        if need <= 0:
            break
        design.add(sparse(need, num_layers, num_mixers, rng, reference), "sparse", limit=need)
    rest = n - len(design)
    n_strat = int(round(stratified_share * rest))
    for _ in range(20):  # re-draw until the quota is met (duplicates are rare except for tiny L)
        need = n_strat - sum(k == "stratified" for k in design.kinds)
        if need <= 0:
            break
        design.add(stratified(need, num_layers, num_mixers, rng), "stratified", limit=need)
    for _ in range(20):
        need = n - len(design)
        if need <= 0:
            break
        design.add(uniform(need, num_layers, num_mixers, rng), "uniform", limit=need)
    return design


def propose_active(surrogate, costs, n: int, rng: np.random.Generator,
                   measured: Iterable[tuple[int, ...]] = (), resolution: int = 4000) -> Design:
    """Up to n unmeasured placements on or next to the surrogate's predicted Pareto frontier.

    Frontier points are taken evenly spread in speedup; when there are fewer than n unmeasured ones,
    random 1- and 2-layer perturbations of frontier points fill the rest.
    """
    from supernet.placement.optimize import Problem, pareto_frontier

    design = Design(measured)
    if n <= 0:
        return design
    problem = Problem.from_surrogate(surrogate, costs, allow_unmeasured=True)
    front = pareto_frontier(problem, resolution=resolution)
    if not front:
        return design
    rows = np.stack([s.indices for s in front])
    order = np.argsort([s.speedup for s in front])
    pick = order[np.unique(np.linspace(0, len(order) - 1, num=min(len(order), 4 * n)).round().astype(int))]
    design.add(rows[pick[rng.permutation(len(pick))]], "active", limit=n)
    L, M = problem.L, problem.M
    for _ in range(50):
        need = n - len(design)
        if need <= 0 or M < 2:
            break
        base = rows[rng.integers(0, len(rows), size=need)]
        flips = rng.integers(1, 3, size=need)
        for r, k in zip(base, flips):
            for i in rng.choice(L, size=min(k, L), replace=False):
                r[i] = (r[i] + rng.integers(1, M)) % M
        design.add(base, "active", limit=need)
    return design
