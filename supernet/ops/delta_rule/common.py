"""What every delta-rule path shares: the layout checks, the L2 norm and the raw-gate formula."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the same formula as fla's in-kernel L2 norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def gate_decay(g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Log decay -exp(A_log) * softplus(g + dt_bias) in fp32, from a raw gate input.

    GDN: g [..., HV], A_log and dt_bias [HV]. KDA: g [..., HV, K], A_log [HV] (one rate per head),
    dt_bias [HV * K]. The same formula as fla's in-kernel gate (`use_gate_in_kernel`).
    """
    per_channel = g.dim() == 4
    x = g.float().flatten(-2) if per_channel else g.float()  # KDA: [..., HV * K], dt_bias's layout
    if dt_bias is not None:
        x = x + dt_bias.float()
    A = A_log.float().exp()
    if per_channel:
        A = A.repeat_interleave(g.shape[-1])  # A_log[h] for every channel of head h
    return (-A * F.softplus(x)).view(g.shape)


def _check_gate(g: torch.Tensor, A_log: torch.Tensor | None, dt_bias: torch.Tensor | None) -> None:
    if A_log is None:
        if dt_bias is not None:
            raise ValueError("dt_bias is only used with A_log (a raw gate input)")
        return
    heads = g.shape[2]
    if A_log.numel() != heads:
        raise ValueError(f"A_log must have one value per value head ({heads}); got {list(A_log.shape)}")
    per_channel = heads * g.shape[3] if g.dim() == 4 else heads
    if dt_bias is not None and dt_bias.numel() != per_channel:
        raise ValueError(f"dt_bias must have {per_channel} values for g of shape {list(g.shape)}; "
                         f"got {list(dt_bias.shape)}")


def _check_shapes(q, k, v, g, beta) -> tuple[int, int, int, int, int, int]:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must be [B, T, HV, V] with B={B}, T={T}; got {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        raise ValueError(f"value heads HV={HV} must be a multiple of q/k heads H={H}")
    if beta.shape != (B, T, HV):
        raise ValueError(f"beta must be [B, T, HV]={[B, T, HV]}; got {list(beta.shape)}")
    if g.shape not in ((B, T, HV), (B, T, HV, K)):
        raise ValueError(f"g must be [B, T, HV] (GDN) or [B, T, HV, K] (KDA); got {list(g.shape)}")
    return B, T, H, K, HV, V


def _expand_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H, K] -> [B, T, HV, K]: each q/k head serves HV // H consecutive value heads (GVA)."""
    groups = num_heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _initial_state(initial_state, B, HV, K, V, device) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(B, HV, K, V, dtype=torch.float32, device=device)
    if initial_state.shape != (B, HV, K, V):
        raise ValueError(f"initial_state must be [B, HV, K, V]={[B, HV, K, V]}; got {list(initial_state.shape)}")
    return initial_state.float()
