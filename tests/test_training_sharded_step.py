"""The local-shard clip + fused AdamW step equals `clip_grad_norm_` + `AdamW(fused=True)` on the
same FSDP2 (DTensor) parameters, and a non-finite step leaves weights and state untouched."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn

from supernet.training.gc_control import ScheduledGC
from supernet.training.sharded_step import (clip_local_grads_, fused_adamw_local_step, local_grad_square_sum,
                                   shards_are_disjoint)
from tests.float_bounds import U32, adam_ratio_bound


@pytest.fixture
def one_rank_group():
    """A one-process gloo group: FSDP2 then shards onto a mesh of one, with real DTensors."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_model(seed: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 5), nn.LayerNorm(5))
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}],
                             lr=1e-2, betas=(0.9, 0.95), fused=True)


def _backward(model: nn.Module, scale: float) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    (model(x).square().sum() * scale).backward()


@pytest.mark.parametrize("max_norm", [0.05, float("inf")])  # clipping active / a no-op
def test_local_shard_step_equals_the_dtensor_step(one_rank_group, max_norm):
    """Both optimizers step on bitwise-identical gradients (one backward, copied), so the test sees
    only the clip + step arithmetic. Two backwards would not do: AdamW normalises each element by
    its own gradient history, so an element whose gradient is a near-cancelling sum turns a
    last-bit difference (another GEMM kernel, alignment or thread split) into an O(lr) weight
    difference: gradients perturbed by 4 ulp moved weights by 2e-5 here, and a fresh clone's CI on
    another CPU saw 4.5e-6 against the earlier 1e-7 tolerance with two backwards."""
    a, b = _sharded_model(0), _sharded_model(0)  # the same weights
    params_a, params_b = list(a.parameters()), list(b.parameters())
    assert shards_are_disjoint(params_a) and not shards_are_disjoint([torch.zeros(2)])
    opt_a, opt_b = _optimizer(a), _optimizer(b)
    steps = 3
    lr_sum = steps * max(g["lr"] for g in opt_a.param_groups)
    k = len(params_a) - 1  # gradients entering the norm (the last parameter gets none)
    # The two norms differ only in how the k per-tensor norms (the same _foreach_norm) are combined:
    # vector_norm(stack) against stack.square().sum().sqrt(). Each is within (k/2 + 1) u of the exact
    # value (sum of k squares, then the root), so they differ by at most (k + 2) u relatively.
    norm_rtol = (k + 2) * U32
    # The clip factor max_norm / (norm + 1e-6) adds two roundings per side and the multiply one per
    # element per side: clipped gradients differ elementwise by at most delta_g relatively. With
    # clipping off both factors are exactly 1.0, so the gradients stay bitwise equal.
    delta_g = (k + 2 + 4 + 2) * U32 if max_norm != float("inf") else 0.0
    # AdamW: g_t -> g_t (1 + e_t), |e_t| <= delta_g, moves m_hat / sqrt(v_hat) by at most 2 C delta_g;
    # each side's own roundings of the ratio (moments, bias corrections, sqrt, eps, divide) are about
    # 6 u each, so the two ratios differ by 2 C delta_g + 12 u per step, times lr in the weight.
    # The weight's own update w (1 - lr wd) - lr r rounds twice per side per step: 4 u |w| per step.
    C = adam_ratio_bound(0.9, 0.95, steps)
    weight_atol = lr_sum * (2 * C * delta_g + 12 * U32)  # 0.03 (26 u + 12 u) = 6.8e-8 with clipping
    weight_rtol = 4 * steps * U32
    # v = sum w'_t g_t^2: 2 delta_g from the gradients plus 4 roundings per step per side.
    state_rtol = 2 * delta_g + 8 * steps * U32
    for step in range(steps):
        _backward(a, 1.0 + step)
        _backward(b, 1.0 + step)
        with torch.no_grad():
            for pa, pb in zip(params_a, params_b):
                pb.grad.copy_(pa.grad)
        params_b[-1].grad = None  # a parameter without a gradient is skipped by both
        params_a[-1].grad = None
        norm_ref = torch.nn.utils.clip_grad_norm_(params_a, max_norm).full_tensor()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        norm = local_grad_square_sum(params_b).sqrt()
        torch.testing.assert_close(norm, norm_ref, rtol=norm_rtol, atol=0)
        clip_local_grads_(params_b, norm, max_norm)
        fused_adamw_local_step(opt_b, torch.zeros(()))
        opt_b.zero_grad(set_to_none=True)
        for pa, pb in zip(params_a, params_b):
            if delta_g == 0.0:  # the same fused kernel on bitwise-equal inputs in one process: exact
                assert torch.equal(pb.full_tensor(), pa.full_tensor())
            else:
                torch.testing.assert_close(pb.full_tensor(), pa.full_tensor(), rtol=weight_rtol, atol=weight_atol)
    for pa, pb in zip(params_a[:-1], params_b[:-1]):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert float(sb["step"]) == float(sa["step"]) == 3.0
        torch.testing.assert_close(sb["exp_avg_sq"].full_tensor(), sa["exp_avg_sq"].full_tensor(),
                                   rtol=state_rtol if delta_g else 0.0, atol=0)
    assert not opt_a.state[params_a[-1]] and not opt_b.state[params_b[-1]]  # never had a gradient


def test_local_shard_step_skips_on_found_inf(one_rank_group):
    model = _sharded_model(0)
    params = list(model.parameters())
    opt = _optimizer(model)
    _backward(model, 1.0)
    fused_adamw_local_step(opt, torch.zeros(()))  # one real step: state exists
    before = [p.full_tensor().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].full_tensor().clone() for p in params]
    _backward(model, float("nan"))
    fused_adamw_local_step(opt, torch.ones(()))
    for p, w, m in zip(params, before, moments):
        assert torch.equal(p.full_tensor(), w)
        assert torch.equal(opt.state[p]["exp_avg"].full_tensor(), m)
        assert float(opt.state[p]["step"]) == 1.0


class _Node:
    pass


def test_scheduled_gc_collects_cycles_only_on_its_steps_and_restores_the_collector():
    assert gc.isenabled()
    with ScheduledGC(3) as collector:
        assert not gc.isenabled()
        node = _Node()
        node.me = node  # a reference cycle: only a collection frees it
        alive = weakref.ref(node)
        del node
        collector.step(2)
        assert alive() is not None
        collector.step(3)
        assert alive() is None
    assert gc.isenabled()
    with ScheduledGC(0):
        assert gc.isenabled()
