"""GDN and KDA mixers: cache continuation, gradients, conversion from a teacher attention."""
from __future__ import annotations

import pytest
import torch

from supernet.cache import SupernetCache
from supernet.mixers.gdn import CONV_TAP_QK, CONV_TAP_V, GatedDeltaNetMixer
from supernet.mixers.kda import KimiDeltaAttentionMixer
from supernet.ops.delta_rule import kda_rule
from supernet.ops.gated_norm import gated_rms_norm
from supernet.ops.short_conv import causal_conv1d_silu
from tests.helpers.configs import tiny_config

LAYER = 1  # not 0, so that a mixer reading the wrong cache slot would show


MIXERS = {
    "gdn": lambda: GatedDeltaNetMixer(tiny_config(), LAYER),
    "gdn-gva": lambda: GatedDeltaNetMixer(tiny_config(gdn_num_heads=2, gdn_num_v_heads=4, gdn_v_head_dim=8), LAYER),
    "kda": lambda: KimiDeltaAttentionMixer(tiny_config(), LAYER),
}


def make_mixer(name: str, seed: int = 0) -> torch.nn.Module:
    """A mixer with every parameter randomised, so decays, gates and convs all matter."""
    torch.manual_seed(seed)
    mixer = MIXERS[name]()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return mixer.eval()


def run_pieces(mixer, x, sizes):
    """Feed x in consecutive pieces through one cache, advancing it like the model does."""
    cache = SupernetCache(2)
    outs, start = [], 0
    for n in sizes:
        outs.append(mixer(x[:, start:start + n], cache=cache))
        cache.advance(n)
        start += n
    assert start == x.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("name", list(MIXERS))
def test_full_forward_equals_prefill_plus_decode_and_pieces(name):
    mixer = make_mixer(name)
    torch.manual_seed(1)
    x = torch.randn(2, 22, 64)
    with torch.no_grad():
        full = mixer(x)
        decoded, cache = run_pieces(mixer, x, [13] + [1] * 9)
        uneven, _ = run_pieces(mixer, x, [13, 1, 1, 7])
        long_pieces, _ = run_pieces(mixer, x, [5, 17])  # second piece takes the chunked path
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uneven, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long_pieces, full, atol=1e-5, rtol=1e-5)
    # decode state: conv tails + fp32 recurrent state, in this layer's slot only
    state = cache.mixer_state(LAYER, mixer.cache_name)
    W = mixer.config.linear_conv_size
    assert state["conv_q"].shape == (2, mixer.q_proj.out_features, W - 1)
    assert state["conv_v"].shape == (2, mixer.v_proj.out_features, W - 1)
    heads = getattr(mixer, "num_v_heads", mixer.num_heads)
    assert state["recurrent"].shape == (2, heads, mixer.head_dim, mixer.v_head_dim)
    assert state["recurrent"].dtype == torch.float32
    assert cache.states[0] == {}


@pytest.mark.parametrize("name", list(MIXERS))
def test_no_cache_means_no_state_and_batch_rows_are_independent(name):
    mixer = make_mixer(name, seed=2)
    x = torch.randn(3, 9, 64)
    with torch.no_grad():
        both = mixer(x)
        single = mixer(x[1:2])
    assert both.shape == x.shape
    torch.testing.assert_close(both[1:2], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MIXERS))
def test_bfloat16_mixer_tracks_float32(name):
    mixer = make_mixer(name, seed=3)
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        ref = mixer(x)
        out = mixer.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("name", list(MIXERS))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    mixer = MIXERS[name]().train()  # default (reset_parameters) init
    x = torch.randn(2, 70, 64, requires_grad=True)
    mixer(x).pow(2).mean().backward()
    for pname, p in mixer.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_parameter_names_and_shapes_follow_the_spec():
    cfg = tiny_config(gdn_num_heads=2, gdn_num_v_heads=4, gdn_head_dim=16, gdn_v_head_dim=8,
                      kda_num_heads=4, kda_head_dim=16, kda_v_head_dim=8)
    D, W = 64, cfg.linear_conv_size
    gdn = {n: tuple(p.shape) for n, p in GatedDeltaNetMixer(cfg, 0).named_parameters()}
    assert gdn == {
        "q_proj.weight": (32, D), "k_proj.weight": (32, D), "v_proj.weight": (32, D),
        "q_conv1d.weight": (32, 1, W), "k_conv1d.weight": (32, 1, W), "v_conv1d.weight": (32, 1, W),
        "a_proj.weight": (4, D), "A_log": (4,), "dt_bias": (4,), "b_proj.weight": (4, D),
        "g_proj.weight": (32, D), "o_norm.weight": (8,), "o_proj.weight": (D, 32),
    }
    kda = {n: tuple(p.shape) for n, p in KimiDeltaAttentionMixer(cfg, 0).named_parameters()}
    assert kda == {
        "q_proj.weight": (64, D), "k_proj.weight": (64, D), "v_proj.weight": (32, D),
        "q_conv1d.weight": (64, 1, W), "k_conv1d.weight": (64, 1, W), "v_conv1d.weight": (32, 1, W),
        "f_a_proj.weight": (16, D), "f_b_proj.weight": (64, 16), "A_log": (4,), "dt_bias": (64,),
        "b_proj.weight": (4, D), "g_a_proj.weight": (8, D), "g_b_proj.weight": (32, 8),
        "o_norm.weight": (8,), "o_proj.weight": (D, 32),
    }


