"""Cluster-expansion surrogate: predicts a placement's quality from a few hundred measured ones.

    quality(p) ~ J0 + sum_i J_i(m_i) + sum_(i,j) J_ij(m_i, m_j)

Each site (layer) has a reference mixer whose one-hot column is dropped, and pair terms exist only
for non-reference mixer pairs, so the features are linearly independent (the ANOVA "corner"
parametrisation): J0 is the quality of the all-reference placement, J_i(m) the effect of switching
layer i alone, J_ij the extra effect of switching both. Coefficients come from ridge (default) or
lasso regression with the penalty picked by k-fold cross-validation; the out-of-fold predictions
give honest diagnostics (Spearman, R^2, RMSE) of how well the surrogate ranks unseen placements.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from supernet.layout import MIXERS, Placement, PlacementError

PAIR_CHOICES = ("none", "nn", "all")  # plus "within:D" (all pairs at distance <= D)


# -- pair sets ------------------------------------------------------------------------------------
def pair_list(num_layers: int, pairs: str | int) -> np.ndarray:
    """The (i, j) site pairs, i < j, of a pair-set spec: none, nn, all, within:D (or an int D)."""
    if isinstance(pairs, str):
        spec = pairs.strip().lower()
        if spec == "none":
            distance = 0
        elif spec == "nn":
            distance = 1
        elif spec == "all":
            distance = num_layers
        elif spec.startswith("within:") and spec[7:].isdigit():
            distance = int(spec[7:])
        else:
            raise PlacementError(f"unknown pair set {pairs!r}; use none, nn, all or within:D (e.g. within:3)")
    else:
        distance = int(pairs)
    if distance < 0:
        raise PlacementError(f"pair distance must be >= 0, got {distance}")
    out = [(i, j) for i in range(num_layers) for j in range(i + 1, min(num_layers, i + distance + 1))]
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def pair_spec_name(pairs: np.ndarray, num_layers: int) -> str:
    """Describe a pair array by the spec that produces it (for tables and JSON)."""
    if len(pairs) == 0:
        return "none"
    d = int((pairs[:, 1] - pairs[:, 0]).max())
    if np.array_equal(pairs, pair_list(num_layers, d)):
        return "nn" if d == 1 else ("all" if d >= num_layers - 1 else f"within:{d}")
    return "custom"


# -- encoding -------------------------------------------------------------------------------------
def encode(placements: Iterable, mixers: Sequence[str], num_layers: int | None = None) -> np.ndarray:
    """Placements (Placement, list or comma string) -> int array [n, L] of indices into `mixers`."""
    index = {m: k for k, m in enumerate(mixers)}
    rows = []
    for p in placements:
        if isinstance(p, np.ndarray):
            rows.append(p.astype(np.int64))
            continue
        pl = Placement.parse(p, num_layers)
        try:
            rows.append([index[m] for m in pl])
        except KeyError as exc:
            raise PlacementError(
                f"mixer {exc.args[0]!r} is not among the modelled mixers ({', '.join(mixers)})"
            ) from None
    if not rows:
        return np.zeros((0, num_layers or 0), dtype=np.int64)
    return np.asarray(rows, dtype=np.int64)


class FeatureMap:
    """One-hot single-site and pair features relative to a per-site reference mixer."""

    def __init__(self, num_layers: int, num_mixers: int, pairs: np.ndarray, reference: np.ndarray) -> None:
        self.L, self.M = num_layers, num_mixers
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.reference = np.asarray(reference, dtype=np.int64)
        L, M, P = self.L, self.M, len(self.pairs)
        not_ref = np.ones((L, M), dtype=bool)
        not_ref[np.arange(L), self.reference] = False
        self.single_col = np.full((L, M), -1, dtype=np.int64)
        self.single_col[not_ref] = np.arange(not_ref.sum())
        self.num_single = int(not_ref.sum())
        both = not_ref[self.pairs[:, 0]][:, :, None] & not_ref[self.pairs[:, 1]][:, None, :]  # [P,M,M]
        self.pair_col = np.full((P, M, M), -1, dtype=np.int64)
        self.pair_col[both] = self.num_single + np.arange(both.sum())
        self.num_features = self.num_single + int(both.sum())

    def transform(self, P: np.ndarray) -> np.ndarray:
        """Int placements [n, L] -> dense 0/1 design matrix [n, num_features] (no intercept)."""
        P = np.asarray(P, dtype=np.int64)
        n = len(P)
        X = np.zeros((n, self.num_features))
        rows = np.arange(n)[:, None]
        cols = self.single_col[np.arange(self.L)[None, :], P]
        mask = cols >= 0
        X[np.broadcast_to(rows, cols.shape)[mask], cols[mask]] = 1.0
        if len(self.pairs):
            cols = self.pair_col[np.arange(len(self.pairs))[None, :], P[:, self.pairs[:, 0]], P[:, self.pairs[:, 1]]]
            mask = cols >= 0
            X[np.broadcast_to(rows, cols.shape)[mask], cols[mask]] = 1.0
        return X

    def unpack(self, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coefficient vector -> (h [L, M], Jp [P, M, M]) with zeros at reference entries."""
        h = np.zeros((self.L, self.M))
        mask = self.single_col >= 0
        h[mask] = beta[self.single_col[mask]]
        Jp = np.zeros((len(self.pairs), self.M, self.M))
        mask = self.pair_col >= 0
        Jp[mask] = beta[self.pair_col[mask]]
        return h, Jp

    def is_pair_column(self) -> np.ndarray:
        out = np.zeros(self.num_features, dtype=bool)
        out[self.num_single:] = True
        return out


