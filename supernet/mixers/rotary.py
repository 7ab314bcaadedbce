"""Rotary position embeddings (RoPE), shared by the FA and SWA mixers of every layer."""
from __future__ import annotations

import math

import torch
from torch import nn

from supernet.config import SupernetConfig


def _inverse_frequencies(config: SupernetConfig, sliding: bool = False) -> torch.Tensor:
    """RoPE frequencies of the global layers, or (`sliding`) of the teacher's sliding layers."""
    theta = config.sliding_rope_theta if sliding else config.rope_theta
    scaling = (config.sliding_rope_scaling if sliding else config.rope_scaling) or {}
    return rope_inverse_frequencies(config.head_dim, theta, scaling)


def rope_inverse_frequencies(dim: int, theta: float, scaling: dict) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        # positions divided by `factor` (Gemma 3's global layers): the same as frequencies divided
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        # Llama 3.x long-context scaling: stretch low frequencies, keep high ones, blend between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")


ROPE_TYPES = ("default", "linear", "llama3")


class RotaryEmbedding(nn.Module):
    """cos/sin tables of one RoPE; `sliding=True` builds the teacher's sliding layers' one (Gemma 3)."""

    def __init__(self, config: SupernetConfig, sliding: bool = False) -> None:
        super().__init__()
        self.config = config
        self.sliding = sliding
        self.register_buffer("inv_freq", _inverse_frequencies(config, sliding), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return _inverse_frequencies(self.config, self.sliding).to(self.inv_freq.device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [B, T, head_dim], in x's dtype (computed in float32)."""
        freqs = position_ids[:, :, None].float() * self.inv_freq.float().to(x.device)[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == roll(x, D/2) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 signed: torch.Tensor | None = None):
    """q/k [B, H, T, D]; cos/sin [B, T, D] with equal halves (as RotaryEmbedding makes them).

    The usual form is x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1). Written as
    roll(x, D/2) * signed_sin(sin) (the same products, signs moved onto sin), each of q and k costs
    three kernels instead of five; `signed` (= signed_sin(sin)) can be made once for all layers.
    A decode step of a small model is bound by kernel launches.
    """
    half = q.shape[-1] // 2
    signed = signed_sin(sin) if signed is None else signed
    cos, signed = cos[:, None], signed[:, None]
    return (
        torch.addcmul(q * cos, torch.roll(q, half, dims=-1), signed),
        torch.addcmul(k * cos, torch.roll(k, half, dims=-1), signed),
    )
