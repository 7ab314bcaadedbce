"""Depthwise causal short convolution + SiLU, the local mixing step in front of GDN/KDA's q, k, v.

A decode step only needs the last `W - 1` inputs of the channel, so continuing a sequence is the
same convolution run over `[tail, new inputs]`; the new tail is returned for the next call. This
makes "prefill all at once", "prefill in pieces" and "one token at a time" give identical outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    tail: torch.Tensor | None = None,
    return_tail: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SiLU(depthwise causal conv(x)).

    Args:
        x: [B, T, C] inputs.
        weight: [C, 1, W] (an `nn.Conv1d(C, C, W, groups=C)` weight) or [C, W].
        tail: [B, C, W-1], the inputs that preceded `x` (None = a fresh sequence, i.e. zeros).
        return_tail: also return the last W-1 inputs (the tail for the next call).

    Returns:
        (y [B, T, C], new tail [B, C, W-1] or None).
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    channels, width = weight.shape
    batch, length, _ = x.shape
    if x.shape[-1] != channels:
        raise ValueError(f"causal_conv1d_silu: x has {x.shape[-1]} channels, weight has {channels}")
    xt = x.transpose(1, 2)  # [B, C, T]
    if tail is None:
        tail = xt.new_zeros(batch, channels, width - 1)
    full = torch.cat([tail.to(xt.dtype), xt], dim=-1)  # [B, C, W-1+T]
    w = weight.to(xt.dtype)
    if length == 1:
        # decode: one dot product per channel; avoids conv1d's setup cost
        y = (full * w.unsqueeze(0)).sum(-1, keepdim=True)
    else:
        y = F.conv1d(full, w.unsqueeze(1), groups=channels)
    y = F.silu(y).transpose(1, 2)
    new_tail = full[..., full.shape[-1] - (width - 1):].contiguous() if return_tail else None
    return y, new_tail
