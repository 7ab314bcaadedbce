"""Planted placement problems with known truth: for tests, benchmarks and trying the tools without a model."""
from __future__ import annotations

import numpy as np

from supernet.placement.optimize import Problem
from supernet.placement.surrogate import pair_list
from supernet.layout import MIXERS


def planted_tables(num_layers: int, num_mixers: int = 4, pairs: str = "nn", seed: int = 0,
                   pair_scale: float = 0.3, decay: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random J_i (N(0,1)) and J_ij (N(0, pair_scale^2), optionally shrinking as decay^(distance-1))."""
    rng = np.random.default_rng(seed)
    pr = pair_list(num_layers, pairs)
    h = rng.normal(size=(num_layers, num_mixers))
    scale = np.full(len(pr), pair_scale)
    if decay is not None and len(pr):
        scale = pair_scale * decay ** (pr[:, 1] - pr[:, 0] - 1)
    Jp = rng.normal(size=(len(pr), num_mixers, num_mixers)) * scale[:, None, None]
    return h, pr, Jp


def truth(h: np.ndarray, pr: np.ndarray, Jp: np.ndarray, P: np.ndarray) -> np.ndarray:
    P = np.atleast_2d(P)
    q = h[np.arange(h.shape[0])[None, :], P].sum(axis=1)
    if len(pr):
        q = q + Jp[np.arange(len(pr))[None, :], P[:, pr[:, 0]], P[:, pr[:, 1]]].sum(axis=1)
    return q


def planted_problem(num_layers: int, num_mixers: int = 4, pairs: str = "nn", seed: int = 0,
                    integer_costs: bool = False, pair_scale: float = 0.3, decay: float | None = None) -> Problem:
    """A Problem whose fa column is the most expensive (like real decode costs at long context)."""
    h, pr, Jp = planted_tables(num_layers, num_mixers, pairs, seed, pair_scale, decay)
    rng = np.random.default_rng(seed + 1000)
    if integer_costs:
        cost = rng.integers(1, 20, size=(num_layers, num_mixers)).astype(float)
        cost[:, 0] = cost.max(axis=1) + 1
    else:
        cost = rng.uniform(0.5, 3.0, size=(num_layers, num_mixers))
        cost[:, 0] = cost.max(axis=1) + 0.1
    fixed = 1.0
    return Problem(MIXERS[:num_mixers], 0.0, h, pr, Jp, cost, fixed, fixed + float(cost[:, 0].sum()))
