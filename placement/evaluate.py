"""The measuring campaign: which placements to evaluate, and the evaluations file they go to.

Pure numpy: the measurement itself (a placement's quality against the teacher, with torch) is
supernet.measure.quality; `run_campaign` takes it as a callable. The metric:

    quality = 1 - KL(teacher || p) / KL(teacher || uniform)

(see supernet/measure/quality.py for how it is computed).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from supernet.placement.evaluations import append_evaluation, read_evaluations
from supernet.placement.sampling import initial_design, propose_active
from supernet.io_utils import read_jsonl
from supernet.layout import MIXERS, Placement, PlacementError

METRIC = "1-kl/kl_uniform"


# -- data -----------------------------------------------------------------------------------------
def load_texts(path: str | Path) -> list[str]:
    """Texts of a `{"id", "text"}` JSONL file."""
    texts = []
    for k, row in read_jsonl(path, "data file", "give a JSONL file with a 'text' per line", PlacementError):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise PlacementError(f"data file {path} line {k} needs a string field 'text'")
        texts.append(row["text"])
    if not texts:
        raise PlacementError(f"data file {path} has no texts")
    return texts


# -- the measuring campaign -----------------------------------------------------------------------
def check_compatible(existing_rows: list[dict], row: dict, path: str | Path) -> None:
    """Refuse to append rows measured differently (metric, reference or tokens) to an existing file."""
    for key in ("metric", "reference", "data_id", "tasks_spec"):  # tasks_spec: eval-placements --retrieval/--dev-tasks
        old = {r.get(key) for r in existing_rows if key in r}
        if old and row.get(key) not in old:
            raise PlacementError(
                f"{path} holds rows with {key}={sorted(map(str, old))[0]!r}, this run measures "
                f"{row.get(key)!r}; use another --out or the same settings"
            )


def _sparse_left(share: float, n_total: int, rows: list[dict]) -> int:
    """Sparse rows still owed: `share` of n_total, less those measured before (a resumed campaign)."""
    return max(0, int(round(share * n_total)) - sum(r.get("design") == "sparse" for r in rows))


def run_campaign(evaluate: Callable[[Placement], dict], out: str | Path, n_total: int, num_layers: int,
                 mixers: Sequence[str] = MIXERS, costs: Any = None, active_fraction: float = 0.25,
                 rounds: int = 3, pairs: str = "nn", seed: int = 0, progress: bool = True,
                 probe: dict | None = None, log: Callable[[str], None] = print, sparse_share: float = 0.0) -> int:
    """Measure placements until `out` holds `n_total` rows; returns how many were measured now.

    Resumable: rows already in `out` are kept and never re-measured. The first (1 - active_fraction)
    of the rows follow the space-filling design (see sampling.py; `sparse_share` of them change only a
    few layers, which a threshold-like metric such as retrieval needs); the rest come from `rounds`
    active-learning rounds that refit the surrogate and measure its predicted frontier (needs costs).
    """
    from tqdm.auto import tqdm

    from supernet.placement.surrogate import encode, fit_surrogate

    if n_total < 1:
        raise PlacementError("--n must be >= 1")
    if not 0.0 <= active_fraction < 1.0:
        raise PlacementError("--active-fraction must be in [0, 1)")
    if not 0.0 <= sparse_share <= 1.0:
        raise PlacementError("--sparse-share must be in [0, 1]")
    mixers = tuple(mixers)
    existing = read_evaluations(out, num_layers, allow_empty=True)
    if probe is not None and existing.rows:
        check_compatible(existing.rows, probe, out)
    ours = [p for p in existing.placements if all(m in mixers for m in p)]
    measured = {tuple(r) for r in encode(ours, mixers, num_layers)} if ours else set()
    count, new = len(existing), 0
    if count >= n_total:
        log(f"{out} already holds {count} evaluations (>= --n {n_total}); nothing to do")
        return 0
    rng = np.random.default_rng([seed, count])
    n_active = int(round(active_fraction * n_total)) if costs is not None else 0

    def measure(rows: np.ndarray, kinds: list[str], desc: str) -> None:
        nonlocal count, new
        bar = tqdm(list(zip(rows, kinds)), desc=desc, disable=not progress)
        for row, kind in bar:
            placement = Placement(tuple(mixers[int(v)] for v in row))
            result = evaluate(placement)
            result = {"placement": placement.to_list(), **{k: v for k, v in result.items() if k != "placement"},
                      "design": kind}
            if new == 0 and existing.rows:
                check_compatible(existing.rows, result, out)
            append_evaluation(out, result)
            measured.add(tuple(int(v) for v in row))
            count += 1
            new += 1
            bar.set_postfix(quality=f"{result['quality']:.4f}")

    base = initial_design(max(0, n_total - n_active - count), num_layers, len(mixers), rng, measured,
                          reference=mixers.index("fa") if "fa" in mixers else 0,
                          sparse_share=_sparse_left(sparse_share, n_total, existing.rows)
                          / max(1, n_total - n_active - count))
    if len(base):
        measure(np.stack(base.rows), base.kinds, "placements")
    for r in range(rounds if n_active else 0):
        remaining = n_total - count
        if remaining <= 0:
            break
        data = read_evaluations(out, num_layers)
        keep = [k for k, p in enumerate(data.placements) if all(m in mixers for m in p)]
        surrogate = fit_surrogate([data.placements[k] for k in keep], data.quality[keep], pairs=pairs,
                                  mixers=mixers, seed=seed)
        proposal = propose_active(surrogate, costs, math.ceil(remaining / (rounds - r)), rng, measured)
        if not len(proposal):
            break
        measure(np.stack(proposal.rows), proposal.kinds, f"active round {r + 1}/{rounds}")
    return new
