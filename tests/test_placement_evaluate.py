"""Placement evaluation: the KL metric, the sampling design, the resumable active-learning campaign."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from supernet.placement.cost import analytic_costs
from supernet.measure.quality import PlacementEvaluator, coarse_kl, full_kl
from supernet.placement.evaluate import run_campaign
from supernet.placement.evaluations import append_evaluation, read_evaluations
from supernet.placement.sampling import initial_design, one_changed, propose_active, random_counts
from supernet.placement.surrogate import fit_surrogate
from supernet.config import SupernetConfig
from supernet.layout import MIXERS, Placement, PlacementError


# -- the metric -----------------------------------------------------------------------------------
def test_coarse_kl_equals_full_kl_when_k_covers_the_vocabulary():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    kl_full, _, agree_full = full_kl(s, t)
    t_lp = torch.log_softmax(t, -1)
    vals, idx = t_lp.topk(11, dim=-1)
    kl, agree = coarse_kl(s, vals, idx, torch.full((2, 5), -60.0))
    torch.testing.assert_close(kl, kl_full, atol=1e-5, rtol=1e-5)
    assert torch.equal(agree, agree_full)


def test_coarse_kl_is_a_lower_bound_and_zero_for_the_teacher():
    torch.manual_seed(1)
    t, s = torch.randn(3, 7, 50), torch.randn(3, 7, 50)
    t_lp = torch.log_softmax(t, -1)
    vals, idx = t_lp.topk(5, dim=-1)
    rest = torch.log1p(-vals.exp().sum(-1))
    kl, _ = coarse_kl(s, vals, idx, rest)
    assert torch.all(kl <= full_kl(s, t)[0] + 1e-5)  # coarsening never increases a KL
    self_kl, agree = coarse_kl(t, vals, idx, rest)
    assert float(self_kl.abs().max()) < 1e-5 and bool(agree.all())


class _Toy:
    """A 'model' whose logits move away from the teacher's as more layers leave fa."""

    def __init__(self, vocab=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(vocab, vocab, generator=g) * 2
        self.noise = {m: torch.randn(vocab, vocab, generator=g) * k for m, k in zip(MIXERS, (0, .3, .6, .9))}

    def __call__(self, ids, placement):
        logits = self.base[ids]
        for m in placement:
            logits = logits + self.noise[m][ids] / len(placement)
        return logits


@pytest.mark.parametrize("top_k", [8, 0])
def test_evaluator_quality_is_one_for_the_teacher_and_orders_placements(top_k):
    toy = _Toy()
    ids = torch.randint(0, 40, (5, 12), generator=torch.Generator().manual_seed(0))
    teacher = lambda b: toy(b, Placement(("fa",) * 4))  # noqa: E731
    ev = PlacementEvaluator(toy, ids, teacher, top_k=top_k, batch_size=2, progress=False)
    rows = {p: ev(Placement.parse(p, 4)) for p in ("all-fa", "fa,fa,fa,kda", "all-kda")}
    assert rows["all-fa"]["quality"] == pytest.approx(1.0) and rows["all-fa"]["top1_agreement"] == 1.0
    assert 1.0 > rows["fa,fa,fa,kda"]["quality"] > rows["all-kda"]["quality"]
    assert rows["all-kda"]["tokens"] == 60 and rows["all-kda"]["metric"].startswith("1-kl/kl_uniform@")
    assert rows["all-kda"]["kl"] > 0 and rows["all-kda"]["kl_uniform"] > rows["all-kda"]["kl"]


# -- the design -----------------------------------------------------------------------------------
def test_initial_design_mixes_all_kinds_without_duplicates():
    rng = np.random.default_rng(0)
    d = initial_design(200, 30, 4, rng)
    kinds = Counter(d.kinds)
    assert len(d) == 200 and len({tuple(r) for r in d.rows}) == 200
    assert kinds["single"] == 4 and kinds["one-changed"] == 60
    assert kinds["stratified"] > 50 and kinds["uniform"] > 50
    # stratified rows cover extreme mixer counts that uniform sampling almost never produces
    strat = np.stack([r for r, k in zip(d.rows, d.kinds) if k == "stratified"])
    fa_counts = (strat == 0).sum(axis=1)
    assert fa_counts.max() >= 20 and fa_counts.min() <= 2
    assert one_changed(5, 4).shape == (15, 5)
    c = random_counts(30, 4, rng)
    assert c.sum() == 30 and np.all(c >= 0)


def test_design_skips_already_measured():
    rng = np.random.default_rng(0)
    first = initial_design(20, 6, 4, rng)
    second = initial_design(20, 6, 4, rng, measured=[tuple(r) for r in first.rows])
    assert not {tuple(r) for r in first.rows} & {tuple(r) for r in second.rows}


def _planted_evaluate(L, seed=0):
    rng = np.random.default_rng(seed)
    h = -np.abs(rng.normal(scale=0.01, size=(L, 4)))
    h[:, 0] = 0

    def evaluate(p: Placement) -> dict:
        r = np.array([MIXERS.index(m) for m in p])
        return {"quality": 1.0 + float(h[np.arange(L), r].sum()), "metric": "planted", "reference": "truth"}

    return evaluate


def test_active_proposals_are_near_the_predicted_frontier():
    L = 10
    evaluate = _planted_evaluate(L)
    rng = np.random.default_rng(1)
    d = initial_design(60, L, 4, rng)
    placements = [Placement(tuple(MIXERS[v] for v in r)) for r in d.rows]
    model = fit_surrogate(placements, [evaluate(p)["quality"] for p in placements], pairs="nn")
    costs = analytic_costs(SupernetConfig(num_hidden_layers=L), 32768, 8)
    prop = propose_active(model, costs, 12, rng, measured=[tuple(r) for r in d.rows])
    assert len(prop) == 12 and set(prop.kinds) == {"active"}
    assert not {tuple(r) for r in prop.rows} & {tuple(r) for r in d.rows}


def test_campaign_is_resumable_and_reaches_n(tmp_path):
    L, out = 8, tmp_path / "ev.jsonl"
    evaluate = _planted_evaluate(L)
    costs = analytic_costs(SupernetConfig(num_hidden_layers=L), 32768, 8)
    assert run_campaign(evaluate, out, 30, L, costs=costs, progress=False, log=lambda s: None) == 30
    assert run_campaign(evaluate, out, 40, L, costs=costs, progress=False, log=lambda s: None) == 10
    assert run_campaign(evaluate, out, 40, L, costs=costs, progress=False, log=lambda s: None) == 0
    ev = read_evaluations(out, L)
    assert len(ev) == 40 and len(ev.measured()) == 40
    kinds = Counter(r["design"] for r in ev.rows)
    assert kinds["active"] >= 10 and kinds["single"] == 4
    # rows measured differently are never mixed into the same file
    with pytest.raises(PlacementError, match="reference"):
        run_campaign(evaluate, out, 50, L, costs=costs, progress=False,
                     probe={"metric": "planted", "reference": "another teacher"})


def test_campaign_without_costs_skips_active_learning(tmp_path):
    out = tmp_path / "ev.jsonl"
    run_campaign(_planted_evaluate(6), out, 25, 6, mixers=("fa", "gdn"), progress=False)
    ev = read_evaluations(out)
    assert len(ev) == 25 and "active" not in {r["design"] for r in ev.rows}
    assert all(set(p) <= {"fa", "gdn"} for p in ev.placements)


# -- evaluations.jsonl ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "no rows"),
        (['{"placement": ["fa", "gdn"], "quality": 0.5}', "{oops"], "line 2 is not valid JSON"),
        (['{"placement": ["fa", "mamba"], "quality": 0.5}'], "unknown mixer 'mamba'"),
        (['{"placement": ["fa", "gdn"], "quality": 0.5}', '{"placement": ["fa"], "quality": 0.5}'],
         "1 layers but line 1 has 2"),
        (['{"placement": ["fa", "gdn"], "quality": NaN}'], "quality is nan"),
        (['{"placement": ["fa", "gdn"], "quality": "high"}'], "must be a number"),
        (['{"placement": ["fa", "gdn"]}'], "needs an object with 'placement' and 'quality'"),
    ],
)
def test_bad_evaluation_files(tmp_path, lines, message):
    path = tmp_path / "ev.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(PlacementError, match=message):
        read_evaluations(path)


