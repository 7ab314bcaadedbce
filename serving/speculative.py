"""Serving's side of self-speculative decoding: cache snapshots for the vLLM drafter, one-row helpers.

- `snapshot` / `restore`: `supernet.serving.drafter.SupernetDrafter` (vLLM verifies, our drafter
  proposes) keeps its own SupernetCache per request and undoes rejected drafts with these: FA
  lengths are cut back, every other state is cloned and put back.
- `greedy_generate` / `speculative_generate`: one-row conveniences (token lists in and out) over the
  library engines in supernet/generation.py, which own greedy generation (eager, static, and the
  batched draft-and-verify engine of supernet/speculative.py).
"""
from __future__ import annotations

from typing import Any

import torch

from supernet import generation
from supernet.cache import SupernetCache
from supernet.layout import PlacementLike
from supernet.speculative import SpecStats


# -- cache snapshots ------------------------------------------------------------------------------
def snapshot(cache: SupernetCache) -> tuple[int, list[dict[str, Any]]]:
    """What `restore` needs to undo any later tokens: FA lengths, copies of all other states."""
    layers = []
    for layer in cache.states:
        saved = {}
        for mixer, state in layer.items():
            if mixer == "fa" and "len" in state:
                saved[mixer] = ("len", state["len"])
            else:
                saved[mixer] = ("copy", {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
        layers.append(saved)
    return cache.seen_tokens, layers


def restore(cache: SupernetCache, snap: tuple[int, list[dict[str, Any]]]) -> None:
    seen, layers = snap
    cache.seen_tokens = seen
    for i, saved in enumerate(layers):
        for mixer in list(cache.states[i]):
            if mixer not in saved:
                del cache.states[i][mixer]
        for mixer, (kind, value) in saved.items():
            if kind == "len":
                cache.states[i][mixer]["len"] = value
            else:
                cache.states[i][mixer] = dict(value)


# -- one-row helpers ------------------------------------------------------------------------------
def _one_row(input_ids: torch.Tensor, name: str) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"{name} takes one sequence, input_ids [1, T]; got {tuple(input_ids.shape)} "
                         "(supernet.generation takes batches)")


def greedy_generate(model, input_ids: torch.Tensor, placement: PlacementLike, max_new_tokens: int,
                    eos_token_id: int | None = None) -> list[int]:
    """The placement's greedy continuation of one sequence (eager cached decoding)."""
    _one_row(input_ids, "greedy_generate")
    return generation.greedy_generate(model, input_ids, placement, max_new_tokens, eos_token_id, static=False)[0]


def speculative_generate(model, input_ids: torch.Tensor, draft_placement: PlacementLike,
                         target_placement: PlacementLike, k: int = 4, max_new_tokens: int = 64,
                         eos_token_id: int | None = None) -> tuple[list[int], SpecStats]:
    """Greedy self-speculative decoding of one sequence: the target's own greedy continuation."""
    _one_row(input_ids, "speculative_generate")
    rows, stats = generation.speculative_generate(model, input_ids, draft_placement, target_placement, k,
                                                  max_new_tokens, eos_token_id)
    return rows[0], stats
