"""Gated RMSNorm on the per-head output of a linear mixer: rmsnorm(o) * weight * act(gate).

Computed in fp32 because the readout of a long recurrence can be tiny or large; the norm rescales
it to unit RMS per head so `o_proj` sees a stable magnitude whatever the state did.

For CUDA inference (policy and off switch: supernet.ops.fla_backend) fla's fused Triton kernel does
it in one pass (fp32 inside, like the torch path); the torch path is the reference and runs on the
CPU, under torch.compile (inductor fuses it into the layer's graph), in training and without fla.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from supernet.ops.fla_backend import fla_function, use_fla

_ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}


def torch_gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "silu"
) -> torch.Tensor:
    """The pure-torch path; same contract as `gated_rms_norm`."""
    act = _ACTIVATIONS[activation]
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float() * act(gate.float())).to(x.dtype)


def _fla_norm():
    """fla's `rms_norm_gated`, or None when fla (or triton) is not importable."""
    return fla_function("modules.norm.fused_norm_gate", "rms_norm_gated")


def _use_fla(x: torch.Tensor) -> bool:
    """fla for CUDA inference in eager mode (under torch.compile the torch path keeps the layer one
    graph; in training the torch path's backward is the validated one)."""
    return use_fla(x, inference_only=True) and x.numel() > 0 and _fla_norm() is not None


@torch.compiler.disable
def fla_gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "silu"
) -> torch.Tensor:
    """fla's fused kernel (autograd-capable); same contract as `gated_rms_norm`."""
    return _fla_norm()(x, gate, weight, None, activation=activation, eps=eps)


def gated_rms_norm(
    x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "silu"
) -> torch.Tensor:
    """rmsnorm over the last dim of `x`, times `weight`, times `activation(gate)`; output in x.dtype."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"gated_rms_norm: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    if _use_fla(x):
        return fla_gated_rms_norm(x, gate, weight, eps, activation)
    return torch_gated_rms_norm(x, gate, weight, eps, activation)


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
