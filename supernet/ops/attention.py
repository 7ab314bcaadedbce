"""Causal (optionally windowed) GQA attention behind one function, so mixers never branch on the device.

Convention: the `Tq` queries are the last `Tq` positions of the `Tk` keys (keys may start later than
position 0 when a sliding-window cache was trimmed). Query i may see key j when j <= i (causal) and,
with a window W, i - j < W (itself plus W-1 earlier tokens).

Kernels: flash-attn on CUDA when installed; else FlexAttention on CUDA for windowed prefill; else
torch SDPA (which also runs on the CPU).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _load_flash_attn():
    try:
        from flash_attn import flash_attn_func  # type: ignore

        return flash_attn_func
    except Exception:
        return None


# Resolved once at import: a lookup inside the forward would be traced by torch.compile, and a failed
# import there is a graph break in every attention layer.
FLASH_ATTN_FUNC = _load_flash_attn()


def _window_mask(tq: int, tk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [Tq, Tk] mask, True where attention is allowed."""
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    k_pos = torch.arange(tk, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    return allowed


@functools.lru_cache(maxsize=32)
def _flex_block_mask(tq: int, tk: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = tk - tq

    def sliding_causal(b, h, q_idx, kv_idx):
        q_abs = q_idx + offset
        return (kv_idx <= q_abs) & (q_abs - kv_idx < window)

    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=tq, KV_LEN=tk, device=device)


def _compile_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# torch.compile only wraps here; compilation happens on the first call (fixed, block-aligned shapes).
COMPILED_FLEX = _compile_flex()


def decode_mask_bias(size: int, position: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [size] for one decode token: 0 for key slots <= `position`, -inf after them.

    Made once per decode step and shared by every layer with a buffer of this size, so that SDPA
    gets a ready float mask instead of converting a boolean one in each layer.
    """
    live = torch.arange(size, device=position.device) <= position
    return torch.zeros(size, dtype=dtype, device=position.device).masked_fill_(~live, float("-inf"))


def masked_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """One query token per sequence over a fixed-size key buffer; `bias` [Tk] is the additive mask
    (0 for live keys, -inf for empty slots; see decode_mask_bias).

    The query heads of each KV group are folded into the query-length axis, so the cache is read
    once per KV head instead of being expanded to every query head.
    """
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    if tq != 1:
        raise ValueError(f"masked decode attention takes one query token, got {tq}")
    folded = q.reshape(b, hkv, hq // hkv, d)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=bias.view(1, 1, 1, -1), scale=scale)
    return out.reshape(b, hq, 1, d)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: int | None = None
) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> [B, Hq, Tq, D]."""
    tq, tk = q.shape[2], k.shape[2]
    if window is not None and window >= tk:
        window = None  # the window covers everything: plain causal attention
    gqa = q.shape[1] != k.shape[1]

    if q.is_cuda and tq == 1 and window is None and gqa:
        # One decode token sees every cached key: fold the query heads of each KV group into the
        # query-length axis, so SDPA runs its fused kernels without a GQA expansion of the cache.
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        out = F.scaled_dot_product_attention(q.reshape(b, hkv, hq // hkv, d), k, v, scale=scale)
        return out.reshape(b, hq, 1, d)

    if q.is_cuda:
        flash = FLASH_ATTN_FUNC
        if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
            out = flash(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                softmax_scale=scale, causal=True,
                window_size=(window - 1, 0) if window is not None else (-1, -1),
            )
            return out.transpose(1, 2)
        if window is not None and tq == tk and tq % 128 == 0:
            # FlexAttention skips the blocks outside the window; it compiles once per shape, so it
            # is used for the fixed, block-aligned shapes of training and benchmarks only.
            block_mask = _flex_block_mask(tq, tk, window, str(q.device))
            return COMPILED_FLEX(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)

    if window is None and tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if window is None and tq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    mask = _window_mask(tq, tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
