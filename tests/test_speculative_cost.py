"""The cost model of self-speculative decoding (placement/speculative_cost.py) and the draft choice."""
from __future__ import annotations

import json

import pytest

from supernet.config import SupernetConfig
from supernet.layout import Placement
from supernet.placement.cost import analytic_costs
from supernet.placement.speculative_cost import expected_tokens, predict, predict_from_costs, token_cost


def smollm2_shape() -> SupernetConfig:
    """SmolLM2-135M's shape (30 layers, 9 heads / 3 KV heads of 64), the design's reference model."""
    return SupernetConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, swa_window=4096,
                          tie_word_embeddings=True)


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.88, 4) == pytest.approx((1 - 0.88**5) / 0.12)
    assert expected_tokens(0.88, 4) == pytest.approx(3.94, abs=0.01)  # the "about 3.9 per round"
    assert expected_tokens(1.0, 4) == 5 and expected_tokens(0.0, 4) == 1
    with pytest.raises(ValueError):
        expected_tokens(1.5, 2)


def test_round_cost_formula():
    # R = k C_d + c_d + C_t + k c_t; speedup = E C_t / R
    p = predict_from_costs(10.0, 4.0, 1.0, 0.5, alpha=0.5, k=2)
    assert p.round_cost == pytest.approx(2 * 4 + 0.5 + 10 + 2 * 1)
    assert p.speedup == pytest.approx(expected_tokens(0.5, 2) * 10 / p.round_cost)


def test_memory_bound_verification_costs_about_one_step_and_where_drafts_pay():
    config = smollm2_shape()
    fa = Placement.uniform("fa", 30)
    gdn_draft = Placement(["fa" if i % 10 == 0 else "gdn" for i in range(30)])
    big = analytic_costs(config, 8192, 64)
    # k extra tokens of a verification add under 2% of a step at batch 64, context 8192
    assert 4 * token_cost(big, fa, config) / big.cost(fa) < 0.02
    assert predict(big, fa, gdn_draft, 0.88, 4, config=config).speedup > 2.0
    # batch 1, short context: the shared weights dominate both steps and the same draft loses
    small = analytic_costs(config, 256, 1)
    assert predict(small, fa, gdn_draft, 0.88, 4, config=config).speedup < 1.0


def test_choose_draft_picks_the_best_pair_or_none(tmp_path):
    import torch

    from supernet.draft_choice import choose_draft, record_acceptance, recorded_acceptance
    from supernet.model import SupernetForCausalLM
    from tests.helpers.configs import tiny_config

    config = tiny_config(presets={"lin": ["gdn", "kda", "gdn", "kda"], "half": ["fa", "gdn", "fa", "gdn"]})
    torch.manual_seed(0)
    model = SupernetForCausalLM(config).eval()
    best, ranked = choose_draft(model, "all-fa", {"lin": 0.9, "half": 0.95}, batch=64, context=8192)
    assert best is not None and best is ranked[0] and best.speedup == max(r.speedup for r in ranked)
    assert {r.draft for r in ranked} == {"lin", "half"} and {r.k for r in ranked} == set(range(1, 9))
    none, _ = choose_draft(model, "all-fa", {"lin": 0.05}, batch=1, context=16)
    assert none is None
    # acceptances recorded in presets.json come back per target
    path = tmp_path / "presets.json"
    path.write_text(json.dumps({"num_layers": 4, "presets": [{"name": "all-fa", "placement": ["fa"] * 4}]}))
    record_acceptance(path, "all-fa", {"lin": {"alpha": 0.7}}, "test")
    assert recorded_acceptance(path, "all-fa") == {"lin": 0.7}
    assert recorded_acceptance(path, "other") == {}
    with pytest.raises(ValueError, match="no preset named"):
        record_acceptance(path, "nope", {}, "test")
