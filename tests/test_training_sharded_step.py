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
    a, b = _sharded_model(0), _sharded_model(0)  # the same weights
    params_a, params_b = list(a.parameters()), list(b.parameters())
    assert shards_are_disjoint(params_a) and not shards_are_disjoint([torch.zeros(2)])
    opt_a, opt_b = _optimizer(a), _optimizer(b)
    for step in range(3):
        _backward(a, 1.0 + step)
        _backward(b, 1.0 + step)
        params_b[-1].grad = None  # a parameter without a gradient is skipped by both
        params_a[-1].grad = None
        norm_ref = torch.nn.utils.clip_grad_norm_(params_a, max_norm).full_tensor()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        norm = local_grad_square_sum(params_b).sqrt()
        torch.testing.assert_close(norm, norm_ref, rtol=1e-6, atol=0)
        clip_local_grads_(params_b, norm, max_norm)
        fused_adamw_local_step(opt_b, torch.zeros(()))
        opt_b.zero_grad(set_to_none=True)
        for pa, pb in zip(params_a, params_b):
            torch.testing.assert_close(pb.full_tensor(), pa.full_tensor(), rtol=1e-6, atol=1e-7)
    for pa, pb in zip(params_a[:-1], params_b[:-1]):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert float(sb["step"]) == float(sa["step"]) == 3.0
        torch.testing.assert_close(sb["exp_avg_sq"].full_tensor(), sa["exp_avg_sq"].full_tensor(), rtol=1e-6, atol=1e-9)
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
