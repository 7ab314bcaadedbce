"""The cost model of self-speculative decoding (placement/speculative_cost.py) and the draft choice."""
from __future__ import annotations

import json

import numpy as np
import pytest

from supernet.config import SupernetConfig
from supernet.layout import Placement
from supernet.placement.cost import analytic_costs
from supernet.placement.speculative_cost import (
    batch_tokens_per_round,
    expected_rounds,
    expected_rounds_mixed,
    expected_rounds_of_rows,
    expected_tokens,
    predict,
    predict_from_costs,
    token_cost,
    tokens_per_round_distribution,
)


def smollm2_shape() -> SupernetConfig:
    """SmolLM2-135M's shape (30 layers, 9 heads / 3 KV heads of 64), the design's reference model."""
    return SupernetConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, swa_window=4096,
                          tie_word_embeddings=True)


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.88, 4) == pytest.approx((1 - 0.88**5) / 0.12)
    assert expected_tokens(0.88, 4) == pytest.approx(3.94, abs=0.01)  # the issue's "about 3.9 per round"
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

    from supernet.draft_choice import choose_draft, record_acceptance, recorded_acceptance, recorded_row_alphas
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
    record_acceptance(path, "all-fa", {"lin": {"alpha": 0.7, "row_alphas": [0.5, 0.9]}, "half": {"alpha": 0.8}}, "test")
    assert recorded_acceptance(path, "all-fa") == {"lin": 0.7, "half": 0.8}
    assert recorded_acceptance(path, "other") == {}
    assert recorded_row_alphas(path, "all-fa") == {"lin": [0.5, 0.9]}  # "half" recorded none
    # at batch > 1 the slowest row is charged; rows that differ in acceptance cost more rounds still
    at = dict(batch=64, context=8192, ks=[4], table=analytic_costs(model.config, 8192, 64))
    one_alpha, _ = choose_draft(model, "all-fa", {"lin": 0.7}, new_tokens=63, **at)
    spread, _ = choose_draft(model, "all-fa", {"lin": 0.7}, new_tokens=63, row_alphas={"lin": [0.5, 0.9]}, **at)
    per_row = choose_draft(model, "all-fa", {"lin": 0.7}, **at)[1][0]
    assert one_alpha.tokens_per_round == pytest.approx(63 / expected_rounds(0.7, 4, 63, 64))
    assert spread.tokens_per_round == pytest.approx(63 / expected_rounds_mixed([0.5, 0.9], 4, 63, 64))
    assert spread.speedup < one_alpha.speedup < per_row.speedup
    with pytest.raises(ValueError, match="no preset named"):
        record_acceptance(path, "nope", {}, "test")


# -- the slowest row sets the rounds ---------------------------------------------------------------
def _simulated_rounds(alphas: list[float], k: int, n: int, trials: int, seed: int) -> np.ndarray:
    """Monte Carlo of max over rows of R_N: rows gain X ~ tokens_per_round_distribution per round."""
    rng = np.random.default_rng(seed)
    worst = np.zeros(trials)
    for alpha in alphas:
        w = tokens_per_round_distribution(alpha, k)
        gains = rng.choice(len(w), size=(trials, n), p=w)  # X >= 1, so n rounds always suffice
        rounds = np.argmax(np.cumsum(gains, axis=1) >= n, axis=1) + 1
        worst = np.maximum(worst, rounds)
    return worst


@pytest.mark.parametrize("alphas,k,n", [([0.75] * 8, 4, 63), ([0.55] * 64, 2, 40), ([0.9, 0.8, 0.5, 0.7], 3, 50),
                                        ([0.6], 4, 30)])
def test_expected_rounds_matches_monte_carlo(alphas, k, n):
    trials = 8000
    sim = _simulated_rounds(alphas, k, n, trials, seed=len(alphas) * 100 + k)
    exact = expected_rounds_of_rows(alphas, k, n)
    se = sim.std(ddof=1) / np.sqrt(trials)
    # 4 standard errors: a correct formula fails this with probability ~6e-5 (and the seed is fixed)
    assert abs(sim.mean() - exact) <= 4 * se, (sim.mean(), exact, se)
    if len(set(alphas)) == 1:
        assert expected_rounds(alphas[0], k, n, len(alphas)) == pytest.approx(exact, rel=1e-12)


def test_mixed_rows_match_monte_carlo():
    """Rows whose alpha is drawn from measured per-row alphas (prompts differ)."""
    measured, k, n, batch, trials = [0.45, 0.6, 0.8, 0.9], 4, 63, 8, 6000
    rng = np.random.default_rng(7)
    draws = rng.choice(measured, size=(trials, batch))
    worst = np.zeros(trials)
    for alpha in measured:  # simulate every row at every alpha, keep the rows that drew it
        w = tokens_per_round_distribution(alpha, k)
        gains = rng.choice(len(w), size=(trials, batch, n), p=w)
        rounds = np.argmax(np.cumsum(gains, axis=2) >= n, axis=2) + 1
        worst = np.maximum(worst, np.where(draws == alpha, rounds, 0).max(axis=1))
    exact = expected_rounds_mixed(measured, k, n, batch)
    se = worst.std(ddof=1) / np.sqrt(trials)
    assert abs(worst.mean() - exact) <= 4 * se, (worst.mean(), exact, se)
    assert exact > expected_rounds(float(np.mean(measured)), k, n, batch)  # spread costs rounds
    assert expected_rounds_mixed([0.7], k, n, batch) == pytest.approx(expected_rounds(0.7, k, n, batch), rel=1e-12)


def test_expected_rounds_exact_cases_and_bounds():
    assert expected_rounds(1.0, 4, 63, 8) == pytest.approx(13)  # always k + 1 tokens: ceil(63 / 5)
    assert expected_rounds(0.0, 4, 63, 8) == pytest.approx(63)  # always 1 token
    # Wald: E[S_R] = mu E[R] with N <= S_R <= N + k, so N / mu <= E[R] <= (N + k) / mu for one row
    for alpha, k, n in [(0.8, 4, 64), (0.5, 2, 200), (0.95, 8, 1000)]:
        mu = expected_tokens(alpha, k)
        assert n / mu <= expected_rounds(alpha, k, n) <= (n + k) / mu
    # more rows never need fewer rounds; the batch's yield falls below E(k)
    rounds = [expected_rounds(0.75, 4, 63, b) for b in (1, 2, 8, 64)]
    assert rounds == sorted(rounds) and rounds[-1] > rounds[0] + 3
    assert batch_tokens_per_round(0.75, 4, 63, 64) < expected_tokens(0.75, 4)


def test_prediction_charges_the_slowest_row():
    one = predict_from_costs(10.0, 4.0, 1.0, 0.5, alpha=0.8, k=4)
    batch = predict_from_costs(10.0, 4.0, 1.0, 0.5, alpha=0.8, k=4, batch=64, new_tokens=63)
    assert batch.tokens_per_round == pytest.approx(63 / expected_rounds(0.8, 4, 63, 64))
    assert batch.speedup < one.speedup and batch.as_dict()["batch"] == 64
