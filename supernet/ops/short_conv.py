"""Depthwise causal short convolution + SiLU, the local mixing step in front of GDN/KDA's q, k, v.

A decode step only needs the last `W - 1` inputs of the channel, so continuing a sequence is the
same convolution run over `[tail, new inputs]`; the new tail is returned for the next call. This
makes "prefill all at once", "prefill in pieces" and "one token at a time" give identical outputs.

Two implementations behind `causal_conv1d_silu`:
- torch (`torch_causal_conv1d_silu`): cat + conv1d + SiLU; the reference, and the path on the CPU,
  under torch.compile (inductor fuses it into the layer's graph), in training and without fla.
- fla's fused Triton kernels for CUDA inference (policy and off switch: supernet.ops.fla_backend):
  one kernel for conv + SiLU, and for a decode step one kernel that also shifts the cache in place.

Tail format (the decode state other code reads): [B, C, W-1], the last W-1 inputs, oldest first.
fla keeps a [B, C, W] cache whose first column is never read; its last W-1 columns are our tail, so
the fla path returns the tail as the view `cache[..., 1:]` (`fla_cache_to_tail`). A tail made that
way is recognised on the next call (`_fla_cache_of`) and its cache is updated in place:
a decode step then costs one kernel and the state tensor stays the same object, which is what a
CUDA graph replay needs. Any other tail (contiguous, e.g. from the torch path or a clone) is
padded to a fresh cache first (`tail_to_fla_cache`) and is left untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from supernet.ops.fla_backend import fla_function, use_fla


def torch_causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None, return_tail: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pure-torch path; `weight` is [C, W]. Same contract as `causal_conv1d_silu`."""
    channels, width = weight.shape
    batch, length, _ = x.shape
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


def tails_after_each_token(tail: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The tail after each of the T inputs x [B, T, C], continuing `tail` [B, C, W-1]: [B, T, C, W-1].

    Speculative decoding keeps these so that any prefix of a step's tokens can be committed exactly.
    """
    width_1 = tail.shape[-1]
    full = torch.cat([tail.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, W-1+T]
    return full.unfold(-1, width_1, 1)[:, :, 1:].permute(0, 2, 1, 3)


# --------------------------------------------------------------------------------------------
# fla's Triton kernels


_FLA_MODULE = "modules.causal_conv1d"


def tail_to_fla_cache(tail: torch.Tensor) -> torch.Tensor:
    """[B, C, W-1] tail -> a new contiguous [B, C, W] fla cache (the unused first column zero)."""
    return F.pad(tail, (1, 0))


# A tail made by `fla_cache_to_tail` carries its cache under this attribute (views made in inference
# mode do not record their base, so the tail cannot find it otherwise).
_CACHE_ATTR = "_fla_conv_cache"


def fla_cache_to_tail(cache: torch.Tensor) -> torch.Tensor:
    """[B, C, W] fla cache -> the [B, C, W-1] tail, as a view (no copy) that remembers its cache."""
    tail = cache[..., 1:]
    setattr(tail, _CACHE_ATTR, cache)
    return tail


def _fla_cache_of(tail: torch.Tensor) -> torch.Tensor | None:
    """The contiguous [B, C, W] cache whose `[..., 1:]` view `tail` is, or None.

    Only a tail made by `fla_cache_to_tail` is updated in place (clones and index selections of it
    are new tensors without the reference); the layout checks make sure that the extra column
    fla's update kernel writes belongs to that cache.
    """
    cache = getattr(tail, _CACHE_ATTR, None)
    if cache is None or not cache.is_contiguous() or cache.dtype != tail.dtype:
        return None
    B, C, tail_len = tail.shape
    if tuple(cache.shape) != (B, C, tail_len + 1) or tail.stride() != cache.stride():
        return None
    return cache if tail.data_ptr() == cache.data_ptr() + cache.element_size() else None


def _use_fla(x: torch.Tensor, width: int) -> bool:
    """fla for CUDA inference in eager mode (under torch.compile the torch path keeps the layer one
    graph; in training the torch path's backward is the validated one)."""
    return (use_fla(x, inference_only=True) and width >= 2 and x.numel() > 0
            and fla_function(_FLA_MODULE, "causal_conv1d_update") is not None)


# Kept out of torch.compile (never reached while compiling; see `_use_fla`): fla's wrappers pick
# kernels and autotune in Python.
@torch.compiler.disable
def fla_causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None, return_tail: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's fused path; `weight` is [C, W]. Same contract as `causal_conv1d_silu`.

    Decode (one token, no autograd, tail kept): `causal_conv1d_update` shifts the cache in place.
    Otherwise `causal_conv1d` (autograd-capable) from the tail as initial state.
    """
    weight = weight.contiguous()
    cache = None if tail is None else _fla_cache_of(tail)
    in_place = cache is not None
    if tail is not None and cache is None:
        cache = tail_to_fla_cache(tail.to(x.dtype))
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.shape[1] == 1 and return_tail and not needs_grad:
        if cache is None:
            cache = x.new_zeros(x.shape[0], weight.shape[0], weight.shape[1])
        update = fla_function(_FLA_MODULE, "causal_conv1d_update")
        y, cache = update(x=x, cache=cache, weight=weight, activation="silu")
        return y, (tail if in_place else fla_cache_to_tail(cache))
    y, final = fla_function(_FLA_MODULE, "causal_conv1d")(
        x=x, weight=weight, initial_state=cache, output_final_state=return_tail, activation="silu"
    )
    return y, (fla_cache_to_tail(final) if return_tail else None)


# --------------------------------------------------------------------------------------------
# dispatch


def causal_conv1d_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    tail: torch.Tensor | None = None,
    return_tail: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SiLU(depthwise causal conv(x)), with fla's fused kernels for CUDA inference.

    Args:
        x: [B, T, C] inputs.
        weight: [C, 1, W] (an `nn.Conv1d(C, C, W, groups=C)` weight) or [C, W].
        tail: [B, C, W-1], the inputs that preceded `x` (None = a fresh sequence, i.e. zeros).
            On CUDA a tail this function returned may be updated in place by the next call.
        return_tail: also return the last W-1 inputs (the tail for the next call).

    Returns:
        (y [B, T, C], new tail [B, C, W-1] or None).
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    channels, width = weight.shape
    if x.shape[-1] != channels:
        raise ValueError(f"causal_conv1d_silu: x has {x.shape[-1]} channels, weight has {channels}")
    if _use_fla(x, width):
        return fla_causal_conv1d_silu(x, weight, tail, return_tail)
    return torch_causal_conv1d_silu(x, weight, tail, return_tail)
