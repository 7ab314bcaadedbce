"""The torch delta-rule paths against fla's naive references, against each other, and the small ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from supernet.ops import delta_rule as dr
from supernet.ops.delta_rule import dispatch
from supernet.ops.gated_norm import GatedRMSNorm, gated_rms_norm
from supernet.ops.short_conv import causal_conv1d_silu

naive_gdn = pytest.importorskip("fla.ops.gated_delta_rule.naive")
naive_kda = pytest.importorskip("fla.ops.kda.naive")

TOL = dict(atol=1e-5, rtol=1e-5)


def make_inputs(B, T, H, HV, K, V, per_channel, seed=0, decay_scale=1.0):
    """Random inputs in the layout of both fla and our ops; k is unit-norm as in the mixers."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g_shape = (B, T, HV, K) if per_channel else (B, T, HV)
    g = F.logsigmoid(torch.randn(*g_shape, generator=gen)) * decay_scale
    beta = torch.rand(B, T, HV, generator=gen)
    h0 = torch.randn(B, HV, K, V, generator=gen)
    return q, k, v, g, beta, h0


def ours(fn, q, k, v, g, beta, h0, **kw):
    return fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)


# ---------------------------------------------------------------- against fla's naive references


@pytest.mark.parametrize("T", [1, 37, 64, 130])
@pytest.mark.parametrize("HV", [3, 6])  # 6: GVA, two value heads per q/k head
@pytest.mark.parametrize("fn", [dr.recurrent_delta_rule, dr.chunk_delta_rule])
def test_gdn_matches_fla_naive(T, HV, fn):
    q, k, v, g, beta, h0 = make_inputs(2, T, 3, HV, 16, 8, per_channel=False, seed=T + HV)
    # fla's naive GDN has no GVA: give it q/k repeated per value head (head j reads q/k head j // G).
    G = HV // 3
    o_ref, s_ref = naive_gdn.naive_recurrent_gated_delta_rule(
        q.repeat_interleave(G, 2), k.repeat_interleave(G, 2), v, beta, g,  # note: beta before g
        initial_state=h0.clone(), output_final_state=True,
    )
    o, s = ours(fn, q, k, v, g, beta, h0)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("HV", [2, 4])
@pytest.mark.parametrize("fn", [dr.recurrent_delta_rule, dr.chunk_delta_rule])
def test_kda_matches_fla_naive_recurrent(T, HV, fn):
    q, k, v, g, beta, h0 = make_inputs(2, T, 2, HV, 16, 8, per_channel=True, seed=T * HV)
    o_ref, s_ref = naive_kda.naive_recurrent_kda(q, k, v, g, beta, initial_state=h0.clone(), output_final_state=True)
    o, s = ours(fn, q, k, v, g, beta, h0)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)


@pytest.mark.parametrize("T", [64, 128])  # fla's naive chunk version needs whole chunks
def test_kda_matches_fla_naive_chunk(T):
    q, k, v, g, beta, h0 = make_inputs(1, T, 2, 4, 16, 8, per_channel=True, seed=T)
    o_ref, s_ref = naive_kda.naive_chunk_kda(q, k, v, g, beta, initial_state=h0.clone(), output_final_state=True)
    o, s = ours(dr.chunk_delta_rule, q, k, v, g, beta, h0)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)


def test_dispatch_l2norm_and_default_scale_match_naive():
    """gated_delta_rule / kda_rule with use_qk_l2norm == naive on normalised q, k, scale K^-0.5."""
    q, k, v, g, beta, h0 = make_inputs(2, 70, 2, 2, 16, 8, per_channel=False, seed=5)
    k = k * 3.0  # not unit-norm any more: the dispatch must normalise
    qn, kn = dr.l2_normalize(q), dr.l2_normalize(k)
    o_ref, s_ref = naive_gdn.naive_recurrent_gated_delta_rule(
        qn, kn, v, beta, g, initial_state=h0.clone(), output_final_state=True
    )
    o, s = dr.gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)

    q, k, v, g, beta, h0 = make_inputs(2, 70, 2, 2, 16, 8, per_channel=True, seed=6)
    qn, kn = dr.l2_normalize(q), dr.l2_normalize(k * 3.0)
    o_ref, s_ref = naive_kda.naive_recurrent_kda(qn, kn, v, g, beta, initial_state=h0.clone(), output_final_state=True)
    o, s = dr.kda_rule(q, k * 3.0, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)


# ---------------------------------------------------------------- chunked == recurrent


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_equals_recurrent(per_channel, chunk_size):
    q, k, v, g, beta, h0 = make_inputs(2, 100, 2, 4, 16, 8, per_channel, seed=chunk_size)
    o1, s1 = ours(dr.recurrent_delta_rule, q, k, v, g, beta, h0)
    o2, s2 = ours(dr.chunk_delta_rule, q, k, v, g, beta, h0, chunk_size=chunk_size)
    torch.testing.assert_close(o2, o1, **TOL)
    torch.testing.assert_close(s2, s1, **TOL)


