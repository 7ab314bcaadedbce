"""Batched self-speculative decoding (supernet/speculative.py): lossless, exact rollback, exact sampling.

The model: serving's tiny random supernet with layers 2 and 3 turned down (their mixers' output
projections x 0.35), so a draft that swaps GDN and KDA there is often but not always right: rows
accept different numbers of drafts in a round, which is what these tests need.
"""
from __future__ import annotations

import pytest
import torch

from supernet.cache import SupernetCache
from supernet.generation import greedy_generate, speculative_generate
from supernet.model import SupernetForCausalLM
from supernet.threads import torch_threads
from tests.helpers.checkpoints import random_state_dict
from tests.helpers.configs import vllm_config
from supernet.speculative import _StaticRows, accept_drafts

# every pair has fa, swa, gdn and kda in both the draft and the target
PAIRS = [("fa,swa,kda,gdn", "fa,swa,gdn,kda"), ("swa,fa,gdn,kda", "swa,fa,kda,gdn")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _model(vocab_size: int = 264, turn_down: float = 0.35) -> SupernetForCausalLM:
    config = vllm_config(vocab_size=vocab_size)
    state = random_state_dict(config, seed=1)
    for name in state:
        if name.startswith(("model.layers.2.mixers", "model.layers.3.mixers")) and name.endswith("o_proj.weight"):
            state[name] = state[name] * turn_down
    model = SupernetForCausalLM(config).eval()
    model.load_state_dict(state, strict=False)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("draft,target", PAIRS)
@pytest.mark.parametrize("batch,prompt_len,k", [(1, 12, 3), (8, 12, 3), (8, 5, 1), (8, 5, 5)])
def test_greedy_output_is_the_targets_own(model, draft, target, batch, prompt_len, k):
    """Batch 1 and 8, prompts shorter and longer than the SWA window (8), several k."""
    ids = _prompts(batch, prompt_len)
    want = greedy_generate(model, ids, target, 20)
    got, stats = speculative_generate(model, ids, draft, target, k=k, max_new_tokens=20)
    assert got == want
    assert 0 < stats.accepted < stats.drafted
    if batch > 1:
        assert stats.ragged_rounds > 0  # rows accepted different numbers of drafts in one round


@pytest.mark.parametrize("draft,target", PAIRS)
def test_steps_run_before_decoding_leave_no_trace(model, draft, target):
    """The warm-up/capture steps run before the decode timer (eagerly here) roll back exactly:
    recurrent states return to slot 0, attention keys they wrote are overwritten before being read."""
    ids = _prompts(8, 12, seed=5)
    want = greedy_generate(model, ids, target, 16)
    got, stats = speculative_generate(model, ids, draft, target, k=3, max_new_tokens=16, capture_first=True)
    plain, plain_stats = speculative_generate(model, ids, draft, target, k=3, max_new_tokens=16, capture_first=False)
    assert got == want == plain
    # the draft's states too: the same drafts were proposed and kept, round by round
    assert stats.accepted_per_round == plain_stats.accepted_per_round


def test_rows_stop_at_their_own_end_of_sequence(model):
    ids = _prompts(8, 9, seed=3)
    free = greedy_generate(model, ids, PAIRS[0][1], 24)
    eos = free[0][6]  # a token row 0 emits; other rows stop at it or run to the end
    want = greedy_generate(model, ids, PAIRS[0][1], 24, eos_token_id=eos)
    got, _ = speculative_generate(model, ids, *PAIRS[0], k=4, max_new_tokens=24, eos_token_id=eos)
    assert got == want
    assert len(got[0]) <= 7 and any(len(row) == 24 for row in got)


def _eager_cache(model, placement, ids: torch.Tensor) -> tuple[SupernetCache, torch.Tensor]:
    cache = SupernetCache(model.config.num_hidden_layers)
    logits = model(ids, past_key_values=cache, use_cache=True, placement=placement).logits
    return cache, logits


@torch.no_grad()
@pytest.mark.parametrize("placement", ["fa,swa,gdn,kda", "kda,gdn,swa,fa"])
def test_rollback_equals_recomputation_and_static_steps_equal_eager(model, placement):
    """Feed k+1 tokens per row, keep a different prefix per row, then check against caches that
    read exactly the kept tokens: the GDN/KDA states are equal, and the next static step's logits
    equal ordinary eager decoding (so FA's position rollback and SWA's ring are right too)."""
    k, batch = 4, 4
    p = model.config.resolve(placement)
    ids = _prompts(batch, 10, seed=5)
    cache, _ = _eager_cache(model, p, ids)
    rows = _StaticRows(model, p, cache, capacity=40, lookahead=k + 1, history_slots=k + 2,
                       step_tokens=(k + 1, 1), cuda_graph=False)
    fed = _prompts(batch, k + 1, seed=6)
    step_logits = rows.run(fed, torch.full((batch,), 10), slot=1).clone()
    # every state stays the tensor it was when the steps were built: what CUDA graphs of the
    # different step shapes (sharing these states) rely on
    assert all(cache.states[i][m][key] is t for (i, m, key), t in rows.fixed.items())
    keep = torch.tensor([0, 1, 3, 5])  # history slot: 0 = nothing kept, i = the first i fed tokens kept
    rows.rollback(keep)
    refs = []
    for b in range(batch):
        _, ref_logits = _eager_cache(model, p, torch.cat([ids[b : b + 1], fed[b : b + 1]], 1))
        # the static (k+1)-token step equals eager decoding of the same tokens
        torch.testing.assert_close(step_logits[b], ref_logits[0, 10:], atol=2e-5, rtol=1e-4)
        ref, _ = _eager_cache(model, p, torch.cat([ids[b : b + 1], fed[b : b + 1, : int(keep[b])]], 1))
        refs.append(ref)
        for i, m in enumerate(p):
            if m in ("gdn", "kda"):
                for name in ("recurrent", "conv_q", "conv_k", "conv_v"):
                    torch.testing.assert_close(cache.states[i][m][name][b], ref.states[i][m][name][0],
                                               atol=2e-5, rtol=1e-4)
    probe = _prompts(batch, 1, seed=7)
    next_logits = rows.run(probe, 10 + keep, slot=1)[:, 0]
    for b in range(batch):
        want = model(probe[b : b + 1], past_key_values=refs[b], use_cache=True, placement=p).logits[0, 0]
        torch.testing.assert_close(next_logits[b], want, atol=2e-5, rtol=1e-4)


def _chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test with cells of expected count < 5 pooled into one (the test's validity rule)."""
    from scipy.stats import chi2

    n = counts.sum().item()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    return float(chi2.sf(stat, df=len(exp) - 1))


def test_rejection_step_keeps_the_target_distribution():
    """Fixed p (target) and q (draft) per position over 6 tokens, 40k rounds in one batch: the first
    emitted token follows p_1, the second (when the first draft was kept) p_2, and the bonus p_3."""
    gen = torch.Generator().manual_seed(0)
    vocab, k, rounds = 6, 2, 40_000
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(k, vocab, generator=gen) * 1.5, -1)
    assert (p[:k] - q).abs().sum(-1).min() > 0.4  # the draft is far from the target: the test has power
    drafts = torch.multinomial(q.repeat(rounds, 1), 1, generator=gen).view(rounds, k)
    n, token = accept_drafts(drafts, q.expand(rounds, k, vocab), p.log().expand(rounds, k + 1, vocab),
                             temperature=1.0, generator=gen)
    emitted = torch.cat([drafts, token[:, None]], 1)
    first = torch.where(n > 0, drafts[:, 0], token)
    assert _chi_square_pvalue(torch.bincount(first, minlength=vocab), p[0]) > 1e-3
    kept = n > 0
    second = torch.where(n[kept] > 1, drafts[kept, 1], token[kept])
    assert _chi_square_pvalue(torch.bincount(second, minlength=vocab), p[1]) > 1e-3
    bonus = emitted[n == k, k]
    assert _chi_square_pvalue(torch.bincount(bonus, minlength=vocab), p[2]) > 1e-3
    # and the draft's own samples are rejected by the same test (it can fail)
    assert _chi_square_pvalue(torch.bincount(drafts[:, 0], minlength=vocab), p[0]) < 1e-6


@torch.no_grad()
def test_speculative_sampling_matches_the_targets_joint_distribution():
    """A model with 8 tokens: 4000 rows sample two tokens each through draft-and-verify; their
    joint histogram matches the target's exact p(t1) p(t2 | t1) (chi-square)."""
    model = _model(vocab_size=8, turn_down=1.0)
    draft, target = "fa,swa,kda,gdn", "fa,swa,gdn,kda"
    prompt = torch.tensor([[0, 5, 3, 7, 4]])
    rows = 4000
    got, _ = speculative_generate(model, prompt.expand(rows, -1), draft, target, k=2, max_new_tokens=2,
                                  temperature=1.0, generator=torch.Generator().manual_seed(1))
    pairs = torch.tensor(got)
    counts = torch.bincount(pairs[:, 0] * 8 + pairs[:, 1], minlength=64)
    p1 = torch.softmax(model(prompt, placement=target).logits[0, -1], -1)
    both = torch.cat([prompt.expand(8, -1), torch.arange(8)[:, None]], 1)
    p2 = torch.softmax(model(both, placement=target).logits[:, -1], -1)
    joint = (p1[:, None] * p2).reshape(-1)
    assert _chi_square_pvalue(counts, joint) > 1e-3
    p1_draft = torch.softmax(model(prompt, placement=draft).logits[0, -1], -1)
    assert (p1 - p1_draft).abs().sum() > 0.1  # the draft really differs from the target


def test_bad_draft_settings_are_clear_errors(model):
    ids = _prompts(1, 6)
    with pytest.raises(ValueError, match="must be >= 1"):
        speculative_generate(model, ids, PAIRS[0][0], PAIRS[0][1], k=0)
    with pytest.raises(ValueError, match="equals the target"):
        speculative_generate(model, ids, "fa,swa,gdn,kda", "fa,swa,gdn,kda")
    with pytest.raises(ValueError, match="T >= 2"):
        speculative_generate(model, ids[:, :1], *PAIRS[0])


@pytest.mark.parametrize("per_channel", [False, True])
def test_per_token_states_are_the_states_of_every_prefix(per_channel):
    """The delta rule's kept states (what rollback gathers from) equal running each prefix alone."""
    from supernet.ops.delta_rule import delta_rule_per_token_states, gated_delta_rule, kda_rule
    from supernet.ops.short_conv import tails_after_each_token

    gen = torch.Generator().manual_seed(0)
    B, T, H, HV, K, V = 2, 5, 2, 4 if not per_channel else 2, 8, 8
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = torch.randn(B, T, HV, K, generator=gen) if per_channel else torch.randn(B, T, HV, generator=gen)
    beta = torch.randn(B, T, HV, generator=gen)
    a_log, dt = torch.zeros(HV), torch.zeros(HV * K if per_channel else HV)
    h0 = torch.randn(B, HV, K, V, generator=gen)
    gates = dict(use_qk_l2norm=True, A_log=a_log, dt_bias=dt, beta_logits=True)
    o, states = delta_rule_per_token_states(q, k, v, g, beta, initial_state=h0, **gates)
    rule = kda_rule if per_channel else gated_delta_rule
    for t in range(1, T + 1):
        o_t, s_t = rule(q[:, :t], k[:, :t], v[:, :t], g[:, :t], beta[:, :t], initial_state=h0,
                        output_final_state=True, **gates)
        torch.testing.assert_close(states[:, t - 1], s_t, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(o[:, :t], o_t, atol=1e-5, rtol=1e-5)
    tail, x = torch.randn(B, 6, 3, generator=gen), torch.randn(B, T, 6, generator=gen)
    tails = tails_after_each_token(tail, x)
    full = torch.cat([tail, x.transpose(1, 2)], -1)
    for t in range(T):
        assert torch.equal(tails[:, t], full[..., t + 1 : t + 4])
