"""The gated MLP's activation, silu(gate) * up: one fused kernel on CUDA at inference (fla's swiglu)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from supernet.ops.fla_backend import fla_function, use_fla


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32 inside the fused kernel, in the inputs' dtype."""
    if use_fla(gate, inference_only=True) and gate.dtype == up.dtype:
        fused = fla_function("modules.activations", "swiglu")
        if fused is not None:
            return fused(gate, up)
    return F.silu(gate) * up
