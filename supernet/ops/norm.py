"""RMSNorm, computed in float32 whatever the input dtype (as in the Llama teacher).

The torch path is the reference (and the CPU path). On CUDA at inference, fla's fused kernel does
the norm in one pass and can add the residual in the same pass (`add_rms_norm`): a decoder layer's
two norms and one residual add go from ~17 small kernels to 2.
"""
from __future__ import annotations

import torch
from torch import nn

from supernet.ops.fla_backend import fla_function, use_fla


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)), the division in float32, as the teacher computes it."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _fused_norm(x: torch.Tensor):
    """fla's `rms_norm` when the fused path applies to `x` and fla is importable, else None."""
    if not use_fla(x, inference_only=True):
        return None
    return fla_function("modules.norm.layernorm", "rms_norm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fused = _fused_norm(x)
    if fused is not None:
        return fused(x, weight.to(x.dtype), None, eps=eps)
    return torch_rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): the pre-norm step after a residual branch."""
    fused = _fused_norm(x)
    if fused is not None and residual.dtype == x.dtype:
        normed, summed = fused(x, weight.to(x.dtype), None, residual=residual, eps=eps, prenorm=True)
        return normed, summed
    summed = residual + x
    return torch_rms_norm(summed, weight, eps), summed


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x)."""
        return add_rms_norm(x, residual, self.weight, self.eps)
