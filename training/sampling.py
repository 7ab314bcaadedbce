"""Placement sampling for stage 1: which mixer each layer runs at a given optimizer step.

Every rank must run the same placement at the same step (FSDP/DDP gradients are averaged over
ranks), and a resumed run must draw the same sequence. So the sampler is a seeded numpy
Generator whose state is saved in checkpoints, and it is advanced exactly once per optimizer step
on every rank; no communication is needed.

Strategies:
* uniform: each layer independently picks one of `mixers` with equal probability (the default:
  every mixer of every layer is trained about equally often).
* weighted: each layer picks mixer m with probability weight[m] / sum(weights).
* full_layout: the counts of layers per mixer are drawn first, every split (c_1 + ... + c_M = L,
  c_i >= 0) equally likely, then the layers are arranged in a uniformly random order. Uniform
  sampling concentrates on balanced layouts (all-gdn has probability 4^-L); this gives all-gdn
  the same chance as any other split, so the extreme, fast placements get trained too.
* targeted: with probability `preset_prob` one of `presets` (e.g. a presets.json), else `base`
  (uniform, weighted or full_layout). The same rule as the preset option below, named.
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

STRATEGIES = ("uniform", "weighted", "full_layout", "targeted")


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
        base: str = "uniform",
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sampling strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if strategy == "targeted":
            if base not in ("uniform", "weighted", "full_layout"):
                raise ValueError(f"targeted sampling needs a base strategy uniform, weighted or full_layout, not {base!r}")
            if not presets or preset_prob <= 0:
                raise ValueError("targeted sampling needs presets and preset_prob > 0")
            strategy = base
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
        if self.strategy == "full_layout":
            layer_draw = self._full_layout_draw()
        else:
            layer_draw = self.rng.choice(len(self.mixers), size=self.num_layers, p=self.probs)
        preset_draw = int(self.rng.integers(0, max(1, len(self.presets))))
        if self.presets and u < self.preset_prob:
            return self.presets[preset_draw]
        return Placement(tuple(self.mixers[i] for i in layer_draw))

    def _full_layout_draw(self):
        """Stars and bars: M - 1 bar positions among L + M - 1 slots, uniformly without
        replacement, give each split of L layers into M counts with equal probability; then a
        uniform permutation places them. Fixed randomness per call (resume draws the same)."""
        L, M = self.num_layers, len(self.mixers)
        bars = np.sort(self.rng.choice(L + M - 1, size=M - 1, replace=False)) if M > 1 else np.array([], int)
        edges = np.concatenate([[-1], bars, [L + M - 1]])
        counts = np.diff(edges) - 1
        layout = np.repeat(np.arange(M), counts)
        return self.rng.permutation(layout)

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
    from_file = dict(load_presets(Path(cfg.presets_file), num_layers)) if cfg.presets_file else {}
    presets = resolve_placements(cfg.presets, num_layers, {**named, **from_file})
    # the whole file joins, unless `presets` names some of its entries: then only those (targeted SFT
    # on a few chosen presets)
    if from_file and not any(isinstance(p, str) and p in from_file for p in cfg.presets):
        presets += list(from_file.values())
    return PlacementSampler(num_layers, cfg.mixers, cfg.strategy, cfg.weights, presets, cfg.preset_prob, seed,
                            getattr(cfg, "base", "uniform"))