# -- the fitted model -----------------------------------------------------------------------------
@dataclass
class ClusterExpansion:
    """A fitted surrogate: constant, single-site tables and pair tables over `mixers`."""

    num_layers: int
    mixers: tuple[str, ...]
    pairs: np.ndarray  # [P, 2] site pairs
    reference: np.ndarray  # [L] reference mixer index per site
    J0: float
    h: np.ndarray  # [L, M]
    Jp: np.ndarray  # [P, M, M]
    support: np.ndarray  # [L, M] how many measured placements had mixer m at layer i
    method: str = "ridge"
    alpha: float = 0.0
    pair_ratio: float = 1.0
    diagnostics: dict = field(default_factory=dict)

    # -- prediction -------------------------------------------------------------------------
    def predict_indices(self, P: np.ndarray) -> np.ndarray:
        """Predicted quality of int placements [n, L] (indices into self.mixers)."""
        P = np.atleast_2d(np.asarray(P, dtype=np.int64))
        q = self.J0 + self.h[np.arange(self.num_layers)[None, :], P].sum(axis=1)
        if len(self.pairs):
            k = np.arange(len(self.pairs))[None, :]
            q = q + self.Jp[k, P[:, self.pairs[:, 0]], P[:, self.pairs[:, 1]]].sum(axis=1)
        return q

    def predict(self, placements: Iterable) -> np.ndarray:
        return self.predict_indices(encode(placements, self.mixers, self.num_layers))

    def pair_spec(self) -> str:
        return pair_spec_name(self.pairs, self.num_layers)

    # -- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "kind": "cluster-expansion",
            "num_layers": self.num_layers,
            "mixers": list(self.mixers),
            "pairs": self.pairs.tolist(),
            "pair_set": self.pair_spec(),
            "reference": [self.mixers[r] for r in self.reference],
            "J0": self.J0,
            "single": {m: self.h[:, k].tolist() for k, m in enumerate(self.mixers)},
            "pair_tables": self.Jp.tolist(),
            "support": self.support.tolist(),
            "method": self.method,
            "alpha": self.alpha,
            "pair_ratio": self.pair_ratio,
            "diagnostics": self.diagnostics,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ClusterExpansion":
        try:
            mixers = tuple(data["mixers"])
            L = int(data["num_layers"])
            for m in mixers:
                if m not in MIXERS:
                    raise PlacementError(f"surrogate names unknown mixer {m!r}; choose from {', '.join(MIXERS)}")
            h = np.stack([np.asarray(data["single"][m], dtype=float) for m in mixers], axis=1)
            pairs = np.asarray(data["pairs"], dtype=np.int64).reshape(-1, 2)
            Jp = np.asarray(data["pair_tables"], dtype=float).reshape(len(pairs), len(mixers), len(mixers))
            ref = np.asarray([mixers.index(m) for m in data["reference"]], dtype=np.int64)
            support = np.asarray(data.get("support", np.ones((L, len(mixers)))), dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlacementError(f"surrogate JSON is malformed ({type(exc).__name__}: {exc}); refit it") from None
        if h.shape != (L, len(mixers)) or len(ref) != L:
            raise PlacementError(f"surrogate JSON tables do not match num_layers={L}; refit it")
        return cls(L, mixers, pairs, ref, float(data["J0"]), h, Jp, support,
                   data.get("method", "ridge"), float(data.get("alpha", 0.0)),
                   float(data.get("pair_ratio", 1.0)), dict(data.get("diagnostics", {})))

    def save(self, path: str | Path) -> None:
        from supernet.io_utils import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ClusterExpansion":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlacementError(f"surrogate file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise PlacementError(f"surrogate file {path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
        return cls.from_dict(data)


# -- regression -----------------------------------------------------------------------------------
def _fold_ids(n: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    ids = np.arange(n) % folds
    rng.shuffle(ids)
    return ids


def _ridge_path(X: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred ridge solutions for every alpha at once via one SVD: (intercepts [A], betas [p, A])."""
    xm, ym = X.mean(axis=0), y.mean()
    U, s, Vt = np.linalg.svd(X - xm, full_matrices=False)
    uty = U.T @ (y - ym)
    shrink = s[:, None] / (s[:, None] ** 2 + alphas[None, :])  # [r, A]
    betas = Vt.T @ (shrink * uty[:, None])
    return ym - xm @ betas, betas


def _lasso_path(X: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.linear_model import Lasso
    except ImportError:  # pragma: no cover - dev extra
        raise PlacementError("--method lasso needs scikit-learn: pip install scikit-learn") from None
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    model = Lasso(alpha=float(alphas[0]), warm_start=True, precompute=True, max_iter=2000, tol=1e-5)
    icpt, betas = np.zeros(len(alphas)), np.zeros((X.shape[1], len(alphas)))
    order = np.argsort(alphas)[::-1]  # strong -> weak penalty, warm-started
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for a in order:
            model.set_params(alpha=float(alphas[a]))
            model.fit(X, y)
            icpt[a], betas[:, a] = model.intercept_, model.coef_
    return icpt, betas


def _single_threaded_blas():
    """Small SVDs run faster on one BLAS thread, and far faster when the cores are shared."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank (what Spearman's rho is defined on)."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(a)] - 1
    ranks = np.empty(len(a))
    ranks[order] = (first + last)[group] / 2.0 + 1.0
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho in numpy (scipy.stats alone takes ~1 s to import on a busy 2-core machine)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(np.clip((ra @ rb) / math.sqrt((ra @ ra) * (rb @ rb)), -1.0, 1.0))


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    resid = y - pred
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {
        "spearman": _spearman(y, pred),
        "r2": 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
        "rmse": float(np.sqrt((resid**2).mean())),
    }


def fit_surrogate(
    placements: Iterable,
    quality: Sequence[float],
    pairs: str | int | np.ndarray = "nn",
    method: str = "ridge",
    reference: str = "fa",
    mixers: Sequence[str] | None = None,
    folds: int = 5,
    alphas: Sequence[float] | None = None,
    pair_ratios: Sequence[float] | None = None,
    seed: int = 0,
    refit_cv: bool = False,
) -> ClusterExpansion:
    """Fit the cluster expansion; penalty (alpha) and the extra pair penalty chosen by k-fold CV.

    `pair_ratios` multiplies the penalty on pair terms, so the data decide how much the pair terms
    are shrunk relative to single-site terms. `mixers` defaults to those that occur in the data
    (a mixer never measured cannot be predicted). `reference` is a mixer name or "mode" (the most
    frequent mixer at each site, which conditions the fit best). Ridge cross-validates in closed
    form (no refit per fold); `refit_cv=True` refits every fold instead (the reference the closed
    form is tested against, and the only way for lasso).
    """
    placements = list(placements)
    if not placements:
        raise PlacementError("no evaluations to fit; measure placements first (supernet eval-placements)")
    y = np.asarray(quality, dtype=float)
    if len(y) != len(placements):
        raise PlacementError(f"{len(placements)} placements but {len(y)} quality values")
    if not np.all(np.isfinite(y)):
        raise PlacementError("quality values must be finite numbers (found NaN or inf)")
    if isinstance(placements[0], np.ndarray):
        P = np.asarray(placements, dtype=np.int64)
        if mixers is None:
            raise PlacementError("index placements need the mixers list")
        mixers = tuple(mixers)
    else:
        first = Placement.parse(placements[0])
        L = len(first)
        used = sorted({m for p in placements for m in Placement.parse(p, L)}, key=MIXERS.index)
        mixers = tuple(mixers) if mixers is not None else tuple(used)
        P = encode(placements, mixers, L)
    n, L = P.shape
    M = len(mixers)
    if n < 4:
        raise PlacementError(f"only {n} evaluations; the surrogate needs at least 4 (better a few hundred)")
    if method not in ("ridge", "lasso"):
        raise PlacementError(f"unknown regression method {method!r}; use ridge or lasso")

    support = np.zeros((L, M), dtype=np.int64)
    np.add.at(support, (np.broadcast_to(np.arange(L), P.shape), P), 1)
    if reference == "mode":
        ref = support.argmax(axis=1)
    elif reference in mixers:
        ref = np.full(L, mixers.index(reference), dtype=np.int64)
    elif reference in MIXERS:  # the named reference was never measured: fall back to the mode
        ref = support.argmax(axis=1)
    else:
        raise PlacementError(f"unknown reference mixer {reference!r}; use one of {', '.join(mixers)} or 'mode'")

    pair_arr = pairs if isinstance(pairs, np.ndarray) else pair_list(L, pairs)
    fmap = FeatureMap(L, M, pair_arr, ref)
    X = fmap.transform(P)
    is_pair = fmap.is_pair_column()
    if pair_ratios is None:  # lasso is ~50x slower per fit, so it gets a coarser grid
        pair_ratios = (1.0, 4.0, 16.0, 64.0, 256.0) if method == "ridge" else (1.0, 16.0)
    ratios = [1.0] if not is_pair.any() else [float(r) for r in pair_ratios]

    scale = float(np.std(y)) or 1.0
    if alphas is None:
        # one-hot columns have O(n) squared norm; span very weak to very strong shrinkage
        alphas = np.logspace(-6, 3, 37) * (n / 100.0) if method == "ridge" else np.logspace(-5, -1, 13) * scale
    alphas = np.asarray(alphas, dtype=float)
    path = _ridge_path if method == "ridge" else _lasso_path

    k = max(2, min(folds, n))
    fold = _fold_ids(n, k, np.random.default_rng(seed))
    closed_form = method == "ridge" and not refit_cv and n <= CLOSED_FORM_MAX_ROWS
    with _single_threaded_blas():
        search = _search_ridge_closed_form if closed_form else _search_by_refitting
        best, oof_all, final = search(X, y, is_pair, ratios, alphas, path, fold, k)
        _, r_best, a_best = best
        col_scale = np.where(is_pair, 1.0 / math.sqrt(r_best), 1.0)
        icpt, betas = final if final is not None else path(X * col_scale, y, alphas[[a_best]])
    beta = betas[:, 0] * col_scale
    h, Jp = fmap.unpack(beta)
    model = ClusterExpansion(L, mixers, pair_arr, ref, float(icpt[0]), h, Jp, support,
                             method, float(alphas[a_best]), float(r_best))
    model.diagnostics = _diagnostics(model, P, y, oof_all[r_best], k, alphas, a_best)
    return model


# The closed form costs ~ n^3 per pair ratio (an n x n eigendecomposition, then for each of the 37
# penalties the fold blocks of I - H, n^3 / k), the refits ~ k n p^2 (thin SVDs with p columns): by
# flop count they cross near 2000 rows for p ~ 600 (L = 48, nn pairs), so above this the search
# refits instead. Both give the same answer.
CLOSED_FORM_MAX_ROWS = 2000


def _search_by_refitting(X, y, is_pair, ratios, alphas, path, fold, k):
    """Grid search over (pair ratio, alpha): k refits per ratio (any path: ridge or lasso)."""
    n = len(y)
    best = (math.inf, None, None)
    oof_all: dict[float, np.ndarray] = {}
    for r in ratios:
        col_scale = np.where(is_pair, 1.0 / math.sqrt(r), 1.0)  # scaling a column = penalising it r times
        Xs = X * col_scale
        oof = np.zeros((n, len(alphas)))
        for f in range(k):
            tr, va = fold != f, fold == f
            icpt, betas = path(Xs[tr], y[tr], alphas)
            oof[va] = icpt[None, :] + Xs[va] @ betas
        mse = ((oof - y[:, None]) ** 2).mean(axis=0)
        a = int(np.argmin(mse))
        oof_all[r] = oof[:, a]
        if mse[a] < best[0] - 1e-15:
            best = (float(mse[a]), r, a)
    return best, oof_all, None


def _complement_of_ones(G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B^T G B, v) for B the last n-1 columns of the Householder reflector I - 2 v v^T / v^T v that
    maps 1/sqrt(n) to -e_1: an orthonormal basis of the vectors summing to zero, applied in O(n^2)."""
    n = len(G)
    v = np.full(n, 1.0 / math.sqrt(n))
    v[0] += 1.0
    v /= np.linalg.norm(v)
    Gv = G @ v
    GH = G - 2.0 * np.outer(Gv, v)  # G H
    HGH = GH - 2.0 * np.outer(v, v @ GH)  # H G H
    return HGH[1:, 1:], v


def _from_complement(Z: np.ndarray, v: np.ndarray) -> np.ndarray:
    """B @ Z for the basis B of `_complement_of_ones` (Z has n-1 rows)."""
    full = np.vstack([np.zeros((1, Z.shape[1])), Z])
    return full - 2.0 * np.outer(v, v @ full)


def _search_ridge_closed_form(X, y, is_pair, ratios, alphas, path, fold, k):
    """The same grid search as `_search_by_refitting` for ridge, without refitting.

    Ridge with an unpenalised intercept fitted on the training folds equals ridge on the training
    folds centred on their own means, which is what the refits compute. For a fixed penalty its
    held-out residuals on fold v follow from the full fit alone: e~_v = (I - H_vv)^-1 e_v, with
    H the full-data hat matrix and e the full-data residuals (block deletion, Woodbury). In an
    orthonormal eigenbasis U of the centred Gram matrix G = Xc Xc^T (restricted to the vectors that
    sum to zero, where the intercept does not act), I - H = U diag(alpha / (lambda + alpha)) U^T,
    so one eigendecomposition per pair ratio serves every alpha and every fold; G itself is
    G_single + G_pair / ratio, two products computed once. The ratios are independent, so they
    run on up to two threads (numpy's LAPACK calls release the GIL; each uses one BLAS thread).
    """
    yc = y - y.mean()
    Xc = X - X.mean(axis=0)
    G_single = Xc[:, ~is_pair] @ Xc[:, ~is_pair].T
    G_pair = Xc[:, is_pair] @ Xc[:, is_pair].T if is_pair.any() else None
    members = [np.flatnonzero(fold == f) for f in range(k)]

    def one_ratio(r: float):
        G = G_single if G_pair is None else G_single + G_pair / r
        return _held_out_for_all_alphas(G, y, yc, alphas, members)

    workers = min(len(ratios), _usable_cores(), 2)
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one_ratio, ratios))
    else:
        results = [one_ratio(r) for r in ratios]
    best = (math.inf, None, None)
    oof_all: dict[float, np.ndarray] = {}
    for r, (oof, _) in zip(ratios, results):  # the refit search's order and tie rule
        mse = ((oof - y[:, None]) ** 2).mean(axis=0)
        a = int(np.argmin(mse))
        oof_all[r] = oof[:, a]
        if mse[a] < best[0] - 1e-15:
            best = (float(mse[a]), r, a)
    # the final fit on all rows from the same eigenbasis: beta = Xs_c^T U (Lambda + alpha)^-1 U^T yc
    _, r_best, a_best = best
    U, lam, z = results[list(ratios).index(r_best)][1]
    col_scale = np.where(is_pair, 1.0 / math.sqrt(r_best), 1.0)
    beta = (Xc * col_scale).T @ (U @ (z / (lam + alphas[a_best])))
    intercept = y.mean() - (X.mean(axis=0) * col_scale) @ beta
    return best, oof_all, (np.array([intercept]), beta[:, None])


def _held_out_for_all_alphas(G, y, yc, alphas, members):
    """Out-of-fold predictions [n, A] of centred ridge for every alpha, from one eigendecomposition
    of the Gram matrix G; also returns (U, lambda, U^T yc) for the final fit."""
    Gb, v = _complement_of_ones(G)
    lam, Ub = np.linalg.eigh(Gb)
    lam = np.clip(lam, 0.0, None)  # G is a Gram matrix: negative eigenvalues are rounding
    U = _from_complement(Ub, v)  # [n, n-1], orthonormal columns, each summing to zero
    D = alphas[:, None] / (lam[None, :] + alphas[:, None])  # [A, n-1]: I - H = U diag(D) U^T
    root_D = np.sqrt(D)
    z = U.T @ yc
    oof = np.empty((len(y), len(alphas)))
    for rows in members:
        Uv = U[rows]
        resid = (D * z[None, :]) @ Uv.T  # [A, m]: full-data residuals on the fold
        Mv = np.empty((len(alphas), len(rows), len(rows)))  # I - H_vv per alpha
        scaled = np.empty_like(Uv)
        for a in range(len(alphas)):  # one cache-sized buffer instead of an [A, m, n] temporary
            np.multiply(Uv, root_D[a], out=scaled)
            np.dot(scaled, scaled.T, out=Mv[a])  # S S^T: numpy calls BLAS syrk, half a GEMM
        held_out = np.linalg.solve(Mv, resid[:, :, None])[:, :, 0]
        oof[rows] = (y[rows][None, :] - held_out).T
    return oof, (U, lam, z)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _diagnostics(model: ClusterExpansion, P: np.ndarray, y: np.ndarray, oof: np.ndarray,
                 folds: int, alphas: np.ndarray, a_best: int) -> dict:
    """Held-out (out-of-fold) and in-sample fit quality plus how much the pair terms matter."""
    pred = model.predict_indices(P)
    single = model.J0 + model.h[np.arange(model.num_layers)[None, :], P].sum(axis=1)
    pair_part = pred - single
    var_pred = float(np.var(pred))
    cv = regression_metrics(y, oof)
    fit = regression_metrics(y, pred)
    return {
        "n": int(len(y)),
        "folds": int(folds),
        "num_features": int(np.count_nonzero(model.h) + np.count_nonzero(model.Jp)),
        "num_terms": int(model.num_layers * (len(model.mixers) - 1) + len(model.pairs) * (len(model.mixers) - 1) ** 2),
        "cv_spearman": cv["spearman"],
        "cv_r2": cv["r2"],
        "cv_rmse": cv["rmse"],
        "train_spearman": fit["spearman"],
        "train_r2": fit["r2"],
        "train_rmse": fit["rmse"],
        "quality_std": float(np.std(y)),
        "alpha_at_grid_edge": bool(a_best in (0, len(alphas) - 1)),
        "pair_variance_share": float(np.var(pair_part) / var_pred) if var_pred > 0 else 0.0,
        "pair_rms": float(np.sqrt((model.Jp**2).mean())) if model.Jp.size else 0.0,
        "pair_max_abs": float(np.abs(model.Jp).max()) if model.Jp.size else 0.0,
        "single_rms": float(np.sqrt((model.h**2).mean())),
        "unmeasured_sites": int((model.support == 0).sum()),
    }
