"""`decode_step_vk` (one served decode step on states in vLLM's [HV, V, K] layout, in place)
against the reference token loop, for per-head (GDN) and per-channel (KDA) decays, with GVA.

Tolerance: float32 sums of K = 16 products of O(1) values, ordered differently (multiply-and-reduce
on the pages' layout against the reference's matmul on [K, V]): a few ulps of O(1), well inside 1e-5."""
from __future__ import annotations

import pytest
import torch

from supernet.ops.delta_rule import decode_step_vk, l2_normalize, recurrent_delta_rule


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("h,hv", [(2, 2), (2, 4)])
@pytest.mark.parametrize("with_scratch", [False, True])
def test_one_step_on_transposed_pages_equals_the_reference(per_channel, h, hv, with_scratch):
    gen = torch.Generator().manual_seed(0)
    b, k_dim, v_dim = 3, 16, 8
    q = l2_normalize(torch.randn(b, h, k_dim, generator=gen))
    k = l2_normalize(torch.randn(b, h, k_dim, generator=gen))
    v = torch.randn(b, hv, v_dim, generator=gen)
    g = -torch.rand(b, hv, k_dim, generator=gen) if per_channel else -torch.rand(b, hv, generator=gen)
    beta = torch.rand(b, hv, generator=gen)
    state = torch.randn(b, hv, k_dim, v_dim, generator=gen)  # the reference's [B, HV, K, V]
    o_ref, s_ref = recurrent_delta_rule(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                        initial_state=state, output_final_state=True)
    page = state.transpose(-1, -2).contiguous()
    scratch = torch.full_like(page, float("nan")) if with_scratch else None  # garbage in: never read
    o = decode_step_vk(q, k, v, g, beta, page, scratch=scratch)
    torch.testing.assert_close(o, o_ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(page, s_ref.transpose(-1, -2), atol=1e-5, rtol=1e-5)


def test_a_state_or_scratch_in_the_wrong_layout_is_refused():
    q = torch.zeros(1, 2, 16)
    v, g = torch.zeros(1, 2, 8), torch.zeros(1, 2)
    with pytest.raises(ValueError, match="state must be float32"):
        decode_step_vk(q, q, v, g, g, torch.zeros(1, 2, 16, 8))  # the reference's [K, V] layout
    with pytest.raises(ValueError, match="scratch must be float32"):
        decode_step_vk(q, q, v, g, g, torch.zeros(1, 2, 8, 16), scratch=torch.zeros(2, 2, 8, 16))
