"""The four token mixers. Each module owns its projections, decode cache and kernel choice."""
from __future__ import annotations

from torch import nn

from supernet.config import SupernetConfig
from supernet.layout import MIXERS


def mixer_class(name: str) -> type[nn.Module]:
    """The class implementing mixer `name` (imported lazily: the linear mixers pull in more code)."""
    if name == "fa":
        from supernet.mixers.attention import AttentionMixer

        return AttentionMixer
    if name == "swa":
        from supernet.mixers.attention import SlidingWindowAttentionMixer

        return SlidingWindowAttentionMixer
    if name == "gdn":
        from supernet.mixers.gdn import GatedDeltaNetMixer

        return GatedDeltaNetMixer
    if name == "kda":
        from supernet.mixers.kda import KimiDeltaAttentionMixer

        return KimiDeltaAttentionMixer
    raise ValueError(f"unknown mixer {name!r}; choose one of {', '.join(MIXERS)}")


def build_mixers(config: SupernetConfig, layer_idx: int, names: tuple[str, ...] = MIXERS) -> nn.ModuleDict:
    return nn.ModuleDict({name: mixer_class(name)(config, layer_idx) for name in names})
