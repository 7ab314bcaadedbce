"""`SupernetDecoderLayer`: shared norms and MLP around a `ModuleDict` of four mixers."""
from __future__ import annotations

import torch
from torch import nn

from supernet.cache import SupernetCache
from supernet.config import SupernetConfig
from supernet.mixers import build_mixers
from supernet.ops.activations import silu_mul
from supernet.ops.norm import RMSNorm
from supernet.layout import MIXERS


class MLP(nn.Module):
    """The teacher's gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: SupernetConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; supported: silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class SupernetDecoderLayer(nn.Module):
    def __init__(self, config: SupernetConfig, layer_idx: int, mixers: tuple[str, ...] = MIXERS) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.mixers = build_mixers(config, layer_idx, mixers)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mixer: str,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        cache: SupernetCache | None = None,
    ) -> torch.Tensor:
        if mixer not in self.mixers:
            raise ValueError(
                f"layer {self.layer_idx} has no {mixer!r} mixer (this model holds {', '.join(self.mixers)})"
            )
        mixed = self.mixers[mixer](self.input_layernorm(hidden_states), position_embeddings, cache)
        return self.finish(hidden_states, mixed)

    def finish(self, hidden_states: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The shared part after the mixer: residual add + norm (one fused kernel on CUDA), MLP, residual add."""
        normed, h = self.post_attention_layernorm.add_and_norm(mixed, hidden_states)
        return h + self.mlp(normed)
