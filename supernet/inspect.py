"""Summaries of a supernet: parameters per mixer and shared, presets — what `supernet info` prints."""
from __future__ import annotations

from dataclasses import dataclass

from supernet.model import SupernetForCausalLM
from supernet.layout import MIXERS


@dataclass
class ParameterCounts:
    shared: int
    per_mixer: dict[str, int]  # summed over layers
    num_layers: int = 1

    @property
    def total(self) -> int:
        return self.shared + sum(self.per_mixer.values())

    def placement_total(self, placement) -> int:
        """Parameters a single placement actually uses."""
        per_layer = {m: n // max(1, self.num_layers) for m, n in self.per_mixer.items()}
        return self.shared + sum(per_layer[m] for m in placement)


def count_parameters(model: SupernetForCausalLM) -> ParameterCounts:
    seen: set[int] = set()
    per_mixer = {m: 0 for m in MIXERS}
    shared = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        if "mixers" in parts:
            per_mixer[parts[parts.index("mixers") + 1]] += p.numel()
        else:
            shared += p.numel()
    return ParameterCounts(shared=shared, per_mixer=per_mixer, num_layers=model.config.num_hidden_layers)
