"""The CUDA-only fused paths (fla's conv, gated norm and in-kernel gates) against the torch paths.

On the CPU the dispatch always picks torch (tested directly below). The fla paths themselves are
run here through Triton's interpreter (TRITON_INTERPRET=1: the same kernels, executed with numpy),
in a child process because the variable must be set before triton is imported. Only fla's fused
recurrent kernel runs under the interpreter (its chunk kernels do not), so the mixer checks stay at
T <= 64; benchmarks/gpu_linear_mixers.py checks the chunk path on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from supernet.ops import delta_rule as dr
from supernet.ops.delta_rule import dispatch
from supernet.ops import gated_norm as gn
from supernet.ops import short_conv as sc

TOL = dict(rtol=1e-4, atol=1e-5)



# ---------------------------------------------------------------- dispatch and tail formats (no fla)


def test_cpu_dispatch_picks_the_torch_paths():
    x = torch.randn(1, 3, 8)
    assert not sc._use_fla(x, 4) and not gn._use_fla(x)
    assert not dispatch._gates_in_kernel(x, (x,))
    # what the dispatchers return on the CPU is exactly the torch paths' result
    w, tail = torch.randn(8, 1, 4), torch.randn(1, 8, 3)
    y, t = sc.causal_conv1d_silu(x, w, tail, return_tail=True)
    y_ref, t_ref = sc.torch_causal_conv1d_silu(x, w.squeeze(1), tail, True)
    assert torch.equal(y, y_ref) and torch.equal(t, t_ref)
    gate, nw = torch.randn(1, 3, 8), torch.rand(8)
    assert torch.equal(gn.gated_rms_norm(x, gate, nw, 1e-5, "sigmoid"), gn.torch_gated_rms_norm(x, gate, nw, 1e-5, "sigmoid"))


def test_raw_gates_equal_precomputed_gates_on_cpu():
    torch.manual_seed(0)
    B, T, H, K = 2, 9, 2, 8
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    b = torch.randn(B, T, H)
    for per_channel in (False, True):
        raw = torch.randn(B, T, H, K) if per_channel else torch.randn(B, T, H)
        A_log, dt_bias = torch.randn(H) * 0.5, torch.randn(H * K if per_channel else H)
        g = dr.gate_decay(raw, A_log, dt_bias)
        expected = -A_log.exp().view(H, *([1] if per_channel else [])) * torch.nn.functional.softplus(
            raw + dt_bias.view(H, K) if per_channel else raw + dt_bias)
        torch.testing.assert_close(g, expected)
        rule = dr.kda_rule if per_channel else dr.gated_delta_rule
        o, s = rule(q, k, v, raw, b, A_log=A_log, dt_bias=dt_bias, beta_logits=True, output_final_state=True)
        o_ref, s_ref = rule(q, k, v, g, torch.sigmoid(b), output_final_state=True)
        assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    with pytest.raises(ValueError, match="A_log"):
        dr.gated_delta_rule(q, k, v, b, b, A_log=torch.zeros(H + 1))
    with pytest.raises(ValueError, match="dt_bias"):
        dr.kda_rule(q, k, v, q, b, A_log=torch.zeros(H), dt_bias=torch.zeros(H))


def test_tail_and_fla_cache_round_trip():
    tail = torch.randn(2, 5, 3)
    cache = sc.tail_to_fla_cache(tail)
    assert cache.shape == (2, 5, 4) and cache.is_contiguous() and torch.equal(cache[..., 0], torch.zeros(2, 5))
    view = sc.fla_cache_to_tail(cache)
    assert torch.equal(view, tail) and view.data_ptr() == cache.data_ptr() + cache.element_size()
    # only such a view is recognised as an fla cache (and may be updated in place)
    assert sc._fla_cache_of(view) is cache
    assert sc._fla_cache_of(tail) is None  # contiguous tail
    assert sc._fla_cache_of(view.clone()) is None  # a clone (cache snapshots) is never shared
    with torch.inference_mode():  # how decoding runs: views made there record no base tensor
        cache = sc.tail_to_fla_cache(tail)
        assert sc._fla_cache_of(sc.fla_cache_to_tail(cache)) is cache
    # views that fla_cache_to_tail did not make are never taken for a cache (serving's paged tails)
    assert sc._fla_cache_of(cache[..., 1:]) is None and sc._fla_cache_of(torch.randn(4, 5, 3)[1][None]) is None
    forged = torch.randn(2, 5, 5)[..., 2:]
    forged._fla_conv_cache = cache  # a reference that does not match the memory layout is ignored
    assert sc._fla_cache_of(forged) is None


# ---------------------------------------------------------------- fla kernels, interpreted


def _child() -> None:
    """Runs in the TRITON_INTERPRET=1 child; raises on the first mismatch."""
    import triton.runtime.autotuner as autotuner

    # the interpreter has no benchmarker: every autotuning candidate "takes" the same time
    autotuner.Autotuner.do_bench = property(lambda self: lambda fn, quantiles=None: [1.0, 1.0, 1.0])
    assert sc.fla_function(sc._FLA_MODULE, "causal_conv1d") is not None and gn._fla_norm() is not None
    assert dr.fla_available()
    close = torch.testing.assert_close
    torch.manual_seed(0)

    # short conv: prefill, decode in place, prefill continuing from an fla tail, gradients
    B, C, W = 2, 24, 4
    w = torch.randn(C, W)
    x = torch.randn(B, 9, C)
    y, tail = sc.fla_causal_conv1d_silu(x, w, None, True)
    y_ref, tail_ref = sc.torch_causal_conv1d_silu(x, w, None, True)
    close(y, y_ref, **TOL), close(tail, tail_ref)
    assert sc._fla_cache_of(tail) is not None
    for _ in range(3):  # decode steps update the cache in place: the state stays the same object
        x1 = torch.randn(B, 1, C)
        y, new_tail = sc.fla_causal_conv1d_silu(x1, w, tail, True)
        y_ref, tail_ref = sc.torch_causal_conv1d_silu(x1, w, tail_ref, True)
        assert new_tail is tail
        close(y, y_ref, **TOL), close(tail, tail_ref)
    contiguous = tail_ref.clone()
    y, new_tail = sc.fla_causal_conv1d_silu(x1, w, contiguous, True)  # a foreign tail is not modified
    assert torch.equal(contiguous, tail_ref) and sc._fla_cache_of(new_tail) is not None
    close(y, sc.torch_causal_conv1d_silu(x1, w, tail_ref, True)[0], **TOL)
    for T in (6, 2):  # longer and shorter than the tail
        xt = torch.randn(B, T, C)
        y, tail = sc.fla_causal_conv1d_silu(xt, w, tail, True)
        y_ref, tail_ref = sc.torch_causal_conv1d_silu(xt, w, tail_ref, True)
        close(y, y_ref, **TOL), close(tail, tail_ref)
    y, none = sc.fla_causal_conv1d_silu(x1, w, tail, False)
    assert none is None
    close(y, sc.torch_causal_conv1d_silu(x1, w, tail_ref, False)[0], **TOL)
    # autograd through fla's conv as training calls it (no tail; the interpreter cannot run fla's
    # initial-state gradient kernel); T = 1 too, which must not take the in-place decode kernel
    for T in (5, 1):
        grads = []
        for fn in (sc.fla_causal_conv1d_silu, sc.torch_causal_conv1d_silu):
            xg = torch.randn(B, T, C, generator=torch.Generator().manual_seed(T)).requires_grad_()
            wg = w.clone().requires_grad_()
            out, _ = fn(xg, wg, None, True)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append((out, xg.grad, wg.grad))
        for a, b in zip(*grads):
            close(a, b, **TOL)

    # gated norm: both activations, bf16 input with fp32 weight, gradients
    x, gate, nw = torch.randn(2, 5, 3, 32), torch.randn(2, 5, 3, 32), torch.rand(32) + 0.5
    for act in ("silu", "sigmoid"):
        close(gn.fla_gated_rms_norm(x, gate, nw, 1e-5, act), gn.torch_gated_rms_norm(x, gate, nw, 1e-5, act), **TOL)
        out = gn.fla_gated_rms_norm(x.bfloat16(), gate.bfloat16(), nw, 1e-5, act)
        assert out.dtype == torch.bfloat16
        close(out, gn.torch_gated_rms_norm(x.bfloat16(), gate.bfloat16(), nw, 1e-5, act), rtol=1e-2, atol=1e-2)
    grads = []
    for fn in (gn.fla_gated_rms_norm, gn.torch_gated_rms_norm):
        xs = [t.clone().requires_grad_() for t in (x, gate, nw)]
        fn(*xs, 1e-5, "silu").pow(2).sum().backward()
        grads.append([t.grad for t in xs])
    for a, b in zip(*grads):
        close(a, b, **TOL)

    # whole mixers on the fused paths (fused recurrent kernel with in-kernel gates) vs the torch paths
    from supernet.cache import SupernetCache
    from tests.test_linear_mixers import make_mixer

    def run(mixer, xs, fused: bool):
        sc._use_fla = (lambda x, width: True) if fused else (lambda x, width: False)
        gn._use_fla = (lambda x: True) if fused else (lambda x: False)
        dispatch._gates_in_kernel = (lambda q, tensors: True) if fused else (lambda q, tensors: False)
        dispatch._fla_kernel = (lambda family, q, tensors: dispatch._fla_kernels()[f"{family}_recurrent"]) if fused \
            else (lambda family, q, tensors: None)
        cache, outs, tails = SupernetCache(2), [], []
        with torch.inference_mode():
            for a, b in ((0, 10), (10, 11), (11, 12), (12, 13), (13, 17)):
                outs.append(mixer(xs[:, a:b], cache=cache))
                cache.advance(b - a)
                tails.append(cache.mixer_state(1, mixer.cache_name)["conv_q"])
        return torch.cat(outs, 1), cache.mixer_state(1, mixer.cache_name), tails

    switches = sc._use_fla, gn._use_fla, dispatch._gates_in_kernel, dispatch._fla_kernel
    for name in ("gdn", "gdn-gva", "kda"):
        mixer = make_mixer(name)
        xs = torch.randn(2, 17, 64)
        try:
            out_f, state_f, tails_f = run(mixer, xs, True)
            out_t, state_t, _ = run(mixer, xs, False)
        finally:  # the child runs other modules' checks next
            sc._use_fla, gn._use_fla, dispatch._gates_in_kernel, dispatch._fla_kernel = switches
        close(out_f, out_t, rtol=1e-4, atol=1e-4)
        for key in ("conv_q", "conv_k", "conv_v", "recurrent"):
            close(state_f[key], state_t[key], rtol=1e-4, atol=1e-4)
        assert tails_f[1] is tails_f[2] is tails_f[3]  # decode steps: the conv state object is kept
    print("fla fused paths ok")


@pytest.mark.slow
def test_fla_fused_paths_equal_torch_paths_interpreted(interpreted):
    interpreted.check("tests.test_fla_fused_paths", "fla fused paths ok")
