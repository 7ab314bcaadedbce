"""Gradient clipping and the fused AdamW update on the local shards of FSDP2 parameters.

Why: under FSDP2 every trainable parameter, gradient and AdamW state is a DTensor, and each op of
`clip_grad_norm_` and of AdamW's step goes through DTensor's Python dispatch. On 2 x H200 that was
about 110 ms of host time per profiled step beside about 350 ms of GPU work per rank, and in eager
mode the host sets the pace. The arithmetic needs no DTensor: AdamW is elementwise, so each rank
can update its own shards, and a global norm is the root of the summed squares of the per-shard
norms, so one all-reduce (shared with the step's loss statistics) gives every rank the same
clipping factor.

The optimizer object and its state stay DTensors, so checkpoints (torch.distributed.checkpoint)
see exactly what they saw before; only the step reads the tensors underneath.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.optim.adamw import adamw


def shards_are_disjoint(params: Sequence[Tensor]) -> bool:
    """True when every parameter is a DTensor sharded along every mesh dimension (FSDP2's
    `Shard(0)`): each element then lives on exactly one rank, so local sums add up to global ones."""
    return bool(params) and all(
        isinstance(p, DTensor) and all(isinstance(pl, Shard) for pl in p.placements) for p in params)


def _local(t: Tensor) -> Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def local_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """The local shards of the gradients that exist (a mixer outside the placement has none)."""
    return [_local(p.grad) for p in params if p.grad is not None]


@torch.no_grad()
def local_grad_square_sum(params: Sequence[Tensor]) -> Tensor:
    """Sum over this rank's gradient shards of the squared 2-norm (fp32 scalar); all-reduced over
    the ranks it is the squared global gradient norm."""
    grads = local_grads(params)
    device = params[0].device if params else torch.device("cpu")
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads, 2.0)
    return torch.stack([n.float() for n in norms]).square().sum()


@torch.no_grad()
def clip_local_grads_(params: Sequence[Tensor], total_norm: Tensor, max_norm: float) -> None:
    """Scale the gradient shards as `clip_grad_norm_` would, given the global norm."""
    grads = local_grads(params)
    if not grads:
        return
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].device))


def _state(optimizer: torch.optim.Optimizer, p: Tensor) -> dict:
    """AdamW's state of `p`, created as its own first step would (DTensors like `p`)."""
    state = optimizer.state[p]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def fused_adamw_local_step(optimizer: torch.optim.AdamW, found_inf: Tensor) -> None:
    """One fused AdamW step over the local shards of every parameter with a gradient, with the
    group's hyper-parameters (the scheduler's current lr). `found_inf` (1.0 on the device) leaves
    every weight, moment and step count unchanged, as under a GradScaler."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [_state(optimizer, p) for p in params]
        beta1, beta2 = group["betas"]
        adamw([_local(p) for p in params], local_grads(params),
              [_local(s["exp_avg"]) for s in states], [_local(s["exp_avg_sq"]) for s in states], [],
              [_local(s["step"]) for s in states],
              fused=True, found_inf=found_inf.to(params[0].device), grad_scale=None,
              capturable=False, differentiable=False, has_complex=False,
              amsgrad=group.get("amsgrad", False), beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=group.get("maximize", False))