def test_append_repairs_a_missing_final_newline(tmp_path):
    path = tmp_path / "ev.jsonl"
    path.write_text('{"placement": ["fa"], "quality": 1.0}')  # cut short after the last row
    append_evaluation(path, {"placement": ["gdn"], "quality": 0.5})
    assert [json.loads(x)["quality"] for x in path.read_text().splitlines()] == [1.0, 0.5]


# -- the real model -------------------------------------------------------------------------------
def test_evaluator_on_a_tiny_supernet():
    from tests.helpers.configs import tiny_config

    try:
        from supernet.model import SupernetForCausalLM

        torch.manual_seed(0)
        model = SupernetForCausalLM(tiny_config(num_hidden_layers=3)).eval()
    except (ImportError, NotImplementedError) as exc:
        pytest.skip(f"the supernet model cannot be built yet ({exc})")
    ids = torch.randint(0, model.config.vocab_size, (4, 10), generator=torch.Generator().manual_seed(0))

    def student(batch, placement):
        return model(input_ids=batch, placement=placement, use_cache=False).logits

    all_fa = Placement.uniform("fa", 3)
    exact = PlacementEvaluator(student, ids, lambda b: student(b, all_fa), top_k=0, batch_size=3, progress=False)
    full_k = PlacementEvaluator(student, ids, lambda b: student(b, all_fa), top_k=model.config.vocab_size,
                                batch_size=3, progress=False)
    assert exact(all_fa)["quality"] == pytest.approx(1.0)
    for p in ("gdn,fa,kda", "all-swa"):
        a, b = exact(Placement.parse(p, 3)), full_k(Placement.parse(p, 3))
        assert a["quality"] < 1.0
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-7)  # top-k = vocabulary -> exact KL
