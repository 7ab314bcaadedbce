"""Placement sampling for stage 1: which mixer each layer runs at a given optimizer step.

Every rank must run the same placement at the same step (FSDP/DDP gradients are averaged over
ranks), and a resumed run must draw the same sequence. So the sampler is a seeded numpy
Generator whose state is saved in checkpoints, and it is advanced exactly once per optimizer step
on every rank; no communication is needed.

Strategies:
* uniform: each layer independently picks one of `mixers` with equal probability (the default:
  every mixer of every layer is trained about equally often).
* weighted: each layer picks mixer m with probability weight[m] / sum(weights).
* presets: with probability `preset_prob` the step instead uses one of a list of target placements
  (e.g. the all-gdn model, or presets from a previous `placement optimize`), chosen uniformly, so
  the placements that will actually be served get extra training.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from supernet.layout import MIXERS, Placement, load_presets


class PlacementSampler:
    def __init__(
        self,
        num_layers: int,
        mixers: Sequence[str] = MIXERS,
        strategy: str = "uniform",
        weights: dict[str, float] | None = None,
        presets: Sequence[Placement] = (),
        preset_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        if strategy not in ("uniform", "weighted"):
            raise ValueError(f"unknown sampling strategy {strategy!r}; choose uniform or weighted")
        self.num_layers = num_layers
        self.mixers = list(mixers)
        self.strategy = strategy
        if strategy == "weighted":
            w = np.array([float((weights or {}).get(m, 0.0)) for m in self.mixers])
            if (w < 0).any() or w.sum() <= 0:
                raise ValueError("sampling.weights must be non-negative with a positive sum over sampling.mixers")
            self.probs = w / w.sum()
        else:
            self.probs = np.full(len(self.mixers), 1.0 / len(self.mixers))
        self.presets = list(presets)
        self.preset_prob = preset_prob if self.presets else 0.0
        self.rng = np.random.default_rng(seed)

    def sample(self) -> Placement:
        """Draw the next placement (advances the state by a fixed amount of randomness)."""
        u = self.rng.random()
        layer_draw = self.rng.choice(len(self.mixers), size=self.num_layers, p=self.probs)
        preset_draw = int(self.rng.integers(0, max(1, len(self.presets))))
        if self.presets and u < self.preset_prob:
            return self.presets[preset_draw]
        return Placement(tuple(self.mixers[i] for i in layer_draw))

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": copy.deepcopy(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]


def resolve_placements(items: Sequence[Any], num_layers: int, named: dict[str, Placement] | None = None) -> list[Placement]:
    """Config entries (`all-gdn`, `"fa,gdn,..."`, lists, or preset names) -> Placements."""
    out = []
    for item in items:
        if isinstance(item, str) and named and item in named:
            out.append(named[item])
        else:
            out.append(Placement.parse(item, num_layers))
    return out


def build_sampler(cfg: Any, num_layers: int, seed: int, model_presets: dict[str, list[str]] | None = None) -> PlacementSampler:
    """From a `SamplingConfig`; preset names may refer to the checkpoint's presets or a presets file."""
    named = {k: Placement.parse(v, num_layers) for k, v in (model_presets or {}).items()}
    presets = resolve_placements(cfg.presets, num_layers, named)
    if cfg.presets_file:
        presets += list(load_presets(Path(cfg.presets_file), num_layers).values())
    return PlacementSampler(num_layers, cfg.mixers, cfg.strategy, cfg.weights, presets, cfg.preset_prob, seed)
