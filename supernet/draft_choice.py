"""Choosing the draft: measured acceptance per draft preset, the cost model's speedup per (draft, k).

`measure_acceptance` runs greedy speculative decoding on held-out prompts and returns each draft's
per-token acceptance alpha; `choose_draft` ranks every (draft, k) with
supernet/placement/speculative_cost.py at a batch and context and returns the best, or None when no
draft is predicted to beat the target alone. presets.json may record the measured acceptances
(`record_acceptance`, read back by `recorded_acceptance`) under each target preset's "drafts" key,
so `supernet generate --draft-preset auto` needs no measurement.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from supernet.layout import Placement, PlacementLike
from supernet.placement.cost import CostTable, analytic_costs
from supernet.placement.speculative_cost import Prediction, rank
from supernet.speculative import speculative_generate


def candidate_drafts(model, target: PlacementLike) -> dict[str, Placement]:
    """The checkpoint's presets (and all-fa) that differ from the target."""
    t = model.config.resolve(target)
    layers = model.config.num_hidden_layers
    out = {"all-fa": Placement.uniform("fa", layers), **model.presets}
    return {name: p for name, p in out.items() if tuple(p) != tuple(t)}


@torch.no_grad()
def measure_acceptance(model, prompts: torch.Tensor, target: PlacementLike, drafts: dict[str, Placement],
                       k: int = 4, new_tokens: int = 32) -> dict[str, dict[str, float]]:
    """Greedy speculative decoding of `prompts` [B, T] per draft; alpha and the raw counts."""
    out = {}
    for name, draft in drafts.items():
        _, stats = speculative_generate(model, prompts, draft, target, k=k, max_new_tokens=new_tokens)
        out[name] = {"alpha": stats.per_token_acceptance, "acceptance_rate": stats.acceptance_rate,
                     "tokens_per_round": stats.tokens_per_round, "k": k, "drafted": stats.drafted,
                     "row_alphas": stats.row_alphas}
    return out


def choose_draft(model, target: PlacementLike, alphas: dict[str, float], *, batch: int, context: int,
                 table: CostTable | None = None, ks=range(1, 9), token_fraction: float | None = None,
                 new_tokens: int | None = None,
                 row_alphas: dict[str, list[float]] | None = None) -> tuple[Prediction | None, list[Prediction]]:
    """(best prediction or None if nothing beats the target alone, every prediction ranked).

    Without a `table` the analytic decode costs at (batch, context) are used (memory-bound GPU
    decoding, see placement/cost.py). With `batch` > 1 and `new_tokens` (per row), a round's yield is
    what the slowest of the rows sets (`speculative_cost.expected_rounds`), not one row's E(k): a
    larger k then gains less, since the rows drift further apart. `row_alphas` (name -> per-row
    alphas measured on held-out prompts) lets rows differ in acceptance as those prompts did."""
    t = model.config.resolve(target)
    table = table or analytic_costs(model.config, context, batch)
    drafts = {name: (model.config.resolve(name), a) for name, a in alphas.items()
              if tuple(model.config.resolve(name)) != tuple(t)}
    slowest_row = dict(batch=batch, new_tokens=new_tokens, row_alphas=row_alphas) if batch > 1 and new_tokens else {}
    ranked = rank(table, t, drafts, ks, config=model.config, token_fraction=token_fraction, **slowest_row)
    best = ranked[0] if ranked and ranked[0].speedup > 1.0 else None
    return best, ranked


def _entries(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def record_acceptance(presets_path: str | Path, target: str, acceptance: dict[str, dict[str, float]],
                      source: str) -> None:
    """Store the measured acceptances under the target preset's entry in presets.json."""
    from supernet.io_utils import atomic_write_text

    path = Path(presets_path)
    data = _entries(path)
    for entry in data.get("presets", []):
        if entry.get("name") == target:
            entry["drafts"] = {name: {**values, "measured_on": source} for name, values in acceptance.items()}
            break
    else:
        raise ValueError(f"{path} has no preset named {target!r}")
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def recorded_acceptance(presets_path: str | Path, target: str) -> dict[str, float]:
    """draft name -> alpha recorded for `target` in presets.json ({} when none)."""
    return {name: float(v["alpha"]) for name, v in _recorded_drafts(presets_path, target).items()}


def recorded_row_alphas(presets_path: str | Path, target: str) -> dict[str, list[float]]:
    """draft name -> the per-row alphas recorded for `target` (drafts recorded without them are left out)."""
    return {name: [float(a) for a in v["row_alphas"]] for name, v in _recorded_drafts(presets_path, target).items()
            if v.get("row_alphas")}


def _recorded_drafts(presets_path: str | Path, target: str) -> dict[str, dict]:
    for entry in _entries(Path(presets_path)).get("presets", []):
        if entry.get("name") == target:
            return entry.get("drafts", {})
    return {}