@pytest.mark.parametrize("per_channel", [False, True])
def test_chunk_is_stable_under_strong_decay(per_channel):
    """Cumulative decays of thousands of nats inside a chunk must not overflow (no NaN/inf)."""
    q, k, v, g, beta, _ = make_inputs(1, 128, 2, 2, 16, 8, per_channel, seed=1, decay_scale=40.0)
    o1, s1 = dr.recurrent_delta_rule(q, k, v, g, beta, output_final_state=True)
    o2, s2 = dr.chunk_delta_rule(q, k, v, g, beta, output_final_state=True)
    assert torch.isfinite(o2).all() and torch.isfinite(s2).all()
    torch.testing.assert_close(o2, o1, **TOL)
    torch.testing.assert_close(s2, s1, **TOL)


@pytest.mark.parametrize("per_channel", [False, True])
def test_chunk_gradients_equal_recurrent(per_channel):
    inputs = make_inputs(2, 45, 2, 4, 8, 8, per_channel, seed=3)
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    o1, s1 = dr.recurrent_delta_rule(*a[:5], initial_state=a[5], output_final_state=True)
    o2, s2 = dr.chunk_delta_rule(*b[:5], initial_state=b[5], output_final_state=True)
    w_o, w_s = torch.randn_like(o1), torch.randn_like(s1)
    ((o1 * w_o).sum() + (s1 * w_s).sum()).backward()
    ((o2 * w_o).sum() + (s2 * w_s).sum()).backward()
    for name, x, y in zip(["q", "k", "v", "g", "beta", "h0"], a, b):
        assert y.grad is not None and torch.isfinite(y.grad).all(), name
        torch.testing.assert_close(y.grad, x.grad, atol=1e-4, rtol=1e-4, msg=f"grad of {name}")


def test_split_sequence_continues_exactly():
    """Running [0:T1] then [T1:T] from the carried state equals one run over [0:T]."""
    q, k, v, g, beta, _ = make_inputs(1, 90, 2, 2, 16, 8, per_channel=True, seed=9)
    o_full, s_full = dr.kda_rule(q, k, v, g, beta, output_final_state=True)
    o_a, s_a = dr.kda_rule(q[:, :50], k[:, :50], v[:, :50], g[:, :50], beta[:, :50], output_final_state=True)
    o_b, s_b = dr.kda_rule(
        q[:, 50:], k[:, 50:], v[:, 50:], g[:, 50:], beta[:, 50:], initial_state=s_a, output_final_state=True
    )
    torch.testing.assert_close(torch.cat([o_a, o_b], 1), o_full, **TOL)
    torch.testing.assert_close(s_b, s_full, **TOL)


def test_output_dtype_and_state_dtype():
    q, k, v, g, beta, _ = make_inputs(1, 20, 2, 2, 8, 8, per_channel=False)
    o, s = dr.gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, beta, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o, s = dr.gated_delta_rule(q, k, v, g, beta)
    assert s is None


def test_bad_shapes_raise_clear_errors():
    q, k, v, g, beta, _ = make_inputs(1, 5, 2, 3, 8, 8, per_channel=False)
    with pytest.raises(ValueError, match="multiple"):
        dr.gated_delta_rule(q, k, v, g, beta)
    q, k, v, g, beta, _ = make_inputs(1, 5, 2, 2, 8, 8, per_channel=False)
    with pytest.raises(ValueError, match="kda_rule"):
        dr.gated_delta_rule(q, k, v, g.unsqueeze(-1).expand(-1, -1, -1, 8), beta)
    with pytest.raises(ValueError, match="gated_delta_rule"):
        dr.kda_rule(q, k, v, g, beta)


def test_cpu_never_picks_fla():
    q = torch.zeros(1, 3, 1, 4)
    assert dispatch._fla_kernel("gdn", q, (q,)) is None


# ---------------------------------------------------------------- short conv and gated norm


def test_short_conv_matches_padded_conv1d_and_continues():
    torch.manual_seed(0)
    B, T, C, W = 2, 11, 6, 4
    x, w = torch.randn(B, T, C), torch.randn(C, 1, W)
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), w, groups=C)).transpose(1, 2)
    y, tail = causal_conv1d_silu(x, w, return_tail=True)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(tail, x[:, -(W - 1):].transpose(1, 2))
    # pieces 5 + 1 + 5 with carried tails
    pieces, tail = [], None
    for a, b in [(0, 5), (5, 6), (6, 11)]:
        y_i, tail = causal_conv1d_silu(x[:, a:b], w, tail, return_tail=True)
        pieces.append(y_i)
    torch.testing.assert_close(torch.cat(pieces, 1), ref)


def test_gated_rms_norm():
    torch.manual_seed(0)
    x, gate, weight = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), torch.rand(8)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    torch.testing.assert_close(gated_rms_norm(x, gate, weight, 1e-5, "silu"), ref * F.silu(gate))
    torch.testing.assert_close(gated_rms_norm(x, gate, weight, 1e-5, "sigmoid"), ref * torch.sigmoid(gate))
    assert gated_rms_norm(x.bfloat16(), gate, weight, 1e-5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="activation"):
        GatedRMSNorm(8, activation="relu")


def test_torch_path_keeps_float32_under_autocast():
    q, k, v, g, beta, h0 = make_inputs(1, 40, 2, 2, 16, 8, per_channel=True, seed=4)
    o_ref, s_ref = dr.kda_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = dr.kda_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(s, s_ref, **TOL)


def test_chunk_refuses_positive_log_decay():
    q, k, v, g, beta, _ = make_inputs(1, 20, 2, 2, 8, 8, per_channel=False)
    with pytest.raises(ValueError, match="<= 0"):
        dr.chunk_delta_rule(q, k, v, -g, beta)
