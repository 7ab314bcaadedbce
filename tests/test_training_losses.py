"""Losses (fused chunked lm_head vs plain autograd), top-K bucketing, hidden matching, sampling."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from supernet.layout import Placement
from supernet.training.losses import (LossSpec, fused_lm_head_loss, hidden_match_loss, reference_logit_loss,
                             topk_from_logits)
from supernet.training.sampling import PlacementSampler

N, D, V = 37, 16, 50


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    ht, wt = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    tw = torch.rand(N, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[3, 9]] = -100
    return h, w, ht, wt, tw, labels


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("tau,chunk", [(1.0, 8), (2.0, 1000)])
def test_fused_loss_matches_autograd_reference(kind, tau, chunk):
    h, w, ht, wt, tw, labels = _inputs()
    spec = LossSpec(kind=kind, temperature=tau, kl_weight=0.7, ce_weight=0.3, chunk_tokens=chunk)
    out = fused_lm_head_loss(h, w, tw, spec, teacher_hidden=ht, teacher_weight=wt, labels=labels)
    out.loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = reference_logit_loss(h @ w.T, tw, spec, teacher_logits=ht @ wt.T, labels=labels)
    ref.backward()
    assert torch.allclose(out.loss, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-5)
    assert torch.allclose(gw, w.grad, atol=1e-5)
    assert out.kl > 0 and out.ce > 0


def test_frozen_head_gets_no_gradient_and_grad_scales_with_upstream():
    h, w, ht, wt, tw, _ = _inputs(1)
    w.requires_grad_(False)
    spec = LossSpec(chunk_tokens=5)
    out = fused_lm_head_loss(h, w, tw, spec, teacher_hidden=ht, teacher_weight=wt)
    (3.0 * out.loss).backward()
    g3 = h.grad.clone()
    h.grad = None
    fused_lm_head_loss(h, w, tw, spec, teacher_hidden=ht, teacher_weight=wt).loss.backward()
    assert w.grad is None
    assert torch.allclose(g3, 3.0 * h.grad)


def test_topk_with_full_vocab_equals_full_kl_and_small_k_is_bounded():
    h, w, _, _, tw, _ = _inputs(2)
    zt = torch.randn(N, V) * 3
    spec = LossSpec(kind="fkl", temperature=1.5, chunk_tokens=10)
    full = reference_logit_loss(h @ w.T, tw, spec, teacher_logits=zt)
    full_k = fused_lm_head_loss(h, w, tw, spec, topk=topk_from_logits(zt, V, 1.5))
    assert torch.allclose(full_k.loss, full, rtol=1e-5)
    previous = 0.0
    for k in (1, 4, 16, 40):
        tk = topk_from_logits(zt, k, 1.5)
        got = fused_lm_head_loss(h, w, tw, spec, topk=tk)
        # merging the tail into one bucket can only lose information: 0 <= KL_K <= KL_full,
        # and keeping more ids recovers more of it
        assert 0.0 <= got.loss.item() <= full.item() + 1e-5
        assert got.loss.item() >= previous - 1e-5
        previous = got.loss.item()
        # the analytic top-K gradient equals autograd through the bucketed loss
        got.loss.backward()
        g = h.grad.clone()
        h.grad = None
        reference_logit_loss(h @ w.T, tw, spec, topk=tk).backward()
        assert torch.allclose(g, h.grad, atol=1e-5)
        h.grad = None


def test_hidden_match_is_zero_for_equal_states_and_relative():
    a = [torch.randn(2, 5, 8) for _ in range(3)]
    tw = torch.ones(2, 5) / 10
    assert hidden_match_loss(a, a, tw).item() == 0.0
    b = [x * 1.1 for x in a]
    # relative error: 10% off everywhere -> 0.01 per token, whatever the scale of each layer
    assert hidden_match_loss(b, a, tw).item() == pytest.approx(0.01, rel=1e-4)
    big = [x * 100 for x in a]
    assert hidden_match_loss([x * 1.1 for x in big], big, tw).item() == pytest.approx(0.01, rel=1e-4)


def test_uniform_sampler_is_balanced_and_resumable():
    s = PlacementSampler(6, seed=1)
    draws = [s.sample() for _ in range(400)]
    counts = Counter(m for p in draws for m in p)
    assert set(counts) == {"fa", "swa", "gdn", "kda"}
    assert all(500 < c < 700 for c in counts.values())  # 2400 draws, 600 expected each
    a = PlacementSampler(6, seed=1)
    for _ in range(7):
        a.sample()
    state = a.state_dict()
    nxt = [a.sample() for _ in range(5)]
    b = PlacementSampler(6, seed=99)
    b.load_state_dict(state)
    assert [b.sample() for _ in range(5)] == nxt == draws[7:12]


def test_weighted_and_preset_sampling():
    s = PlacementSampler(4, mixers=["fa", "gdn"], strategy="weighted", weights={"fa": 1, "gdn": 3}, seed=0)
    counts = Counter(m for _ in range(500) for m in s.sample())
    assert 0.7 < counts["gdn"] / 2000 < 0.8
    target = Placement.parse("kda,kda,swa,swa")
    s = PlacementSampler(4, presets=[target], preset_prob=0.5, seed=0)
    hits = sum(s.sample() == target for _ in range(400))
    assert 170 < hits < 230  # about half, plus rare uniform draws that happen to match
    with pytest.raises(ValueError, match="weights"):
        PlacementSampler(4, strategy="weighted", weights={"fa": 0}, seed=0)
