"""`SupernetDecoderLayer`: shared norms and MLP around a `ModuleDict` of four mixers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from supernet.cache import SupernetCache
from supernet.config import SupernetConfig
from supernet.mixers import build_mixers
from supernet.ops.activations import silu_mul
from supernet.ops.norm import RMSNorm
from supernet.layout import MIXERS


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def _gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gemma's gelu_pytorch_tanh(gate) * up (PyTorch's tanh approximation of GELU)."""
    return F.gelu(gate, approximate="tanh") * up


class MLP(nn.Module):
    """The teacher's gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, config: SupernetConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        if config.hidden_act in ("silu", "swish"):
            self.act_mul = silu_mul
        elif config.hidden_act in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act_mul = _gelu_tanh_mul
        else:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_mul(self.gate_proj(x), self.up_proj(x)))


class SupernetDecoderLayer(nn.Module):
    """Residual mixer branch, then residual MLP branch, normalised as `config.norm_layout` says.

    The norms keep the teacher's names. "pre": `input_layernorm` before the mixer,
    `post_attention_layernorm` before the MLP (Llama's naming). "sandwich" (Gemma 3): also
    `post_attention_layernorm` on the mixer's output, `pre_feedforward_layernorm` before the MLP and
    `post_feedforward_layernorm` on its output. "post" (OLMo 2): `post_attention_layernorm` on the
    mixer's output and `post_feedforward_layernorm` on the MLP's; the mixer reads the raw residual
    stream, so `input_layernorm` is an identity there (callers can still run
    `finish(h, mixer(input_layernorm(h)))` for any layout).
    """

    def __init__(self, config: SupernetConfig, layer_idx: int, mixers: tuple[str, ...] = MIXERS) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.norm_layout = config.norm_layout
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = nn.Identity() if self.norm_layout == "post" else RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        if self.norm_layout == "sandwich":
            self.pre_feedforward_layernorm = RMSNorm(d, eps)
        if self.norm_layout in ("sandwich", "post"):
            self.post_feedforward_layernorm = RMSNorm(d, eps)
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
        if self.norm_layout == "pre":
            normed, h = self.post_attention_layernorm.add_and_norm(mixed, hidden_states)
            return h + self.mlp(normed)
        if self.norm_layout == "sandwich":
            normed, h = self.pre_feedforward_layernorm.add_and_norm(self.post_attention_layernorm(mixed), hidden_states)
            return h + self.post_feedforward_layernorm(self.mlp(normed))
        h = hidden_states + self.post_attention_layernorm(mixed)
        return h + self.post_feedforward_layernorm(self.mlp(h))
