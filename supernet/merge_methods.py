"""Tensor merge rules for `supernet merge`: linear, TIES and SLERP, all in float64.

Implemented from the papers' definitions (not from mergekit):
- linear (model soups, Wortsman et al. 2022): sum_i w_i x_i / sum_i w_i (or without the division).
- TIES (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"): task vectors
  tau_i = x_i - base; *trim* each to its `density` share of largest-magnitude entries (the rest set
  to 0); *elect* a sign per entry, the sign of the summed (weighted) mass sum_i w_i tau_i; *disjoint
  merge*: average per entry only the trimmed values that agree with the elected sign (weighted by
  w_i, zeros excluded); result base + lambda * that mean.
- SLERP (Shoemake 1985, used for weights by White 2016 and later merges): the two tensors as flat
  vectors, angle Omega from their normalised dot product, result sin((1-t) Omega)/sin Omega * x0 +
  sin(t Omega)/sin Omega * x1. Where the vectors are (anti-)parallel, sin Omega -> 0 and the formula
  is ill-conditioned, so it falls back to the linear (1-t) x0 + t x1: below Omega = 1e-3 rad the two
  differ by at most t(1-t) Omega^2 / 2 <= 1.25e-7 of the norm, about one float32 rounding.
"""
from __future__ import annotations

import math

import torch

# 1 - |cos Omega| below this means Omega < ~1e-3 rad (1 - cos x ~ x^2 / 2): linear fallback
PARALLEL_EPS = 5e-7


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for x, w in zip(tensors, weights):
        out += w * x.to(torch.float64)
    if normalize:
        out /= sum(weights)
    return out


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` share of entries with the largest magnitude (ties at the cut kept), zero the rest."""
    if density >= 1.0:
        return delta
    n = delta.numel()
    k = int(round(density * n))
    if k <= 0:
        return torch.zeros_like(delta)
    mag = delta.abs().flatten()
    cut = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    return torch.where(delta.abs() >= cut, delta, torch.zeros_like(delta))


def ties(tensors: list[torch.Tensor], base: torch.Tensor, weights: list[float], densities: list[float],
         lam: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """TIES-merging of `tensors` onto `base` (see the module docstring)."""
    b = base.to(torch.float64)
    trimmed = [w * trim(x.to(torch.float64) - b, d) for x, w, d in zip(tensors, weights, densities)]
    elected = torch.sign(torch.stack(trimmed).sum(0))
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    for t, w in zip(trimmed, weights):
        agree = (torch.sign(t) == elected) & (t != 0)
        num += torch.where(agree, t, 0.0)
        den += torch.where(agree, w, 0.0)
    if normalize:
        delta = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    else:
        delta = num
    return b + lam * delta


def slerp(x0: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors as flat vectors (linear where near-parallel)."""
    a = x0.to(torch.float64)
    b = x1.to(torch.float64)
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return (1.0 - t) * a + t * b
    cos = max(-1.0, min(1.0, float((a.flatten() @ b.flatten()) / (na * nb))))
    if 1.0 - abs(cos) < PARALLEL_EPS:
        return (1.0 - t) * a + t * b
    omega = math.acos(cos)
    so = math.sin(omega)
    return (math.sin((1.0 - t) * omega) / so) * a + (math.sin(t * omega) / so) * b
