"""Gated RMSNorm on the per-head output of a linear mixer: rmsnorm(o) * weight * act(gate).

Computed in fp32 because the readout of a long recurrence can be tiny or large; the norm rescales
it to unit RMS per head so `o_proj` sees a stable magnitude whatever the state did.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "silu"
) -> torch.Tensor:
    """rmsnorm over the last dim of `x`, times `weight`, times `activation(gate)`; output in x.dtype."""
    act = _ACTIVATIONS[activation]
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float() * act(gate.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Holds the norm weight (checkpoint key `o_norm.weight`, shape [head_dim])."""

    def __init__(self, dim: int, eps: float = 1e-5, activation: str = "silu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"GatedRMSNorm: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.activation = activation

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps, self.activation)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, activation={self.activation}"
