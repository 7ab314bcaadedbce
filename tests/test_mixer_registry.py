"""The mixer registry against the built torch modules: parameter names, shapes and counts, and the
decode state the mixers actually keep, for several GQA ratios and head dims."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from supernet.cache import SupernetCache
from supernet.config import SupernetConfig
from supernet.layout import MIXERS
from supernet.mixers import build_mixers, mixer_class
from supernet.mixers.registry import FLOAT32, REGISTRY, spec
from supernet.mixers.rotary import RotaryEmbedding
from supernet.placement.cost import analytic_costs

CONFIGS = {
    "mha-dh16": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4),
    "gqa2-dh16": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2),
    "gqa3-dh24-bias": dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=1, head_dim=24,
                           attention_bias=True, linear_conv_size=3),
    "own-linear-dims": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, gdn_num_heads=2,
                            gdn_num_v_heads=4, gdn_head_dim=12, gdn_v_head_dim=10, kda_num_heads=3,
                            kda_head_dim=8, kda_v_head_dim=20, swa_window=5),
}


def make_config(name: str) -> SupernetConfig:
    return SupernetConfig(vocab_size=97, intermediate_size=96, num_hidden_layers=2, **{"swa_window": 6, **CONFIGS[name]})


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_names_shapes_and_counts_match_the_modules(name):
    config = make_config(name)
    mixers = build_mixers(config, 0)
    for m in MIXERS:
        built = {k: tuple(v.shape) for k, v in mixers[m].named_parameters()}
        assert REGISTRY[m].parameter_shapes(config) == built, m
        assert REGISTRY[m].checkpoint_names(config) == sorted(built)
        assert REGISTRY[m].num_params(config) == sum(p.numel() for p in mixers[m].parameters())
        matmul = sum(p.numel() for p in mixers[m].parameters() if p.ndim == 2)
        assert REGISTRY[m].params(config)["matmul"] == matmul
        assert mixer_class(m) is type(mixers[m])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("context", [4, 11])  # below and past the SWA window (6, or 5)
def test_state_shapes_match_the_mixers_caches(name, context):
    config = make_config(name)
    mixers = build_mixers(config, 0).eval().to(torch.bfloat16)  # the model dtype differs from the fp32 state
    rotary = RotaryEmbedding(config)
    batch = 2
    x = torch.randn(batch, context, config.hidden_size, dtype=torch.bfloat16)
    pe = rotary(x, torch.arange(context)[None].expand(batch, -1))
    for m in MIXERS:
        cache = SupernetCache(1)
        with torch.no_grad():
            mixers[m](x, pe, cache)
        state = cache.mixer_state(0, m)
        expected = REGISTRY[m].state_shapes(config, batch, context)
        live = {}
        for key in expected:
            tensor = state[key]
            if REGISTRY[m].family == "attention":  # buffers may hold spare slots; the live ones are counted
                tensor = tensor[:, :, : min(state["len"], tensor.shape[2])]
            live[key] = tensor
        assert {k: tuple(v.shape) for k, v in live.items()} == {k: s.shape for k, s in expected.items()}, m
        for key, s in expected.items():
            assert live[key].dtype == (torch.float32 if s.dtype == FLOAT32 else torch.bfloat16), (m, key)


def test_cache_bytes_grow_for_fa_cap_for_swa_and_stay_constant_for_linear():
    config = make_config("gqa2-dh16")
    per_token = 2 * config.num_key_value_heads * config.head_dim * 2
    assert spec("fa").cache_bytes(config, 100) - spec("fa").cache_bytes(config, 10) == 90 * per_token
    assert spec("swa").cache_bytes(config, 100) == spec("swa").cache_bytes(config, config.swa_window)
    for m in ("gdn", "kda"):
        assert spec(m).cache_bytes(config, 10) == spec(m).cache_bytes(config, 10_000) > 0
    assert spec("fa").decode_flops(config, 1000) > spec("fa").decode_flops(config, 10)
    assert spec("swa").decode_flops(config, 1000) == spec("swa").decode_flops(config, 100)


def test_cost_model_reads_the_registry():
    config = make_config("own-linear-dims")
    table = analytic_costs(config, 64, 4)
    for m in MIXERS:
        expected = spec(m).weight_bytes(config) / 4 + spec(m).decode_bytes(config, 64)
        assert table.per_layer[m][0] == pytest.approx(expected)


def test_unknown_mixer_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown mixer 'mamba'; choose one of fa, swa, gdn, kda"):
        spec("mamba")


def test_registry_and_cost_model_import_no_torch():
    code = ("import sys; import supernet.mixers.registry, supernet.placement.cost, supernet.placement.profile; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)
