"""The decoder layer's launch-saving rewrites (norm + residual, silu*up, RoPE) keep the reference math.

The fla-fused CUDA paths are checked against these torch paths on a GPU by
benchmarks/gpu_decode_presets.py; here: the CPU paths, and that the CPU never takes a fused path.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from supernet.mixers.rotary import apply_rotary
from supernet.ops import fla_backend
from supernet.ops.activations import silu_mul
from supernet.ops.norm import RMSNorm, add_rms_norm, torch_rms_norm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def test_rotary_equals_rotate_half_form():
    torch.manual_seed(0)
    q, k = torch.randn(2, 9, 5, 64), torch.randn(2, 3, 5, 64)
    angles = torch.rand(2, 5, 32) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rq, rk = apply_rotary(q, k, cos, sin)
    c, s = cos[:, None], sin[:, None]
    torch.testing.assert_close(rq, q * c + _rotate_half(q) * s, rtol=0, atol=1e-6)
    torch.testing.assert_close(rk, k * c + _rotate_half(k) * s, rtol=0, atol=1e-6)
    assert not torch.allclose(rq, q)  # the rotation did something


def test_add_rms_norm_is_residual_then_norm():
    torch.manual_seed(0)
    x, residual, weight = torch.randn(3, 4, 16), torch.randn(3, 4, 16), torch.rand(16) + 0.5
    normed, summed = add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, residual + x)
    expected = weight * (summed / summed.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())
    torch.testing.assert_close(normed, expected)
    norm = RMSNorm(16)
    norm.weight.data.copy_(weight)
    torch.testing.assert_close(norm.add_and_norm(x, residual)[0], norm(residual + x))
    torch.testing.assert_close(norm(x), torch_rms_norm(x, weight, 1e-5))


def test_silu_mul_matches_reference():
    g, u = torch.randn(4, 7), torch.randn(4, 7)
    torch.testing.assert_close(silu_mul(g, u), F.silu(g) * u)


def test_fused_paths_only_on_cuda_and_switchable(monkeypatch):
    x = torch.randn(2, 3)
    assert not fla_backend.use_fla(x)
    monkeypatch.setenv(fla_backend.ENV_SWITCH, "0")
    assert not fla_backend.fused_kernels_enabled()
    monkeypatch.setenv(fla_backend.ENV_SWITCH, "1")
    assert fla_backend.fused_kernels_enabled()
    assert fla_backend.fla_function("no_such_module", "nothing") is None


# ---------------------------------------------------------------- fla kernels, interpreted


def _child() -> None:
    """Runs under TRITON_INTERPRET=1 (fla's Triton kernels executed on the CPU); raises on a mismatch."""
    import triton.runtime.autotuner as autotuner

    from supernet.layer import SupernetDecoderLayer
    from tests.helpers.configs import tiny_config
    from supernet.ops import activations, norm

    # the interpreter has no benchmarker: every autotuning candidate "takes" the same time
    autotuner.Autotuner.do_bench = property(lambda self: lambda fn, quantiles=None: [1.0, 1.0, 1.0])
    fused_norm = fla_backend.fla_function("modules.norm.layernorm", "rms_norm")
    fused_swiglu = fla_backend.fla_function("modules.activations", "swiglu")
    assert fused_norm is not None and fused_swiglu is not None
    close = torch.testing.assert_close
    torch.manual_seed(0)
    x, residual, weight = torch.randn(4, 3, 96), torch.randn(4, 3, 96), torch.rand(96) + 0.5
    close(fused_norm(x, weight, None, eps=1e-5), torch_rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-5)
    normed, summed = fused_norm(x, weight, None, residual=residual, eps=1e-5, prenorm=True)
    close(summed, residual + x), close(normed, torch_rms_norm(residual + x, weight, 1e-5), rtol=1e-5, atol=1e-5)
    xb, rb, wb = x.bfloat16(), residual.bfloat16(), weight.bfloat16()
    close(fused_norm(xb, wb, None, eps=1e-5), torch_rms_norm(xb, wb, 1e-5), rtol=2e-2, atol=2e-2)
    g, u = torch.randn(4, 3, 40), torch.randn(4, 3, 40)
    close(fused_swiglu(g, u), F.silu(g) * u, rtol=1e-5, atol=1e-5)

    # a whole decoder layer with the fused paths forced on equals the torch paths
    config = tiny_config(num_hidden_layers=1, head_dim=16)
    layer = SupernetDecoderLayer(config, 0, mixers=("fa",)).eval()
    hidden = torch.randn(2, 7, 64)
    angles = torch.arange(7.0)[None, :, None] * torch.rand(8)
    pos = (torch.cat([angles.cos()] * 2, -1).expand(2, -1, -1), torch.cat([angles.sin()] * 2, -1).expand(2, -1, -1))
    with torch.no_grad():
        reference = layer(hidden, "fa", pos)
        switches = norm.use_fla, activations.use_fla
        norm.use_fla = activations.use_fla = lambda t, inference_only=False: True
        try:
            fused = layer(hidden, "fa", pos)
        finally:  # the child runs other modules' checks next
            norm.use_fla, activations.use_fla = switches
    close(fused, reference, rtol=1e-5, atol=1e-5)
    print("fla layer paths ok")


@pytest.mark.slow
def test_fla_norm_and_swiglu_equal_torch_paths_interpreted(interpreted):
    interpreted.check("tests.test_fused_layer_ops", "fla layer paths ok")