def test_default_decays_are_negative_and_long():
    for mixer in (MIXERS["gdn"](), MIXERS["kda"]()):
        per_head = mixer.dt_bias.numel() // mixer.A_log.numel()
        rate = mixer.A_log.exp().repeat_interleave(per_head) * torch.nn.functional.softplus(mixer.dt_bias)
        assert (rate > 0).all() and rate.max() <= 0.1 + 1e-6 and rate.min() >= 1e-3 - 1e-6


# ---------------------------------------------------------------- conversion from attention


def teacher_weights(D=576, Hq=9, Hkv=3, Dh=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(Hq * Dh, D, generator=gen), torch.randn(Hkv * Dh, D, generator=gen),
        torch.randn(Hkv * Dh, D, generator=gen), torch.randn(D, Hq * Dh, generator=gen),
    )


def smollm_config(**overrides):
    return tiny_config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, **overrides)


@pytest.mark.parametrize("cls", [GatedDeltaNetMixer, KimiDeltaAttentionMixer])
def test_init_from_attention_9q_3kv_heads(cls):
    q_w, k_w, v_w, o_w = teacher_weights()
    mixer = cls(smollm_config(), 0)
    mixer.init_from_attention(q_w, k_w, v_w, o_w, num_heads=9, num_kv_heads=3, head_dim=64)
    assert mixer.q_proj.weight.shape == (576, 576) and mixer.k_proj.weight.shape == (576, 576)
    assert mixer.v_proj.weight.shape == (576, 576) and mixer.o_proj.weight.shape == (576, 576)
    torch.testing.assert_close(mixer.q_proj.weight, q_w)
    torch.testing.assert_close(mixer.o_proj.weight, o_w)
    k_heads = mixer.k_proj.weight.view(9, 64, 576)
    v_heads = mixer.v_proj.weight.view(9, 64, 576)
    for h in range(9):  # GQA: query head h used kv head h // 3
        torch.testing.assert_close(k_heads[h], k_w.view(3, 64, 576)[h // 3])
        torch.testing.assert_close(v_heads[h], v_w.view(3, 64, 576)[h // 3])
    for conv, tap in ((mixer.q_conv1d, CONV_TAP_QK), (mixer.k_conv1d, CONV_TAP_QK), (mixer.v_conv1d, CONV_TAP_V)):
        assert conv.weight.shape == (576, 1, 4)
        assert (conv.weight[..., :-1] == 0).all() and (conv.weight[..., -1] == tap).all()
    assert (mixer.o_norm.weight == 1).all()
    assert (mixer.A_log == 0).all()
    torch.testing.assert_close(torch.nn.functional.softplus(mixer.dt_bias).max(), torch.tensor(0.1))


def test_converted_gdn_starts_silent_and_kda_starts_at_half_readout():
    q_w, k_w, v_w, o_w = (w * 0.05 for w in teacher_weights())
    x = torch.randn(1, 12, 576)
    gdn = GatedDeltaNetMixer(smollm_config(), 0)
    gdn.init_from_attention(q_w, k_w, v_w, o_w, 9, 3, 64)
    with torch.no_grad():
        assert gdn(x).abs().max() == 0  # silu(0) gate: the residual passes unchanged

    kda = KimiDeltaAttentionMixer(smollm_config(), 0)
    kda.init_from_attention(q_w, k_w, v_w, o_w, 9, 3, 64)
    with torch.no_grad():
        q = causal_conv1d_silu(x @ kda.q_proj.weight.T, kda.q_conv1d.weight)[0].view(1, 12, 9, 64)
        k = causal_conv1d_silu(x @ kda.k_proj.weight.T, kda.k_conv1d.weight)[0].view(1, 12, 9, 64)
        v = causal_conv1d_silu(x @ kda.v_proj.weight.T, kda.v_conv1d.weight)[0].view(1, 12, 9, 64)
        f = kda.f_b_proj(kda.f_a_proj(x)) + kda.dt_bias
        g = -torch.nn.functional.softplus(f).view(1, 12, 9, 64)
        beta = torch.sigmoid(kda.b_proj(x))
        readout, _ = kda_rule(q, k, v, g, beta, use_qk_l2norm=True)
        expected = kda.o_proj(0.5 * gated_rms_norm(readout, torch.full_like(readout, 50.0), kda.o_norm.weight,
                                                   kda.o_norm.eps, "sigmoid").reshape(1, 12, 576))
        torch.testing.assert_close(kda(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "cls, overrides, match",
    [
        (GatedDeltaNetMixer, dict(gdn_num_heads=3, gdn_num_v_heads=9), "gdn_num_heads=3"),
        (GatedDeltaNetMixer, dict(gdn_head_dim=32), "gdn_head_dim=32"),
        (KimiDeltaAttentionMixer, dict(kda_v_head_dim=32), "kda_v_head_dim=32"),
    ],
)
def test_init_from_attention_refuses_unmappable_shapes(cls, overrides, match):
    mixer = cls(smollm_config(**overrides), 0)
    with pytest.raises(ValueError, match=match):
        mixer.init_from_attention(*teacher_weights(), num_heads=9, num_kv_heads=3, head_dim=64)


def test_init_from_attention_checks_weight_shapes():
    q_w, k_w, v_w, o_w = teacher_weights()
    mixer = GatedDeltaNetMixer(smollm_config(), 0)
    with pytest.raises(ValueError, match="k_w has shape"):
        mixer.init_from_attention(q_w, k_w, v_w, o_w, num_heads=9, num_kv_heads=1, head_dim=64)
