"""The four token mixers. Each module owns its projections, decode cache and kernel choice.

What each mixer is (its class, sizes, state, costs, serving layer) is declared once, in
supernet.mixers.registry; this package imports torch only when a mixer is built.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from supernet.layout import MIXERS
from supernet.mixers.registry import REGISTRY, spec

if TYPE_CHECKING:
    from torch import nn

    from supernet.config import SupernetConfig


def mixer_class(name: str) -> "type[nn.Module]":
    """The class implementing mixer `name`, from the registry (imported lazily)."""
    return spec(name).module_class()


def build_mixers(config: "SupernetConfig", layer_idx: int, names: tuple[str, ...] = MIXERS) -> "nn.ModuleDict":
    from torch import nn

    return nn.ModuleDict({name: mixer_class(name)(config, layer_idx) for name in names})


__all__ = ["MIXERS", "REGISTRY", "build_mixers", "mixer_class", "spec"]
